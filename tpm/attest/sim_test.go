package attest

// The TPM half of the flow, done here with go-tpm against the in-process simulator, so the station's half (this
// package) is tested against what a real TPM produces. One simulator per process: no t.Parallel.

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/simulator"
)

type simTPM struct {
	tb  testing.TB
	tpm transport.TPMCloser
}

func openSim(tb testing.TB) *simTPM {
	tb.Helper()
	t, err := simulator.OpenSimulator()
	if err != nil {
		tb.Fatalf("open simulator: %v", err)
	}
	s := &simTPM{tb: tb, tpm: t}
	tb.Cleanup(func() {
		defer t.Close()
		// Registered first, so it runs after every flush: no test leaves a transient object behind.
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(tpm2.TPMHTTransient), PropertyCount: 8}.Execute(t)
		if err != nil {
			tb.Errorf("list transient handles: %v", err)
			return
		}
		if h, err := rsp.CapabilityData.Data.Handles(); err == nil && len(h.Handle) > 0 {
			tb.Errorf("%d transient objects left loaded", len(h.Handle))
		}
	})
	return s
}

// on is s with objects flushed at the end of tb (a subtest).
func (s *simTPM) on(tb testing.TB) *simTPM { return &simTPM{tb: tb, tpm: s.tpm} }

// flush unloads objects now (the TPM has 3 transient slots).
func (s *simTPM) flush(objs ...object) {
	for _, o := range objs {
		if _, err := (tpm2.FlushContext{FlushHandle: o.handle}).Execute(s.tpm); err != nil {
			s.tb.Errorf("flush: %v", err)
		}
	}
}

// object is a loaded TPM object and its public area, marshalled.
type object struct {
	handle tpm2.TPMHandle
	name   tpm2.TPM2BName
	public []byte
}

func (o object) auth() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: o.handle, Name: o.name, Auth: tpm2.PasswordAuth(nil)}
}

func (s *simTPM) primary(hierarchy tpm2.TPMHandle, tmpl tpm2.TPMTPublic) object {
	s.tb.Helper()
	rsp, err := tpm2.CreatePrimary{PrimaryHandle: hierarchy, InPublic: tpm2.New2B(tmpl)}.Execute(s.tpm)
	if err != nil {
		s.tb.Fatalf("CreatePrimary: %v", err)
	}
	return object{rsp.ObjectHandle, rsp.Name, rsp.OutPublic.Bytes()}
}

// child creates and loads a key under parent.
func (s *simTPM) child(parent object, tmpl tpm2.TPMTPublic) object {
	s.tb.Helper()
	c, err := tpm2.Create{ParentHandle: parent.auth(), InPublic: tpm2.New2B(tmpl)}.Execute(s.tpm)
	if err != nil {
		s.tb.Fatalf("Create: %v", err)
	}
	l, err := tpm2.Load{ParentHandle: parent.auth(), InPrivate: c.OutPrivate, InPublic: c.OutPublic}.Execute(s.tpm)
	if err != nil {
		s.tb.Fatalf("Load: %v", err)
	}
	return object{l.ObjectHandle, l.Name, c.OutPublic.Bytes()}
}

// activate runs TPM2_ActivateCredential with the authorisation the EK needs: plain auth when it has userWithAuth,
// else its policy (PolicySecret(endorsement), TCG policy A).
func (s *simTPM) activate(ak, ek object, blob, secret []byte) ([]byte, error) {
	ekAuth := tpm2.AuthHandle{Handle: ek.handle, Name: ek.name, Auth: tpm2.Policy(tpm2.TPMAlgSHA256, 16,
		func(t transport.TPM, h tpm2.TPMISHPolicy, nonce tpm2.TPM2BNonce) error {
			_, err := tpm2.PolicySecret{AuthHandle: tpm2.TPMRHEndorsement, PolicySession: h, NonceTPM: nonce}.Execute(t)
			return err
		})}
	if pub, err := decodePublic("EK", ek.public); err == nil && pub.ObjectAttributes.UserWithAuth {
		ekAuth = ek.auth()
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: ak.auth(),
		KeyHandle:      ekAuth,
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: blob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: secret},
	}.Execute(s.tpm)
	if err != nil {
		return nil, err
	}
	return rsp.CertInfo.Buffer, nil
}

