package attest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// FuzzParseEKCertificate: EK certificates come from the unit's TPM, outside input. Seeded with swtpm's real ones.
func FuzzParseEKCertificate(f *testing.F) {
	files, _ := filepath.Glob("testdata/swtpm/*.der")
	for _, name := range files {
		der, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(der)
		f.Add(tcgHeader(der))
		f.Add(append(append([]byte{}, der...), 0, 0, 0))
	}
	f.Add([]byte{0x10, 0x01, 0x00, 0x02, 0x30, 0x00})
	roots := BuiltinRoots()
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseEKCertificate(data)
		if err != nil {
			return
		}
		IdentityOf(c)
		roots.Verify(c, nil, time.Time{})
		if again, err := ParseEKCertificate(c.Raw); err != nil || !again.Equal(c) {
			t.Errorf("Raw does not parse back to the same certificate: %v", err)
		}
	})
}

// fuzzUnit is a genuine attest run on the simulator, made once per fuzzing process.
func fuzzEvidence(f *testing.F) *Evidence {
	s := openSim(f)
	u := attestUnit(f, s, tpm2.ECCEKTemplate)
	ekKey, err := PublicKey(u.ek.public)
	if err != nil {
		f.Fatal(err)
	}
	p := newTestPKI(f, time.Time{})
	return u.evidence(p.issueEK(f, ekKey, nil).Raw, [][]byte{p.inter.Raw}, StatusUntrusted)
}

// FuzzVerifyCertify: the certify blobs and public areas come from the unit's TPM.
func FuzzVerifyCertify(f *testing.F) {
	ev := fuzzEvidence(f)
	f.Add(ev.AKPublic, ev.CertifyAttest, ev.CertifySignature, ev.Nonce, ev.KeyPublic)
	f.Add(ev.KeyPublic, ev.CertifyAttest, ev.CertifySignature, ev.Nonce, ev.AKPublic)
	f.Fuzz(func(t *testing.T, ak, attest, sig, nonce, key []byte) {
		VerifyCertify(ak, attest, sig, nonce, key)
		CheckAK(ak)
		Name(key)
		PublicKey(key)
		if ekName, err := Name(ak); err == nil {
			MakeCredential(key, ekName, nonce)
		}
	})
}

// FuzzVerifyEvidence: stored evidence is read back from the inventory or an export, as JSON.
func FuzzVerifyEvidence(f *testing.F) {
	ev := fuzzEvidence(f)
	seed, err := json.Marshal(ev)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte(`{"version":1}`))
	roots := BuiltinRoots()
	f.Fuzz(func(t *testing.T, data []byte) {
		var e Evidence
		if json.Unmarshal(data, &e) != nil {
			return
		}
		chk := VerifyEvidence(&e, roots, "")
		switch chk.Status {
		case StatusTrusted, StatusUntrusted, StatusAbsent:
		default:
			t.Errorf("status %q", chk.Status)
		}
	})
}
