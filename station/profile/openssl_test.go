package profile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// dpkgEntry is one package paragraph of a dpkg status file.
func dpkgEntry(name, version, status string) string {
	return "Package: " + name + "\nStatus: " + status + "\nPriority: optional\nSection: libs\nArchitecture: arm64\n" +
		"Version: " + version + "\nDescription: " + name + "\n a description\n .\n over lines\n\n"
}

// readStatus reads a package database from testdata: debian12.status (tpm2-openssl 1.1.1 with tpm2-abrmd) or
// debian13.status (tpm2-openssl 1.3, no tpm2-abrmd needed).
func readStatus(tb testing.TB, name string) string {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		tb.Fatal(err)
	}
	return string(b)
}

func TestOpenSSLFromDpkg(t *testing.T) {
	debian12Status, debian13Status := readStatus(t, "debian12.status"), readStatus(t, "debian13.status")
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
			c := OpenSSLFromDpkg([]byte(tt.status), DpkgStatus)
			if c.Form != tt.form || !strings.Contains(c.Reason, tt.reason) || !c.Auto {
				t.Fatalf("got %+v, want form %s, reason containing %q", c, tt.form, tt.reason)
			}
			if tt.warning == "" && c.Warning != "" || tt.warning != "" && !strings.Contains(c.Warning, tt.warning) {
				t.Fatalf("warning %q, want %q", c.Warning, tt.warning)
			}
		})
	}
	if got := OpenSSLFromDpkg([]byte(debian12Status), DpkgStatus).String(); got != "tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status → provider-abrmd" {
		t.Errorf("String() = %q", got)
	}
	u := OpenSSLUnknown("no /var/lib/dpkg/status in partition 2")
	if u.Form != OpenSSLProvider || !strings.Contains(u.String(), "warning: assumed tpm2-openssl 1.2 or later") {
		t.Errorf("unknown: %+v %q", u, u.String())
	}
}

func TestInstalledVersion(t *testing.T) {
	status := []byte(readStatus(t, "debian12.status") + dpkgEntry("tpm2-tools", "5.4-1", "deinstall ok config-files"))
	if v, ok := InstalledVersion(status, "tpm2-openssl"); !ok || v != "1.1.1-1" {
		t.Errorf("tpm2-openssl: %q %v, want 1.1.1-1", v, ok)
	}
	if v, ok := InstalledVersion(status, "tpm2-tools"); ok {
		t.Errorf("removed tpm2-tools: %q, want not installed", v)
	}
}
