package station

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"provision/image"
	"provision/station/ca"
	"provision/station/profile"
	"provision/tpm"
)

// ErrImage: the image cannot be written or does not verify.
var ErrImage = errors.New("image")

// imageError marks an error as ErrImage without repeating what the image package already says (its messages name
// the image).
type imageError struct{ err error }

func (e imageError) Error() string        { return e.err.Error() }
func (e imageError) Unwrap() error        { return e.err }
func (e imageError) Is(target error) bool { return target == ErrImage }

func imageErr(err error) error { return imageError{err} }

// resolvedPart is a logical partition of a profile resolved in one image.
type resolvedPart struct {
	spec  profile.PartitionSpec
	parts []image.Partition
}

func resolvePartitions(im *image.Image, plan *profile.Plan) (map[string]resolvedPart, error) {
	out := map[string]resolvedPart{}
	used := map[string]bool{}
	for _, f := range plan.Files {
		used[f.Part] = true
	}
	for _, m := range plan.Merges {
		used[m.Part] = true
	}
	names := make([]string, 0, len(used))
	for n := range used {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		spec := plan.Partitions[name]
		sels, err := profile.ParseSelect(spec.Select)
		if err != nil {
			return nil, err
		}
		rp := resolvedPart{spec: spec}
		for _, sel := range sels {
			p, err := im.Select(sel)
			if err != nil {
				return nil, fmt.Errorf("profile %s: partition %s (select %q): %w", plan.Profile, name, sel, err)
			}
			rp.parts = append(rp.parts, p)
		}
		out[name] = rp
	}
	return out, nil
}

// Inject writes a plan into the image at imagePath: every target is checked before the first byte is written (the image
// package refuses damaged tables, unsupported or unclean file systems and missing space in any target; a key file aimed
// at FAT is refused unless the profile allows it), files are read back and compared, and the image is synced before
// Inject returns. A plan whose TPM OpenSSL form is still provisional (tpm_openssl auto) is settled first from the
// image's package database and re-rendered in place: plan.OpenSSL then says which form was written and why.
func Inject(ctx context.Context, imagePath string, plan *profile.Plan, opts ...image.OpenOption) error {
	im, err := image.Open(ctx, imagePath, opts...)
	if err != nil {
		return imageErr(err)
	}
	defer im.Close()
	parts, err := preparePlan(ctx, im, plan)
	if err != nil {
		return imageErr(err)
	}
	var writes []image.Write
	for _, f := range plan.Files {
		for _, p := range parts[f.Part].parts {
			writes = append(writes, image.Write{Partition: p, Path: f.Path, Data: f.Data, Mode: f.Mode, UID: f.UID, GID: f.GID})
		}
	}
	merged, err := plannedMerges(ctx, im, parts, plan)
	if err != nil {
		return imageErr(err)
	}
	writes = append(writes, merged...)
	// Apply commits synced: the new blocks are on stable storage before the undo journal goes (no second sync).
	if err := im.Apply(ctx, writes); err != nil {
		return imageErr(err)
	}
	if err := im.Close(); err != nil {
		return imageErr(fmt.Errorf("image %s: close: %w", imagePath, err))
	}
	return nil
}

// plannedMerges reads each JSON merge target, applies every merge aimed at it in order, and returns the writes.
func plannedMerges(ctx context.Context, im *image.Image, parts map[string]resolvedPart, plan *profile.Plan) ([]image.Write, error) {
	type target struct {
		part image.Partition
		path string
	}
	var order []target
	docs := map[target][]byte{}
	modes := map[target]image.FileInfo{}
	for _, m := range plan.Merges {
		for _, p := range parts[m.Part].parts {
			t := target{p, m.Path}
			cur, seen := docs[t]
			if !seen {
				fsys, err := im.FS(ctx, p)
				if err != nil {
					return nil, fmt.Errorf("partition %d: %w", p.Number, err)
				}
				cur, err = fsys.ReadFile(m.Path)
				info := image.FileInfo{Mode: 0o644}
				if err == nil {
					info, err = fsys.Stat(m.Path)
				}
				fsys.Close()
				switch {
				case errors.Is(err, fs.ErrNotExist) && m.Create:
					cur = nil
				case errors.Is(err, fs.ErrNotExist):
					return nil, fmt.Errorf("partition %d: %s is missing: the profile merges into it (is this the right image and profile?)", p.Number, m.Path)
				case err != nil:
					return nil, fmt.Errorf("partition %d: read %s: %w", p.Number, m.Path, err)
				}
				order = append(order, t)
				modes[t] = info
			}
			out, err := profile.MergeJSON(cur, m.Set)
			if err != nil {
				return nil, fmt.Errorf("partition %d: %s: %w", p.Number, m.Path, err)
			}
			docs[t] = out
		}
	}
	var writes []image.Write
	for _, t := range order {
		info := modes[t]
		writes = append(writes, image.Write{Partition: t.part, Path: t.path, Data: docs[t], Mode: info.Mode.Perm(), UID: info.UID, GID: info.GID})
	}
	return writes, nil
}

