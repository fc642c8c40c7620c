package tpm

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"

	"provision/internal/testutil"
)

// The EK policy digests are what the TPM computes: policy A from TPM2_PolicySecret(TPM_RH_ENDORSEMENT), the
// high-range templates' policy from TPM2_PolicyOR(A, C); the low-range templates carry A.
func TestEKPolicies(t *testing.T) {
	for alg, p := range ekPolicies {
		calc, err := tpm2.NewPolicyCalculator(alg)
		if err != nil {
			t.Fatal(err)
		}
		if err := (tpm2.PolicySecret{AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement}}).Update(calc); err != nil {
			t.Fatal(err)
		}
		if got := calc.Hash().Digest; !bytes.Equal(got, p.a) {
			t.Errorf("%v policy A: %x, want %x", alg, got, p.a)
		}
		calc.Reset()
		or := tpm2.PolicyOr{PHashList: tpm2.TPMLDigest{Digests: []tpm2.TPM2BDigest{{Buffer: p.a}, {Buffer: p.c}}}}
		if err := or.Update(calc); err != nil {
			t.Fatal(err)
		}
		if got := calc.Hash().Digest; !bytes.Equal(got, p.or) {
			t.Errorf("%v policy OR(A, C): %x, want %x", alg, got, p.or)
		}
	}
	for _, tm := range ekTemplates {
		want := ekPolicies[tm.public.NameAlg].or
		if tm.index < 0x01c00012 {
			want = ekPolicies[tpm2.TPMAlgSHA256].a
		}
		if !bytes.Equal(tm.public.AuthPolicy.Buffer, want) {
			t.Errorf("template %s: authPolicy %x", tm.label, tm.public.AuthPolicy.Buffer)
		}
	}
}

// measure runs op and logs how many TPM commands it sent and how long it took.
func measure(t *testing.T, n *atomic.Int64, what string, op func()) {
	t.Helper()
	before, start := n.Load(), time.Now()
	op()
	t.Logf("%s: %d TPM commands, %s", what, n.Load()-before, time.Since(start).Round(10*time.Microsecond))
}

func parseNVCert(t testing.TB, c NVCertificate) *x509.Certificate {
	t.Helper()
	cert, err := x509.ParseCertificate(trimDER(c.Data))
	if err != nil {
		t.Fatalf("EK certificate at %#x: %v", c.Index, err)
	}
	return cert
}

func TestSwtpmEKCertificates(t *testing.T) {
	ctx := context.Background()
	plain := openSwtpm(t, testutil.StartSwtpm(t))
	if certs, chain, err := plain.EKCertificates(ctx); err != nil || certs != nil || chain != nil {
		t.Fatalf("swtpm without EK certificates: %v %v %v", certs, chain, err)
	}
	soft, _ := Open(ctx, "soft")
	if certs, _, err := soft.EKCertificates(ctx); certs != nil || err != nil {
		t.Fatalf("soft: %v %v", certs, err)
	}
	if info, err := soft.Info(ctx); info != (Info{}) || err != nil {
		t.Fatalf("soft info: %v %v", info, err)
	}

	var n atomic.Int64
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	d := openSwtpm(t, s, WithCounter(&n))
	var certs, chain []NVCertificate
	var err error
	measure(t, &n, "EKCertificates", func() { certs, chain, err = d.EKCertificates(ctx) })
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || certs[0].Index != 0x01c00002 || certs[1].Index != 0x01c00016 || len(chain) != 0 {
		t.Fatalf("certificates at %v, chain %v", certs, chain)
	}
	if _, ok := parseNVCert(t, certs[0]).PublicKey.(interface{ Size() int }); !ok {
		t.Fatal("0x01c00002 does not hold an RSA key")
	}
	if k, ok := parseNVCert(t, certs[1]).PublicKey.(*ecdsa.PublicKey); !ok || k.Curve.Params().BitSize != 384 {
		t.Fatal("0x01c00016 does not hold a P-384 key")
	}
	// Both chain to the swtpm-localca certificates in EKRootsDir (root, then the issuer of EK certificates).
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for name, pool := range map[string]*x509.CertPool{"swtpm-localca-rootca-cert.pem": roots, "issuercert.pem": inter} {
		b, err := os.ReadFile(filepath.Join(s.EKRootsDir(), name))
		if err != nil || !pool.AppendCertsFromPEM(b) {
			t.Fatalf("%s: %v", name, err)
		}
	}
	for _, c := range certs {
		cert := parseNVCert(t, c)
		cert.UnhandledCriticalExtensions = slices.DeleteFunc(cert.UnhandledCriticalExtensions,
			func(o asn1.ObjectIdentifier) bool { return o.Equal(asn1.ObjectIdentifier{2, 5, 29, 17}) })
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%#x: %v", c.Index, err)
		}
	}
	if der, err := d.EKCertificate(ctx); err != nil || !bytes.Equal(der, trimDER(certs[0].Data)) {
		t.Fatalf("EKCertificate: %v", err)
	}
	var info Info
	measure(t, &n, "Info", func() { info, err = d.Info(ctx) })
	if err != nil || info.Manufacturer != 0x49424d00 || info.VendorString != "SW   TPM" || info.FirmwareVersion == 0 || info.SpecRevision == 0 {
		t.Fatalf("info %+v, %v", info, err)
	}
}

