// Package attest decides whether a unit's key lives in a genuine TPM, from evidence the TPM gave: EK certificates
// (parsed despite the quirks of real ones), their chain to TPM vendor roots (built in, plus the station's own), the TCG
// vendor-ID registry, the station's half of credential activation, the check of a TPM2_Certify of the device key, and
// the offline re-verification of stored evidence. It sends no TPM command (package tpm does).
package attest

import (
	"crypto"
	"crypto/x509"
	"errors"
	"net/url"
	"time"
)

var errTodo = errors.New("attest: not implemented yet")

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

// ParseEKCertificate parses an EK certificate as a TPM stores it: plain DER, DER with trailing bytes (padding), or DER
// behind the TCG PC Client header (tag 0x1001, 2-byte length). The critical SubjectAltName of DirectoryName form that
// EK certificates carry (TPM manufacturer, model, version) is read and marked handled, so crypto/x509 verifies it.
func ParseEKCertificate(data []byte) (*x509.Certificate, error) { return nil, errTodo }

// TPMIdentity is what an EK certificate's SubjectAltName says of its TPM (TCG OIDs 2.23.133.2.1/2/3), as written there
// ("id:49424D00", "swtpm", "id:20191023").
type TPMIdentity struct {
	Manufacturer, Model, Version string
}

// IdentityOf reads the TPM identity from an EK certificate's SubjectAltName (zero when it has none).
func IdentityOf(c *x509.Certificate) TPMIdentity { return TPMIdentity{} }

// VendorName is the TCG vendor-ID registry's short name for a TPM_PT_MANUFACTURER value ("IBM", "IFX", "NTC"), or ""
// when the ID is not registered.
func VendorName(id uint32) string { return "" }

// ManufacturerMatch compares the certificate's manufacturer ("id:49424D00", as EK certificates write it) with the ID the
// TPM reports, through the registry: known is false when either side cannot be read.
func ManufacturerMatch(certManufacturer string, tpmID uint32) (known, match bool) { return false, false }

// Roots is a set of trusted TPM vendor roots and intermediates.
type Roots struct{}

// BuiltinRoots is the built-in set: public CA certificates of TPM vendors (Infineon, Intel, Nuvoton, STMicro, Nationz,
// GlobalSign, Alibaba Cloud vTPM).
func BuiltinRoots() *Roots { return &Roots{} }

// LoadRoots is the built-in set plus every certificate in the PEM files (*.pem, *.crt) of dirs. A file that does not
// parse is an error naming it.
func LoadRoots(dirs ...string) (*Roots, error) { return nil, errTodo }

// Add adds certificates as trust anchors (a vendor "root" need not be self-signed).
func (r *Roots) Add(certs ...*x509.Certificate) {}

// Len is the number of certificates in the set.
func (r *Roots) Len() int { return 0 }

// Verify chains an EK certificate to the set at time at, with intermediates from the TPM's NV and the set's own
// intermediates. It returns the chain (EK first) or an error wrapping ErrUnknownVendor or ErrExpired.
func (r *Roots) Verify(ek *x509.Certificate, intermediates []*x509.Certificate, at time.Time) ([]*x509.Certificate, error) {
	return nil, errTodo
}

// KeySHA256 is the SHA-256 of a public key's SPKI DER, lowercase hex: ek_sha256, what "one TPM, one unit" keys on.
func KeySHA256(pub crypto.PublicKey) (string, error) { return "", errTodo }

// EKURI is the URI SAN that names a unit's TPM in its device certificate, in the form step-ca's device attestation
// uses: urn:ek:sha256:<base64 of the SHA-256 of the EK's SPKI DER>.
func EKURI(pub crypto.PublicKey) (*url.URL, error) { return nil, errTodo }

// MakeCredential is the station's half of credential activation: it seals secret to the TPM holding the EK (ekPublic,
// a marshalled TPMT_PUBLIC) for the key named akName. Only that TPM, holding that key, can recover it.
func MakeCredential(ekPublic, akName, secret []byte) (credentialBlob, encryptedSecret []byte, err error) {
	return nil, nil, errTodo
}

