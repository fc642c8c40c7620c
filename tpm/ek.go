package tpm

import (
	"bytes"
	"context"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// The endorsement side of attestation: the EK certificates a TPM vendor wrote into NV, and the endorsement key itself
// (persistent, or recreated from the TCG template its certificate's index names).

// NV ranges of EK certificates (TCG EK Credential Profile 2.3): the certificates themselves and the chain certificates
// a vendor may add.
const (
	ekCertFirst  = 0x01c00002
	ekChainFirst = 0x01c00100
	ekChainLast  = 0x01c001ff
)

// Persistent handles an EK may live at (TCG Provisioning Guidance: 0x81010000–0x810100FF).
const (
	ekPersistentFirst = 0x81010000
	ekPersistentLast  = 0x810100ff
	ekPersistentRSA   = 0x81010001
	ekPersistentECC   = 0x81010002
)

// The EK authorization policies (TCG EK Credential Profile 2.3, annex B), per name algorithm: A is
// TPM2_PolicySecret(TPM_RH_ENDORSEMENT), C is TPM2_PolicyAuthorizeNV of the EK policy index (0x01C07F01/2/3), and
// the high-range templates' authPolicy is TPM2_PolicyOR(A, C) (the profile calls it policy B).
var ekPolicies = map[tpm2.TPMAlgID]struct{ a, c, or []byte }{
	tpm2.TPMAlgSHA256: {
		a:  mustHex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"),
		c:  mustHex("3767e2edd43ff45a3a7e1eaefcef78643dca964632e7aad82c673a30d8633fde"),
		or: mustHex("ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0"),
	},
	tpm2.TPMAlgSHA384: {
		a:  mustHex("8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53"),
		c:  mustHex("d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165"),
		or: mustHex("b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12"),
	},
	tpm2.TPMAlgSHA512: {
		a:  mustHex("1e3b76502c8a1425aa0b7b3fc646a1b0fae063b03b5368f9c4cddecaff0891dd682bac1a85d4d832b781ea451915de5fc5bf0dc4a1917cd42fa041e3f998e0ee"),
		c:  mustHex("589ee1e146544716e8deafe6db247b01b81e9f9c7dd16b814aa159138749105fba5388dd1dea702f35240c184933121e2c61b8f50d3ef91393a49a38c3f73fc8"),
		or: mustHex("b8221ca69e8550a4914de3faa6a18c072cc01208073a928d5d66d59ef79e49a429c41a6b269571d57edb25fbdb1838425608b413cd616a5f6db5b6071af99bea"),
	},
}

// ekTemplate is one TCG EK template and the NV index of the certificate for the key it makes.
type ekTemplate struct {
	index      uint32
	persistent uint32 // the persistent handle looked at first: 0x81010001/2 for the low range (TCG Provisioning
	// Guidance); for the high range, 0x810100 followed by the index's last byte, where swtpm_setup puts the H-3 EK
	label  string
	public tpm2.TPMTPublic
}

// ekTemplates in the order EKCertificates reports the certificates: low range, then high range. H-5 (SM2) is left
// out: nothing on the station's side can check an SM2 key.
var ekTemplates = []ekTemplate{
	{0x01c00002, ekPersistentRSA, "L-1 (RSA 2048)", tpm2.RSAEKTemplate},
	{0x01c0000a, ekPersistentECC, "L-2 (ECC P-256)", tpm2.ECCEKTemplate},
	{0x01c00012, 0x81010012, "H-1 (RSA 2048)", high(tpm2.TPMAlgSHA256, 128, 2048, 0)},
	{0x01c00014, 0x81010014, "H-2 (ECC P-256)", high(tpm2.TPMAlgSHA256, 128, 0, tpm2.TPMECCNistP256)},
	{0x01c00016, 0x81010016, "H-3 (ECC P-384)", high(tpm2.TPMAlgSHA384, 256, 0, tpm2.TPMECCNistP384)},
	{0x01c00018, 0x81010018, "H-4 (ECC P-521)", high(tpm2.TPMAlgSHA512, 256, 0, tpm2.TPMECCNistP521)},
	{0x01c0001c, 0x8101001c, "H-6 (RSA 3072)", high(tpm2.TPMAlgSHA384, 256, 3072, 0)},
	{0x01c0001e, 0x8101001e, "H-7 (RSA 4096)", high(tpm2.TPMAlgSHA384, 256, 4096, 0)},
}

// highAttrs are the high-range templates' attributes: unlike the low range, userWithAuth is set (the EK's empty
// authValue serves the USER role) and the policy guards only the ADMIN role.
var highAttrs = tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
	AdminWithPolicy: true, Restricted: true, Decrypt: true}

