package attest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"
)

// testPKI is a TPM vendor's CA in miniature: a root, an intermediate, and EK certificates made like real ones.
type testPKI struct {
	root, inter       *x509.Certificate
	rootKey, interKey *ecdsa.PrivateKey
}

var (
	testStart = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	testEnd   = time.Date(2036, 1, 1, 0, 0, 0, 0, time.UTC)
	testNow   = time.Date(2027, 6, 1, 0, 0, 0, 0, time.UTC)
)

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}

func create(tb testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		tb.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func caTmpl(serial int64, cn string, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: cn, Organization: []string{"Test TPM Vendor"}},
		NotBefore:             testStart,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
}

// newTestPKI makes a vendor root and intermediate; interNotAfter bounds the intermediate (zero: testEnd).
func newTestPKI(tb testing.TB, interNotAfter time.Time) *testPKI {
	tb.Helper()
	if interNotAfter.IsZero() {
		interNotAfter = testEnd
	}
	p := &testPKI{rootKey: newKey(tb), interKey: newKey(tb)}
	rt := caTmpl(1, "Test TPM EK Root CA", testEnd)
	p.root = create(tb, rt, rt, p.rootKey.Public(), p.rootKey)
	it := caTmpl(2, "Test TPM EK Intermediate CA 01", interNotAfter)
	// Vendors' intermediates sometimes carry the EK usage themselves: Verify must not mind.
	it.UnknownExtKeyUsage = []asn1.ObjectIdentifier{OIDEKCertificate}
	p.inter = create(tb, it, p.root, p.interKey.Public(), p.rootKey)
	return p
}

var testIdentity = TPMIdentity{Manufacturer: "id:49465800", Model: "SLB9670", Version: "id:00070055"}

// ekTemplate is an EK certificate as the TCG profile has it: empty subject, critical SAN with the TPM attributes,
// tcg-kp-EKCertificate, keyEncipherment (RSA) or keyAgreement (ECC), not a CA.
func ekTemplate(serial int64, notAfter time.Time, extra ...pkix.Extension) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		NotBefore:             testStart,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageKeyAgreement,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{OIDEKCertificate},
		BasicConstraintsValid: true,
		ExtraExtensions: append([]pkix.Extension{{
			Id: oidSubjectAltName, Critical: true, Value: tcgSANValue(testIdentity, nil),
		}}, extra...),
	}
}

// issueEK issues an EK certificate for pub from the intermediate.
func (p *testPKI) issueEK(tb testing.TB, pub crypto.PublicKey, tmpl *x509.Certificate) *x509.Certificate {
	tb.Helper()
	if tmpl == nil {
		tmpl = ekTemplate(0x1234, testEnd)
	}
	return create(tb, tmpl, p.inter, pub, p.interKey)
}

// resign replaces a certificate's TBSCertificate with tbs, signed by key (ECDSA with SHA-256), keeping the outer form
// crypto/x509 would write: how the tests make certificates crypto/x509 itself refuses to create.
func resign(tb testing.TB, tbs []byte, key *ecdsa.PrivateKey) []byte {
	tb.Helper()
	digest := sha256.Sum256(tbs)
	sig, err := ecdsa.SignASN1(rand.Reader, key, digest[:])
	if err != nil {
		tb.Fatal(err)
	}
	der, err := asn1.Marshal(struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}{
		TBS: asn1.RawValue{FullBytes: tbs},
		Alg: pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}},
		Sig: asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)},
	})
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

// withSerial is tbs with its serial number's content bytes replaced.
func withSerial(tb testing.TB, tbs, serial []byte) []byte {
	tb.Helper()
	var seq, version, old asn1.RawValue
	if _, err := asn1.Unmarshal(tbs, &seq); err != nil {
		tb.Fatal(err)
	}
	rest, err := asn1.Unmarshal(seq.Bytes, &version)
	if err != nil {
		tb.Fatal(err)
	}
	tail, err := asn1.Unmarshal(rest, &old)
	if err != nil {
		tb.Fatal(err)
	}
	s, _ := asn1.Marshal(asn1.RawValue{Tag: asn1.TagInteger, Bytes: serial})
	content := append(append(append([]byte{}, version.FullBytes...), s...), tail...)
	out, _ := asn1.Marshal(asn1.RawValue{Tag: asn1.TagSequence, IsCompound: true, Bytes: content})
	return out
}

func mustParseEK(tb testing.TB, data []byte) *x509.Certificate {
	tb.Helper()
	c, err := ParseEKCertificate(data)
	if err != nil {
		tb.Fatalf("ParseEKCertificate: %v", err)
	}
	return c
}

// anchors is a Roots holding only certs.
func anchors(certs ...*x509.Certificate) *Roots {
	r := &Roots{}
	r.Add(certs...)
	return r
}

func contains(err error, s string) bool { return err != nil && containsStr(err.Error(), s) }

func containsStr(s, sub string) bool { return strings.Contains(s, sub) }

func isBadEvidence(err error) bool { return errors.Is(err, ErrBadEvidence) }

func anyContains(list []string, sub string) bool {
	for _, s := range list {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
