package attest

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func tcgHeader(der []byte) []byte {
	return append([]byte{0x10, 0x01, byte(len(der) >> 8), byte(len(der))}, der...)
}

func TestParseEKCertificateForms(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	ek := p.issueEK(t, newKey(t).Public(), nil)
	der := ek.Raw
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"plain DER", der},
		{"trailing zeros", append(append([]byte{}, der...), make([]byte, 300)...)},
		{"trailing 0xff", append(append([]byte{}, der...), bytes.Repeat([]byte{0xff}, 17)...)},
		{"TCG header", tcgHeader(der)},
		{"TCG header and padding", append(tcgHeader(der), make([]byte, 64)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := mustParseEK(t, tc.data)
			if !bytes.Equal(c.Raw, der) {
				t.Errorf("Raw is %d bytes, want the %d bytes of DER", len(c.Raw), len(der))
			}
			if len(c.UnhandledCriticalExtensions) != 0 {
				t.Errorf("UnhandledCriticalExtensions = %v, want none", c.UnhandledCriticalExtensions)
			}
			if got := IdentityOf(c); got != testIdentity {
				t.Errorf("IdentityOf = %+v, want %+v", got, testIdentity)
			}
			chain, err := anchors(p.root).Verify(c, []*x509.Certificate{p.inter}, testNow)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if len(chain) != 3 || !chain[2].Equal(p.root) {
				t.Errorf("chain of %d certificates, want EK, intermediate, root", len(chain))
			}
		})
	}
}

func TestParseEKCertificateRefuses(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	der := p.issueEK(t, newKey(t).Public(), nil).Raw
	for _, tc := range []struct {
		name, data, want string
	}{
		{"empty", "", "empty"},
		{"header longer than data", string(tcgHeader(der)[:100]), "TCG header announces"},
		{"truncated DER", string(der[:len(der)-10]), "truncated"},
		{"not DER", "hello, world", "not a DER certificate"},
		{"broken inside", string(append([]byte{0x30, 0x03, 0x02, 0x01, 0x01}, 0)), "attest: EK certificate:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseEKCertificate([]byte(tc.data))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestVerifyCauses(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	ek := mustParseEK(t, p.issueEK(t, newKey(t).Public(), ekTemplate(7, time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))).Raw)
	inter := []*x509.Certificate{p.inter}

	t.Run("expired EK", func(t *testing.T) {
		_, err := anchors(p.root).Verify(ek, inter, time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC))
		if !errors.Is(err, ErrExpired) || !strings.Contains(err.Error(), "EK certificate") {
			t.Errorf("err = %v, want ErrExpired for the EK certificate", err)
		}
	})
	t.Run("not yet valid", func(t *testing.T) {
		_, err := anchors(p.root).Verify(ek, inter, testStart.Add(-time.Hour))
		if !errors.Is(err, ErrExpired) {
			t.Errorf("err = %v, want ErrExpired", err)
		}
	})
	t.Run("expired intermediate", func(t *testing.T) {
		q := newTestPKI(t, time.Date(2027, 1, 1, 0, 0, 0, 0, time.UTC))
		ek := mustParseEK(t, q.issueEK(t, newKey(t).Public(), nil).Raw)
		_, err := anchors(q.root).Verify(ek, []*x509.Certificate{q.inter}, testNow)
		if !errors.Is(err, ErrExpired) || !strings.Contains(err.Error(), "Intermediate CA 01") {
			t.Errorf("err = %v, want ErrExpired naming the intermediate", err)
		}
	})
	t.Run("unknown issuer", func(t *testing.T) {
		_, err := BuiltinRoots().Verify(ek, inter, testNow)
		if !errors.Is(err, ErrUnknownVendor) || !strings.Contains(err.Error(), "Test TPM EK Root CA") {
			t.Errorf("err = %v, want ErrUnknownVendor naming the root the intermediate needs", err)
		}
	})
	t.Run("missing intermediate", func(t *testing.T) {
		_, err := anchors(p.root).Verify(ek, nil, testNow)
		if !errors.Is(err, ErrUnknownVendor) || !strings.Contains(err.Error(), "Intermediate CA 01") {
			t.Errorf("err = %v, want ErrUnknownVendor naming the EK's issuer", err)
		}
	})
	t.Run("intermediate as anchor", func(t *testing.T) {
		chain, err := anchors(p.inter).Verify(ek, nil, testNow)
		if err != nil || len(chain) != 2 {
			t.Errorf("chain %d, err %v: want EK and the intermediate", len(chain), err)
		}
	})
	t.Run("no certificate", func(t *testing.T) {
		if _, err := BuiltinRoots().Verify(nil, nil, testNow); !errors.Is(err, ErrNoEKCertificate) {
			t.Errorf("err = %v, want ErrNoEKCertificate", err)
		}
	})
	t.Run("parsed by crypto/x509 directly", func(t *testing.T) {
		raw, err := x509.ParseCertificate(ek.Raw)
		if err != nil {
			t.Fatal(err)
		}
		if len(raw.UnhandledCriticalExtensions) != 1 {
			t.Fatalf("crypto/x509 left %v unhandled, the test expects the SAN", raw.UnhandledCriticalExtensions)
		}
		if _, err := anchors(p.root).Verify(raw, inter, testNow); err != nil {
			t.Errorf("Verify: %v", err)
		}
		if len(raw.UnhandledCriticalExtensions) != 1 {
			t.Error("Verify changed the caller's certificate")
		}
	})
}

func TestOtherCriticalExtensionStillFails(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	odd := pkix.Extension{Id: asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 99999, 1}, Critical: true, Value: []byte{5, 0}}
	ek := mustParseEK(t, p.issueEK(t, newKey(t).Public(), ekTemplate(9, testEnd, odd)).Raw)
	if len(ek.UnhandledCriticalExtensions) != 1 || !ek.UnhandledCriticalExtensions[0].Equal(odd.Id) {
		t.Fatalf("UnhandledCriticalExtensions = %v, want only %v", ek.UnhandledCriticalExtensions, odd.Id)
	}
	_, err := anchors(p.root).Verify(ek, []*x509.Certificate{p.inter}, testNow)
	var unhandled x509.UnhandledCriticalExtension
	if !errors.As(err, &unhandled) {
		t.Errorf("err = %v, want x509.UnhandledCriticalExtension", err)
	}
}

