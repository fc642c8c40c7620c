package profile

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/goccy/go-yaml"
)

func testMaterial(kind string) Material {
	return Material{Serial: "SN-1", KeyKind: kind, Cert: []byte("LEAF\n"), Issuing: []byte("ISSUING\n"), Root: []byte("ROOT\n"),
		ServerCA: []byte("SERVERCA\n"), Key: []byte("KEY\n")}
}

// parseOwn parses the profiles: of a station.yaml as ParseConfig does.
func parseOwn(t *testing.T, text string) map[string]Profile {
	t.Helper()
	var doc struct {
		Profiles map[string]Profile `yaml:"profiles"`
	}
	if err := yaml.UnmarshalWithOptions([]byte(text), &doc, yaml.DisallowUnknownField()); err != nil {
		t.Fatal(err)
	}
	return doc.Profiles
}

func planFor(t *testing.T, own map[string]Profile, profile, kind string) *Plan {
	t.Helper()
	p, err := Resolve(profile, own)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := p.Plan(profile, nil, testMaterial(kind))
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

func findFile(plan *Plan, devicePath string) *PlannedFile {
	for i := range plan.Files {
		if plan.Files[i].DevicePath == devicePath {
			return &plan.Files[i]
		}
	}
	return nil
}

func TestBuiltinProfilesValid(t *testing.T) {
	for _, name := range BuiltinNames() {
		for _, kind := range []string{KeyTPM, KeySoft} {
			plan := planFor(t, nil, name, kind)
			if len(plan.Files) == 0 {
				t.Errorf("%s/%s: no files", name, kind)
			}
			for _, f := range plan.Files {
				if f.From == "key" && f.Mode != 0o600 {
					t.Errorf("%s: key %s mode %o", name, f.Path, f.Mode)
				}
				if f.From != "key" && f.Mode != 0o644 {
					t.Errorf("%s: %s mode %o", name, f.Path, f.Mode)
				}
				if f.UID != 0 || f.GID != 0 {
					t.Errorf("%s: %s owner %d:%d", name, f.Path, f.UID, f.GID)
				}
			}
		}
	}
}

func TestMenderProfile(t *testing.T) {
	soft := planFor(t, nil, "mender", "soft")
	cert := findFile(soft, "/data/mender/mender-cert.pem")
	if cert == nil || cert.Part != "data" || cert.Path != "/mender/mender-cert.pem" || string(cert.Data) != "LEAF\nISSUING\n" {
		t.Fatalf("cert file %+v", cert)
	}
	if k := findFile(soft, "/data/mender/mender-cert-private.pem"); k == nil || string(k.Data) != "KEY\n" || k.Mode != 0o600 {
		t.Fatalf("key file %+v", k)
	}
	if len(soft.Merges) != 1 {
		t.Fatalf("soft merges %+v", soft.Merges)
	}
	hc := soft.Merges[0].Set["HttpsClient"].(map[string]any)
	if hc["Certificate"] != "/data/mender/mender-cert.pem" || hc["Key"] != "/data/mender/mender-cert-private.pem" {
		t.Fatalf("mender.conf values %v do not point at the written files", hc)
	}
	if findFile(soft, "/etc/mender/openssl-tpm2.cnf") != nil {
		t.Error("openssl tpm2 config written for a software key")
	}
	tpm := planFor(t, nil, "mender", "tpm")
	cnf := findFile(tpm, "/etc/mender/openssl-tpm2.cnf")
	if cnf == nil || !strings.Contains(string(cnf.Data), "tpm2 = tpm2_sect") {
		t.Fatalf("tpm provider config missing: %+v", cnf)
	}
	dropin := findFile(tpm, "/etc/systemd/system/mender-authd.service.d/10-tpm2.conf")
	if dropin == nil || !strings.Contains(string(dropin.Data), "OPENSSL_CONF=/etc/mender/openssl-tpm2.cnf") {
		t.Fatalf("systemd drop-in %+v", dropin)
	}
}

func TestProfileBaseOverride(t *testing.T) {
	c := parseOwn(t, `
profiles:
  emmc:
    base: mender
    tpm_openssl: engine
    partitions:
      data: {select: "label=data", mount: /data}
  broker:
    base: mqtt
    vars: {broker_host: mqtt.factory.example}
`)
	emmc := planFor(t, c, "emmc", "tpm")
	if emmc.Partitions["data"].Select != "label=data" || emmc.Partitions["rootfs"].Select != "2,3" {
		t.Fatalf("partitions %+v", emmc.Partitions)
	}
	engine := false
	for _, m := range emmc.Merges {
		if hc, ok := m.Set["HttpsClient"].(map[string]any); ok && hc["SSLEngine"] == "tpm2tss" {
			engine = true
		}
	}
	if !engine || findFile(emmc, "/etc/mender/openssl-tpm2.cnf") != nil {
		t.Fatalf("engine mode: merges %+v", emmc.Merges)
	}
	broker := planFor(t, c, "broker", "tpm")
	cfg := findFile(broker, "/etc/mqtt/client.json")
	if cfg == nil {
		t.Fatal("no mqtt client config")
	}
	var doc struct {
		ClientID string `json:"client_id"`
		Broker   struct {
			Host string `json:"host"`
			Port int    `json:"port"`
		} `json:"broker"`
		TLS struct {
			CA, Cert, Key, Format string
		} `json:"-"`
		TLSMap map[string]string `json:"tls"`
		Topics map[string]string `json:"topics"`
	}
	if err := json.Unmarshal(cfg.Data, &doc); err != nil {
		t.Fatalf("rendered config is not JSON: %v\n%s", err, cfg.Data)
	}
	if doc.ClientID != "SN-1" || doc.Broker.Host != "mqtt.factory.example" || doc.Broker.Port != 8883 ||
		doc.TLSMap["key_file"] != "/etc/certs/client.key" || doc.TLSMap["ca_file"] != "/etc/certs/ca.crt" ||
		doc.TLSMap["key_format"] != "tss2" || doc.Topics["command"] != "devices/SN-1/commands" {
		t.Fatalf("rendered config %s", cfg.Data)
	}
}

func TestProfileErrors(t *testing.T) {
	tests := []struct{ name, profiles, want string }{
		{"unknown partition", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "data:/x", from: cert}]}}`, `partition "data" is not defined`},
		{"key readable by others", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/k", from: key, mode: "0644"}]}}`, "others read the private key"},
		{"bad from", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/k", from: secret}]}}`, `from "secret"`},
		{"relative target", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:etc/x", from: cert}]}}`, "absolute"},
		{"dotdot target", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/etc/../x", from: cert}]}}`, "clean"},
		{"bad select", `{p: {partitions: {root: {select: "two", mount: /}}, files: [{to: "root:/x", from: cert}]}}`, "partition number"},
		{"unknown base", `{p: {base: nope}}`, `no built-in profile "nope"`},
		{"template outside", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/x", from: "template:../x"}]}}`, "climbs out with .."},
		{"bad tpm_openssl", `{p: {base: mender, tpm_openssl: abrmd}}`, "use auto, provider, provider-abrmd, engine, none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Resolve("p", parseOwn(t, "profiles: "+tt.profiles+"\n"))
			if !errors.Is(err, ErrProfile) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrProfile mentioning %q", err, tt.want)
			}
		})
	}
}

