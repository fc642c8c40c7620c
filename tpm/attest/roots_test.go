package attest

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The 51 files hold 45 distinct certificates: keylime's store has six Infineon intermediates twice (IFX1.pem and
// IFX_RSA_01I.pem are one certificate, and so on), and a set holds each certificate once.
const builtinDistinct = 45

func TestBuiltinRoots(t *testing.T) {
	files, err := builtinFiles.ReadDir("roots")
	if err != nil || len(files) != 51 {
		t.Fatalf("%d built-in files (%v), want 51 (roots/README.md)", len(files), err)
	}
	for _, f := range files {
		data, _ := builtinFiles.ReadFile("roots/" + f.Name())
		if certs, err := parsePEMCertificates(data); err != nil || len(certs) != 1 {
			t.Errorf("%s: %d certificates, %v; want one", f.Name(), len(certs), err)
		}
	}
	r := BuiltinRoots()
	if r.Len() != builtinDistinct {
		t.Fatalf("%d built-in roots, want %d", r.Len(), builtinDistinct)
	}
	for _, c := range r.Certificates() {
		if !c.IsCA && c.BasicConstraintsValid {
			t.Errorf("%s is not a CA", c.Subject)
		}
		if len(c.UnhandledCriticalExtensions) != 0 {
			t.Errorf("%s: unhandled critical extensions %v", c.Subject, c.UnhandledCriticalExtensions)
		}
	}
	r.Add(BuiltinRoots().Certificates()...)
	if r.Len() != builtinDistinct {
		t.Errorf("adding the same certificates again gives %d", r.Len())
	}
	other := BuiltinRoots()
	other.Add(newTestPKI(t, time.Time{}).root)
	if BuiltinRoots().Len() != builtinDistinct || other.Len() != builtinDistinct+1 {
		t.Error("Add on one set changed another")
	}
}

func builtin(t *testing.T, file string) *x509.Certificate {
	t.Helper()
	data, err := builtinFiles.ReadFile("roots/" + file)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := parsePEMCertificates(data)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

// Vendor "roots" that are not self-signed (STM's are issued by GlobalSign, Alibaba's EK CA by its own root) are
// anchors. (IFX_RSA_RT, issued by VeriSign, is one too, but its intermediates are signed with SHA-1, which
// crypto/x509 refuses: EK certificates under them chain to the intermediates themselves, also anchors here.)
func TestNonSelfSignedVendorRoots(t *testing.T) {
	for _, tc := range []struct{ root, inter string }{
		{"STM_RSA_RT.pem", "STM_RSA_05I.pem"},
		{"STM_ECC_01RT.pem", "STM_ECC_01I.pem"},
	} {
		t.Run(tc.root, func(t *testing.T) {
			root, inter := builtin(t, tc.root), builtin(t, tc.inter)
			if bytes.Equal(root.RawIssuer, root.RawSubject) {
				t.Fatalf("%s is self-signed: the test needs one that is not", tc.root)
			}
			at := inter.NotBefore
			if root.NotBefore.After(at) {
				at = root.NotBefore
			}
			at = at.Add(24 * time.Hour)
			chain, err := anchors(root).Verify(inter, nil, at)
			if err != nil {
				t.Fatalf("Verify %s under %s: %v", tc.inter, tc.root, err)
			}
			if len(chain) != 2 || !chain[1].Equal(root) {
				t.Errorf("chain of %d, want the intermediate then the non-self-signed root", len(chain))
			}
			// The whole built-in set finds the same way.
			if _, err := BuiltinRoots().Verify(inter, nil, at); err != nil {
				t.Errorf("Verify with the built-in set: %v", err)
			}
		})
	}
}

func TestLoadRoots(t *testing.T) {
	p, q := newTestPKI(t, time.Time{}), newTestPKI(t, time.Time{})
	dir := t.TempDir()
	var bundle bytes.Buffer
	bundle.WriteString("two certificates, with words around them\n")
	pem.Encode(&bundle, &pem.Block{Type: "CERTIFICATE", Bytes: p.root.Raw})
	pem.Encode(&bundle, &pem.Block{Type: "CERTIFICATE", Bytes: p.inter.Raw})
	write := func(name string, data []byte) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("vendor.pem", bundle.Bytes())
	write("other.CRT", q.root.Raw) // DER
	write("notes.txt", []byte("not a certificate"))
	if err := os.Mkdir(filepath.Join(dir, "sub.pem"), 0o755); err != nil {
		t.Fatal(err)
	}
	r, err := LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	if r.Len() != builtinDistinct+3 {
		t.Errorf("%d certificates, want %d built in + 3", r.Len(), builtinDistinct)
	}
	ek := mustParseEK(t, q.issueEK(t, newKey(t).Public(), nil).Raw)
	if _, err := r.Verify(ek, []*x509.Certificate{q.inter}, testNow); err != nil {
		t.Errorf("Verify under a loaded DER root: %v", err)
	}

	write("broken.pem", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	if _, err := LoadRoots(dir); err == nil || !strings.Contains(err.Error(), "broken.pem") {
		t.Errorf("err = %v, want one naming broken.pem", err)
	}
	os.Remove(filepath.Join(dir, "broken.pem"))
	write("key.pem", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	if _, err := LoadRoots(dir); err == nil || !strings.Contains(err.Error(), "key.pem: no certificate") {
		t.Errorf("err = %v, want one saying key.pem holds no certificate", err)
	}
	if _, err := LoadRoots(filepath.Join(dir, "missing")); err == nil {
		t.Error("a missing directory loaded")
	}
}