func TestSANWithoutTCGAttributesStaysUnhandled(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	rdn, _ := asn1.Marshal(pkix.Name{CommonName: "not a TPM"}.ToRDNSequence())
	san, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: rdn}})
	tmpl := ekTemplate(10, testEnd)
	tmpl.ExtraExtensions[0].Value = san
	ek := mustParseEK(t, p.issueEK(t, newKey(t).Public(), tmpl).Raw)
	if len(ek.UnhandledCriticalExtensions) != 1 {
		t.Errorf("UnhandledCriticalExtensions = %v, want the SAN kept unhandled", ek.UnhandledCriticalExtensions)
	}
	if id := IdentityOf(ek); id != (TPMIdentity{}) {
		t.Errorf("IdentityOf = %+v, want zero", id)
	}
}

func TestSerialQuirks(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	ek := p.issueEK(t, newKey(t).Public(), ekTemplate(0x0102, testEnd))
	for _, tc := range []struct {
		name   string
		serial []byte
		want   *big.Int
	}{
		{"negative", []byte{0x80, 0x01}, big.NewInt(-32767)},
		{"leading zero", []byte{0x00, 0x01, 0x02}, big.NewInt(0x0102)},
		{"leading zeros, high bit", []byte{0x00, 0x00, 0x81}, big.NewInt(0x81)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			der := resign(t, withSerial(t, ek.RawTBSCertificate, tc.serial), p.interKey)
			if _, err := x509.ParseCertificate(der); err == nil {
				t.Fatal("crypto/x509 parsed it: the test no longer shows the quirk")
			}
			c := mustParseEK(t, append(der, 0, 0))
			if c.SerialNumber.Cmp(tc.want) != 0 {
				t.Errorf("SerialNumber = %v, want %v", c.SerialNumber, tc.want)
			}
			if !bytes.Equal(c.Raw, der) {
				t.Error("Raw is not the original DER")
			}
			if _, err := anchors(p.root).Verify(c, []*x509.Certificate{p.inter}, testNow); err != nil {
				t.Errorf("Verify (signature over the original bytes): %v", err)
			}
		})
	}
	t.Run("forged after re-encoding", func(t *testing.T) {
		der := resign(t, withSerial(t, ek.RawTBSCertificate, []byte{0x80, 0x01}), newKey(t))
		c := mustParseEK(t, der)
		if _, err := anchors(p.root).Verify(c, []*x509.Certificate{p.inter}, testNow); err == nil {
			t.Error("a certificate signed by another key verified")
		}
	})
}

