package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"provision/internal/testutil"
)

func newCA(tb testing.TB) *Generated {
	tb.Helper()
	g, err := Generate("Test Factory", time.Time{})
	if err != nil {
		tb.Fatal(err)
	}
	return g
}

func csrFor(tb testing.TB, key crypto.Signer, cn string) *x509.CertificateRequest {
	tb.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		tb.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		tb.Fatal(err)
	}
	return csr
}

func TestGenerateHierarchy(t *testing.T) {
	g := newCA(t)
	root, iss := g.CA.Root, g.CA.Issuing
	if k, ok := root.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P384() {
		t.Errorf("root key is %T, want P-384", root.PublicKey)
	}
	if k, ok := iss.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		t.Errorf("issuing key is %T, want P-256", iss.PublicKey)
	}
	if !iss.MaxPathLenZero || iss.MaxPathLen != 0 {
		t.Errorf("issuing path length: %d zero=%v, want 0", iss.MaxPathLen, iss.MaxPathLenZero)
	}
	if got := root.NotAfter.Sub(root.NotBefore); got < RootLifetime {
		t.Errorf("root lifetime %s", got)
	}
	if got := iss.NotAfter.Sub(iss.NotBefore); got < IssuingLifetime {
		t.Errorf("issuing lifetime %s", got)
	}
	if !bytes.Equal(iss.AuthorityKeyId, root.SubjectKeyId) {
		t.Error("issuing AKI != root SKI")
	}
}

func TestSignPolicy(t *testing.T) {
	g := newCA(t)
	devKey := testutil.ECKey()
	uri, _ := url.Parse("urn:dev:serial:SN123")
	now := time.Now().UTC().Truncate(time.Second)
	cert, err := g.CA.Sign(Request{
		CSR:       csrFor(t, devKey, "ignored"),
		Subject:   pkix.Name{CommonName: "device-SN123", Organization: []string{"Acme"}},
		URIs:      []*url.URL{uri},
		Validity:  825 * 24 * time.Hour,
		PublicKey: devKey.Public(),
		Now:       now,
	})
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name string
		ok   bool
	}{
		{"subject CN from template, not CSR", cert.Subject.CommonName == "device-SN123"},
		{"key usage digitalSignature only", cert.KeyUsage == x509.KeyUsageDigitalSignature},
		{"EKU clientAuth only", len(cert.ExtKeyUsage) == 1 && cert.ExtKeyUsage[0] == x509.ExtKeyUsageClientAuth},
		{"CA:false", cert.BasicConstraintsValid && !cert.IsCA},
		{"SKI set", len(cert.SubjectKeyId) == 20},
		{"AKI = issuing SKI", bytes.Equal(cert.AuthorityKeyId, g.CA.Issuing.SubjectKeyId)},
		{"serial 127-128 bits", cert.SerialNumber.BitLen() >= 127 && cert.SerialNumber.BitLen() <= 128 && cert.SerialNumber.Sign() > 0},
		{"not before 5 min back", cert.NotBefore.Equal(now.Add(-5 * time.Minute))},
		{"validity", cert.NotAfter.Equal(now.Add(825 * 24 * time.Hour))},
		{"SAN URI", len(cert.URIs) == 1 && cert.URIs[0].String() == "urn:dev:serial:SN123"},
		{"ECDSA-SHA256 by issuing", cert.SignatureAlgorithm == x509.ECDSAWithSHA256},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("policy: %s", c.name)
		}
	}
	if err := g.CA.Verify(cert, time.Time{}); err != nil {
		t.Errorf("verify chain: %v", err)
	}
}