func aesCFB(bits int) tpm2.TPMTSymDefObject {
	return tpm2.TPMTSymDefObject{
		Algorithm: tpm2.TPMAlgAES,
		KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(bits)),
		Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
	}
}

// high is a high-range EK template (H-1…H-7): RSA of rsaBits, or ECC on curve when rsaBits is 0; its unique field is
// empty.
func high(nameAlg tpm2.TPMAlgID, symBits int, rsaBits tpm2.TPMKeyBits, curve tpm2.TPMECCCurve) tpm2.TPMTPublic {
	t := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: nameAlg, ObjectAttributes: highAttrs,
		AuthPolicy: tpm2.TPM2BDigest{Buffer: ekPolicies[nameAlg].or},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: aesCFB(symBits),
			Scheme:    tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull},
			CurveID:   curve,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
	if rsaBits > 0 {
		t.Type = tpm2.TPMAlgRSA
		t.Parameters = tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: aesCFB(symBits), Scheme: tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgNull}, KeyBits: rsaBits})
		t.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{})
	}
	return t
}

func templateFor(index uint32) (ekTemplate, bool) {
	for _, t := range ekTemplates {
		if t.index == index {
			return t, true
		}
	}
	return ekTemplate{}, false
}

// EKCertificates reads the EK certificates the TPM holds: the low range (0x01c00002 RSA 2048, 0x01c0000a ECC P-256)
// and the high range (0x01c00012 onwards: RSA 2048/3072/4096, ECC P-256/P-384/P-521), in that order, and the chain
// certificates at 0x01c00100–0x01c001ff. Indices that are not defined are left out; a soft Device holds none.
func (d *Device) EKCertificates(ctx context.Context) (certs, chain []NVCertificate, err error) {
	if d.l == nil {
		return nil, nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, nil, fmt.Errorf("tpm: read EK certificates: %w: device closed", ErrUnreachable)
	}
	defined, err := d.handles(ctx, ekCertFirst, ekChainLast, "list NV indices")
	if err != nil {
		return nil, nil, err
	}
	has := make(map[uint32]bool, len(defined))
	for _, h := range defined {
		has[h] = true
	}
	read := func(index uint32) error {
		data, err := d.readNV(ctx, index)
		if err != nil || data == nil {
			return err
		}
		c := NVCertificate{Index: index, Data: data}
		if index >= ekChainFirst {
			chain = append(chain, c)
		} else {
			certs = append(certs, c)
		}
		return nil
	}
	for _, t := range ekTemplates {
		if has[t.index] {
			if err := read(t.index); err != nil {
				return nil, nil, err
			}
		}
	}
	for _, h := range defined {
		if h >= ekChainFirst {
			if err := read(h); err != nil {
				return nil, nil, err
			}
		}
	}
	return certs, chain, nil
}

// EKCertificate returns the DER of the first EK certificate the TPM holds in NV (in EKCertificates' order: RSA, then
// ECC P-256, then the high range), or nil when it holds none. Software keys have none.
func (d *Device) EKCertificate(ctx context.Context) ([]byte, error) {
	certs, _, err := d.EKCertificates(ctx)
	if err != nil || len(certs) == 0 {
		return nil, err
	}
	return trimDER(certs[0].Data), nil
}

// readNV reads a whole NV index, in chunks the TPM accepts; nil when the index was never written or can be read only
// under a policy. Callers hold d.mu.
func (d *Device) readNV(ctx context.Context, index uint32) ([]byte, error) {
	what := fmt.Sprintf("read NV index %#x", index)
	idx := tpm2.TPMHandle(index)
	pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, mapErr(what, err)
	}
	contents, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, mapErr(what, err)
	}
	a := contents.Attributes
	if !a.Written || contents.DataSize == 0 {
		return nil, nil
	}
	// Read with the index's own (empty) authValue where it allows, else as owner, else as platform.
	auth := tpm2.AuthHandle{Handle: idx, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)}
	switch {
	case a.AuthRead:
	case a.OwnerRead:
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	case a.PPRead:
		auth = tpm2.AuthHandle{Handle: tpm2.TPMRHPlatform, Auth: tpm2.PasswordAuth(nil)}
	default:
		return nil, nil // readable only under a policy: no index of a certificate meant to be read
	}
	chunk, err := d.nvBufferMax(ctx)
	if err != nil {
		return nil, err
	}
	size := int(contents.DataSize)
	out := make([]byte, 0, size)
	for off := 0; off < size; off += chunk {
		rsp, err := tpm2.NVRead{
			AuthHandle: auth,
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
			Size:       uint16(min(chunk, size-off)),
			Offset:     uint16(off),
		}.Execute(d.l.with(ctx))
		if err != nil {
			return nil, mapErr(what, err)
		}
		out = append(out, rsp.Data.Buffer...)
	}
	return out, nil
}

