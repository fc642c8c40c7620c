// Package profile owns image profiles (format: docs/profiles.md): the model a station.yaml profiles: entry or a
// built-in parses into, its validation, the built-in profiles and their templates (embedded), and rendering a profile
// for one unit into a Plan of files and JSON merges. It also owns the TPM OpenSSL forms (tpm_openssl:) and the choice
// of a form from a dpkg status file's contents. It opens no image and reads no station files itself: package station
// resolves partitions on an image, reads the image's package database, and supplies template files (Templates).
package profile

import (
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/goccy/go-yaml"
)

//go:embed profiles
var builtinProfiles embed.FS

// Profile maps what the station produces to files in a unit's image (format: docs/profiles.md).
type Profile struct {
	// Base names a built-in profile this one starts from: its partitions and vars are overridden key by key, its files
	// and json_merge entries come first, then this profile's.
	Base       string                   `yaml:"base"`
	Partitions map[string]PartitionSpec `yaml:"partitions"`
	Vars       map[string]string        `yaml:"vars"`
	Files      []FileSpec               `yaml:"files"`
	JSONMerge  []MergeSpec              `yaml:"json_merge"`
	// TPMOpenSSL: how the device's client loads a TSS2 key (OpenSSLForms): "auto" (the default: chosen from the
	// tpm2-openssl version in the image's /var/lib/dpkg/status when the image is written), "provider" (tpm2-openssl
	// >= 1.2, kernel resource manager), "provider-abrmd" (tpm2-openssl 1.1: tpm2-abrmd and default_properties),
	// "engine" (OpenSSL 1.1 tpm2tss engine) or "none". Selects the entries marked when: tpm-provider / tpm-engine;
	// templates see the form as .TPMOpenSSL.
	TPMOpenSSL string `yaml:"tpm_openssl"`
}

// PartitionSpec says which partitions a logical name means and where the device mounts them.
type PartitionSpec struct {
	Select string `yaml:"select"` // "4", "2,3", "name=data", "label=rootfsa"
	Mount  string `yaml:"mount"`  // absolute device path of the mount point
}

// FileSpec writes one file.
type FileSpec struct {
	To    string `yaml:"to"`    // "partition:/path"
	From  string `yaml:"from"`  // cert, cert+chain, chain, root, server_ca, key, ak_cert, ak_key, template:<file>, builtin:<name>
	Mode  string `yaml:"mode"`  // octal; default 0644, and 0600 for key
	Owner string `yaml:"owner"` // "uid:gid" numbers; default 0:0
	When  string `yaml:"when"`  // "", tpm, soft, tpm-provider, tpm-engine
	Name  string `yaml:"name"`  // key in .Paths; default derived from from
	// AllowUnprotectedKey lets a from: key file go to a file system without modes or owners (FAT), where anyone who
	// mounts the partition reads it. Refused unless set: say so only when the device protects that partition otherwise.
	AllowUnprotectedKey bool `yaml:"allow_unprotected_key"`
}

// MergeSpec merges keys into an existing JSON file.
type MergeSpec struct {
	To     string         `yaml:"to"`
	Set    map[string]any `yaml:"set"` // string values are templates (.Paths, .Serial, ...)
	When   string         `yaml:"when"`
	Create bool           `yaml:"create"` // create the file when missing (default: missing is an error)
}

// ErrProfile: a profile is malformed or refers to something that does not exist.
var ErrProfile = errors.New("invalid profile")

// Key kinds a unit's Material names: a TPM-resident key or a software key (the strings package tpm uses).
const (
	KeyTPM  = "tpm"
	KeySoft = "soft"
)

// BuiltinNames lists the built-in profiles.
func BuiltinNames() []string { return []string{"edge", "mender", "mqtt"} }

func builtinProfile(name string) (*Profile, error) {
	data, err := builtinProfiles.ReadFile("profiles/" + name + ".yaml")
	if err != nil {
		return nil, fmt.Errorf("no built-in profile %q (built-in: %s): %w", name, strings.Join(BuiltinNames(), ", "), ErrProfile)
	}
	var p Profile
	if err := yaml.UnmarshalWithOptions(data, &p, yaml.DisallowUnknownField()); err != nil {
		return nil, fmt.Errorf("built-in profile %s: %v: %w", name, err, ErrProfile)
	}
	return &p, nil
}

