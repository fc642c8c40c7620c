package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"provision/internal/testutil"
)

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
	devKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	client, err := g.CA.Sign(Request{CSR: csrFor(t, devKey, "x"), Subject: pkix.Name{CommonName: "device-1"}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	srvKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
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
