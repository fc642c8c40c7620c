package tpm

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
)

// The TPM side of attestation (package tpm/attest holds the checks): the EK certificates in NV and the endorsement
// key itself (ek.go), an attestation key, credential activation and certification of the device key.

// NVCertificate is the content of one NV index that holds a certificate, as stored (a TCG header or padding may
// surround the DER: tpm/attest.ParseEKCertificate copes with both).
type NVCertificate struct {
	Index uint32
	Data  []byte
}

// akTemplate: a restricted signing key (it signs only what the TPM itself produced, such as TPM2_Certify's attestation
// structure) that cannot leave the TPM, ECDSA with SHA-256.
var akTemplate = tpm2.TPMTPublic{
	Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
	ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
		Restricted: true, SignEncrypt: true},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
		Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA,
			Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
		CurveID: tpm2.TPMECCNistP256,
		KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
		Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
	}),
}

// AK is an attestation key: a restricted ECC P-256 signing key (ECDSA with SHA-256) under the storage root key, with
// fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth, restricted and sign. Loaded until Close.
type AK struct {
	dev     *Device
	public  tpm2.TPM2BPublic
	private tpm2.TPM2BPrivate
	pub     crypto.PublicKey
	handle  tpm2.TPMHandle
	name    tpm2.TPM2BName
	loaded  bool // guarded by dev.mu
}

// CreateAK makes an attestation key. On a TPM with 3 object slots and the device key loaded, create it before the EK
// (see EndorsementKey).
func (d *Device) CreateAK(ctx context.Context) (*AK, error) {
	if d.l == nil {
		return nil, errors.New("tpm: a software key has no TPM to make an attestation key in")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("tpm: create attestation key: %w: device closed", ErrUnreachable)
	}
	if err := d.ensureSRK(ctx); err != nil {
		return nil, err
	}
	crsp, err := tpm2.Create{ParentHandle: d.parent(), InPublic: tpm2.New2B(akTemplate)}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, d.sessionErr("create attestation key", d.auth(), err)
	}
	lrsp, err := tpm2.Load{ParentHandle: d.parent(), InPrivate: crsp.OutPrivate, InPublic: crsp.OutPublic}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, d.sessionErr("load attestation key", d.auth(), err)
	}
	ak := &AK{dev: d, public: crsp.OutPublic, private: crsp.OutPrivate, handle: lrsp.ObjectHandle, name: lrsp.Name, loaded: true}
	pub, err := crsp.OutPublic.Contents()
	if err == nil {
		ak.pub, err = tpm2.Pub(*pub)
	}
	if err != nil {
		tpm2.FlushContext{FlushHandle: lrsp.ObjectHandle}.Execute(d.l.with(context.WithoutCancel(ctx)))
		return nil, fmt.Errorf("tpm: attestation key public area: %w", err)
	}
	return ak, nil
}

// Public is the AK's TPMT_PUBLIC, marshalled.
func (a *AK) Public() []byte { return a.public.Bytes() }

// Name is the AK's TPM Name (nameAlg || digest of its public area).
func (a *AK) Name() []byte { return a.name.Buffer }

// PublicKey is the AK's public key.
func (a *AK) PublicKey() crypto.PublicKey { return a.pub }

// PEM is the AK as a TSS2 PRIVATE KEY file (parent: the owner's standard ECC SRK), loadable by OpenSSL's tpm2 provider.
func (a *AK) PEM() ([]byte, error) { return keyFilePEM(a.public, a.private) }

// keyFilePEM encodes a TPM key's blobs as a TSS2 PRIVATE KEY file under the owner's standard SRK. No description and
// no policy: OpenSSL's tpm2 provider 1.1 cannot read either.
func keyFilePEM(public tpm2.TPM2BPublic, private tpm2.TPM2BPrivate) ([]byte, error) {
	tk := keyfile.NewTPMKey(keyfile.OIDLoadableKey, public, private, keyfile.WithParent(tpm2.TPMRHOwner))
	var buf bytes.Buffer
	if err := keyfile.Encode(&buf, tk); err != nil {
		return nil, fmt.Errorf("tpm: encode key file: %w", err)
	}
	return buf.Bytes(), nil
}

// Close flushes the AK. Idempotent.
func (a *AK) Close() error {
	if a == nil {
		return nil
	}
	d := a.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if !a.loaded {
		return nil
	}
	a.loaded = false
	if d.closed || d.l.broken != nil {
		return nil
	}
	if _, err := (tpm2.FlushContext{FlushHandle: a.handle}).Execute(d.l.with(context.Background())); err != nil {
		return mapErr("flush attestation key", err)
	}
	return nil
}

