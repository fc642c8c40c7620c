package ca

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"math/big"
	"sort"
	"strings"
	"time"
)

// Revocation reasons of RFC 5280 §5.3.1, by the camelCase names the standard gives them (removeFromCRL, for delta
// CRLs, is not offered).
var reasonCodes = map[string]int{
	"unspecified":          0,
	"keyCompromise":        1,
	"cACompromise":         2,
	"affiliationChanged":   3,
	"superseded":           4,
	"cessationOfOperation": 5,
	"certificateHold":      6,
	"privilegeWithdrawn":   9,
	"aACompromise":         10,
}

// ReasonCode is the CRL reason code of an RFC 5280 reason name; an unknown name is an error listing the known ones.
func ReasonCode(name string) (int, error) {
	if c, ok := reasonCodes[name]; ok {
		return c, nil
	}
	return 0, fmt.Errorf("unknown revocation reason %q: use one of %s", name, strings.Join(ReasonNames(), ", "))
}

// ReasonNames are the reason names in code order.
func ReasonNames() []string {
	names := make([]string, 0, len(reasonCodes))
	for n := range reasonCodes {
		names = append(names, n)
	}
	sort.Slice(names, func(i, j int) bool { return reasonCodes[names[i]] < reasonCodes[names[j]] })
	return names
}

// Revoked is one CRL entry.
type Revoked struct {
	Serial *big.Int
	At     time.Time
	Reason int // RFC 5280 reason code; 0 (unspecified) is left out of the entry, as RFC 5280 asks
}

// CRL signs a version 2 CRL with the issuing key: the entries, the CRL number, thisUpdate and nextUpdate, the
// authority key identifier of the issuing CA. The issuing certificate must allow cRLSign (Generate's do).
func (ca *CA) CRL(entries []Revoked, number int64, thisUpdate, nextUpdate time.Time) ([]byte, error) {
	if ca.Issuing.KeyUsage&x509.KeyUsageCRLSign == 0 {
		return nil, fmt.Errorf("ca: crl: the issuing CA %q may not sign CRLs (no cRLSign key usage): %w", ca.Issuing.Subject, ErrBadCA)
	}
	list := &x509.RevocationList{
		Number:             big.NewInt(number),
		ThisUpdate:         thisUpdate.UTC().Truncate(time.Second),
		NextUpdate:         nextUpdate.UTC().Truncate(time.Second),
		SignatureAlgorithm: signatureAlgorithm(ca.Signer.Public()),
	}
	for _, e := range entries {
		list.RevokedCertificateEntries = append(list.RevokedCertificateEntries, x509.RevocationListEntry{
			SerialNumber: e.Serial, RevocationTime: e.At.UTC().Truncate(time.Second), ReasonCode: e.Reason})
	}
	der, err := x509.CreateRevocationList(rand.Reader, list, ca.Issuing, ca.Signer)
	if err != nil {
		return nil, fmt.Errorf("ca: crl: %w", err)
	}
	return der, nil
}

// Renew issues a new client certificate for the key of old (a rotation: the device keeps its TPM key, whose
// possession the station checked when it issued old), with old's subject and SAN URIs, under the package policy
// (new serial, validity from now, the CRL distribution point of req). old must have been issued by this CA.
func (ca *CA) Renew(old *x509.Certificate, req Request) (*x509.Certificate, error) {
	if err := old.CheckSignatureFrom(ca.Issuing); err != nil {
		return nil, fmt.Errorf("ca: renew: certificate %x was not issued by %q: %v: %w", old.SerialNumber, ca.Issuing.Subject, err, ErrBadCSR)
	}
	req.Subject, req.URIs = old.Subject, old.URIs
	return ca.issue("renew", old.PublicKey, req)
}