// certify has ak certify key over nonce: the TPMS_ATTEST and TPMT_SIGNATURE, marshalled.
func (s *simTPM) certify(key, ak object, nonce []byte) (attest, sig []byte) {
	s.tb.Helper()
	rsp, err := tpm2.Certify{
		ObjectHandle:   key.auth(),
		SignHandle:     ak.auth(),
		QualifyingData: tpm2.TPM2BData{Buffer: nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(s.tpm)
	if err != nil {
		s.tb.Fatalf("Certify: %v", err)
	}
	return rsp.CertifyInfo.Bytes(), tpm2.Marshal(rsp.Signature)
}

func eccTemplate(attrs tpm2.TPMAObject, scheme tpm2.TPMTECCScheme) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgECC,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    scheme,
			CurveID:   tpm2.TPMECCNistP256,
			KDF:       tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
	}
}

// withUnique is tmpl with another unique value: a primary key made from it is another key.
func withUnique(tmpl tpm2.TPMTPublic, unique string) tpm2.TPMTPublic {
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{X: tpm2.TPM2BECCParameter{Buffer: []byte(unique)}})
	return tmpl
}

var ecdsaSHA256 = tpm2.TPMTECCScheme{
	Scheme:  tpm2.TPMAlgECDSA,
	Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
}

// akTemplate is the attestation key package tpm makes: restricted ECDSA P-256 signing, fixed to its TPM.
var akTemplate = eccTemplate(tpm2.TPMAObject{
	FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, Restricted: true, SignEncrypt: true,
}, ecdsaSHA256)

// deviceKeyTemplate is a device key: unrestricted ECDSA P-256 signing, fixed to its TPM.
var deviceKeyTemplate = eccTemplate(tpm2.TPMAObject{
	FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true,
}, tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull})

// unit is one attest run's TPM objects and what they produced.
type unit struct {
	sim                *simTPM
	ek, ak, key        object
	nonce, attest, sig []byte
	blob, encSecret    []byte
	secretSHA256       string
}

// attestUnit does what the attest step does, with the EK of ekTmpl: credential activation, then certify. The EK is
// flushed; the AK and the key stay loaded until the end of tb.
func attestUnit(tb testing.TB, s *simTPM, ekTmpl tpm2.TPMTPublic) *unit {
	tb.Helper()
	s = s.on(tb)
	u := &unit{sim: s}
	u.ek = s.primary(tpm2.TPMRHEndorsement, ekTmpl)
	u.ak = s.primary(tpm2.TPMRHOwner, akTemplate)
	u.key = s.primary(tpm2.TPMRHOwner, deviceKeyTemplate)
	secret := make([]byte, 32)
	rand.Read(secret)
	akName, err := Name(u.ak.public)
	if err != nil {
		tb.Fatal(err)
	}
	u.blob, u.encSecret, err = MakeCredential(u.ek.public, akName, secret)
	if err != nil {
		tb.Fatalf("MakeCredential: %v", err)
	}
	got, err := s.activate(u.ak, u.ek, u.blob, u.encSecret)
	if err != nil {
		tb.Fatalf("ActivateCredential: %v", err)
	}
	if hex.EncodeToString(got) != hex.EncodeToString(secret) {
		tb.Fatalf("ActivateCredential gave %x, want %x", got, secret)
	}
	s.flush(u.ek)
	tb.Cleanup(func() { s.flush(u.ak, u.key) })
	sum := sha256.Sum256(got)
	u.secretSHA256 = hex.EncodeToString(sum[:])
	u.nonce = make([]byte, 32)
	rand.Read(u.nonce)
	u.attest, u.sig = s.certify(u.key, u.ak, u.nonce)
	return u
}

