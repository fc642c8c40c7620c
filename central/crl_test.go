package central

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"testing"
	"time"
)

// testCRL is a CRL numbered n, signed by a throw-away CA.
func testCRL(tb testing.TB, n int64, this time.Time) []byte {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: this.Add(-time.Hour), NotAfter: this.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCRLSign | x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		tb.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(n), ThisUpdate: this,
		NextUpdate: this.Add(24 * time.Hour), RevokedCertificateEntries: []x509.RevocationListEntry{
			{SerialNumber: big.NewInt(n * 100), RevocationTime: this}}}, ca, key)
	if err != nil {
		tb.Fatal(err)
	}
	return der
}

func TestCRLMonotonic(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if _, err := s.CRL(ctx, "line-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("CRL of a station without one: %v, want ErrNotFound", err)
	}
	if n, err := s.CRLNumber(ctx, "line-1"); n != 0 || err != nil {
		t.Fatalf("CRLNumber without one: %d, %v", n, err)
	}
	this := time.Now().UTC().Truncate(time.Second)
	put := func(der []byte) error {
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		return s.PutCRL(ctx, "line-1", der, rl.Number.Int64(), rl.ThisUpdate, rl.NextUpdate)
	}
	crl2, crl1, crl3 := testCRL(t, 2, this), testCRL(t, 1, this.Add(time.Minute)), testCRL(t, 3, this.Add(2*time.Minute))
	other2 := testCRL(t, 2, this.Add(time.Hour)) // the same number, other bytes
	for _, step := range []struct {
		name string
		der  []byte
		want []byte
	}{
		{"first", crl2, crl2},
		{"repeat", crl2, crl2},
		{"equal number", other2, crl2},
		{"lower number", crl1, crl2},
		{"higher number", crl3, crl3},
	} {
		if err := put(step.der); err != nil {
			t.Fatalf("%s: PutCRL: %v", step.name, err)
		}
		got, err := s.CRL(ctx, "line-1")
		if err != nil || !bytes.Equal(got, step.want) {
			t.Fatalf("%s: the store holds another CRL (%v)", step.name, err)
		}
	}
	if n, err := s.CRLNumber(ctx, "line-1"); n != 3 || err != nil {
		t.Errorf("CRLNumber = %d, %v; want 3", n, err)
	}
	if _, err := s.CRL(ctx, "line-2"); !errors.Is(err, ErrNotFound) {
		t.Errorf("another station's CRL: %v, want ErrNotFound", err)
	}
	// Values that are not the CRL's own, and bytes that are no CRL, are refused.
	if err := s.PutCRL(ctx, "line-1", crl3, 4, this, this.Add(24*time.Hour)); err == nil {
		t.Error("a number that is not the CRL's was accepted")
	}
	if err := s.PutCRL(ctx, "line-1", []byte("not a crl"), 5, this, this); err == nil {
		t.Error("garbage accepted as a CRL")
	}
}

// A certificate's DER goes through a push and back; a push without it keeps the stored copy; a row stored without
// DER gains it from a later push; a DER that is not the fingerprint's certificate is refused.
func TestPushCertificateDER(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	c := newChain("line-1")
	b := c.unitBatch("SN-0001", "SN-0002")
	b.Certificates[0].DER = []byte("certificate one")
	b.Certificates[0].SHA256 = fp("certificate one")
	push(t, s, b)
	d, err := s.Unit(ctx, "SN-0001")
	if err != nil || len(d.Certificates) != 1 || string(d.Certificates[0].DER) != "certificate one" {
		t.Fatalf("certificate DER after the push: %+v, %v", d.Certificates, err)
	}
	if res := push(t, s, b); res.Certificates != 0 {
		t.Errorf("repeat with DER: %d certificates changed", res.Certificates)
	}
	// A repeat without DER (an older binary) keeps the copy and changes nothing.
	b1 := Batch{Station: "line-1", Certificates: []Certificate{b.Certificates[0]}}
	b1.Certificates[0].DER = nil
	if res := push(t, s, b1); res.Certificates != 0 {
		t.Errorf("repeat without DER: %d certificates changed", res.Certificates)
	}
	if d, _ := s.Unit(ctx, "SN-0001"); string(d.Certificates[0].DER) != "certificate one" {
		t.Error("a push without DER dropped the stored copy")
	}
	// SN-0002 was stored without; a later push brings it.
	b2 := Batch{Station: "line-1", Certificates: []Certificate{b.Certificates[1]}}
	if d, _ := s.Unit(ctx, "SN-0002"); d.Certificates[0].DER != nil {
		t.Fatal("a certificate pushed without DER has one")
	}
	b2.Certificates[0].DER = []byte("cert" + "line-1" + "SN-0002") // what fp hashed in cert()
	if res := push(t, s, b2); res.Certificates != 1 {
		t.Errorf("DER for a stored certificate: %d changed, want 1", res.Certificates)
	}
	if d, _ := s.Unit(ctx, "SN-0002"); string(d.Certificates[0].DER) != "certline-1SN-0002" {
		t.Error("the later DER was not stored")
	}
	b2.Certificates[0].DER = []byte("forged")
	if _, err := s.Push(ctx, b2); err == nil {
		t.Error("a DER that is not the fingerprint's certificate was accepted")
	}
}