// Check is one line of the verification checklist.
type Check struct {
	Name   string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// VerifyOptions configure VerifyImage.
type VerifyOptions struct {
	Profile string    // default: station.yaml profile
	Now     time.Time // default: now
}

// VerifyImage reads a unit's identity back from its image and checks it: every file present with the expected mode and
// owner (identical in every partition it is written to); the certificate's CN and SAN name the serial, it is valid now,
// chains to the station CA for client authentication and is the unit's active certificate in the inventory; the key
// matches the certificate; the CA files are the station's; JSON configs parse and point at the written paths.
// The checks are returned in order; err wraps ErrImage when a check failed or the image cannot be read.
func (s *Station) VerifyImage(ctx context.Context, imagePath, serial string, opt VerifyOptions) ([]Check, error) {
	if opt.Now.IsZero() {
		opt.Now = time.Now()
	}
	prof, err := s.Config.ResolveProfile(opt.Profile)
	if err != nil {
		return nil, err
	}
	name := opt.Profile
	if name == "" {
		name = s.Config.Profile
	}
	im, err := image.Open(ctx, imagePath, append(s.ImageOptions(imagePath), image.ReadOnly())...)
	if err != nil {
		return nil, imageErr(err)
	}
	defer im.Close()
	v := &verifier{s: s, im: im, ctx: ctx, serial: serial, now: opt.Now}
	// The key file says which kind of key the unit has, and so which files the profile writes.
	kind := tpm.KindSoft
	// The unit's own fields (batch CSV columns), as the run that wrote the image rendered its templates with them.
	var fields map[string]string
	if u, err := s.Inv.Unit(ctx, serial); err == nil {
		fields = u.Fields
	}
	probe, err := prof.Plan(name, s.Layout, profile.Material{Serial: serial, Fields: fields, KeyKind: tpm.KindSoft})
	if err != nil {
		return nil, err
	}
	parts, err := resolvePartitions(im, probe)
	if err != nil {
		return nil, imageErr(err)
	}
	for _, f := range probe.Files {
		if f.From == "key" {
			if b, err := v.read(parts[f.Part].parts[0], f.Path); err == nil && bytes.Contains(b, []byte("TSS2 PRIVATE KEY")) {
				kind = tpm.KindTPM
			}
			break
		}
	}
	root, issuing := ca.EncodeCerts(s.CA.Root), ca.EncodeCerts(s.CA.Issuing)
	serverCA, err := s.ServerCA()
	if err != nil {
		return nil, err
	}
	plan, err := prof.Plan(name, s.Layout, profile.Material{Serial: serial, Fields: fields, KeyKind: kind, Root: root, Issuing: issuing,
		ServerCA: serverCA})
	if err != nil {
		return nil, err
	}
	if err := settleOpenSSL(ctx, im, plan); err != nil {
		v.fail("TPM OpenSSL configuration", err.Error())
	} else if plan.OpenSSL.Form != "" {
		v.check("TPM OpenSSL configuration: "+plan.OpenSSL.String(), true, "")
	}
	if parts, err = resolvePartitions(im, plan); err != nil {
		return nil, imageErr(err)
	}
	var cert *x509.Certificate
	var keyPEM []byte
	for _, f := range plan.Files {
		var first []byte
		for i, p := range parts[f.Part].parts {
			data, ok := v.file(p, f)
			if !ok {
				continue
			}
			if i == 0 {
				first = data
			} else if !bytes.Equal(first, data) {
				v.fail(f.DevicePath+" identical in every partition", fmt.Sprintf("partition %d differs from partition %d", p.Number, parts[f.Part].parts[0].Number))
			}
		}
		if first == nil {
			continue
		}
		switch f.From {
		case "cert", "cert+chain":
			if cert == nil {
				cert = v.certificate(f.DevicePath, first, f.From == "cert+chain")
			}
		case "key":
			keyPEM = first
		case "root", "server_ca", "chain":
			v.check(f.DevicePath+" is the station's "+f.From, bytes.Equal(first, f.Data), "content differs from the station's")
		case "ak_cert":
			v.akCertificate(f.DevicePath, first, s.CA.Issuing)
		case "ak_key":
			v.check(f.DevicePath+" is a TSS2 key file (the attestation key)", pemType(first) == "TSS2 PRIVATE KEY", "found "+orNone(pemType(first)))
		default:
			v.template(f, first)
		}
	}
	if cert != nil && keyPEM != nil {
		pub, err := tpm.PublicFromPEM(keyPEM)
		switch {
		case err != nil:
			v.fail("key matches certificate", "key file: "+err.Error())
		default:
			v.check("key matches certificate ("+kind+" key)", publicEqual(pub, cert.PublicKey), "the key's public part is not the certificate's")
		}
	}
	v.merges(parts, plan)
	var failed []string
	for _, c := range v.checks {
		if !c.OK {
			failed = append(failed, c.Name)
		}
	}
	if len(failed) > 0 {
		return v.checks, imageErr(fmt.Errorf("image %s: %d check(s) failed, first: %s", imagePath, len(failed), failed[0]))
	}
	return v.checks, nil
}

// ImageOptions are the options to open an image with: a block device (a unit's flash on the fixture) keeps its undo
// journal in the station's undo/ directory, since /dev is not persistent.
func (s *Station) ImageOptions(imagePath string) []image.OpenOption {
	st, err := os.Stat(imagePath)
	if err != nil || st.Mode()&os.ModeDevice == 0 {
		return nil
	}
	dir := filepath.Join(s.Layout.Dir, "undo")
	os.MkdirAll(dir, 0o700)
	return []image.OpenOption{image.WithJournalDir(dir)}
}

// ServerCA is the PEM the profiles write as from: server_ca: station.yaml's server_ca, a file inside the station
// directory (Layout.StationFile: no absolute path, no "..", no symlink out, never a CA key), holding certificates only.
func (s *Station) ServerCA() ([]byte, error) {
	name := s.Config.ServerCA
	if name == "" {
		return ca.EncodeCerts(s.CA.Root), nil
	}
	b, err := readStationSource(s.Layout, "server_ca", name)
	if err != nil {
		return nil, err
	}
	if _, err := ca.ParseCerts(b); err != nil {
		return nil, fmt.Errorf("server_ca %s: %v: %w", name, err, ErrConfig)
	}
	return b, nil
}

type verifier struct {
	s      *Station
	im     *image.Image
	ctx    context.Context
	serial string
	now    time.Time
	checks []Check
}

func (v *verifier) check(name string, ok bool, detail string) {
	c := Check{Name: name, OK: ok}
	if !ok {
		c.Detail = detail
	}
	v.checks = append(v.checks, c)
}

func (v *verifier) fail(name, detail string) { v.check(name, false, detail) }

func (v *verifier) read(p image.Partition, filePath string) ([]byte, error) {
	fsys, err := v.im.FS(v.ctx, p)
	if err != nil {
		return nil, err
	}
	defer fsys.Close()
	return fsys.ReadFile(filePath)
}

// file checks presence, mode and owner of one planned file in one partition and returns its content.
func (v *verifier) file(p image.Partition, f profile.PlannedFile) ([]byte, bool) {
	where := fmt.Sprintf("%s (partition %d)", f.DevicePath, p.Number)
	fsys, err := v.im.FS(v.ctx, p)
	if err != nil {
		v.fail(where+" present", err.Error())
		return nil, false
	}
	defer fsys.Close()
	data, err := fsys.ReadFile(f.Path)
	if err != nil {
		v.fail(where+" present", err.Error())
		return nil, false
	}
	info, err := fsys.Stat(f.Path)
	if err != nil {
		v.fail(where+" present", err.Error())
		return nil, false
	}
	if p.FS == "vfat" {
		if profile.IsKey(f.From) && !f.AllowUnprotected {
			v.fail(where+" key file protected", "partition is FAT (no modes): anyone who mounts it reads the key; the profile does not say allow_unprotected_key")
			return data, true
		}
		v.check(where+" present (FAT: no modes or owners)", true, "")
		return data, true
	}
	v.check(fmt.Sprintf("%s present, mode %04o, owner %d:%d", where, f.Mode, f.UID, f.GID),
		info.Mode.Perm() == f.Mode && info.UID == f.UID && info.GID == f.GID,
		fmt.Sprintf("found mode %04o owner %d:%d", info.Mode.Perm(), info.UID, info.GID))
	return data, true
}

// akCertificate checks an attestation key certificate the station issued (from: ak_cert): signed by the issuing CA,
// valid now, with the tcg-kp-AIKCertificate key usage, followed by the issuing CA.
func (v *verifier) akCertificate(where string, data []byte, issuing *x509.Certificate) {
	certs, err := ca.ParseCerts(data)
	if err != nil {
		v.fail(where+" holds the attestation key certificate", err.Error())
		return
	}
	c := certs[0]
	v.check(where+" attestation key certificate signed by the station's issuing CA", c.CheckSignatureFrom(issuing) == nil,
		"not signed by "+issuing.Subject.String())
	v.check(where+" attestation key certificate valid now", !v.now.Before(c.NotBefore) && v.now.Before(c.NotAfter),
		fmt.Sprintf("valid %s to %s", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339)))
	aik := false
	for _, o := range c.UnknownExtKeyUsage {
		aik = aik || o.String() == "2.23.133.8.3"
	}
	v.check(where+" attestation key certificate has the tcg-kp-AIKCertificate usage", aik, "extended key usage missing")
	v.check(where+" carries the issuing CA after the attestation key certificate", len(certs) >= 2 && certs[1].Equal(issuing),
		"the issuing CA certificate is missing after the leaf")
}