// evictEKs removes swtpm_setup's persistent EKs, so the EK must be recreated from its template.
func evictEKs(t testing.TB, d *Device) {
	t.Helper()
	ctx := context.Background()
	d.mu.Lock()
	defer d.mu.Unlock()
	hs, err := d.handles(ctx, ekPersistentFirst, ekPersistentLast, "list")
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		rp, err := tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(h)}.Execute(d.l.with(ctx))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := (tpm2.EvictControl{
			Auth:             tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			ObjectHandle:     tpm2.NamedHandle{Handle: tpm2.TPMHandle(h), Name: rp.Name},
			PersistentHandle: tpm2.TPMHandle(h),
		}).Execute(d.l.with(ctx)); err != nil {
			t.Fatal(err)
		}
	}
}

// attestAll runs the TPM side of attestation for every EK certificate d holds, logging command counts and times.
func attestAll(t *testing.T, d *Device, n *atomic.Int64, wantPersistent bool) {
	ctx := context.Background()
	certs, _, err := d.EKCertificates(ctx)
	if err != nil || len(certs) == 0 {
		t.Fatalf("EK certificates: %v, %v", certs, err)
	}
	key, err := d.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Close()
	var ak *AK
	measure(t, n, "CreateAK", func() { ak, err = d.CreateAK(ctx) })
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	checkName(t, ak.Public(), ak.Name())
	for _, c := range certs {
		want := parseNVCert(t, c).PublicKey
		var ek *EK
		measure(t, n, "EndorsementKey "+templateLabel(c.Index), func() { ek, err = d.EndorsementKey(ctx, c.Index, want) })
		if err != nil {
			t.Fatal(err)
		}
		if !keyEqual(ek.PublicKey, want) || ek.Persistent != wantPersistent {
			t.Fatalf("%#x: EK %s (persistent %v) does not hold the certified key", c.Index, ek.Template, ek.Persistent)
		}
		t.Logf("%#x: %s", c.Index, ek.Template)
		checkName(t, ek.Public, ek.Name)
		activate(t, d, n, ak, ek)
		ek.Close()
		ek.Close()
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	var attest, sig []byte
	measure(t, n, "Certify", func() { attest, sig, err = d.Certify(ctx, key, ak, nonce) })
	if err != nil {
		t.Fatal(err)
	}
	checkCertify(t, ak, key, nonce, attest, sig)
	key.Close() // the TPM's 3 object slots: the SRK, the AK and its key file
	akFile(t, d, ak)
}

// checkName: a Name is what a verifier computes from the public area.
func checkName(t *testing.T, public, name []byte) {
	t.Helper()
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](public)
	if err != nil {
		t.Fatal(err)
	}
	n, err := tpm2.ObjectName(pub)
	if err != nil || !bytes.Equal(n.Buffer, name) {
		t.Fatalf("Name %x, computed %x (%v)", name, n.Buffer, err)
	}
}

func templateLabel(index uint32) string {
	t, _ := templateFor(index)
	return t.label
}