func TestOAEPKey(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := ekTemplate(11, testEnd)
	tmpl.KeyUsage = x509.KeyUsageKeyEncipherment
	ek := p.issueEK(t, &rk.PublicKey, tmpl)
	rsaEncryption := []byte{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01}
	oaep := []byte{0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x07}
	tbs := bytes.Replace(ek.RawTBSCertificate, rsaEncryption, oaep, 1)
	c := mustParseEK(t, resign(t, tbs, p.interKey))
	pub, ok := c.PublicKey.(*rsa.PublicKey)
	if !ok || !pub.Equal(&rk.PublicKey) {
		t.Fatalf("PublicKey = %T, want the RSA key", c.PublicKey)
	}
	if _, err := anchors(p.root).Verify(c, []*x509.Certificate{p.inter}, testNow); err != nil {
		t.Errorf("Verify: %v", err)
	}
}

// swtpm's own EK certificates (swtpm_setup --create-ek-cert with a private swtpm_localca): a critical SAN of
// DirectoryName form, manufacturer id:00001014, an RSA and a P-384 EK.
func TestSwtpmEKCertificates(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"rootca.pem", "issuer.pem"} {
		b, err := os.ReadFile(filepath.Join("testdata/swtpm", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	withLocalCA, err := LoadRoots(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"ek-rsa2048.der", "ek-secp384r1.der"} {
		t.Run(f, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join("testdata/swtpm", f))
			if err != nil {
				t.Fatal(err)
			}
			c := mustParseEK(t, data)
			want := TPMIdentity{Manufacturer: "id:00001014", Model: "swtpm", Version: "id:20191023"}
			if got := IdentityOf(c); got != want {
				t.Errorf("IdentityOf = %+v, want %+v", got, want)
			}
			if known, match := ManufacturerMatch(IdentityOf(c).Manufacturer, 0x49424D00); !known || !match {
				t.Errorf("ManufacturerMatch(swtpm, IBM) = %v, %v; want a match", known, match)
			}
			if _, err := withLocalCA.Verify(c, nil, testNow); err != nil {
				t.Errorf("Verify with swtpm-localca's root: %v", err)
			}
			_, err = BuiltinRoots().Verify(c, nil, testNow)
			if !errors.Is(err, ErrUnknownVendor) || !strings.Contains(err.Error(), "swtpm-localca") {
				t.Errorf("Verify with the built-in roots: %v, want ErrUnknownVendor naming swtpm-localca", err)
			}
		})
	}
}

// A root with the issuer's name but another key: the cause says crypto/x509's words.
func TestUnknownVendorSaysWhyACandidateFailed(t *testing.T) {
	p, q := newTestPKI(t, time.Time{}), newTestPKI(t, time.Time{})
	ek := mustParseEK(t, p.issueEK(t, newKey(t).Public(), nil).Raw)
	_, err := anchors(q.inter).Verify(ek, nil, testNow) // same subject as p's intermediate, another key
	if !errors.Is(err, ErrUnknownVendor) || !strings.Contains(err.Error(), "possibly because of") {
		t.Errorf("err = %v, want ErrUnknownVendor with crypto/x509's reason", err)
	}
}