func (v *verifier) certificate(where string, data []byte, wantChain bool) *x509.Certificate {
	certs, err := ca.ParseCerts(data)
	if err != nil {
		v.fail(where+" holds a certificate", err.Error())
		return nil
	}
	c := certs[0]
	wantCN := ""
	if n, err := v.s.Config.SubjectTemplate().Render(v.serial, nil); err == nil {
		wantCN = n.CommonName
	}
	v.check(fmt.Sprintf("certificate CN %q names the serial", c.Subject.CommonName),
		c.Subject.CommonName == wantCN || (wantCN == "" && strings.Contains(c.Subject.CommonName, v.serial)),
		fmt.Sprintf("want %q", wantCN))
	san := SerialURI(v.serial).String()
	hasSAN := false
	for _, u := range c.URIs {
		hasSAN = hasSAN || u.String() == san
	}
	v.check("certificate SAN "+san, hasSAN, fmt.Sprintf("certificate has %v", c.URIs))
	v.check(fmt.Sprintf("certificate valid now (until %s)", c.NotAfter.UTC().Format(time.DateOnly)),
		!v.now.Before(c.NotBefore) && v.now.Before(c.NotAfter),
		fmt.Sprintf("valid %s to %s", c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339)))
	err = v.s.CA.Verify(c, v.now)
	v.check("certificate chains to the station CA for client auth", err == nil, fmt.Sprint(err))
	if wantChain {
		v.check(where+" carries the issuing CA after the leaf", len(certs) >= 2 && certs[1].Equal(v.s.CA.Issuing),
			"the issuing CA certificate is missing after the leaf")
	}
	if active, err := v.s.Inv.ActiveCertificate(v.ctx, v.serial); err == nil {
		v.check("certificate is the unit's active certificate in the inventory", active.SHA256 == ca.Fingerprint(c),
			fmt.Sprintf("inventory's active certificate is %s", active.Serial))
	} else {
		v.fail("certificate is the unit's active certificate in the inventory", err.Error())
	}
	return c
}

