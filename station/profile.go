package station

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/template"

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
	From  string `yaml:"from"`  // cert, cert+chain, chain, root, server_ca, key, template:<file>, builtin:<name>
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

// Material is what a unit contributes to its image.
type Material struct {
	Serial   string
	Fields   map[string]string
	KeyKind  string // "tpm" or "soft"
	Cert     []byte // leaf PEM
	Issuing  []byte // issuing CA PEM
	Root     []byte // root CA PEM
	ServerCA []byte // the CA devices trust for the fleet's servers
	Key      []byte // TSS2 PRIVATE KEY or PKCS#8 PEM
}

// PlannedFile is one file to write in every partition its logical name selects.
type PlannedFile struct {
	Part       string // logical partition name
	Path       string // inside the file system
	DevicePath string // as the device sees it
	Data       []byte
	Mode       fs.FileMode
	UID, GID   int
	From       string
	// AllowUnprotected: the profile allows this key file on a file system without modes (allow_unprotected_key).
	AllowUnprotected bool
}

// PlannedMerge is one JSON merge.
type PlannedMerge struct {
	Part   string
	Path   string
	Set    map[string]any
	Create bool
}

// Plan is a profile applied to one unit.
type Plan struct {
	Profile    string
	Partitions map[string]PartitionSpec
	Files      []PlannedFile
	Merges     []PlannedMerge
	Paths      map[string]string // name -> device path
	// OpenSSL is the form of the TPM OpenSSL configuration the plan writes and why (zero for software keys and
	// profiles that write none). For tpm_openssl auto the form is provisional until Inject (or VerifyImage) reads the
	// image's package database, settles it and re-renders the plan in place.
	OpenSSL OpenSSLChoice

	replan func(OpenSSLChoice) (*Plan, error)
}

// ErrProfile: a profile is malformed or refers to something that does not exist.
var ErrProfile = errors.New("invalid profile")

// BuiltinProfileNames lists the built-in profiles.
func BuiltinProfileNames() []string { return []string{"edge", "mender", "mqtt"} }

func builtinProfile(name string) (*Profile, error) {
	data, err := builtinProfiles.ReadFile("profiles/" + name + ".yaml")
	if err != nil {
		return nil, fmt.Errorf("no built-in profile %q (built-in: %s): %w", name, strings.Join(BuiltinProfileNames(), ", "), ErrProfile)
	}
	var p Profile
	if err := yaml.UnmarshalWithOptions(data, &p, yaml.DisallowUnknownField()); err != nil {
		return nil, fmt.Errorf("built-in profile %s: %v: %w", name, err, ErrProfile)
	}
	return &p, nil
}

