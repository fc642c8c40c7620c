package ca

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/internal/testutil"
)

// A CRL of the issuing CA: Go parses it back, OpenSSL prints the entry with its reason and refuses the revoked leaf
// under -crl_check while it accepts another one.
func TestCRLWithOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	g := newCA(t)
	sign := func(cn string) *x509.Certificate {
		c, err := g.CA.Sign(Request{CSR: csrFor(t, testutil.ECKey(), cn), Subject: pkix.Name{CommonName: cn}, Validity: time.Hour,
			CRLDistributionPoints: []string{"http://crl.example/crl/line-1"}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	bad, good := sign("bad"), sign("good")
	if len(bad.CRLDistributionPoints) != 1 || bad.CRLDistributionPoints[0] != "http://crl.example/crl/line-1" {
		t.Fatalf("CRL distribution points %v", bad.CRLDistributionPoints)
	}
	code, err := ReasonCode("keyCompromise")
	if err != nil || code != 1 {
		t.Fatalf("keyCompromise = %d, %v", code, err)
	}
	if _, err := ReasonCode("stolen"); err == nil || !strings.Contains(err.Error(), "cessationOfOperation") {
		t.Fatalf("unknown reason: %v", err)
	}
	now := time.Now()
	der, err := g.CA.CRL([]Revoked{{Serial: bad.SerialNumber, At: now, Reason: code}}, 7, now, now.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil || rl.CheckSignatureFrom(g.CA.Issuing) != nil || rl.Number.Int64() != 7 || len(rl.RevokedCertificateEntries) != 1 {
		t.Fatalf("parsed CRL %+v, %v", rl, err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	crl := write("crl.pem", pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}))
	root, iss := write("root.crt", EncodeCerts(g.CA.Root)), write("issuing.crt", EncodeCerts(g.CA.Issuing))
	out, err := exec.Command("openssl", "crl", "-in", crl, "-noout", "-text").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "Key Compromise") || !strings.Contains(string(out), "X509v3 CRL Number") ||
		!strings.Contains(strings.ToUpper(string(out)), strings.ToUpper(bad.SerialNumber.Text(16))) {
		t.Fatalf("openssl crl -text: %v\n%s", err, out)
	}
	verify := func(c *x509.Certificate) (string, error) {
		leaf := write(c.Subject.CommonName+".crt", EncodeCerts(c))
		out, err := exec.Command("openssl", "verify", "-crl_check", "-CRLfile", crl, "-CAfile", root, "-untrusted", iss, leaf).CombinedOutput()
		return string(out), err
	}
	if out, err := verify(bad); err == nil || !strings.Contains(out, "revoked") {
		t.Fatalf("openssl verify of the revoked certificate: %v\n%s", err, out)
	}
	if out, err := verify(good); err != nil {
		t.Fatalf("openssl verify of a valid certificate: %v\n%s", err, out)
	}
}

func TestRenewKeepsKeyAndSubject(t *testing.T) {
	g := newCA(t)
	key := testutil.ECKey()
	old, err := g.CA.Sign(Request{CSR: csrFor(t, key, "x"), Subject: pkix.Name{CommonName: "device-SN-1", Organization: []string{"Ex"}}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := g.CA.Renew(old, Request{Validity: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !publicKeysEqual(nc.PublicKey, key.Public()) || nc.Subject.String() != old.Subject.String() || nc.SerialNumber.Cmp(old.SerialNumber) == 0 ||
		!nc.NotAfter.After(old.NotAfter) || g.CA.Verify(nc, time.Time{}) != nil {
		t.Fatalf("renewed certificate %+v", nc)
	}
	other := newCA(t)
	if _, err := other.CA.Renew(old, Request{Validity: time.Hour}); err == nil {
		t.Fatal("a CA renewed a certificate it did not issue")
	}
}

// The server root is self-signed, separate from the device root, serverAuth only; the device issuing CA can never be
// a server CA.
func TestServerCA(t *testing.T) {
	s, err := GenerateServerRoot("Test Factory", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	key := testutil.ECKey()
	c, err := s.SignServer(key.Public(), []string{"broker.example.com"}, []net.IP{net.ParseIP("127.0.0.1")}, 0)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.Root)
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, DNSName: "broker.example.com", KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err == nil {
		t.Fatal("a server certificate verifies for client authentication")
	}
	g := newCA(t)
	if _, err := NewServerCA(g.CA.Issuing, g.CA.Signer); !errors.Is(err, ErrNotServerCA) {
		t.Fatalf("the device issuing CA as server CA: %v", err)
	}
	if _, err := NewServerCA(s.Root, g.CA.Signer); !errors.Is(err, ErrNotServerCA) {
		t.Fatalf("a foreign key: %v", err)
	}
	if _, err := s.SignServer(key.Public(), nil, nil, 0); err == nil {
		t.Fatal("a server certificate without names")
	}
}