// activate makes a credential for ak under ek, as the station does, and has the TPM recover it; one made for another
// key's Name does not activate.
func activate(t *testing.T, d *Device, n *atomic.Int64, ak *AK, ek *EK) {
	t.Helper()
	ctx := context.Background()
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ek.Public)
	if err != nil {
		t.Fatal(err)
	}
	encap, err := tpm2.ImportEncapsulationKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("provision station challenge 0123")
	blob, encSecret, err := tpm2.CreateCredential(rand.Reader, encap, ak.Name(), secret)
	if err != nil {
		t.Fatal(err)
	}
	var got []byte
	measure(t, n, "ActivateCredential "+ek.Template, func() { got, err = d.ActivateCredential(ctx, ak, ek, blob, encSecret) })
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("activate credential with %s: %x, %v", ek.Template, got, err)
	}
	blob, encSecret, err = tpm2.CreateCredential(rand.Reader, encap, ek.Name, secret)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := d.ActivateCredential(ctx, ak, ek, blob, encSecret); err == nil {
		t.Fatalf("a credential for another Name activated: %x", got)
	}
}

// checkCertify checks the attestation as an independent verifier would.
func checkCertify(t *testing.T, ak *AK, key *Key, nonce, attest, sig []byte) {
	t.Helper()
	a, err := tpm2.Unmarshal[tpm2.TPMSAttest](attest)
	if err != nil {
		t.Fatal(err)
	}
	ci, err := a.Attested.Certify()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](key.PublicArea())
	if err != nil {
		t.Fatal(err)
	}
	name, err := tpm2.ObjectName(pub)
	if err != nil {
		t.Fatal(err)
	}
	if a.Magic != tpm2.TPMGeneratedValue || a.Type != tpm2.TPMSTAttestCertify || !bytes.Equal(a.ExtraData.Buffer, nonce) ||
		!bytes.Equal(ci.Name.Buffer, name.Buffer) || !bytes.Equal(ci.Name.Buffer, key.name.Buffer) {
		t.Fatalf("attestation %+v certifies %x", a, ci.Name.Buffer)
	}
	s, err := tpm2.Unmarshal[tpm2.TPMTSignature](sig)
	if err != nil {
		t.Fatal(err)
	}
	e, err := s.Signature.ECDSA()
	if err != nil || e.Hash != tpm2.TPMAlgSHA256 {
		t.Fatalf("signature %+v: %v", s, err)
	}
	sum := sha256.Sum256(attest)
	r, ss := new(big.Int).SetBytes(e.SignatureR.Buffer), new(big.Int).SetBytes(e.SignatureS.Buffer)
	if !ecdsa.Verify(ak.PublicKey().(*ecdsa.PublicKey), sum[:], r, ss) {
		t.Fatal("the AK's signature over the attestation does not verify")
	}
	ak2, err := tpm2.Unmarshal[tpm2.TPMTPublic](ak.Public())
	if err != nil || !ak2.ObjectAttributes.Restricted || !ak2.ObjectAttributes.SignEncrypt || !ak2.ObjectAttributes.FixedTPM {
		t.Fatalf("AK public area %+v: %v", ak2, err)
	}
}

// akFile: the AK's TSS2 key file decodes to the same key and loads on its TPM.
func akFile(t *testing.T, d *Device, ak *AK) {
	t.Helper()
	p, err := ak.PEM()
	if err != nil {
		t.Fatal(err)
	}
	tk, err := keyfile.Decode(p)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := tk.PublicKey()
	if err != nil || !keyEqual(pub, ak.PublicKey()) || tk.Parent != tpm2.TPMRHOwner {
		t.Fatalf("key file: %v", err)
	}
	k, err := LoadKeyFile(context.Background(), d, p)
	if err != nil {
		t.Fatal(err)
	}
	if !keyEqual(k.Public(), ak.PublicKey()) {
		t.Fatal("loaded AK key file holds another key")
	}
	k.Close()
}