// evidence is what the station stores for u, with ekCert (DER, nil for none) and chain.
func (u *unit) evidence(ekCert []byte, chain [][]byte, status string) *Evidence {
	akName, _ := Name(u.ak.public)
	return &Evidence{
		Version: EvidenceVersion, Time: testNow, Policy: "record",
		EKCertificate: ekCert, EKIndex: 0x01c0000a, Chain: chain,
		EKPublic: u.ek.public, EKSource: "template L-2 (ECC P-256)",
		AKPublic: u.ak.public,
		Activation: Activation{
			AKName: akName, CredentialBlob: u.blob, EncryptedSecret: u.encSecret,
			SecretSHA256: u.secretSHA256, Activated: true,
		},
		Nonce: u.nonce, KeyPublic: u.key.public, CertifyAttest: u.attest, CertifySignature: u.sig,
		TPMManufacturer: 0x4D534654,
		Status:          status,
	}
}

// eccP384EKTemplate is like the high-range P-384 EK swtpm keeps persistent: SHA-384 names, AES-256, and
// userWithAuth (plain empty auth activates).
var eccP384EKTemplate = tpm2.TPMTPublic{
	Type:    tpm2.TPMAlgECC,
	NameAlg: tpm2.TPMAlgSHA384,
	ObjectAttributes: tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, AdminWithPolicy: true,
		Restricted: true, Decrypt: true,
	},
	Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
		Symmetric: tpm2.TPMTSymDefObject{
			Algorithm: tpm2.TPMAlgAES,
			KeyBits:   tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
			Mode:      tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB),
		},
		CurveID: tpm2.TPMECCNistP384,
	}),
	Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{}),
}

func TestMakeCredentialActivates(t *testing.T) {
	s := openSim(t)
	for _, tc := range []struct {
		name string
		tmpl tpm2.TPMTPublic
	}{
		{"ECC P-256 EK", tpm2.ECCEKTemplate},
		{"RSA 2048 EK", tpm2.RSAEKTemplate},
		{"ECC P-384 EK with userWithAuth (as swtpm's high-range EK)", eccP384EKTemplate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := attestUnit(t, s, tc.tmpl)
			if err := VerifyCertify(u.ak.public, u.attest, u.sig, u.nonce, u.key.public); err != nil {
				t.Errorf("VerifyCertify: %v", err)
			}
		})
	}
}

func TestMakeCredentialRefuses(t *testing.T) {
	s := openSim(t)
	ek := s.primary(tpm2.TPMRHEndorsement, tpm2.ECCEKTemplate)
	ak := s.primary(tpm2.TPMRHOwner, akTemplate)
	defer s.flush(ek, ak)
	akName, _ := Name(ak.public)
	for _, tc := range []struct {
		name                string
		ekPub, name2, value []byte
	}{
		{"AK as EK (a signing key)", ak.public, akName, []byte("secret")},
		{"short name", ek.public, akName[:10], []byte("secret")},
		{"empty secret", ek.public, akName, nil},
		{"secret longer than the EK's digest", ek.public, akName, make([]byte, 33)},
		{"trailing bytes", append(append([]byte{}, ek.public...), 0), akName, []byte("secret")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := MakeCredential(tc.ekPub, tc.name2, tc.value); err == nil {
				t.Error("MakeCredential accepted it")
			}
		})
	}
}

