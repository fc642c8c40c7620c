package station

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func testMaterial(kind string) Material {
	return Material{Serial: "SN-1", KeyKind: kind, Cert: []byte("LEAF\n"), Issuing: []byte("ISSUING\n"), Root: []byte("ROOT\n"),
		ServerCA: []byte("SERVERCA\n"), Key: []byte("KEY\n")}
}

func planFor(t *testing.T, c *Config, profile, kind string) *Plan {
	t.Helper()
	p, err := c.ResolveProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := p.Plan(profile, t.TempDir(), testMaterial(kind))
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
	c := DefaultConfig("st")
	for _, name := range BuiltinProfileNames() {
		for _, kind := range []string{"tpm", "soft"} {
			plan := planFor(t, &c, name, kind)
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
	c := DefaultConfig("st")
	soft := planFor(t, &c, "mender", "soft")
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
	tpm := planFor(t, &c, "mender", "tpm")
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
	yamlText := string(DefaultConfig("st").Marshal()) + `
profiles:
  emmc:
    base: mender
    tpm_openssl: engine
    partitions:
      data: {select: "label=data", mount: /data}
  broker:
    base: mqtt
    vars: {broker_host: mqtt.factory.example}
`
	c, err := ParseConfig("station.yaml", []byte(yamlText))
	if err != nil {
		t.Fatal(err)
	}
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
	base := string(DefaultConfig("st").Marshal())
	tests := []struct{ name, profiles, want string }{
		{"unknown partition", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "data:/x", from: cert}]}}`, `partition "data" is not defined`},
		{"key readable by others", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/k", from: key, mode: "0644"}]}}`, "others read the private key"},
		{"bad from", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/k", from: secret}]}}`, `from "secret"`},
		{"relative target", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:etc/x", from: cert}]}}`, "absolute"},
		{"dotdot target", `{p: {partitions: {root: {select: "2", mount: /}}, files: [{to: "root:/etc/../x", from: cert}]}}`, "clean"},
		{"bad select", `{p: {partitions: {root: {select: "two", mount: /}}, files: [{to: "root:/x", from: cert}]}}`, "partition number"},
		{"unknown base", `{p: {base: nope}}`, `no built-in profile "nope"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseConfig("station.yaml", []byte(base+"\nprofiles: "+tt.profiles+"\n"))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrConfig mentioning %q", err, tt.want)
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