func TestMergeJSON(t *testing.T) {
	orig := []byte(`{"ServerURL": "https://hosted.mender.io", "HttpsClient": {"Certificate": "/old", "SkipVerify": false}, "Retry": 30}`)
	out, err := MergeJSON(orig, map[string]any{"HttpsClient": map[string]any{"Certificate": "/new", "Key": "/k"}})
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	hc := doc["HttpsClient"].(map[string]any)
	if doc["ServerURL"] != "https://hosted.mender.io" || doc["Retry"] != float64(30) || hc["Certificate"] != "/new" ||
		hc["Key"] != "/k" || hc["SkipVerify"] != false {
		t.Fatalf("merged %s", out)
	}
	for _, bad := range []string{`[1,2]`, `{"a":1} {"b":2}`, `null`, `{"a":`} {
		if _, err := MergeJSON([]byte(bad), map[string]any{"x": 1}); err == nil {
			t.Errorf("MergeJSON(%q) accepted", bad)
		}
	}
}

func FuzzMergeJSON(f *testing.F) {
	f.Add([]byte(`{"ServerURL":"x","HttpsClient":{"Key":"a"}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(` `))
	f.Fuzz(func(t *testing.T, orig []byte) {
		out, err := MergeJSON(orig, map[string]any{"HttpsClient": map[string]any{"Key": "/k"}})
		if err != nil {
			return
		}
		var doc map[string]any
		if err := json.Unmarshal(out, &doc); err != nil {
			t.Fatalf("output is not JSON: %v", err)
		}
		if hc, ok := doc["HttpsClient"].(map[string]any); !ok || hc["Key"] != "/k" {
			t.Fatalf("key not set: %s", out)
		}
	})
}

// The configuration each form writes: provider-abrmd has the tpm2-abrmd TCTI and default_properties, provider has
// neither, engine writes no provider configuration but SSLEngine, none writes nothing for the TPM.
func TestTPMOpenSSLForms(t *testing.T) {
	c := parseOwn(t, `
profiles:
  m-provider: {base: mender, tpm_openssl: provider}
  m-abrmd: {base: mender, tpm_openssl: provider-abrmd}
  m-engine: {base: mender, tpm_openssl: engine}
  m-none: {base: mender, tpm_openssl: none}
  m-auto: {base: mender, tpm_openssl: auto}
`)
	const cnf, dropin = "/etc/mender/openssl-tpm2.cnf", "/etc/systemd/system/mender-client.service.d/10-tpm2.conf"
	sslEngine := func(plan *Plan) bool {
		for _, m := range plan.Merges {
			if hc, ok := m.Set["HttpsClient"].(map[string]any); ok && hc["SSLEngine"] == "tpm2tss" {
				return true
			}
		}
		return false
	}
	abrmd := planFor(t, c, "m-abrmd", "tpm")
	if abrmd.OpenSSL.Form != OpenSSLProviderABRMD || abrmd.OpenSSL.Auto || abrmd.OpenSSL.String() != "tpm_openssl: provider-abrmd in profile m-abrmd → provider-abrmd" {
		t.Errorf("abrmd choice %+v", abrmd.OpenSSL)
	}
	for _, want := range []string{"alg_section = algorithm_sect", "default_properties = ?provider=tpm2,tpm2.digest!=yes", "tpm2 = tpm2_sect"} {
		if f := findFile(abrmd, cnf); f == nil || !strings.Contains(string(f.Data), want) {
			t.Errorf("provider-abrmd openssl config lacks %q: %+v", want, f)
		}
	}
	for _, want := range []string{"Environment=TPM2OPENSSL_TCTI=tabrmd:bus_type=system", "Environment=OPENSSL_CONF=/etc/mender/openssl-tpm2.cnf", "After=tpm2-abrmd.service"} {
		if f := findFile(abrmd, dropin); f == nil || !strings.Contains(string(f.Data), want) {
			t.Errorf("provider-abrmd drop-in lacks %q: %+v", want, f)
		}
	}
	prov := planFor(t, c, "m-provider", "tpm")
	if f := findFile(prov, cnf); f == nil || strings.Contains(string(f.Data), "default_properties") || strings.Contains(string(f.Data), "alg_section") ||
		!strings.Contains(string(f.Data), "tpm2 = tpm2_sect") {
		t.Errorf("provider openssl config:\n%s", f.Data)
	}
	if f := findFile(prov, dropin); f == nil || !strings.Contains(string(f.Data), "TPM2OPENSSL_TCTI=device:/dev/tpmrm0") || strings.Contains(string(f.Data), "abrmd") {
		t.Errorf("provider drop-in: %+v", f)
	}
	if sslEngine(prov) || sslEngine(abrmd) {
		t.Error("provider forms set SSLEngine")
	}
	eng := planFor(t, c, "m-engine", "tpm")
	if findFile(eng, cnf) != nil || findFile(eng, dropin) != nil || !sslEngine(eng) {
		t.Errorf("engine form: files %+v merges %+v", eng.Files, eng.Merges)
	}
	none := planFor(t, c, "m-none", "tpm")
	if findFile(none, cnf) != nil || findFile(none, dropin) != nil || sslEngine(none) {
		t.Errorf("none form writes TPM configuration")
	}
	for _, name := range []string{"m-auto", "mender"} {
		auto := planFor(t, c, name, "tpm")
		if !auto.OpenSSL.Auto || !auto.Provisional() || auto.OpenSSL.Form != OpenSSLProvider {
			t.Errorf("%s: auto choice %+v", name, auto.OpenSSL)
		}
	}
	if soft := planFor(t, c, "m-abrmd", "soft"); soft.OpenSSL.Form != "" || soft.Provisional() || findFile(soft, cnf) != nil {
		t.Errorf("software key: %+v", soft.OpenSSL)
	}
}