// The credential is bound to the AK's Name: activated for another key, the TPM refuses it.
func TestCredentialForAnotherKeyFails(t *testing.T) {
	s := openSim(t)
	ek := s.primary(tpm2.TPMRHEndorsement, tpm2.ECCEKTemplate)
	ak := s.primary(tpm2.TPMRHOwner, akTemplate)
	other := s.primary(tpm2.TPMRHOwner, deviceKeyTemplate)
	defer s.flush(ek, ak, other)
	otherName, _ := Name(other.public)
	blob, secret, err := MakeCredential(ek.public, otherName, []byte("for the other key"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.activate(ak, ek, blob, secret); err == nil {
		t.Error("the TPM activated a credential made for another key's Name")
	}
}

func TestVerifyCertifyTampering(t *testing.T) {
	s := openSim(t)
	// A key that may leave its TPM (no fixedTPM, no fixedParent), certified by the AK. First, while slots are free
	// (Create needs one): a primary AK made from the same template is the same key as the unit's below.
	ak := s.primary(tpm2.TPMRHOwner, akTemplate)
	srk := s.primary(tpm2.TPMRHOwner, tpm2.ECCSRKTemplate)
	movable := s.child(srk, eccTemplate(tpm2.TPMAObject{
		SensitiveDataOrigin: true, UserWithAuth: true, SignEncrypt: true,
	}, tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgNull}))
	s.flush(srk)
	movableNonce := []byte("movable")
	movableAttest, movableSig := s.certify(movable, ak, movableNonce)
	s.flush(movable, ak)

	u := attestUnit(t, s, tpm2.ECCEKTemplate) // AK and key loaded
	// Another AK (a different key: another unique value) certifies the same key.
	otherAK := s.primary(tpm2.TPMRHOwner, withUnique(akTemplate, "other AK"))
	_, otherSig := s.certify(u.key, otherAK, u.nonce)
	s.flush(otherAK)
	other := s.primary(tpm2.TPMRHOwner, withUnique(deviceKeyTemplate, "other key"))
	s.flush(other)
	// An unrestricted signing key as "AK".
	unrestricted := s.primary(tpm2.TPMRHOwner, withUnique(eccTemplate(deviceKeyTemplate.ObjectAttributes, ecdsaSHA256), "signer"))
	byUnrestricted, byUnrestrictedSig := s.certify(u.key, unrestricted, u.nonce)
	s.flush(unrestricted)

	flip := func(b []byte, i int) []byte {
		c := append([]byte{}, b...)
		c[(i+len(c))%len(c)] ^= 0x01
		return c
	}
	ok := func(args [5][]byte) [5][]byte { return args }
	base := [5][]byte{u.ak.public, u.attest, u.sig, u.nonce, u.key.public}
	with := func(i int, v []byte) [5][]byte { a := base; a[i] = v; return a }
	for _, tc := range []struct {
		name string
		args [5][]byte
		want string
	}{
		{"genuine", ok(base), ""},
		{"flipped last byte of attest", with(1, flip(u.attest, -1)), "signature over the certify attestation does not verify"},
		{"flipped byte in the name", with(1, flip(u.attest, -20)), "does not verify"},
		{"flipped magic", with(1, flip(u.attest, 0)), "TPM_GENERATED"},
		{"flipped type", with(1, flip(u.attest, 5)), "not a TPM2_Certify"},
		{"truncated attest", with(1, u.attest[:len(u.attest)-1]), "certify attestation"},
		{"wrong nonce", with(3, flip(u.nonce, 3)), "nonce"},
		{"no nonce", with(3, nil), "no nonce"},
		{"another key's public area", with(4, other.public), "certifies another key"},
		{"signature of another AK", with(2, otherSig), "does not verify"},
		{"flipped signature", with(2, flip(u.sig, -1)), "does not verify"},
		{"empty signature", with(2, nil), "AK signature"},
		{"key without fixedTPM", [5][]byte{u.ak.public, movableAttest, movableSig, movableNonce, movable.public}, "not fixedTPM"},
		{"unrestricted AK", [5][]byte{unrestricted.public, byUnrestricted, byUnrestrictedSig, u.nonce, u.key.public}, "not restricted"},
		{"AK public area malformed", with(0, u.ak.public[:20]), "AK public area"},
		{"key public area malformed", with(4, append(append([]byte{}, u.key.public...), 1)), "device key public area"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.args
			err := VerifyCertify(a[0], a[1], a[2], a[3], a[4])
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("VerifyCertify: %v", err)
			case tc.want != "" && (err == nil || !contains(err, tc.want) || !isBadEvidence(err)):
				t.Errorf("VerifyCertify = %v, want ErrBadEvidence saying %q", err, tc.want)
			}
		})
	}
}

