// Package ca is the station's certificate authority: it turns a device's CSR into a client certificate under a fixed policy.
//
// Policy of every issued certificate (Sign):
//   - the CSR's signature must verify, and its public key must equal Request.PublicKey when that is set;
//   - subject from Request.Subject (the CSR's own subject is ignored), SAN URIs from Request.URIs;
//   - KeyUsage digitalSignature, ExtKeyUsage clientAuth, BasicConstraints CA:false (critical);
//   - SubjectKeyId = SHA-1 of the public key's subjectPublicKey bits (RFC 5280 §4.2.1.2 method 1), AuthorityKeyId = the
//     issuing CA's SubjectKeyId;
//   - a random positive 128-bit serial number;
//   - NotBefore 5 minutes before now (clock skew on devices), NotAfter now + Validity, clipped to the issuing CA's NotAfter so
//     that no certificate outlives its issuer;
//   - signed by the issuing key: ECDSA with SHA-256 for P-256 issuers, SHA-384 for P-384, SHA-256 for RSA;
//   - the CRL distribution point when Request.CRLDistributionPoints names one.
//
// The issuing CA signs client certificates (Sign; Renew for a rotation) and its CRL (crl.go), never a server
// certificate: those come from the station's separate, self-signed server root (servercert.go).
package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"
)

// Backdate is how far NotBefore lies before the signing time.
const Backdate = 5 * time.Minute

var (
	// ErrBadCSR: the CSR does not parse or its signature does not verify.
	ErrBadCSR = errors.New("bad certificate request")
	// ErrKeyMismatch: the CSR's public key is not the key the station just created.
	ErrKeyMismatch = errors.New("certificate request public key does not match the device key")
	// ErrBadCA: the CA material is inconsistent (key does not match, issuing does not chain to root, not a CA).
	ErrBadCA = errors.New("unusable CA")
	// ErrExpired: the issuing CA is not valid now.
	ErrExpired = errors.New("issuing CA is not valid now")
)

// CA is an issuing CA and the root above it.
type CA struct {
	Root    *x509.Certificate
	Issuing *x509.Certificate
	Signer  crypto.Signer // the issuing CA's private key
}

// New checks that signer is issuing's key, that issuing is a CA allowed to sign certificates and that it chains to root.
func New(root, issuing *x509.Certificate, signer crypto.Signer) (*CA, error) {
	if !publicKeysEqual(issuing.PublicKey, signer.Public()) {
		return nil, fmt.Errorf("ca: issuing key does not belong to the issuing certificate %q: %w", issuing.Subject, ErrBadCA)
	}
	if !issuing.IsCA || issuing.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("ca: %q is not a CA certificate allowed to sign certificates: %w", issuing.Subject, ErrBadCA)
	}
	if !root.IsCA {
		return nil, fmt.Errorf("ca: root %q is not a CA certificate: %w", root.Subject, ErrBadCA)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	_, err := issuing.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: issuing.NotBefore.Add(time.Second), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, fmt.Errorf("ca: issuing CA %q does not chain to root %q: %v: %w", issuing.Subject, root.Subject, err, ErrBadCA)
	}
	return &CA{Root: root, Issuing: issuing, Signer: signer}, nil
}

// Load is New without the signature check of issuing by root: for a station loading CA files that New checked when they
// were generated or imported. It still checks that signer is issuing's key, that issuing is a CA allowed to sign and
// that it names root as its issuer (subject and key identifier). It saves a P-384 verification (~1.5 ms) per command.
func Load(root, issuing *x509.Certificate, signer crypto.Signer) (*CA, error) {
	if !publicKeysEqual(issuing.PublicKey, signer.Public()) {
		return nil, fmt.Errorf("ca: issuing key does not belong to the issuing certificate %q: %w", issuing.Subject, ErrBadCA)
	}
	if !issuing.IsCA || issuing.KeyUsage&x509.KeyUsageCertSign == 0 || !root.IsCA {
		return nil, fmt.Errorf("ca: %q or %q is not a CA certificate allowed to sign: %w", issuing.Subject, root.Subject, ErrBadCA)
	}
	if !bytes.Equal(issuing.RawIssuer, root.RawSubject) || (len(issuing.AuthorityKeyId) > 0 && !bytes.Equal(issuing.AuthorityKeyId, root.SubjectKeyId)) {
		return nil, fmt.Errorf("ca: issuing CA %q was not issued by root %q: %w", issuing.Subject, root.Subject, ErrBadCA)
	}
	return &CA{Root: root, Issuing: issuing, Signer: signer}, nil
}

// ClientAuthOnly reports whether the CA certificate's extended key usage allows client authentication and nothing
// else, so nothing it issues can act as a TLS server. A CA without the extension is unconstrained.
func ClientAuthOnly(c *x509.Certificate) bool {
	return len(c.UnknownExtKeyUsage) == 0 && len(c.ExtKeyUsage) == 1 && c.ExtKeyUsage[0] == x509.ExtKeyUsageClientAuth
}

// Request is what the station asks the CA to certify.
type Request struct {
	CSR       *x509.CertificateRequest
	Subject   pkix.Name
	URIs      []*url.URL
	Validity  time.Duration
	PublicKey crypto.PublicKey // when set, the CSR's key must equal it
	Now       time.Time        // zero: time.Now()
	// CRLDistributionPoints are the URLs of the station's CRL written into the certificate (station.yaml crl.url).
	CRLDistributionPoints []string
}