// nvBufferMax is the most an NV_Read may ask for (TPM_PT_NV_BUFFER_MAX), read once per Device. Callers hold d.mu.
func (d *Device) nvBufferMax(ctx context.Context) (int, error) {
	if d.nvMax > 0 {
		return d.nvMax, nil
	}
	d.nvMax = 512 // a TPM that does not say: what every TPM takes
	props, err := d.properties(ctx, tpm2.TPMPTNVBufferMax, 1)
	if err != nil {
		return 0, err
	}
	if v := props[tpm2.TPMPTNVBufferMax]; v >= 64 && v <= 1<<15 {
		d.nvMax = int(v)
	}
	return d.nvMax, nil
}

// properties reads count TPM properties from first (TPM2_GetCapability, TPM_CAP_TPM_PROPERTIES). Callers hold d.mu.
func (d *Device) properties(ctx context.Context, first tpm2.TPMPT, count uint32) (map[tpm2.TPMPT]uint32, error) {
	rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(first), PropertyCount: count}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, mapErr("read TPM properties", err)
	}
	props, err := rsp.CapabilityData.Data.TPMProperties()
	if err != nil {
		return nil, mapErr("read TPM properties", err)
	}
	out := make(map[tpm2.TPMPT]uint32, len(props.TPMProperty))
	for _, p := range props.TPMProperty {
		out[p.Property] = p.Value
	}
	return out, nil
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

	dev    *Device
	pub    tpm2.TPMTPublic
	name   tpm2.TPM2BName
	closed bool
}

// EndorsementKey returns the EK the certificate at index certifies. want is that certificate's public key: a
// persistent EK (0x81010000–0x810100ff) with this key is used when one exists; otherwise the EK is recreated from the
// TCG template for index's algorithm (low range L-1/L-2, high range H-1…H-7) — its key may differ from want when the
// certificate belongs to another TPM, which is the caller's to check. index 0 (no certificate) and want nil: the
// default EK (a persistent ECC P-256 EK at 0x81010002 or RSA at 0x81010001, else the low-range ECC P-256 template).
// With an index and want nil, the EK at that template's usual persistent handle, else the template's.
//
// Reading or recreating the EK takes an object slot, and a TPM without a resource manager has 3 (swtpm, the simulator):
// EndorsementKey flushes the storage root key first (CreateKey and LoadKeyFile make it again when needed), so with the
// device key loaded, create the AK before the EK: device key, AK and EK then fill the 3 slots.
func (d *Device) EndorsementKey(ctx context.Context, index uint32, want crypto.PublicKey) (*EK, error) {
	if d.l == nil {
		return nil, errors.New("tpm: a software key has no TPM, so no endorsement key")
	}
	tmpl, ok := templateFor(index)
	candidates := []uint32{tmpl.persistent}
	switch {
	case index == 0:
		tmpl, _ = templateFor(0x01c0000a)
		candidates = []uint32{ekPersistentECC, ekPersistentRSA}
	case !ok:
		return nil, fmt.Errorf("tpm: NV index %#x is not an EK certificate index the station knows", index)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil, fmt.Errorf("tpm: endorsement key: %w: device closed", ErrUnreachable)
	}
	if err := d.dropSRK(ctx); err != nil {
		return nil, err
	}
	persistent, err := d.handles(ctx, ekPersistentFirst, ekPersistentLast, "list persistent handles")
	if err != nil {
		return nil, err
	}
	if want != nil { // any persistent EK may hold the certified key; the usual handle is looked at first
		for _, h := range persistent {
			if h != tmpl.persistent {
				candidates = append(candidates, h)
			}
		}
	}
	present := make(map[uint32]bool, len(persistent))
	for _, h := range persistent {
		present[h] = true
	}
	for _, h := range candidates {
		if !present[h] {
			continue
		}
		ek, err := d.readEK(ctx, h)
		if err != nil {
			return nil, err
		}
		if ek != nil && (want == nil || keyEqual(ek.PublicKey, want)) {
			return ek, nil
		}
	}
	auth := d.auth()
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: auth},
		InPublic:      tpm2.New2B(tmpl.public),
	}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, d.sessionErr("create endorsement key "+tmpl.label, auth, err)
	}
	ek := &EK{Handle: uint32(rsp.ObjectHandle), Template: "template " + tmpl.label, dev: d, name: rsp.Name}
	if err := ek.fill(rsp.OutPublic); err != nil {
		tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.l.with(context.WithoutCancel(ctx)))
		return nil, err
	}
	return ek, nil
}