// ActivateCredential recovers the secret MakeCredential (tpm/attest) sealed to ak's Name under ek, with the
// authorisation ek's template requires: plain empty auth when it has userWithAuth, else a policy session with
// PolicySecret(TPM_RH_ENDORSEMENT) (TCG policy A), or policy A within the PolicyOR of the high-range templates.
// credentialBlob and encryptedSecret are the contents of the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET (what
// go-tpm's tpm2.CreateCredential returns).
func (d *Device) ActivateCredential(ctx context.Context, ak *AK, ek *EK, credentialBlob, encryptedSecret []byte) ([]byte, error) {
	if d.l == nil {
		return nil, errors.New("tpm: a software key has no TPM to activate a credential")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("tpm: activate credential: %w: device closed", ErrUnreachable)
	}
	if !ak.loaded || ak.dev != d || ek.dev != d || ek.closed {
		return nil, errors.New("tpm: activate credential: attestation or endorsement key closed, or of another TPM")
	}
	auth, flush, err := d.ekAuth(ctx, ek)
	if err != nil {
		return nil, err
	}
	if flush != nil {
		defer flush()
	}
	akAuth := d.activationAuth(ek)
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: akAuth},
		KeyHandle:      tpm2.AuthHandle{Handle: tpm2.TPMHandle(ek.Handle), Name: ek.name, Auth: auth},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: credentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: encryptedSecret},
	}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, d.sessionErr("activate credential", akAuth, err)
	}
	return rsp.CertInfo.Buffer, nil
}

// Certify has ak certify key (a loaded TPM device key) over qualifyingData: the TPMS_ATTEST it signed and the
// TPMT_SIGNATURE, both marshalled.
func (d *Device) Certify(ctx context.Context, key *Key, ak *AK, qualifyingData []byte) (attest, signature []byte, err error) {
	if d.l == nil || key.soft != nil {
		return nil, nil, errors.New("tpm: certify: a software key cannot be certified by a TPM")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	key.mu.Lock()
	defer key.mu.Unlock()
	if d.closed {
		return nil, nil, fmt.Errorf("tpm: certify: %w: device closed", ErrUnreachable)
	}
	if !key.loaded || !ak.loaded || key.dev != d || ak.dev != d {
		return nil, nil, errors.New("tpm: certify: device or attestation key closed, or of another TPM")
	}
	auth := d.auth()
	rsp, err := tpm2.Certify{
		ObjectHandle:   tpm2.AuthHandle{Handle: key.handle, Name: key.name, Auth: tpm2.PasswordAuth(nil)},
		SignHandle:     tpm2.AuthHandle{Handle: ak.handle, Name: ak.name, Auth: auth},
		QualifyingData: tpm2.TPM2BData{Buffer: qualifyingData},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, nil, d.sessionErr("certify device key", auth, err)
	}
	return rsp.CertifyInfo.Bytes(), tpm2.Marshal(&rsp.Signature), nil
}

// PublicArea is a TPM key's TPMT_PUBLIC, marshalled (nil for a software key).
func (k *Key) PublicArea() []byte {
	if k.soft != nil {
		return nil
	}
	return k.public.Bytes()
}

// Info is what the TPM says about itself (TPM2_GetCapability, TPM properties).
type Info struct {
	Manufacturer    uint32 // TPM_PT_MANUFACTURER, the TCG vendor ID ("IBM\x00" = 0x49424d00)
	VendorString    string // TPM_PT_VENDOR_STRING_1…4, trimmed: the model ("SLB9670", "SW   TPM")
	FirmwareVersion uint64 // TPM_PT_FIRMWARE_VERSION_1 << 32 | _2
	SpecRevision    uint32 // TPM_PT_REVISION
}

// Info reads the TPM's manufacturer, vendor string and firmware version. A soft Device has none (zero Info).
func (d *Device) Info(ctx context.Context) (Info, error) {
	if d.l == nil {
		return Info{}, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return Info{}, fmt.Errorf("tpm: read TPM properties: %w: device closed", ErrUnreachable)
	}
	// TPM_PT_REVISION (0x102) to TPM_PT_FIRMWARE_VERSION_2 (0x10c) in one command.
	p, err := d.properties(ctx, tpm2.TPMPTRevision, uint32(tpm2.TPMPTFirmwareVersion2-tpm2.TPMPTRevision)+1)
	if err != nil {
		return Info{}, err
	}
	var vs []byte
	for pt := tpm2.TPMPTVendorString1; pt <= tpm2.TPMPTVendorString4; pt++ {
		v := p[pt]
		vs = append(vs, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return Info{
		Manufacturer:    p[tpm2.TPMPTManufacturer],
		VendorString:    strings.Trim(string(vs), "\x00 "),
		FirmwareVersion: uint64(p[tpm2.TPMPTFirmwareVersion1])<<32 | uint64(p[tpm2.TPMPTFirmwareVersion2]),
		SpecRevision:    p[tpm2.TPMPTRevision],
	}, nil
}
