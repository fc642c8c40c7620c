package station

import (
	"strings"
	"testing"
)

// dpkgEntry is one package paragraph of a dpkg status file.
func dpkgEntry(name, version, status string) string {
	return "Package: " + name + "\nStatus: " + status + "\nPriority: optional\nSection: libs\nArchitecture: arm64\n" +
		"Version: " + version + "\nDescription: " + name + "\n a description\n .\n over lines\n\n"
}

// debian12Status is the part of a Debian 12 package database that matters: tpm2-openssl 1.1.1 with tpm2-abrmd.
var debian12Status = dpkgEntry("libssl3", "3.0.17-1~deb12u2", "install ok installed") +
	dpkgEntry("tpm2-abrmd", "3.0.0-1", "install ok installed") +
	dpkgEntry("tpm2-openssl", "1.1.1-1", "install ok installed")

// debian13Status: tpm2-openssl 1.3 (no tpm2-abrmd needed).
var debian13Status = dpkgEntry("libssl3t64", "3.5.1-1", "install ok installed") +
	dpkgEntry("tpm2-openssl", "1.3.0-1", "install ok installed")

func TestOpenSSLFromDpkg(t *testing.T) {
	tests := []struct {
		name, status, form, reason, warning string
	}{
		{"debian 12", debian12Status, OpenSSLProviderABRMD, "tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status", ""},
		{"debian 13", debian13Status, OpenSSLProvider, "tpm2-openssl 1.3.0-1 in /var/lib/dpkg/status", ""},
		{"1.2 with epoch", dpkgEntry("tpm2-openssl", "1:1.2.0-1", "install ok installed"), OpenSSLProvider, "tpm2-openssl 1:1.2.0-1", ""},
		{"2.0", dpkgEntry("tpm2-openssl", "2.0~rc1-1", "install ok installed"), OpenSSLProvider, "tpm2-openssl 2.0~rc1-1", ""},
		{"1.0", dpkgEntry("tpm2-openssl", "1.0.1-1", "install ok installed"), OpenSSLProviderABRMD, "tpm2-openssl 1.0.1-1", "tpm2-abrmd is not installed"},
		{"removed, config files left", dpkgEntry("tpm2-openssl", "1.1.1-1", "deinstall ok config-files"), OpenSSLProvider,
			"no tpm2-openssl in /var/lib/dpkg/status", "no tpm2-openssl and no tpm2-tss engine"},
		{"engine", dpkgEntry("libssl1.1", "1.1.1w-0+deb11u1", "install ok installed") +
			dpkgEntry("libengine-tpm2-tss-openssl", "1.1.0-2", "install ok installed"), OpenSSLEngine,
			"libengine-tpm2-tss-openssl 1.1.0-2 and no tpm2-openssl", ""},
		{"odd version", dpkgEntry("tpm2-openssl", "git20240101-1", "install ok installed"), OpenSSLProvider, "tpm2-openssl git20240101-1", "not understood"},
		{"CRLF-free, no final blank line", "Package: tpm2-openssl\nStatus: install ok installed\nVersion: 1.1.0-3", OpenSSLProviderABRMD, "tpm2-openssl 1.1.0-3", "tpm2-abrmd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := openSSLFromDpkg([]byte(tt.status), DpkgStatus)
			if c.Form != tt.form || !strings.Contains(c.Reason, tt.reason) || !c.Auto {
				t.Fatalf("got %+v, want form %s, reason containing %q", c, tt.form, tt.reason)
			}
			if tt.warning == "" && c.Warning != "" || tt.warning != "" && !strings.Contains(c.Warning, tt.warning) {
				t.Fatalf("warning %q, want %q", c.Warning, tt.warning)
			}
		})
	}
	if got := openSSLFromDpkg([]byte(debian12Status), DpkgStatus).String(); got != "tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status → provider-abrmd" {
		t.Errorf("String() = %q", got)
	}
	u := openSSLUnknown("no /var/lib/dpkg/status in partition 2")
	if u.Form != OpenSSLProvider || !strings.Contains(u.String(), "warning: assumed tpm2-openssl 1.2 or later") {
		t.Errorf("unknown: %+v %q", u, u.String())
	}
}

// The configuration each form writes: provider-abrmd has the tpm2-abrmd TCTI and default_properties, provider has
// neither, engine writes no provider configuration but SSLEngine, none writes nothing for the TPM.
func TestTPMOpenSSLForms(t *testing.T) {
	yamlText := string(DefaultConfig("st").Marshal()) + `
profiles:
  m-provider: {base: mender, tpm_openssl: provider}
  m-abrmd: {base: mender, tpm_openssl: provider-abrmd}
  m-engine: {base: mender, tpm_openssl: engine}
  m-none: {base: mender, tpm_openssl: none}
  m-auto: {base: mender, tpm_openssl: auto}
`
	c, err := ParseConfig("station.yaml", []byte(yamlText))
	if err != nil {
		t.Fatal(err)
	}
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
		if !auto.OpenSSL.Auto || auto.replan == nil || auto.OpenSSL.Form != OpenSSLProvider {
			t.Errorf("%s: auto choice %+v", name, auto.OpenSSL)
		}
	}
	if soft := planFor(t, c, "m-abrmd", "soft"); soft.OpenSSL.Form != "" || soft.replan != nil || findFile(soft, cnf) != nil {
		t.Errorf("software key: %+v", soft.OpenSSL)
	}
	if _, err := ParseConfig("station.yaml", []byte(string(DefaultConfig("st").Marshal())+"\nprofiles: {x: {base: mender, tpm_openssl: abrmd}}\n")); err == nil ||
		!strings.Contains(err.Error(), "use auto, provider, provider-abrmd, engine, none") {
		t.Errorf("tpm_openssl abrmd: %v", err)
	}
}
