package profile

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strings"
	"text/template"
)

// Material is what a unit contributes to its image.
type Material struct {
	Serial   string
	Fields   map[string]string
	KeyKind  string // KeyTPM or KeySoft
	Cert     []byte // leaf PEM
	Issuing  []byte // issuing CA PEM
	Root     []byte // root CA PEM
	ServerCA []byte // the CA devices trust for the fleet's servers
	Key      []byte // TSS2 PRIVATE KEY or PKCS#8 PEM
	// The unit's attestation key, when the attest step made one for a profile that writes it: its certificate (PEM,
	// issued by the station) and its TSS2 PRIVATE KEY file.
	AKCert []byte
	AKKey  []byte
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
	// image's package database, settles it and re-renders the plan in place (Settle).
	OpenSSL OpenSSLChoice

	replan func(OpenSSLChoice) (*Plan, error)
}

// Templates reads the files template:<file> entries name. Package station's Layout implements it: inside the
// station directory only, never a key.
type Templates interface {
	ReadTemplate(name string) ([]byte, error)
}

// Provisional reports whether the plan's TPM OpenSSL form waits for the image (tpm_openssl auto with a TPM key):
// Settle it with the form the image's package database calls for.
func (p *Plan) Provisional() bool { return p.replan != nil }

// Settle re-renders a provisional plan in place with the OpenSSL form c. Plans with a forced form, software keys and
// plans settled before are left as they are.
func (p *Plan) Settle(c OpenSSLChoice) error {
	if p.replan == nil {
		return nil
	}
	settled, err := p.replan(c)
	if err != nil {
		return err
	}
	*p = *settled
	return nil
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
	case KeyTPM, KeySoft:
		return when == keyKind
	case "tpm-provider":
		return keyKind == KeyTPM && (form == OpenSSLProvider || form == OpenSSLProviderABRMD)
	case "tpm-engine":
		return keyKind == KeyTPM && form == OpenSSLEngine
	}
	return false
}

// Plan renders the profile for one unit. src reads template:<file> files (package station: inside the station
// directory only, Layout.StationFile). For a TPM key and tpm_openssl auto (the default) the OpenSSL form is provisional
// (provider, Plan.OpenSSL.Auto set) until Inject or VerifyImage reads the image's package database.
func (p *Profile) Plan(name string, src Templates, m Material) (*Plan, error) {
	choice := OpenSSLChoice{}
	if m.KeyKind == KeyTPM {
		choice = forcedOpenSSL(name, p.TPMOpenSSL)
	}
	plan, err := p.plan(name, src, m, choice)
	if err != nil {
		return nil, err
	}
	if choice.Auto {
		plan.replan = func(c OpenSSLChoice) (*Plan, error) { return p.plan(name, src, m, c) }
	}
	return plan, nil
}

func (p *Profile) plan(name string, src Templates, m Material, choice OpenSSLChoice) (*Plan, error) {
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
		content, err := p.content(f.From, src, m, data)
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

func (p *Profile) content(from string, src Templates, m Material, data templateData) ([]byte, error) {
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
	case "ak_cert":
		if len(m.AKCert) == 0 {
			return nil, nil
		}
		return concat(m.AKCert, m.Issuing), nil
	case "ak_key":
		return m.AKKey, nil
	}
	var text []byte
	var err error
	if name, ok := strings.CutPrefix(from, "builtin:"); ok {
		text, err = builtinProfiles.ReadFile("profiles/" + name)
	} else {
		if src == nil {
			return nil, errors.New("template: no template files here")
		}
		text, err = src.ReadTemplate(strings.TrimPrefix(from, "template:"))
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