// Resolve finds a profile by name: one of own (station.yaml profiles:, applied over its base) or a built-in, and
// validates it. Errors wrap ErrProfile.
func Resolve(name string, own map[string]Profile) (*Profile, error) {
	mine, ok := own[name]
	if !ok {
		p, err := builtinProfile(name)
		if err != nil {
			return nil, err
		}
		return p, p.validate(name)
	}
	p := mine
	if mine.Base != "" {
		b, err := builtinProfile(mine.Base)
		if err != nil {
			return nil, fmt.Errorf("profile %s: base: %w", name, err)
		}
		p = *b
		p.Partitions = maps.Clone(b.Partitions)
		maps.Copy(p.Partitions, mine.Partitions)
		p.Vars = maps.Clone(b.Vars)
		if p.Vars == nil {
			p.Vars = map[string]string{}
		}
		maps.Copy(p.Vars, mine.Vars)
		p.Files = append(slices.Clone(b.Files), mine.Files...)
		p.JSONMerge = append(slices.Clone(b.JSONMerge), mine.JSONMerge...)
		if mine.TPMOpenSSL != "" {
			p.TPMOpenSSL = mine.TPMOpenSSL
		}
	}
	return &p, p.validate(name)
}

var partNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)

// SplitTarget splits "partition:/path".
func SplitTarget(to string) (part, p string, err error) {
	part, p, ok := strings.Cut(to, ":")
	if !ok || !partNameRE.MatchString(part) || !strings.HasPrefix(p, "/") || path.Clean(p) != p || p == "/" {
		return "", "", fmt.Errorf("target %q is not partition:/absolute/clean/path", to)
	}
	return part, p, nil
}

func (p *Profile) validate(name string) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("profile %s: %s: %w", name, fmt.Sprintf(format, args...), ErrProfile)
	}
	if len(p.Partitions) == 0 {
		return bad("no partitions")
	}
	for k, ps := range p.Partitions {
		if !partNameRE.MatchString(k) {
			return bad("partition name %q: lowercase letters, digits and '_'", k)
		}
		if _, err := ParseSelect(ps.Select); err != nil {
			return bad("partition %s: %v", k, err)
		}
		if !strings.HasPrefix(ps.Mount, "/") || path.Clean(ps.Mount) != ps.Mount {
			return bad("partition %s: mount %q is not an absolute clean path", k, ps.Mount)
		}
	}
	if !slices.Contains(OpenSSLForms, p.TPMOpenSSL) && p.TPMOpenSSL != "" {
		return bad("tpm_openssl %q: use %s", p.TPMOpenSSL, strings.Join(OpenSSLForms, ", "))
	}
	names := map[string]bool{}
	for i, f := range p.Files {
		part, _, err := SplitTarget(f.To)
		if err != nil {
			return bad("files[%d]: %v", i, err)
		}
		if _, ok := p.Partitions[part]; !ok {
			return bad("files[%d]: partition %q is not defined", i, part)
		}
		if err := checkFrom(f.From); err != nil {
			return bad("files[%d]: %v", i, err)
		}
		if f.AllowUnprotectedKey && !IsKey(f.From) {
			return bad("files[%d]: allow_unprotected_key applies to from: key or ak_key only", i)
		}
		if _, err := parseMode(f.Mode, f.From); err != nil {
			return bad("files[%d]: %v", i, err)
		}
		if _, _, err := parseOwner(f.Owner); err != nil {
			return bad("files[%d]: %v", i, err)
		}
		if err := checkWhen(f.When); err != nil {
			return bad("files[%d]: %v", i, err)
		}
		if f.Name != "" {
			if names[f.Name] {
				return bad("files[%d]: name %q used twice", i, f.Name)
			}
			names[f.Name] = true
		}
	}
	for i, m := range p.JSONMerge {
		part, _, err := SplitTarget(m.To)
		if err != nil {
			return bad("json_merge[%d]: %v", i, err)
		}
		if _, ok := p.Partitions[part]; !ok {
			return bad("json_merge[%d]: partition %q is not defined", i, part)
		}
		if len(m.Set) == 0 {
			return bad("json_merge[%d]: nothing to set", i)
		}
		if err := checkWhen(m.When); err != nil {
			return bad("json_merge[%d]: %v", i, err)
		}
	}
	return nil
}