func TestCheckAK(t *testing.T) {
	s := openSim(t)
	ak := s.primary(tpm2.TPMRHOwner, akTemplate)
	key := s.primary(tpm2.TPMRHOwner, deviceKeyTemplate)
	ek := s.primary(tpm2.TPMRHEndorsement, tpm2.ECCEKTemplate)
	s.flush(ak, key, ek)
	if err := CheckAK(ak.public); err != nil {
		t.Errorf("CheckAK(AK): %v", err)
	}
	for _, tc := range []struct {
		name string
		pub  []byte
		want string
	}{
		{"device key", key.public, "not restricted"},
		{"EK", ek.public, "not a signing key"},
		{"empty", nil, "empty"},
	} {
		if err := CheckAK(tc.pub); err == nil || !contains(err, tc.want) || !isBadEvidence(err) {
			t.Errorf("%s: CheckAK = %v, want ErrBadEvidence saying %q", tc.name, err, tc.want)
		}
	}
}

func TestVerifyEvidence(t *testing.T) {
	s := openSim(t)
	u := attestUnit(t, s, tpm2.ECCEKTemplate)
	ekKey, err := PublicKey(u.ek.public)
	if err != nil {
		t.Fatal(err)
	}
	keyKey, _ := PublicKey(u.key.public)
	keySum, _ := KeySHA256(keyKey)
	p := newTestPKI(t, time.Time{})
	ekCert := p.issueEK(t, ekKey, nil).Raw
	chain := [][]byte{p.inter.Raw}
	roots := anchors(p.root)

	for _, tc := range []struct {
		name       string
		ev         func() *Evidence
		roots      *Roots
		key        string
		status     string
		problem    string // "" for none
		causeWords string
	}{
		{name: "genuine", ev: func() *Evidence { return u.evidence(ekCert, chain, StatusTrusted) },
			roots: roots, key: keySum, status: StatusTrusted},
		{name: "genuine, key not checked", ev: func() *Evidence { return u.evidence(ekCert, chain, StatusTrusted) },
			roots: roots, status: StatusTrusted},
		{name: "no EK certificate", ev: func() *Evidence { return u.evidence(nil, nil, StatusAbsent) },
			roots: roots, key: keySum, status: StatusAbsent, causeWords: "no EK certificate"},
		{name: "untrusted then, trusted now", ev: func() *Evidence {
			ev := u.evidence(ekCert, chain, StatusUntrusted)
			ev.Cause = "issuer unknown"
			return ev
		}, roots: roots, status: StatusTrusted, causeWords: "recorded as untrusted (issuer unknown)"},
		{name: "untrusted, still", ev: func() *Evidence { return u.evidence(ekCert, chain, StatusUntrusted) },
			roots: BuiltinRoots(), status: StatusUntrusted, causeWords: "not a trusted TPM vendor"},
		{name: "trusted, but the root is gone", ev: func() *Evidence { return u.evidence(ekCert, chain, StatusTrusted) },
			roots: BuiltinRoots(), status: StatusUntrusted, problem: "recorded as trusted"},
		{name: "stored chain is not an anchor", ev: func() *Evidence {
			return u.evidence(ekCert, [][]byte{p.inter.Raw, p.root.Raw}, StatusTrusted)
		}, roots: nil, status: StatusUntrusted, problem: "recorded as trusted"},
		{name: "swapped EK certificate", ev: func() *Evidence {
			return u.evidence(p.issueEK(t, newKey(t).Public(), nil).Raw, chain, StatusTrusted)
		}, roots: roots, status: StatusUntrusted, problem: "not this TPM's endorsement key", causeWords: "another TPM"},
		{name: "flipped certify byte", ev: func() *Evidence {
			ev := u.evidence(ekCert, chain, StatusTrusted)
			ev.CertifyAttest = append([]byte{}, ev.CertifyAttest...)
			ev.CertifyAttest[len(ev.CertifyAttest)-3] ^= 0x40
			return ev
		}, roots: roots, status: StatusTrusted, problem: "does not verify"},
		{name: "another unit's key", ev: func() *Evidence { return u.evidence(ekCert, chain, StatusTrusted) },
			roots: roots, key: "00" + keySum[2:], status: StatusTrusted, problem: "not the unit's key"},
		{name: "activation not completed", ev: func() *Evidence {
			ev := u.evidence(ekCert, chain, StatusTrusted)
			ev.Activation.Activated = false
			return ev
		}, roots: roots, status: StatusTrusted, problem: "not completed"},
		{name: "activation for another key", ev: func() *Evidence {
			ev := u.evidence(ekCert, chain, StatusTrusted)
			ev.Activation.AKName, _ = Name(u.key.public)
			return ev
		}, roots: roots, status: StatusTrusted, problem: "names another key than the AK"},
		{name: "broken EK certificate", ev: func() *Evidence {
			return u.evidence(ekCert[:100], chain, StatusUntrusted)
		}, roots: roots, status: StatusUntrusted, problem: "EK certificate does not parse"},
		{name: "unknown status", ev: func() *Evidence { return u.evidence(ekCert, chain, "fine") },
			roots: roots, status: StatusTrusted, problem: "unknown recorded status"},
		{name: "no evidence", ev: func() *Evidence { return nil }, status: StatusAbsent, problem: "no attestation evidence"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chk := VerifyEvidence(tc.ev(), tc.roots, tc.key)
			if chk.Status != tc.status {
				t.Errorf("Status = %q, want %q (cause %q)", chk.Status, tc.status, chk.Cause)
			}
			if tc.problem == "" && len(chk.Problems) != 0 {
				t.Errorf("Problems = %q, want none", chk.Problems)
			}
			if tc.problem != "" && !anyContains(chk.Problems, tc.problem) {
				t.Errorf("Problems = %q, want one saying %q", chk.Problems, tc.problem)
			}
			if tc.causeWords != "" && !containsStr(chk.Cause, tc.causeWords) {
				t.Errorf("Cause = %q, want it to say %q", chk.Cause, tc.causeWords)
			}
			for _, p := range chk.Problems {
				if containsStr(p, "\n") {
					t.Errorf("problem %q is more than one line", p)
				}
			}
		})
	}
}