func TestSwtpmAttest(t *testing.T) {
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	var n atomic.Int64
	d := openSwtpm(t, s, WithCounter(&n))
	t.Run("persistent", func(t *testing.T) { attestAll(t, d, &n, true) })
	// Without the persistent EKs, the templates must make the very keys the certificates name (L-1 and H-3).
	evictEKs(t, d)
	t.Run("template", func(t *testing.T) { attestAll(t, d, &n, false) })
	// The default EK (no certificate): the low-range ECC template.
	ek, err := d.EndorsementKey(context.Background(), 0, nil)
	if err != nil || ek.Persistent || ek.Template != "template L-2 (ECC P-256)" {
		t.Fatalf("default EK: %+v, %v", ek, err)
	}
	ek.Close()
}

// An EK whose template has no userWithAuth and the high-range policy: activation goes through PolicySecret and
// PolicyOR.
func TestSwtpmActivatePolicyOR(t *testing.T) {
	ctx := context.Background()
	var n atomic.Int64
	d := openSwtpm(t, testutil.StartSwtpm(t), WithCounter(&n))
	tmpl := high(tpm2.TPMAlgSHA256, 128, 0, tpm2.TPMECCNistP256)
	tmpl.ObjectAttributes.UserWithAuth = false
	d.mu.Lock()
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(tmpl),
	}.Execute(d.l.with(ctx))
	d.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	ek := &EK{Handle: uint32(rsp.ObjectHandle), Template: "policy OR", dev: d, name: rsp.Name}
	if err := ek.fill(rsp.OutPublic); err != nil {
		t.Fatal(err)
	}
	defer ek.Close()
	ak, err := d.CreateAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	activate(t, d, &n, ak, ek)
}

// An EK certificate copied from another TPM: the TPM's own EK is another key.
func TestSwtpmForeignEKCertificate(t *testing.T) {
	testutil.RequireTool(t, "tpm2_nvdefine")
	ctx := context.Background()
	other := testutil.StartSwtpm(t, testutil.WithEKCert())
	od, err := Open(ctx, other.URI)
	if err != nil {
		t.Fatal(err)
	}
	foreign, _, err := od.EKCertificates(ctx)
	od.Close()
	if err != nil || len(foreign) != 2 {
		t.Fatalf("other TPM's certificates: %v, %v", foreign, err)
	}
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	for _, c := range foreign {
		if err := s.WriteNV(ctx, c.Index, c.Data); err != nil {
			t.Fatal(err)
		}
	}
	d := openSwtpm(t, s)
	certs, _, err := d.EKCertificates(ctx)
	if err != nil || len(certs) != 2 {
		t.Fatalf("certificates: %v, %v", certs, err)
	}
	for i, c := range certs {
		if !bytes.Equal(c.Data, foreign[i].Data) {
			t.Fatalf("%#x: not the other TPM's certificate", c.Index)
		}
		want := parseNVCert(t, c).PublicKey
		ek, err := d.EndorsementKey(ctx, c.Index, want)
		if err != nil {
			t.Fatal(err)
		}
		if keyEqual(ek.PublicKey, want) || ek.Persistent {
			t.Fatalf("%#x: the EK (%s) matches another TPM's certificate", c.Index, ek.Template)
		}
		ek.Close()
	}
}

func TestSoftAttest(t *testing.T) {
	ctx := context.Background()
	d, _ := Open(ctx, "soft")
	if _, err := d.EndorsementKey(ctx, 0, nil); err == nil {
		t.Fatal("soft EK")
	}
	if _, err := d.CreateAK(ctx); err == nil {
		t.Fatal("soft AK")
	}
	k, _ := d.CreateKey(ctx, ECCP256)
	if k.PublicArea() != nil {
		t.Fatal("soft public area")
	}
	var ek *EK
	if ek.Close() != nil {
		t.Fatal("nil EK close")
	}
}

func TestSimulatorAttest(t *testing.T) {
	var n atomic.Int64
	attestAll(t, openSim(t, WithCounter(&n)), &n, false)
}

