package tpm

import (
	"context"
	"crypto"
	"errors"
)

// The TPM side of attestation (package tpm/attest holds the checks): the EK certificates in NV, the endorsement key
// itself, an attestation key, credential activation and certification of the device key.

// errTodo marks what is not written yet.
var errTodo = errors.New("tpm: not implemented yet")

// NVCertificate is the content of one NV index that holds a certificate, as stored (a TCG header or padding may
// surround the DER: tpm/attest.ParseEKCertificate copes with both).
type NVCertificate struct {
	Index uint32
	Data  []byte
}

// EKCertificates reads the EK certificates the TPM holds: the low range (0x01c00002 RSA 2048, 0x01c0000a ECC P-256)
// and the high range (0x01c00012 onwards: RSA 2048/3072/4096, ECC P-256/P-384/P-521), in that order, and the chain
// certificates at 0x01c00100–0x01c001ff. Indices that are not defined are left out; a soft Device holds none.
func (d *Device) EKCertificates(ctx context.Context) (certs, chain []NVCertificate, err error) {
	return nil, nil, errTodo
}

// EK is the TPM's endorsement key for one algorithm: a persistent object, or one recreated from its template and
// loaded until Close.
type EK struct {
	Handle     uint32
	Persistent bool
	Public     []byte // the TPMT_PUBLIC, marshalled (the contents of its TPM2B_PUBLIC)
	Name       []byte
	PublicKey  crypto.PublicKey
	// Template says where the key came from: "persistent 0x81010001", "template L-2 (ECC P-256)", "template H-3 ...".
	Template string
}

// EndorsementKey returns the EK the certificate at index certifies. want is that certificate's public key: a
// persistent EK (0x81010000–0x810100ff) with this key is used when one exists; otherwise the EK is recreated from the
// TCG template for index's algorithm (low range L-1/L-2, high range H-1…H-7) — its key may differ from want when the
// certificate belongs to another TPM, which is the caller's to check. index 0 (no certificate) and want nil: the
// default EK (a persistent ECC P-256 EK at 0x81010002 or RSA at 0x81010001, else the low-range ECC P-256 template).
func (d *Device) EndorsementKey(ctx context.Context, index uint32, want crypto.PublicKey) (*EK, error) {
	return nil, errTodo
}

// Close flushes a recreated EK; a persistent one stays. Idempotent.
func (e *EK) Close() error { return nil }

// AK is an attestation key: a restricted ECC P-256 signing key (ECDSA with SHA-256) under the storage root key, with
// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, restricted and sign. Loaded until Close.
type AK struct {
	dev *Device
}

// CreateAK makes an attestation key.
func (d *Device) CreateAK(ctx context.Context) (*AK, error) { return nil, errTodo }

// Public is the AK's TPMT_PUBLIC, marshalled.
func (a *AK) Public() []byte { return nil }

// Name is the AK's TPM Name (nameAlg || digest of its public area).
func (a *AK) Name() []byte { return nil }

// PublicKey is the AK's public key.
func (a *AK) PublicKey() crypto.PublicKey { return nil }

// PEM is the AK as a TSS2 PRIVATE KEY file (parent: the owner's standard ECC SRK), loadable by OpenSSL's tpm2 provider.
func (a *AK) PEM() ([]byte, error) { return nil, errTodo }

// Close flushes the AK. Idempotent.
func (a *AK) Close() error { return nil }

// ActivateCredential recovers the secret MakeCredential (tpm/attest) sealed to ak's Name under ek, with the
// authorisation ek's template requires: plain empty auth when it has userWithAuth, else a policy session with
// PolicySecret(TPM_RH_ENDORSEMENT) (TCG policy A), or policy A within the PolicyOR of the high-range templates.
func (d *Device) ActivateCredential(ctx context.Context, ak *AK, ek *EK, credentialBlob, encryptedSecret []byte) ([]byte, error) {
	return nil, errTodo
}

// Certify has ak certify key (a loaded TPM device key) over qualifyingData: the TPMS_ATTEST it signed and the
// TPMT_SIGNATURE, both marshalled.
func (d *Device) Certify(ctx context.Context, key *Key, ak *AK, qualifyingData []byte) (attest, signature []byte, err error) {
	return nil, nil, errTodo
}

// PublicArea is a TPM key's TPMT_PUBLIC, marshalled (nil for a software key).
func (k *Key) PublicArea() []byte { return nil }

// Info is what the TPM says about itself (TPM2_GetCapability, TPM properties).
type Info struct {
	Manufacturer    uint32 // TPM_PT_MANUFACTURER, the TCG vendor ID ("IBM\x00" = 0x49424d00)
	VendorString    string // TPM_PT_VENDOR_STRING_1…4, trimmed: the model ("SLB9670", "SW   TPM")
	FirmwareVersion uint64 // TPM_PT_FIRMWARE_VERSION_1 << 32 | _2
	SpecRevision    uint32 // TPM_PT_REVISION
}

// Info reads the TPM's manufacturer, vendor string and firmware version. A soft Device has none (zero Info).
func (d *Device) Info(ctx context.Context) (Info, error) { return Info{}, errTodo }