func (v *verifier) template(f profile.PlannedFile, got []byte) {
	name := f.DevicePath + " matches the profile"
	if strings.HasSuffix(f.Path, ".json") && !json.Valid(got) {
		v.fail(name, "not valid JSON")
		return
	}
	if f.Data != nil {
		v.check(name, bytes.Equal(got, f.Data), "content differs from what the profile renders")
	}
}

func (v *verifier) merges(parts map[string]resolvedPart, plan *profile.Plan) {
	for _, m := range plan.Merges {
		for _, p := range parts[m.Part].parts {
			where := fmt.Sprintf("%s (partition %d)", path.Join(plan.Partitions[m.Part].Mount, m.Path), p.Number)
			data, err := v.read(p, m.Path)
			if err != nil {
				v.fail(where+" readable", err.Error())
				continue
			}
			var doc map[string]any
			if err := json.Unmarshal(data, &doc); err != nil {
				v.fail(where+" parses as JSON", err.Error())
				continue
			}
			missing := containsValues(doc, m.Set, "")
			v.check(where+" points at the written files", missing == "", missing)
		}
	}
}

// containsValues reports the first key of want whose value doc lacks ("" when all are there).
func containsValues(doc, want map[string]any, prefix string) string {
	for k, w := range want {
		got, ok := doc[k]
		if wm, isMap := w.(map[string]any); isMap {
			gm, ok := got.(map[string]any)
			if !ok {
				return prefix + k + " missing"
			}
			if miss := containsValues(gm, wm, prefix+k+"."); miss != "" {
				return miss
			}
			continue
		}
		if !ok || !reflect.DeepEqual(normalizeJSON(got), normalizeJSON(w)) {
			return fmt.Sprintf("%s%s is %v, want %v", prefix, k, got, w)
		}
	}
	return ""
}

func normalizeJSON(v any) any {
	b, _ := json.Marshal(v)
	var out any
	json.Unmarshal(b, &out)
	return out
}

// publicEqual compares two public keys by their SPKI DER (keys decoded from TPM structures may carry another curve
// value than crypto/x509's, which their Equal methods would tell apart).
func publicEqual(a, b any) bool {
	da, err1 := x509.MarshalPKIXPublicKey(a)
	db, err2 := x509.MarshalPKIXPublicKey(b)
	return err1 == nil && err2 == nil && bytes.Equal(da, db)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
