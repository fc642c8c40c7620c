package attest

import (
	"crypto/x509"
	"embed"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// builtinFiles are the vendors' CA certificates (roots/README.md says where they come from).
//
//go:embed roots/*.pem
var builtinFiles embed.FS

// builtinOnce parses the built-in certificates once; the parsed list is never changed afterwards (each Roots copies
// the slice), so this is a cache, not mutable state.
var builtinOnce = sync.OnceValue(func() []*x509.Certificate {
	names, err := builtinFiles.ReadDir("roots")
	if err != nil {
		panic("attest: built-in TPM roots: " + err.Error())
	}
	var certs []*x509.Certificate
	for _, n := range names {
		data, err := builtinFiles.ReadFile("roots/" + n.Name())
		if err != nil {
			panic("attest: built-in TPM roots: " + err.Error())
		}
		cs, err := parsePEMCertificates(data)
		if err != nil {
			panic(fmt.Sprintf("attest: built-in TPM root %s: %v", n.Name(), err)) // a broken build: the tests parse them all
		}
		certs = append(certs, cs...)
	}
	return certs
})

// Roots is a set of trusted TPM vendor roots and intermediates. Every certificate in it is a trust anchor. The zero
// value is an empty set; a Roots is not safe for concurrent Add and Verify.
type Roots struct {
	certs []*x509.Certificate
	seen  map[string]bool // by Raw
}

// BuiltinRoots is the built-in set: public CA certificates of TPM vendors (Infineon, Intel, Nuvoton, STMicro, Nationz,
// GlobalSign, Alibaba Cloud vTPM). Each call returns a new set, so Add on it changes no other.
func BuiltinRoots() *Roots {
	r := &Roots{}
	r.Add(builtinOnce()...)
	return r
}

// LoadRoots is the built-in set plus every certificate in the PEM files (*.pem, *.crt) of dirs. A file that does not
// parse is an error naming it. A .crt file may also be one DER certificate.
func LoadRoots(dirs ...string) (*Roots, error) {
	r := BuiltinRoots()
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil, fmt.Errorf("attest: TPM roots: %w", err)
		}
		for _, e := range entries {
			ext := strings.ToLower(filepath.Ext(e.Name()))
			if e.IsDir() || (ext != ".pem" && ext != ".crt") {
				continue
			}
			path := filepath.Join(dir, e.Name())
			data, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("attest: TPM roots: %w", err)
			}
			certs, err := parsePEMCertificates(data)
			if err != nil {
				return nil, fmt.Errorf("attest: TPM root %s: %w", path, err)
			}
			r.Add(certs...)
		}
	}
	return r, nil
}

// parsePEMCertificates parses every CERTIFICATE block of a PEM file (text around the blocks is ignored), or one DER
// certificate when the file holds no PEM block.
func parsePEMCertificates(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest, blocks := data, 0
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		blocks++
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := parseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if blocks == 0 && len(data) > 0 && data[0] == 0x30 {
		der, err := cutDER(data)
		if err != nil {
			return nil, err
		}
		c, err := parseCertificate(der)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate in it")
	}
	return certs, nil
}

// Add adds certificates as trust anchors (a vendor "root" need not be self-signed). A certificate already in the set
// is not added twice; one parsed by crypto/x509 directly gets its TCG SubjectAltName marked handled (on a copy).
func (r *Roots) Add(certs ...*x509.Certificate) {
	if r.seen == nil {
		r.seen = make(map[string]bool)
	}
	for _, c := range certs {
		if c == nil || r.seen[string(c.Raw)] {
			continue
		}
		r.seen[string(c.Raw)] = true
		r.certs = append(r.certs, withTCGSANHandled(c))
	}
}

// Len is the number of certificates in the set.
func (r *Roots) Len() int { return len(r.certs) }

// Certificates is the set's certificates, in the order they were added (a copy of the list; the certificates are
// shared and must not be changed).
func (r *Roots) Certificates() []*x509.Certificate {
	return append([]*x509.Certificate(nil), r.certs...)
}

// Verify chains an EK certificate to the set at time at, with intermediates from the TPM's NV and the set's own
// intermediates. It returns the chain (EK first) or an error wrapping ErrUnknownVendor or ErrExpired.
//
// Key usages are not checked (ExtKeyUsageAny): EK certificates carry tcg-kp-EKCertificate, and their KeyUsage is
// keyEncipherment or keyAgreement, never what a TLS verifier looks for. Other failures (a bad signature, an unhandled
// critical extension other than the TCG SubjectAltName) come back as crypto/x509 words them, wrapped.
func (r *Roots) Verify(ek *x509.Certificate, intermediates []*x509.Certificate, at time.Time) ([]*x509.Certificate, error) {
	if ek == nil {
		return nil, ErrNoEKCertificate
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	if r != nil {
		for _, c := range r.certs {
			roots.AddCert(c)
			inter.AddCert(c)
		}
	}
	for _, c := range intermediates {
		if c != nil {
			inter.AddCert(withTCGSANHandled(c))
		}
	}
	chains, err := withTCGSANHandled(ek).Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   at,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, chainError(ek, err)
	}
	sort.SliceStable(chains, func(i, j int) bool { return len(chains[i]) < len(chains[j]) })
	return chains[0], nil
}

// chainError words a crypto/x509 verification failure with this package's causes.
func chainError(ek *x509.Certificate, err error) error {
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		c := ek
		if unknown.Cert != nil {
			c = unknown.Cert
		}
		msg := fmt.Sprintf("no trusted root for issuer %q", describeName(c.Issuer.String()))
		// A CA with the right name whose signature did not check (a SHA-1 signature crypto/x509 refuses, another
		// key under the same name): crypto/x509 says which, and so do we.
		if s := unknown.Error(); strings.Contains(s, "possibly because of") {
			msg += " (" + s[strings.Index(s, "possibly because of"):]
		}
		return fmt.Errorf("%w: %s", ErrUnknownVendor, msg)
	}
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
		who := "EK certificate"
		if invalid.Cert != nil && invalid.Cert != ek && string(invalid.Cert.Raw) != string(ek.Raw) {
			who = fmt.Sprintf("CA %q", describeName(invalid.Cert.Subject.String()))
		}
		return fmt.Errorf("%w: %s: %s", ErrExpired, who, invalid.Detail)
	}
	return fmt.Errorf("attest: EK certificate chain: %w", err)
}

// describeName is a distinguished name for messages ("(empty)" for none).
func describeName(s string) string {
	if s == "" {
		return "(empty)"
	}
	return s
}