// ParseSelect splits a partition selector list: numbers, name=…, label=…, type=….
func ParseSelect(sel string) ([]string, error) {
	if strings.TrimSpace(sel) == "" {
		return nil, errors.New("empty select")
	}
	var out []string
	for _, s := range strings.Split(sel, ",") {
		s = strings.TrimSpace(s)
		k, v, hasEq := strings.Cut(s, "=")
		switch {
		case !hasEq:
			if n, err := strconv.Atoi(s); err != nil || n < 1 || n > 128 {
				return nil, fmt.Errorf("select %q: a partition number 1-128, name=…, label=… or type=…", s)
			}
		case (k == "name" || k == "label" || k == "type") && v != "":
		default:
			return nil, fmt.Errorf("select %q: a partition number 1-128, name=…, label=… or type=…", s)
		}
		out = append(out, s)
	}
	return out, nil
}

func checkFrom(from string) error {
	switch from {
	case "cert", "cert+chain", "chain", "root", "server_ca", "key", "ak_cert", "ak_key":
		return nil
	}
	if name, ok := strings.CutPrefix(from, "builtin:"); ok {
		if _, err := fs.Stat(builtinProfiles, "profiles/"+name); err != nil || strings.HasSuffix(name, ".yaml") {
			return fmt.Errorf("from %q: no such built-in template", from)
		}
		return nil
	}
	if f, ok := strings.CutPrefix(from, "template:"); ok && f != "" {
		// The station directory itself is known only when the profile is applied (Layout.StationFile checks symlinks
		// and CA keys then); what can be refused from the text alone is refused here, when station.yaml is loaded.
		if why := OutsideDir(f); why != "" {
			return fmt.Errorf("from %q: %s: template files must be relative paths inside the station directory", from, why)
		}
		return nil
	}
	return fmt.Errorf("from %q: use cert, cert+chain, chain, root, server_ca, key, ak_cert, ak_key, template:<file> or builtin:<name>", from)
}

// IsKey reports whether a from: source is a private key file (the unit's key, or its attestation key): written 0600 by
// default, never readable by group or others, never on FAT unless allowed.
func IsKey(from string) bool { return from == "key" || from == "ak_key" }

// UsesAK reports whether the profile writes the unit's attestation key or its certificate (from: ak_cert, ak_key): the
// attest step then keeps the AK and the station certifies it.
func (p *Profile) UsesAK() bool {
	for _, f := range p.Files {
		if f.From == "ak_cert" || f.From == "ak_key" {
			return true
		}
	}
	return false
}

func checkWhen(w string) error {
	switch w {
	case "", "tpm", "soft", "tpm-provider", "tpm-engine":
		return nil
	}
	return fmt.Errorf("when %q: use tpm, soft, tpm-provider or tpm-engine", w)
}

func parseMode(m, from string) (fs.FileMode, error) {
	if m == "" {
		if IsKey(from) {
			return 0o600, nil
		}
		return 0o644, nil
	}
	n, err := strconv.ParseUint(m, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("mode %q is not an octal permission like \"0644\"", m)
	}
	if IsKey(from) && n&0o077 != 0 {
		return 0, fmt.Errorf("mode %q would let others read the private key: use 0600 or 0400", m)
	}
	return fs.FileMode(n), nil
}

func parseOwner(o string) (int, int, error) {
	if o == "" {
		return 0, 0, nil
	}
	u, g, ok := strings.Cut(o, ":")
	uid, err1 := strconv.Atoi(u)
	gid, err2 := strconv.Atoi(g)
	if !ok || err1 != nil || err2 != nil || uid < 0 || gid < 0 {
		return 0, 0, fmt.Errorf("owner %q is not numeric uid:gid", o)
	}
	return uid, gid, nil
}

// OutsideDir says why a relative file name cannot be inside the directory it is relative to ("" when it can be):
// an absolute path, or one that climbs out with "..". The text alone decides; symlinks are the reader's to check.
func OutsideDir(name string) string {
	clean := filepath.Clean(name)
	switch {
	case filepath.IsAbs(name):
		return "absolute path"
	case clean == ".." || strings.HasPrefix(clean, "../"):
		return "climbs out with .."
	}
	return ""
}
