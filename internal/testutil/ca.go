package testutil

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CA is a throw-away root and issuing CA, as a station has.
type CA struct {
	Root, Issuing *x509.Certificate
	RootKey, Key  crypto.Signer
}

// ECKey is a fresh P-256 key.
func ECKey() crypto.Signer { k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader); return k }

// caTemplate is a CA certificate template valid from an hour ago until until.
func caTemplate(serial int64, cn string, until time.Time) *x509.Certificate {
	return &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: until, IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
}

// sign creates the certificate and parses it back.
func sign(tb testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return cert
}

// NewCA makes a root ("NAME Root") and an issuing CA under it ("NAME Issuing"), valid for a day.
func NewCA(tb testing.TB, name string) *CA {
	tb.Helper()
	rk, ik := ECKey(), ECKey()
	rt := caTemplate(1, name+" Root", time.Now().Add(24*time.Hour))
	root := sign(tb, rt, rt, rk.Public(), rk)
	it := caTemplate(2, name+" Issuing", time.Now().Add(24*time.Hour))
	it.MaxPathLenZero = true
	return &CA{Root: root, Issuing: sign(tb, it, root, ik.Public(), rk), RootKey: rk, Key: ik}
}

// Pool is a pool holding the root.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.Root)
	return p
}

// Issue issues a certificate for pub from the issuing CA, valid for an hour: a client certificate, or with server a
// server certificate for names (IP addresses or DNS names).
func (c *CA) Issue(tb testing.TB, pub crypto.PublicKey, cn string, server bool, names ...string) *x509.Certificate {
	tb.Helper()
	sn, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	tmpl := &x509.Certificate{SerialNumber: sn, Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
	}
	return sign(tb, tmpl, c.Issuing, pub, c.Key)
}

// WritePEM writes certificates and private keys (PKCS #8) to path as PEM, in order.
func WritePEM(tb testing.TB, path string, items ...any) {
	tb.Helper()
	var buf bytes.Buffer
	for _, it := range items {
		switch v := it.(type) {
		case *x509.Certificate:
			pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: v.Raw})
		case crypto.Signer:
			der, _ := x509.MarshalPKCS8PrivateKey(v)
			pem.Encode(&buf, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
		}
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		tb.Fatal(err)
	}
}

// LoopbackServerCert makes a throw-away server CA and a TLS server certificate for 127.0.0.1 signed by it; it returns
// the CA certificate as PEM and the server's certificate with its key.
func LoopbackServerCert(tb testing.TB) (caPEM []byte, cert tls.Certificate) {
	tb.Helper()
	caKey, key := ECKey(), ECKey()
	caTmpl := caTemplate(1, "test server CA", time.Now().Add(time.Hour))
	caCert := sign(tb, caTmpl, caTmpl, caKey.Public(), caKey)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	leaf := sign(tb, tmpl, caCert, key.Public(), caKey)
	caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caCert.Raw})
	return caPEM, tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
}

// ServerIdentity writes a LoopbackServerCert to dir as srv-ca.crt, srv.crt and srv.key (PKCS #8), for servers that
// read files (openssl s_server, mosquitto).
func ServerIdentity(tb testing.TB, dir string) (caFile, certFile, keyFile string) {
	tb.Helper()
	caPEM, cert := LoopbackServerCert(tb)
	caFile, certFile, keyFile = filepath.Join(dir, "srv-ca.crt"), filepath.Join(dir, "srv.crt"), filepath.Join(dir, "srv.key")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	WritePEM(tb, certFile, cert.Leaf)
	WritePEM(tb, keyFile, cert.PrivateKey)
	return caFile, certFile, keyFile
}
