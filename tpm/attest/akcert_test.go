package attest

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"math/big"
	"strings"
	"testing"
	"time"
)

func TestKeySHA256AndEKURI(t *testing.T) {
	k := newKey(t)
	der, _ := x509.MarshalPKIXPublicKey(k.Public())
	sum := sha256.Sum256(der)
	got, err := KeySHA256(k.Public())
	if err != nil || got != hex.EncodeToString(sum[:]) {
		t.Errorf("KeySHA256 = %q, %v; want %x", got, err, sum)
	}
	u, err := EKURI(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	if want := "urn:ek:sha256:" + base64.StdEncoding.EncodeToString(sum[:]); u.String() != want {
		t.Errorf("EKURI = %q, want %q", u, want)
	}
	if _, err := KeySHA256(nil); err == nil {
		t.Error("KeySHA256(nil) succeeded")
	}
}

// stepCAAccepts repeats the checks step-ca's device-attest-01 "tpm" format makes on an AK certificate
// (acme/challenge.go: doTPMAttestationFormat, validateAKCertificate), and smallstep's client-side identity check.
func stepCAAccepts(t *testing.T, c *x509.Certificate, roots *x509.CertPool, ekURI string) {
	t.Helper()
	cp := *c
	var kept []asn1.ObjectIdentifier
	for _, oid := range cp.UnhandledCriticalExtensions {
		if !oid.Equal(oidSubjectAltName) {
			kept = append(kept, oid)
		}
	}
	cp.UnhandledCriticalExtensions = kept
	if _, err := cp.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: testNow}); err != nil {
		t.Errorf("x5c is not valid: %v", err)
	}
	if c.Version != 3 || c.Subject.String() != "" || c.IsCA {
		t.Errorf("version %d, subject %q, CA %v: want 3, empty, false", c.Version, c.Subject, c.IsCA)
	}
	ekuFirst := false
	for _, ext := range c.Extensions {
		if ext.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 37}) {
			var ekus []asn1.ObjectIdentifier
			if _, err := asn1.Unmarshal(ext.Value, &ekus); err == nil && len(ekus) > 0 && ekus[0].Equal(OIDAKCertificate) {
				ekuFirst = true
			}
		}
	}
	if !ekuFirst {
		t.Error("the EKU extension does not start with tcg-kp-AIKCertificate")
	}
	// step-ca reads the SAN's DirectoryNames with pkix.Name.FillFromRDNSequence and type-asserts string values.
	var got TPMIdentity
	for _, ext := range c.Extensions {
		if !ext.Id.Equal(oidSubjectAltName) {
			continue
		}
		if !ext.Critical {
			t.Error("the SAN is not critical")
		}
		var names []asn1.RawValue
		asn1.Unmarshal(ext.Value, &names)
		for _, gn := range names {
			if gn.Tag != 4 {
				continue
			}
			var rdns pkix.RDNSequence
			asn1.Unmarshal(gn.Bytes, &rdns)
			var n pkix.Name
			n.FillFromRDNSequence(&rdns)
			for _, atv := range n.Names {
				s, _ := atv.Value.(string)
				switch {
				case atv.Type.Equal(oidTPMManufacturer):
					got.Manufacturer = s
				case atv.Type.Equal(oidTPMModel):
					got.Model = s
				case atv.Type.Equal(oidTPMVersion):
					got.Version = s
				}
			}
		}
	}
	if got.Manufacturer == "" || got.Model == "" || got.Version == "" {
		t.Errorf("TPM details %+v: step-ca needs all three", got)
	}
	found := false
	for _, u := range c.URIs {
		found = found || strings.EqualFold(u.String(), ekURI)
	}
	if !found {
		t.Errorf("URIs %v lack %s", c.URIs, ekURI)
	}
	if c.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("KeyUsage = %v, want digitalSignature", c.KeyUsage)
	}
}

func TestAKCertificateTemplate(t *testing.T) {
	p := newTestPKI(t, time.Time{})
	ak, ek := newKey(t), newKey(t)
	ekURI, _ := EKURI(ek.Public())
	id := IdentityFromTPM(0x49424D00, "SW   TPM", 0x2019102300163636)
	if id != (TPMIdentity{"id:49424D00", "SW   TPM", "id:20191023"}) {
		t.Errorf("IdentityFromTPM = %+v", id)
	}
	tmpl := AKCertificateTemplate(ak.Public(), id, testStart, testEnd, big.NewInt(42), ekURI)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.inter, ak.Public(), p.interKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.inter)
	stepCAAccepts(t, c, pool, ekURI.String())
	if got := IdentityOf(c); got != id {
		t.Errorf("IdentityOf(AK certificate) = %+v, want %+v", got, id)
	}
}