// Name computes a TPM object's Name from its marshalled TPMT_PUBLIC.
func Name(public []byte) ([]byte, error) { return nil, errTodo }

// PublicKey decodes the public key of a marshalled TPMT_PUBLIC.
func PublicKey(public []byte) (crypto.PublicKey, error) { return nil, errTodo }

// CheckAK checks an attestation key's public area: a restricted signing key that cannot leave its TPM.
func CheckAK(akPublic []byte) error { return errTodo }

// VerifyCertify checks a TPM2_Certify of a key: attest is a TPMS_ATTEST with the TPM magic, type ATTEST_CERTIFY,
// extraData equal to nonce and the certified Name equal to the Name of keyPublic; signature (a marshalled
// TPMT_SIGNATURE) verifies with the AK; keyPublic has fixedTPM, fixedParent and sensitiveDataOrigin. Errors wrap
// ErrBadEvidence and say which check failed.
func VerifyCertify(akPublic, attest, signature, nonce, keyPublic []byte) error { return errTodo }

// Evidence is what the station keeps of one attest run: everything needed to re-check it offline. It is stored as
// JSON (byte fields base64) in the inventory's attestations table and exported as is.
type Evidence struct {
	Version int       `json:"version"` // 1
	Time    time.Time `json:"time"`    // when the station attested (chains are verified at this time)
	Policy  string    `json:"policy"`  // off | record | required

	EKCertificate []byte   `json:"ek_certificate,omitempty"` // DER, as ParseEKCertificate cleaned it
	EKIndex       uint32   `json:"ek_index,omitempty"`       // the NV index it came from
	Chain         [][]byte `json:"chain,omitempty"`          // DER: the NV chain certificates, then the verified chain above the EK certificate
	EKPublic      []byte   `json:"ek_public"`                // TPMT_PUBLIC of the EK the TPM used
	EKSource      string   `json:"ek_source"`                // EK.Template

	AKPublic   []byte     `json:"ak_public"` // TPMT_PUBLIC
	Activation Activation `json:"activation"`

	Nonce            []byte `json:"nonce"`             // the certify qualifying data
	KeyPublic        []byte `json:"key_public"`        // TPMT_PUBLIC of the device key
	CertifyAttest    []byte `json:"certify_attest"`    // TPMS_ATTEST
	CertifySignature []byte `json:"certify_signature"` // TPMT_SIGNATURE

	TPMManufacturer uint32 `json:"tpm_manufacturer"` // TPM_PT_MANUFACTURER
	TPMVendorString string `json:"tpm_vendor_string,omitempty"`
	TPMFirmware     uint64 `json:"tpm_firmware,omitempty"`

	Status   string   `json:"status"`          // trusted | untrusted | absent
	Cause    string   `json:"cause,omitempty"` // why not trusted, in words
	Warnings []string `json:"warnings,omitempty"`
}

// Activation records credential activation: what the station sealed to the EK for the AK's Name, and that the TPM
// gave the secret back (its SHA-256; the secret itself is single-use and kept too, as it protects nothing afterwards).
type Activation struct {
	AKName          []byte `json:"ak_name"`
	CredentialBlob  []byte `json:"credential_blob"`
	EncryptedSecret []byte `json:"encrypted_secret"`
	SecretSHA256    string `json:"secret_sha256"`
	Activated       bool   `json:"activated"`
}

// Check is the offline verdict on stored evidence.
type Check struct {
	Status   string   // recomputed: trusted | untrusted | absent
	Cause    string   // why not trusted
	Problems []string // mismatches and unparseable parts; empty when the evidence verifies
}

// VerifyEvidence re-checks stored evidence offline: the EK certificate parses and certifies EKPublic's key; the
// activation names the AK (Name of AKPublic) and was completed; the AK is a restricted signing key of a TPM; the
// certify attestation verifies (VerifyCertify) for KeyPublic, whose key's SHA-256 must be keySHA256 (the unit's
// recorded key fingerprint, "" to skip); the chain verifies against roots at ev.Time, and the status it gives is the
// recorded one (a recorded "trusted" that no longer chains is a problem).
func VerifyEvidence(ev *Evidence, roots *Roots, keySHA256 string) Check { return Check{Problems: []string{errTodo.Error()}} }
