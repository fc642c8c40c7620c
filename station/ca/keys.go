package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/youmark/pkcs8"

	"provision/internal/pemkey"
)

var (
	// ErrPassphraseNeeded: the key is encrypted and no passphrase was given.
	ErrPassphraseNeeded = errors.New("CA key is encrypted: set PROVISION_CA_PASSPHRASE")
	// ErrWrongPassphrase: the passphrase does not decrypt the key.
	ErrWrongPassphrase = errors.New("wrong CA key passphrase")
	// ErrBadKey: the key file is not a private key this station can use.
	ErrBadKey = errors.New("unusable CA key file")
)

// Lifetimes of the CA certificates that Generate makes.
const (
	RootLifetime    = 20 * 365 * 24 * time.Hour
	IssuingLifetime = 5 * 365 * 24 * time.Hour
)

// Generated is a freshly made root and issuing CA with their keys.
type Generated struct {
	CA      *CA
	RootKey crypto.Signer
}

// Generate makes a self-signed P-384 root (20 years) and a P-256 issuing CA under it (5 years, path length 0, extended
// key usage clientAuth only: the station's online key can never vouch for a server). name is used in both subjects
// ("<name> Root CA", "<name> Issuing CA").
func Generate(name string, now time.Time) (*Generated, error) {
	if now.IsZero() {
		now = time.Now()
	}
	now = now.UTC().Truncate(time.Second)
	rootKey, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate root key: %w", err)
	}
	root, err := caCert(pkix.Name{CommonName: name + " Root CA", Organization: []string{name}}, rootKey.Public(), nil, rootKey,
		now.Add(-Backdate), now.Add(RootLifetime), -1, nil)
	if err != nil {
		return nil, fmt.Errorf("ca: generate root: %w", err)
	}
	issKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("ca: generate issuing key: %w", err)
	}
	iss, err := caCert(pkix.Name{CommonName: name + " Issuing CA", Organization: []string{name}}, issKey.Public(), root, rootKey,
		now.Add(-Backdate), now.Add(IssuingLifetime), 0, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth})
	if err != nil {
		return nil, fmt.Errorf("ca: generate issuing CA: %w", err)
	}
	c, err := New(root, iss, issKey)
	if err != nil {
		return nil, err
	}
	return &Generated{CA: c, RootKey: rootKey}, nil
}

// caCert makes a CA certificate; parent nil means self-signed. maxPathLen -1 means unlimited. eku, when not empty,
// constrains what the CA's certificates may be used for (RFC 5280 leaves it to verifiers; Go, OpenSSL and most TLS
// stacks apply it down the chain).
func caCert(subject pkix.Name, pub crypto.PublicKey, parent *x509.Certificate, signer crypto.Signer, nb, na time.Time, maxPathLen int, eku []x509.ExtKeyUsage) (*x509.Certificate, error) {
	serial, err := RandomSerial()
	if err != nil {
		return nil, err
	}
	ski, err := SubjectKeyID(pub)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             nb,
		NotAfter:              na,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski,
		SignatureAlgorithm:    signatureAlgorithm(signer.Public()),
		ExtKeyUsage:           eku,
	}
	switch {
	case maxPathLen == 0:
		tmpl.MaxPathLen, tmpl.MaxPathLenZero = 0, true
	case maxPathLen > 0:
		tmpl.MaxPathLen = maxPathLen
	default:
		tmpl.MaxPathLen = -1
	}
	if parent == nil {
		parent = tmpl
	} else {
		tmpl.AuthorityKeyId = parent.SubjectKeyId
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// pbkdf2Opts protect CA keys at rest: PBES2, PBKDF2-HMAC-SHA256 with 600,000 iterations, AES-256-CBC (readable by
// `openssl pkey`).
var pbkdf2Opts = &pkcs8.Opts{
	Cipher:  pkcs8.AES256CBC,
	KDFOpts: pkcs8.PBKDF2Opts{SaltSize: 16, IterationCount: 600_000, HMACHash: crypto.SHA256},
}

// MarshalKey encodes a private key as PKCS#8 PEM; encrypted ("ENCRYPTED PRIVATE KEY") when passphrase is not empty.
func MarshalKey(key crypto.Signer, passphrase []byte) ([]byte, error) {
	if len(passphrase) == 0 {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("ca: marshal key: %w", err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
	}
	der, err := pkcs8.MarshalPrivateKey(key, passphrase, pbkdf2Opts)
	if err != nil {
		return nil, fmt.Errorf("ca: encrypt key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: der}), nil
}

// ParseKey reads a PEM private key: PKCS#8 (plain or encrypted), SEC1 "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY".
func ParseKey(b []byte, passphrase []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("ca: no PEM private key found: %w", ErrBadKey)
	}
	if blk.Type != "ENCRYPTED PRIVATE KEY" {
		s, err := pemkey.Parse(blk)
		if err != nil {
			return nil, fmt.Errorf("ca: %v: %w", err, ErrBadKey)
		}
		return s, nil
	}
	if len(passphrase) == 0 {
		return nil, fmt.Errorf("ca: %w", ErrPassphraseNeeded)
	}
	key, _, err := pkcs8.ParsePrivateKey(blk.Bytes, passphrase)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", ErrWrongPassphrase)
	}
	s, err := pemkey.Signer(key)
	if err != nil {
		return nil, fmt.Errorf("ca: %v: %w", err, ErrBadKey)
	}
	return s, nil
}

// Fingerprint is the SHA-256 of a certificate's DER, lowercase hex.
func Fingerprint(c *x509.Certificate) string {
	return fmt.Sprintf("%x", sha256.Sum256(c.Raw))
}