// Sign checks the CSR and issues a client certificate under the package policy.
func (ca *CA) Sign(req Request) (*x509.Certificate, error) {
	if req.CSR == nil {
		return nil, fmt.Errorf("ca: sign: no certificate request: %w", ErrBadCSR)
	}
	if err := req.CSR.CheckSignature(); err != nil {
		return nil, fmt.Errorf("ca: sign: %v: %w", err, ErrBadCSR)
	}
	if req.PublicKey != nil && !publicKeysEqual(req.PublicKey, req.CSR.PublicKey) {
		return nil, fmt.Errorf("ca: sign: %w", ErrKeyMismatch)
	}
	return ca.issue("sign", req.CSR.PublicKey, req)
}

// issue makes a client certificate for pub under the package policy (Sign after its CSR checks; Renew).
func (ca *CA) issue(op string, pub crypto.PublicKey, req Request) (*x509.Certificate, error) {
	return issueLeaf(op, ca.Issuing, ca.Signer, pub, x509.Certificate{Subject: req.Subject, URIs: req.URIs,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, CRLDistributionPoints: req.CRLDistributionPoints},
		req.Now, req.Validity)
}

// issueLeaf is what every certificate this package issues shares (client, server, attestation key): tmpl gives the
// subject, names and key usage purposes; the rest is fixed here: a random positive 128-bit serial, NotBefore 5 minutes
// before now (zero: time.Now()), NotAfter now + validity clipped to the issuer's, KeyUsage digitalSignature, CA:false,
// SubjectKeyId of pub and AuthorityKeyId of the issuer, signed with the issuer's key. An issuer not valid now is
// ErrExpired.
func issueLeaf(op string, issuer *x509.Certificate, signer crypto.Signer, pub crypto.PublicKey, tmpl x509.Certificate,
	now time.Time, validity time.Duration) (*x509.Certificate, error) {
	if validity <= 0 {
		return nil, fmt.Errorf("ca: %s: validity must be positive, got %s", op, validity)
	}
	if now.IsZero() {
		now = time.Now()
	}
	now = now.UTC().Truncate(time.Second)
	if now.Before(issuer.NotBefore) || !now.Before(issuer.NotAfter) {
		return nil, fmt.Errorf("ca: %s: %q valid %s to %s: %w", op, issuer.Subject, issuer.NotBefore.Format(time.DateOnly),
			issuer.NotAfter.Format(time.DateOnly), ErrExpired)
	}
	notAfter := now.Add(validity)
	if notAfter.After(issuer.NotAfter) {
		notAfter = issuer.NotAfter
	}
	ski, err := SubjectKeyID(pub)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	serial, err := RandomSerial()
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	t := tmpl
	t.SerialNumber, t.NotBefore, t.NotAfter = serial, now.Add(-Backdate), notAfter
	t.KeyUsage = x509.KeyUsageDigitalSignature
	t.BasicConstraintsValid, t.IsCA, t.MaxPathLen, t.MaxPathLenZero = true, false, 0, false
	t.SubjectKeyId, t.AuthorityKeyId = ski, issuer.SubjectKeyId
	t.SignatureAlgorithm = signatureAlgorithm(signer.Public())
	der, err := x509.CreateCertificate(rand.Reader, &t, issuer, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	return cert, nil
}

// Chain is the issuing certificate then the root.
func (ca *CA) Chain() []*x509.Certificate { return []*x509.Certificate{ca.Issuing, ca.Root} }

// Verify checks that cert chains to the root through the issuing CA for client authentication, at time t (zero: now).
func (ca *CA) Verify(cert *x509.Certificate, t time.Time) error {
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(ca.Root)
	inter.AddCert(ca.Issuing)
	_, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: t,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	return err
}

// RandomSerial is a random positive 128-bit certificate serial number.
func RandomSerial() (*big.Int, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	b[0] &= 0x7f // positive, and DER-encodes in at most 16 bytes
	b[0] |= 0x40 // never shorter than 127 bits: stable length
	return new(big.Int).SetBytes(b), nil
}

// SubjectKeyID is RFC 5280 method 1: SHA-1 of the subjectPublicKey BIT STRING.
func SubjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("subject key id: %w", err)
	}
	var spki struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &spki); err != nil {
		return nil, fmt.Errorf("subject key id: %w", err)
	}
	sum := sha1.Sum(spki.PublicKey.Bytes)
	return sum[:], nil
}

func signatureAlgorithm(pub crypto.PublicKey) x509.SignatureAlgorithm {
	if k, ok := pub.(*ecdsa.PublicKey); ok {
		switch k.Curve {
		case elliptic.P384():
			return x509.ECDSAWithSHA384
		case elliptic.P521():
			return x509.ECDSAWithSHA512
		}
		return x509.ECDSAWithSHA256
	}
	if _, ok := pub.(*rsa.PublicKey); ok {
		return x509.SHA256WithRSA
	}
	return x509.UnknownSignatureAlgorithm
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	da, errA := x509.MarshalPKIXPublicKey(a)
	db, errB := x509.MarshalPKIXPublicKey(b)
	return errA == nil && errB == nil && bytes.Equal(da, db)
}

// EncodeCerts PEM-encodes certificates in order.
func EncodeCerts(certs ...*x509.Certificate) []byte {
	var buf bytes.Buffer
	for _, c := range certs {
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return buf.Bytes()
}

// ParseCerts reads every CERTIFICATE block of a PEM file. Other block types are an error, so a key pasted by mistake
// into a certificate file is noticed.
func ParseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q where a certificate belongs", blk.Type)
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return out, nil
}
