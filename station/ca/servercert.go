package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"net"
	"time"
)

// The server CA: a self-signed root of its own that issues TLS server certificates (the fleet's MQTT broker, the
// Mender server's proxy) which devices are given as their trust anchor (station.yaml server_ca). It is separate from
// the device root and never the device issuing CA: CA has no method that issues a server certificate, and NewServerCA
// refuses any certificate that is not a self-signed root allowed to vouch for servers.

// Lifetimes of the server root and of the server certificates it issues.
const (
	ServerRootLifetime = 20 * 365 * 24 * time.Hour
	ServerCertLifetime = 825 * 24 * time.Hour
)

// ErrNotServerCA: the certificate cannot be a server CA (not self-signed, not a CA, or constrained to client
// authentication, as the device issuing CA is).
var ErrNotServerCA = errors.New("not a server CA")

// ServerCA is the server root and its key.
type ServerCA struct {
	Root   *x509.Certificate
	Signer crypto.Signer
}

// GenerateServerRoot makes a self-signed P-384 server root ("<name> Server Root CA", 20 years) whose extended key
// usage is serverAuth only: what it issues can never authenticate a device.
func GenerateServerRoot(name string, now time.Time) (*ServerCA, error) {
	if now.IsZero() {
		now = time.Now()
	}
	now = now.UTC().Truncate(time.Second)
	key, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate server root key: %w", err)
	}
	root, err := caCert(pkix.Name{CommonName: name + " Server Root CA", Organization: []string{name}}, key.Public(), nil, key,
		now.Add(-Backdate), now.Add(ServerRootLifetime), 0, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	if err != nil {
		return nil, fmt.Errorf("ca: generate server root: %w", err)
	}
	return NewServerCA(root, key)
}

// NewServerCA checks that root is a self-signed CA allowed to vouch for servers and that signer is its key.
func NewServerCA(root *x509.Certificate, signer crypto.Signer) (*ServerCA, error) {
	switch {
	case !publicKeysEqual(root.PublicKey, signer.Public()):
		return nil, fmt.Errorf("ca: server CA key does not belong to %q: %w", root.Subject, ErrNotServerCA)
	case !root.IsCA || root.KeyUsage&x509.KeyUsageCertSign == 0:
		return nil, fmt.Errorf("ca: %q is not a CA allowed to sign certificates: %w", root.Subject, ErrNotServerCA)
	case !bytes.Equal(root.RawIssuer, root.RawSubject) || root.CheckSignatureFrom(root) != nil:
		return nil, fmt.Errorf("ca: %q is not a self-signed root: the server CA is a root of its own, never the device issuing CA: %w", root.Subject, ErrNotServerCA)
	case ClientAuthOnly(root):
		return nil, fmt.Errorf("ca: %q is constrained to client authentication: %w", root.Subject, ErrNotServerCA)
	}
	return &ServerCA{Root: root, Signer: signer}, nil
}

// SignServer issues a TLS server certificate for pub: subject CN = the first DNS name (else the first IP), SANs
// from dnsNames and ips, KeyUsage digitalSignature, ExtKeyUsage serverAuth, CA:false, SKI/AKI, a random serial,
// NotBefore 5 minutes back, NotAfter now + validity clipped to the root's.
func (s *ServerCA) SignServer(pub crypto.PublicKey, dnsNames []string, ips []net.IP, validity time.Duration) (*x509.Certificate, error) {
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, errors.New("ca: server certificate: give at least one DNS name or IP address")
	}
	if validity <= 0 {
		validity = ServerCertLifetime
	}
	cn := ""
	if len(dnsNames) > 0 {
		cn = dnsNames[0]
	} else {
		cn = ips[0].String()
	}
	return issueLeaf("server certificate", s.Root, s.Signer, pub, x509.Certificate{Subject: pkix.Name{CommonName: cn},
		DNSNames: dnsNames, IPAddresses: ips, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, time.Time{}, validity)
}
