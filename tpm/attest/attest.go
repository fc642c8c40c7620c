// Package attest decides whether a unit's key lives in a genuine TPM, from evidence the TPM gave: EK certificates
// (parsed despite the quirks of real ones), their chain to TPM vendor roots (built in, plus the station's own), the TCG
// vendor-ID registry, the station's half of credential activation, the check of a TPM2_Certify of the device key, and
// the offline re-verification of stored evidence. It sends no TPM command (package tpm does).
//
// Files: ekcert.go (EK certificates and their TCG identity), roots.go (trust anchors and chain verification),
// vendors.go (the vendor-ID registry), tpmobjects.go (TPM public areas, credential activation, TPM2_Certify),
// evidence.go (stored evidence and its offline check), akcert.go (the AK certificate of the attestation authority).
package attest

import (
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
)

// Statuses of a unit's attestation (inventory, JSON).
const (
	StatusTrusted   = "trusted"   // the EK certificate chains to a trusted root, and the TPM proved it holds that EK and the device key
	StatusUntrusted = "untrusted" // the TPM proved itself consistent, but its EK certificate does not chain to a trusted root
	StatusAbsent    = "absent"    // the TPM holds no EK certificate
	StatusOff       = "off"       // attestation: off
	StatusSoft      = "soft"      // a software key: no TPM to attest
)

// Causes why a chain does not verify, in words for the operator.
var (
	ErrNoEKCertificate = errors.New("the TPM holds no EK certificate")
	ErrUnknownVendor   = errors.New("EK certificate issuer is not a trusted TPM vendor (add its root with tpm_roots or --tpm-roots)")
	ErrExpired         = errors.New("EK certificate or its chain is expired or not yet valid")
	ErrKeyMismatch     = errors.New("the EK certificate's key is not this TPM's endorsement key (a certificate from another TPM)")
	ErrBadEvidence     = errors.New("attestation evidence does not verify")
)

// keyDigest is the SHA-256 of a public key's SPKI DER.
func keyDigest(pub crypto.PublicKey) ([]byte, error) {
	if pub == nil {
		return nil, errors.New("attest: no public key")
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("attest: encode public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return sum[:], nil
}

// KeySHA256 is the SHA-256 of a public key's SPKI DER, lowercase hex: ek_sha256, what "one TPM, one unit" keys on.
func KeySHA256(pub crypto.PublicKey) (string, error) {
	sum, err := keyDigest(pub)
	if err != nil {
		return "", err
	}
	return hex.EncodeToString(sum), nil
}

// EKURI is the URI SAN that names a unit's TPM in its device certificate, in the form step-ca's device attestation
// uses: urn:ek:sha256:<base64 of the SHA-256 of the EK's SPKI DER>. The base64 is the standard alphabet with padding,
// as smallstep's tpmkms and step CLI write it (and compare it, case-insensitively, with an AK certificate's URI SANs).
func EKURI(pub crypto.PublicKey) (*url.URL, error) {
	sum, err := keyDigest(pub)
	if err != nil {
		return nil, err
	}
	return &url.URL{Scheme: "urn", Opaque: "ek:sha256:" + base64.StdEncoding.EncodeToString(sum)}, nil
}