func rsaAKTemplate(scheme tpm2.TPMAlgID) tpm2.TPMTPublic {
	details := tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256})
	if scheme == tpm2.TPMAlgRSAPSS {
		details = tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSAPSS, &tpm2.TPMSSigSchemeRSAPSS{HashAlg: tpm2.TPMAlgSHA256})
	}
	return tpm2.TPMTPublic{
		Type:             tpm2.TPMAlgRSA,
		NameAlg:          tpm2.TPMAlgSHA256,
		ObjectAttributes: akTemplate.ObjectAttributes,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme:    tpm2.TPMTRSAScheme{Scheme: scheme, Details: details},
			KeyBits:   2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{}),
	}
}

func TestVerifyCertifyRSAAK(t *testing.T) {
	s := openSim(t)
	key := s.primary(tpm2.TPMRHOwner, deviceKeyTemplate)
	defer s.flush(key)
	nonce := []byte("rsa nonce")
	for _, scheme := range []tpm2.TPMAlgID{tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS} {
		t.Run(algName(scheme), func(t *testing.T) {
			ak := s.primary(tpm2.TPMRHOwner, rsaAKTemplate(scheme))
			attest, sig := s.certify(key, ak, nonce)
			s.flush(ak)
			if err := VerifyCertify(ak.public, attest, sig, nonce, key.public); err != nil {
				t.Errorf("VerifyCertify: %v", err)
			}
			attest[len(attest)-1] ^= 1
			if err := VerifyCertify(ak.public, attest, sig, nonce, key.public); !contains(err, "does not verify") {
				t.Errorf("VerifyCertify of a changed attestation = %v, want a signature failure", err)
			}
		})
	}
}