func TestSignRefusals(t *testing.T) {
	g := newCA(t)
	devKey := testutil.ECKey()
	otherKey := testutil.ECKey()
	good := csrFor(t, devKey, "x")
	tampered := *good
	tampered.Signature = append([]byte(nil), good.Signature...)
	tampered.Signature[len(tampered.Signature)-3] ^= 0xff
	tests := []struct {
		name string
		req  Request
		want error
	}{
		{"no CSR", Request{Validity: time.Hour}, ErrBadCSR},
		{"bad CSR signature", Request{CSR: &tampered, Validity: time.Hour}, ErrBadCSR},
		{"CSR key is not the device key", Request{CSR: good, Validity: time.Hour, PublicKey: otherKey.Public()}, ErrKeyMismatch},
		{"issuing CA expired", Request{CSR: good, Validity: time.Hour, Now: time.Now().Add(6 * 365 * 24 * time.Hour)}, ErrExpired},
		{"issuing CA not yet valid", Request{CSR: good, Validity: time.Hour, Now: time.Now().Add(-time.Hour)}, ErrExpired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := g.CA.Sign(tt.req)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
}

func TestSignClipsToIssuer(t *testing.T) {
	g := newCA(t)
	devKey := testutil.ECKey()
	cert, err := g.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "x"}, Validity: 50 * 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !cert.NotAfter.Equal(g.CA.Issuing.NotAfter) {
		t.Fatalf("not after %s, want the issuer's %s", cert.NotAfter, g.CA.Issuing.NotAfter)
	}
}

func TestSignRSADevice(t *testing.T) {
	g := newCA(t)
	devKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	cert, err := g.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "x"}, Validity: time.Hour, PublicKey: devKey.Public()})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := cert.PublicKey.(*rsa.PublicKey); !ok {
		t.Fatalf("public key %T", cert.PublicKey)
	}
}

func TestNewRejectsInconsistentCA(t *testing.T) {
	a, b := newCA(t), newCA(t)
	tests := []struct {
		name          string
		root, issuing *x509.Certificate
		key           crypto.Signer
	}{
		{"key of another CA", a.CA.Root, a.CA.Issuing, b.CA.Signer},
		{"issuing under another root", b.CA.Root, a.CA.Issuing, a.CA.Signer},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := New(tt.root, tt.issuing, tt.key); !errors.Is(err, ErrBadCA) {
				t.Fatalf("got %v, want ErrBadCA", err)
			}
		})
	}
	// A leaf certificate is not a CA.
	devKey := testutil.ECKey()
	leaf, err := a.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "x"}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := New(a.CA.Root, leaf, devKey); !errors.Is(err, ErrBadCA) {
		t.Fatalf("leaf as issuing CA: got %v, want ErrBadCA", err)
	}
}

func TestKeyRoundTrip(t *testing.T) {
	g := newCA(t)
	tests := []struct {
		name       string
		pass, read []byte
		want       error
	}{
		{"plain", nil, nil, nil},
		{"encrypted", []byte("s3cret"), []byte("s3cret"), nil},
		{"encrypted, no passphrase", []byte("s3cret"), nil, ErrPassphraseNeeded},
		{"encrypted, wrong passphrase", []byte("s3cret"), []byte("nope"), ErrWrongPassphrase},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := MarshalKey(g.CA.Signer, tt.pass)
			if err != nil {
				t.Fatal(err)
			}
			if len(tt.pass) > 0 && bytes.Contains(b, []byte("BEGIN PRIVATE KEY")) {
				t.Fatal("encrypted key written in the clear")
			}
			k, err := ParseKey(b, tt.read)
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if err == nil && !publicKeysEqual(k.Public(), g.CA.Signer.Public()) {
				t.Fatal("key changed in the round trip")
			}
		})
	}
	if _, err := ParseKey([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), nil); !errors.Is(err, ErrBadKey) {
		t.Fatalf("certificate as key: got %v", err)
	}
}