// Every EK template makes a key on swtpm, with the policy the TCG profile names (the templates for which swtpm_setup
// makes no certificate are checked here at least for what the TPM accepts).
func TestSwtpmEKTemplates(t *testing.T) {
	ctx := context.Background()
	d := openSwtpm(t, testutil.StartSwtpm(t))
	for _, tm := range ekTemplates {
		start := time.Now()
		d.mu.Lock()
		rsp, err := tpm2.CreatePrimary{
			PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
			InPublic:      tpm2.New2B(tm.public),
		}.Execute(d.l.with(ctx))
		if err == nil {
			tpm2.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(d.l.with(ctx))
		}
		d.mu.Unlock()
		if err != nil && tm.index == 0x01c0001e && errors.Is(err, tpm2.TPMRCValue) {
			t.Logf("%s: not supported by swtpm (libtpms keeps RSA to 3072 bits)", tm.label)
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tm.label, err)
			continue
		}
		t.Logf("%s: %s", tm.label, time.Since(start).Round(time.Millisecond))
	}
}

// BenchmarkSwtpmAttest is the TPM side of one unit's attestation on swtpm with EK certificates, the device key
// already loaded: read the EK certificates and the TPM's identity, create the AK, get the EK a certificate names (the
// RSA one, persistent with policy A; the P-384 one, persistent with userWithAuth; the P-384 one recreated from
// template H-3), activate a credential, certify the device key, export the AK.
func BenchmarkSwtpmAttest(b *testing.B) {
	testutil.RequireTool(b, "swtpm")
	for _, tc := range []struct {
		name     string
		cert     int
		recreate bool
	}{{"rsa-persistent", 0, false}, {"p384-persistent", 1, false}, {"p384-template", 1, true}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			s := testutil.StartSwtpm(b, testutil.WithEKCert())
			var n atomic.Int64
			d, err := Open(ctx, s.URI, WithFlushStale(true), WithCounter(&n))
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			if tc.recreate {
				evictEKs(b, d)
			}
			key, err := d.CreateKey(ctx, ECCP256)
			if err != nil {
				b.Fatal(err)
			}
			defer key.Close()
			secret := make([]byte, 32)
			n.Store(0)
			for b.Loop() {
				attestOnce(b, d, key, tc.cert, secret)
			}
			b.ReportMetric(float64(n.Load())/float64(b.N), "tpm-cmds/op")
		})
	}
}

func attestOnce(b *testing.B, d *Device, key *Key, which int, secret []byte) {
	ctx := context.Background()
	certs, _, err := d.EKCertificates(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.Info(ctx); err != nil {
		b.Fatal(err)
	}
	ak, err := d.CreateAK(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer ak.Close()
	cert, err := x509.ParseCertificate(trimDER(certs[which].Data))
	if err != nil {
		b.Fatal(err)
	}
	ek, err := d.EndorsementKey(ctx, certs[which].Index, cert.PublicKey)
	if err != nil {
		b.Fatal(err)
	}
	defer ek.Close()
	pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ek.Public)
	encap, _ := tpm2.ImportEncapsulationKey(pub)
	blob, encSecret, err := tpm2.CreateCredential(rand.Reader, encap, ak.Name(), secret)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.ActivateCredential(ctx, ak, ek, blob, encSecret); err != nil {
		b.Fatal(err)
	}
	ek.Close()
	if _, _, err := d.Certify(ctx, key, ak, secret); err != nil {
		b.Fatal(err)
	}
	if _, err := ak.PEM(); err != nil {
		b.Fatal(err)
	}
}

// tpm2-tools, an independent decoder, reads the certify attestation.
func TestCertifyTPM2Print(t *testing.T) {
	testutil.RequireTool(t, "tpm2_print")
	ctx := context.Background()
	d := openSim(t)
	key, err := d.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	defer key.Close()
	ak, err := d.CreateAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close()
	attest, _, err := d.Certify(ctx, key, ak, []byte("nonce-0123456789"))
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "attest.bin")
	if err := os.WriteFile(f, attest, 0o600); err != nil {
		t.Fatal(err)
	}
	// tpm2-tools 5.4 decodes the header and then stops at the certify body ("Cannot print unsupported type 0x8017",
	// exit 1): only quotes are printed in full.
	out, _ := exec.Command("tpm2_print", "-t", "TPMS_ATTEST", f).CombinedOutput()
	for _, want := range []string{"magic: ff544347", "type: 8017", "extraData: 6e6f6e63652d30313233343536373839"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Fatalf("tpm2_print does not show %q:\n%s", want, out)
		}
	}
}