// dropSRK flushes the storage root key, if loaded, to free its object slot. Callers hold d.mu.
func (d *Device) dropSRK(ctx context.Context) error {
	if !d.srkUp {
		return nil
	}
	d.srkUp = false
	if _, err := (tpm2.FlushContext{FlushHandle: d.srk}).Execute(d.l.with(ctx)); err != nil {
		return mapErr("flush storage root key", err)
	}
	return nil
}

// readEK reads the persistent object at h as an EK: nil when it holds no RSA or ECC key. Callers hold d.mu.
func (d *Device) readEK(ctx context.Context, h uint32) (*EK, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(h)}.Execute(d.l.with(ctx))
	if err != nil {
		return nil, mapErr(fmt.Sprintf("read persistent key %#x", h), err)
	}
	ek := &EK{Handle: h, Persistent: true, Template: fmt.Sprintf("persistent %#x", h), dev: d, name: rsp.Name}
	if ek.fill(rsp.OutPublic) != nil {
		return nil, nil // some other object kept in the EK range
	}
	return ek, nil
}

func (e *EK) fill(pub tpm2.TPM2BPublic) error {
	p, err := pub.Contents()
	if err != nil {
		return fmt.Errorf("tpm: endorsement key public area: %w", err)
	}
	if e.PublicKey, err = tpm2.Pub(*p); err != nil {
		return fmt.Errorf("tpm: endorsement key public area: %w", err)
	}
	e.pub, e.Public, e.Name = *p, pub.Bytes(), e.name.Buffer
	return nil
}

// Close flushes a recreated EK; a persistent one stays. Idempotent.
func (e *EK) Close() error {
	if e == nil || e.Persistent {
		return nil
	}
	d := e.dev
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.closed {
		return nil
	}
	e.closed = true
	if d.closed || d.l.broken != nil {
		return nil
	}
	if _, err := (tpm2.FlushContext{FlushHandle: tpm2.TPMHandle(e.Handle)}).Execute(d.l.with(context.Background())); err != nil {
		return mapErr("flush endorsement key", err)
	}
	return nil
}

// ekAuth is the authorization the EK's USER role takes: its empty authValue when it has userWithAuth, else a policy
// session satisfying policy A, or policy A within the OR of the high-range templates; flush, when not nil, ends that
// session. Callers hold d.mu.
func (d *Device) ekAuth(ctx context.Context, ek *EK) (auth tpm2.Session, flush func(), err error) {
	if ek.pub.ObjectAttributes.UserWithAuth {
		return tpm2.PasswordAuth(nil), nil, nil
	}
	pol, ok := ekPolicies[ek.pub.NameAlg]
	policy := ek.pub.AuthPolicy.Buffer
	if !ok || !bytes.Equal(policy, pol.a) && !bytes.Equal(policy, pol.or) {
		return nil, nil, fmt.Errorf("tpm: endorsement key: authPolicy %x is not a TCG EK policy", policy)
	}
	sess, _, err := tpm2.PolicySession(d.l.with(ctx), ek.pub.NameAlg, 16)
	if err != nil {
		return nil, nil, mapErr("start policy session", err)
	}
	flush = func() {
		tpm2.FlushContext{FlushHandle: sess.Handle()}.Execute(d.l.with(context.WithoutCancel(ctx)))
	}
	if _, err := (tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}).Execute(d.l.with(ctx)); err != nil {
		flush()
		return nil, nil, mapErr("policy secret (endorsement)", err)
	}
	if bytes.Equal(policy, pol.or) {
		if _, err := (tpm2.PolicyOr{
			PolicySession: sess.Handle(),
			PHashList:     tpm2.TPMLDigest{Digests: []tpm2.TPM2BDigest{{Buffer: pol.a}, {Buffer: pol.c}}},
		}).Execute(d.l.with(ctx)); err != nil {
			flush()
			return nil, nil, mapErr("policy OR", err)
		}
	}
	return sess, flush, nil
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

// keyEqual reports whether two public keys are the same key.
func keyEqual(a, b crypto.PublicKey) bool {
	e, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && e.Equal(b)
}