// ResolveProfile finds a profile by name: the station's own (station.yaml profiles:, applied over its base) or a built-in.
func (c *Config) ResolveProfile(name string) (*Profile, error) {
	if name == "" {
		name = c.Profile
	}
	own, ok := c.Profiles[name]
	if !ok {
		p, err := builtinProfile(name)
		if err != nil {
			return nil, err
		}
		return p, p.validate(name)
	}
	p := own
	if own.Base != "" {
		b, err := builtinProfile(own.Base)
		if err != nil {
			return nil, fmt.Errorf("profile %s: base: %w", name, err)
		}
		p = *b
		p.Partitions = maps.Clone(b.Partitions)
		maps.Copy(p.Partitions, own.Partitions)
		p.Vars = maps.Clone(b.Vars)
		if p.Vars == nil {
			p.Vars = map[string]string{}
		}
		maps.Copy(p.Vars, own.Vars)
		p.Files = append(slices.Clone(b.Files), own.Files...)
		p.JSONMerge = append(slices.Clone(b.JSONMerge), own.JSONMerge...)
		if own.TPMOpenSSL != "" {
			p.TPMOpenSSL = own.TPMOpenSSL
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
		if f.AllowUnprotectedKey && f.From != "key" {
			return bad("files[%d]: allow_unprotected_key applies to from: key only", i)
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
	case "cert", "cert+chain", "chain", "root", "server_ca", "key":
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
		if why := outsideStation(f); why != "" {
			return fmt.Errorf("from %q: %s: template files must be relative paths inside the station directory", from, why)
		}
		return nil
	}
	return fmt.Errorf("from %q: use cert, cert+chain, chain, root, server_ca, key, template:<file> or builtin:<name>", from)
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
		if from == "key" {
			return 0o600, nil
		}
		return 0o644, nil
	}
	n, err := strconv.ParseUint(m, 8, 32)
	if err != nil || n > 0o777 {
		return 0, fmt.Errorf("mode %q is not an octal permission like \"0644\"", m)
	}
	if from == "key" && n&0o077 != 0 {
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

func fileName(f FileSpec) string {
	if f.Name != "" {
		return f.Name
	}
	return strings.NewReplacer("+", "_", ":", "_", ".", "_", "-", "_", "/", "_").Replace(f.From)
}

func applies(when, form, keyKind string) bool {
	switch when {
	case "":
		return true
	case "tpm", "soft":
		return when == keyKind
	case "tpm-provider":
		return keyKind == "tpm" && (form == OpenSSLProvider || form == OpenSSLProviderABRMD)
	case "tpm-engine":
		return keyKind == "tpm" && form == OpenSSLEngine
	}
	return false
}

// Plan renders the profile for one unit. stationDir resolves template:<file> paths (inside the station directory
// only: Layout.StationFile). For a TPM key and tpm_openssl auto (the default) the OpenSSL form is provisional
// (provider, Plan.OpenSSL.Auto set) until Inject or VerifyImage reads the image's package database.
func (p *Profile) Plan(name, stationDir string, m Material) (*Plan, error) {
	choice := OpenSSLChoice{}
	if m.KeyKind == "tpm" {
		choice = forcedOpenSSL(name, p.TPMOpenSSL)
	}
	plan, err := p.plan(name, stationDir, m, choice)
	if err != nil {
		return nil, err
	}
	if choice.Auto {
		plan.replan = func(c OpenSSLChoice) (*Plan, error) { return p.plan(name, stationDir, m, c) }
	}
	return plan, nil
}

func (p *Profile) plan(name, stationDir string, m Material, choice OpenSSLChoice) (*Plan, error) {
	plan := &Plan{Profile: name, Partitions: p.Partitions, Paths: map[string]string{}, OpenSSL: choice}
	form := choice.Form
	var files []FileSpec
	for _, f := range p.Files {
		if applies(f.When, form, m.KeyKind) {
			files = append(files, f)
			part, fp, _ := SplitTarget(f.To)
			plan.Paths[fileName(f)] = path.Join(p.Partitions[part].Mount, fp)
		}
	}
	data := templateData{Serial: m.Serial, Fields: m.Fields, Paths: plan.Paths, Vars: p.Vars, KeyKind: m.KeyKind, TPMOpenSSL: form}
	for _, f := range files {
		part, fp, _ := SplitTarget(f.To)
		mode, _ := parseMode(f.Mode, f.From)
		uid, gid, _ := parseOwner(f.Owner)
		content, err := p.content(f.From, stationDir, m, data)
		if err != nil {
			return nil, fmt.Errorf("profile %s: %s: %w", name, f.To, err)
		}
		plan.Files = append(plan.Files, PlannedFile{Part: part, Path: fp, DevicePath: path.Join(p.Partitions[part].Mount, fp), Data: content,
			Mode: mode, UID: uid, GID: gid, From: f.From, AllowUnprotected: f.AllowUnprotectedKey})
	}
	for _, mg := range p.JSONMerge {
		if !applies(mg.When, form, m.KeyKind) {
			continue
		}
		part, fp, _ := SplitTarget(mg.To)
		set, err := renderValues(mg.Set, data)
		if err != nil {
			return nil, fmt.Errorf("profile %s: json_merge %s: %w", name, mg.To, err)
		}
		plan.Merges = append(plan.Merges, PlannedMerge{Part: part, Path: fp, Set: set.(map[string]any), Create: mg.Create})
	}
	return plan, nil
}

type templateData struct {
	Serial  string
	Fields  map[string]string
	Paths   map[string]string
	Vars    map[string]string
	KeyKind string
	// TPMOpenSSL is the OpenSSL form for a TPM key (provider, provider-abrmd, engine, none); "" for a software key.
	TPMOpenSSL string
}

var templateFuncs = template.FuncMap{
	"json": func(v any) (string, error) {
		b, err := json.Marshal(v)
		return string(b), err
	},
}

func render(name, text string, data templateData) ([]byte, error) {
	t, err := template.New(name).Option("missingkey=error").Funcs(templateFuncs).Parse(text)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, data); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (p *Profile) content(from, stationDir string, m Material, data templateData) ([]byte, error) {
	switch from {
	case "cert":
		return m.Cert, nil
	case "cert+chain":
		return concat(m.Cert, m.Issuing), nil
	case "chain":
		return concat(m.Issuing, m.Root), nil
	case "root":
		return m.Root, nil
	case "server_ca":
		return m.ServerCA, nil
	case "key":
		return m.Key, nil
	}
	var text []byte
	var err error
	if name, ok := strings.CutPrefix(from, "builtin:"); ok {
		text, err = builtinProfiles.ReadFile("profiles/" + name)
	} else {
		text, err = readStationSource(Layout{Dir: stationDir}, "template", strings.TrimPrefix(from, "template:"))
		if err != nil {
			return nil, err
		}
	}
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	out, err := render(from, string(text), data)
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	if strings.HasSuffix(from, ".json") && !json.Valid(out) {
		return nil, fmt.Errorf("template %s did not render valid JSON", from)
	}
	return out, nil
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
		if len(p) > 0 && p[len(p)-1] != '\n' {
			out = append(out, '\n')
		}
	}
	return out
}

// renderValues renders every string in a YAML value as a template.
func renderValues(v any, data templateData) (any, error) {
	switch x := v.(type) {
	case string:
		if !strings.Contains(x, "{{") {
			return x, nil
		}
		b, err := render("value", x, data)
		return string(b), err
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			r, err := renderValues(e, data)
			if err != nil {
				return nil, err
			}
			out[k] = r
		}
		return out, nil
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			r, err := renderValues(e, data)
			if err != nil {
				return nil, err
			}
			out[i] = r
		}
		return out, nil
	}
	return v, nil
}

// MergeJSON sets keys into a JSON object, recursively for objects, keeping every other key as it was.
// The result is indented with two spaces, as mender.conf usually is.
func MergeJSON(orig []byte, set map[string]any) ([]byte, error) {
	var doc map[string]any
	if len(bytes.TrimSpace(orig)) == 0 {
		doc = map[string]any{}
	} else {
		dec := json.NewDecoder(bytes.NewReader(orig))
		dec.UseNumber()
		if err := dec.Decode(&doc); err != nil {
			return nil, fmt.Errorf("not a JSON object: %w", err)
		}
		if dec.More() {
			return nil, errors.New("not a JSON object: trailing data")
		}
		if doc == nil {
			return nil, errors.New("not a JSON object: null")
		}
	}
	mergeInto(doc, set)
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}

func mergeInto(dst, src map[string]any) {
	for k, v := range src {
		if sv, ok := v.(map[string]any); ok {
			if dv, ok := dst[k].(map[string]any); ok {
				mergeInto(dv, sv)
				continue
			}
		}
		dst[k] = v
	}
}