// OpenSSL reads the encrypted key and verifies an issued certificate against the chain.
func TestOpenSSLInterop(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	g := newCA(t)
	dir := t.TempDir()
	devKey := testutil.ECKey()
	cert, err := g.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "device-1"}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ := MarshalKey(g.CA.Signer, []byte("pw"))
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root, iss, leaf := write("root.crt", EncodeCerts(g.CA.Root)), write("issuing.crt", EncodeCerts(g.CA.Issuing)), write("device.crt", EncodeCerts(cert))
	keyFile := write("issuing.key", keyPEM)
	if out, err := exec.Command("openssl", "verify", "-CAfile", root, "-untrusted", iss, leaf).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify: %v\n%s", err, out)
	}
	if out, err := exec.Command("openssl", "pkey", "-in", keyFile, "-passin", "pass:pw", "-noout").CombinedOutput(); err != nil {
		t.Fatalf("openssl pkey on the encrypted key: %v\n%s", err, out)
	}
}

func BenchmarkSign(b *testing.B) {
	g := newCA(b)
	devKey := testutil.ECKey()
	csr := csrFor(b, devKey, "x")
	for b.Loop() {
		if _, err := g.CA.Sign(Request{CSR: csr, Subject: pkix.Name{CommonName: "x"}, Validity: time.Hour}); err != nil {
			b.Fatal(err)
		}
	}
}

func TestLoadChecks(t *testing.T) {
	a, b := newCA(t), newCA(t)
	if _, err := Load(a.CA.Root, a.CA.Issuing, a.CA.Signer); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(a.CA.Root, a.CA.Issuing, b.CA.Signer); !errors.Is(err, ErrBadCA) {
		t.Fatalf("foreign key: %v", err)
	}
	if _, err := Load(b.CA.Root, a.CA.Issuing, a.CA.Signer); !errors.Is(err, ErrBadCA) {
		t.Fatalf("foreign root: %v", err)
	}
}

// A generated issuing CA is constrained to client authentication: even a server certificate made with its key (a
// stolen station key) does not verify for a TLS server, with OpenSSL or Go, while device certificates verify as clients.
func TestIssuingCAClientAuthOnly(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	g := newCA(t)
	if !ClientAuthOnly(g.CA.Issuing) {
		t.Fatalf("issuing CA extended key usage %v %v, want clientAuth only", g.CA.Issuing.ExtKeyUsage, g.CA.Issuing.UnknownExtKeyUsage)
	}
	if ClientAuthOnly(g.CA.Root) {
		t.Fatal("the root is constrained too")
	}
	devKey := testutil.ECKey()
	client, err := g.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "device-1"}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	srvKey := testutil.ECKey()
	sn, _ := RandomSerial()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: sn, Subject: pkix.Name{CommonName: "broker.example"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, DNSNames: []string{"broker.example"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}, g.CA.Issuing, srvKey.Public(), g.CA.Signer)
	if err != nil {
		t.Fatal(err)
	}
	server, _ := x509.ParseCertificate(der)

	dir := t.TempDir()
	write := func(name string, c *x509.Certificate) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, EncodeCerts(c), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	root, iss := write("root.crt", g.CA.Root), write("issuing.crt", g.CA.Issuing)
	verify := func(purpose, leaf string) ([]byte, error) {
		return exec.Command("openssl", "verify", "-purpose", purpose, "-CAfile", root, "-untrusted", iss, leaf).CombinedOutput()
	}
	if out, err := verify("sslclient", write("device.crt", client)); err != nil {
		t.Fatalf("openssl verify -purpose sslclient of a device certificate: %v\n%s", err, out)
	}
	if out, err := verify("sslserver", write("server.crt", server)); err == nil {
		t.Fatalf("openssl verify -purpose sslserver accepted a server certificate from the issuing CA:\n%s", out)
	}
	roots := x509.NewCertPool()
	roots.AddCert(g.CA.Root)
	inter := x509.NewCertPool()
	inter.AddCert(g.CA.Issuing)
	if _, err := server.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: "broker.example"}); err == nil {
		t.Fatal("Go verified a server certificate from the issuing CA")
	}
	if err := g.CA.Verify(client, time.Now()); err != nil {
		t.Fatalf("device certificate: %v", err)
	}
}
