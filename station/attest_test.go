package station

import (
	"context"
	"crypto/x509"
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"provision/internal/testutil"
	"provision/inventory"
	"provision/simulator"
	"provision/tpm/attest"
)

// attestStation is a station with the given attestation policy and, when roots is set, those TPM roots trusted.
func attestStation(t *testing.T, policy string, roots ...string) *Station {
	t.Helper()
	s := newStation(t)
	s.Config.Attestation = policy
	s.ExtraTPMRoots = roots
	return s
}

// simRoots is a folder holding the simulator manufacturer's root, as the demo station's tpm_roots does.
func simRoots(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "provision-simulator.pem"), simulator.EKRootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func provisionOne(t *testing.T, s *Station, uri, serial string) (Result, error) {
	t.Helper()
	d := openDevice(t, uri)
	defer d.Close()
	return s.Provision(context.Background(), d, ProvisionRequest{Serial: serial, Image: goldenImage(t), Operator: "t"}, nil)
}

func stepStatus(res Result, step Step) string {
	for _, s := range res.Steps {
		if s.Name == step {
			return s.Status
		}
	}
	return ""
}

func latestAttestation(t *testing.T, s *Station, serial string) inventory.Attestation {
	t.Helper()
	a, err := s.Inv.Attestation(context.Background(), serial)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// The simulator is manufactured with an EK certificate: trusted once its root is, untrusted (but shippable under
// record) without it; the device certificate names the EK; the evidence re-verifies offline.
func TestAttestSimulator(t *testing.T) {
	s := attestStation(t, AttestRecord, simRoots(t))
	res, err := provisionOne(t, s, "sim", "SN-0001")
	if err != nil {
		t.Fatal(err)
	}
	if st := stepStatus(res, StepAttest); st != StatusOK {
		t.Fatalf("attest status %q", st)
	}
	a := latestAttestation(t, s, "SN-0001")
	if res.Attestation == nil || res.Attestation.Status != inventory.AttestTrusted || res.Attestation.EKSHA256 != a.EKSHA256 {
		t.Fatalf("result's attestation %+v", res.Attestation)
	}
	if a.Status != inventory.AttestTrusted || a.Outcome != "ok" || a.EKSHA256 == "" || a.EKCertSHA256 == "" {
		t.Fatalf("attestation %+v", a)
	}
	u, _ := s.Inv.Unit(context.Background(), "SN-0001")
	if u.EKSHA256 != a.EKSHA256 {
		t.Fatalf("unit bound to %q, attestation says %q", u.EKSHA256, a.EKSHA256)
	}
	var ekURI string
	for _, uri := range res.Certificate.URIs {
		if strings.HasPrefix(uri.String(), "urn:ek:sha256:") {
			ekURI = uri.String()
		}
	}
	var ev attest.Evidence
	if err := json.Unmarshal(a.Evidence, &ev); err != nil {
		t.Fatal(err)
	}
	ekPub, err := attest.PublicKey(ev.EKPublic)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := attest.EKURI(ekPub)
	if ekURI == "" || ekURI != want.String() {
		t.Fatalf("device certificate EK URI %q, want %q", ekURI, want)
	}
	if rep, err := s.VerifyAttestation(context.Background(), "SN-0001"); err != nil {
		t.Fatalf("attest verify: %v (%v)", err, rep.Problems)
	}

	// Without the simulator's root: untrusted, still shippable under record.
	s2 := attestStation(t, AttestRecord)
	if _, err := provisionOne(t, s2, "sim", "SN-0002"); err != nil {
		t.Fatal(err)
	}
	if a := latestAttestation(t, s2, "SN-0002"); a.Status != inventory.AttestUntrusted || !strings.Contains(a.Cause, "not a trusted TPM vendor") {
		t.Fatalf("without the root: %+v", a)
	}
	// ... and refused under required, with nothing issued.
	s3 := attestStation(t, AttestRequired)
	res, err = provisionOne(t, s3, "sim", "SN-0003")
	var se *StepError
	if !errors.As(err, &se) || se.Step != StepAttest || !strings.Contains(err.Error(), "attestation required: untrusted") {
		t.Fatalf("required without the root: %v", err)
	}
	if res.Certificate != nil || activeCount(t, s3, "SN-0003") != 0 {
		t.Fatal("a certificate was issued for a unit that failed attest")
	}
	if a := latestAttestation(t, s3, "SN-0003"); a.Outcome != "failed" {
		t.Fatalf("failed attest recorded as %+v", a)
	}
}

func TestAttestSoftAndOff(t *testing.T) {
	s := attestStation(t, AttestRequired)
	res, err := provisionOne(t, s, "soft", "SN-0001")
	if err != nil {
		t.Fatal(err)
	}
	if st := stepStatus(res, StepAttest); st != StatusSoft {
		t.Fatalf("soft unit: attest status %q", st)
	}
	if a := latestAttestation(t, s, "SN-0001"); a.Status != inventory.AttestSoft {
		t.Fatalf("soft: %+v", a)
	}
	off := attestStation(t, AttestOff)
	res, err = provisionOne(t, off, "sim", "SN-0002")
	if err != nil {
		t.Fatal(err)
	}
	if st := stepStatus(res, StepAttest); st != StatusSkipped {
		t.Fatalf("off: attest status %q", st)
	}
	u, _ := off.Inv.Unit(context.Background(), "SN-0002")
	if a := latestAttestation(t, off, "SN-0002"); a.Status != inventory.AttestOff || u.EKSHA256 != "" {
		t.Fatalf("off: %+v, unit bound to %q", a, u.EKSHA256)
	}
	for _, c := range res.Certificate.URIs {
		if strings.HasPrefix(c.String(), "urn:ek:") {
			t.Fatalf("off: certificate names an EK: %s", c)
		}
	}
}

// swtpm with EK certificates from its own swtpm-localca (RSA low range and P-384 high range): trusted when that root
// is configured, untrusted without it, refused under required; one TPM is one unit.
func TestAttestSwtpm(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())

	s := attestStation(t, AttestRequired, sw.EKRootsDir())
	res, err := provisionOne(t, s, sw.URI, "SN-0001")
	if err != nil {
		t.Fatal(err)
	}
	a := latestAttestation(t, s, "SN-0001")
	if a.Status != inventory.AttestTrusted {
		t.Fatalf("swtpm with its root: %+v", a)
	}
	if len(a.Warnings) > 0 {
		t.Errorf("swtpm: unexpected warnings %q (id:00001014 is IBM)", a.Warnings)
	}
	if rep, err := s.VerifyAttestation(context.Background(), "SN-0001"); err != nil {
		t.Fatalf("attest verify: %v (%v)", err, rep.Problems)
	}
	_ = res

	// The same TPM for another serial: refused (exit 3), nothing issued; the first unit again: fine.
	_, err = provisionOne(t, s, sw.URI, "SN-0002")
	if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "this TPM is already unit SN-0001") {
		t.Fatalf("second serial on one TPM: %v", err)
	}
	if activeCount(t, s, "SN-0002") != 0 {
		t.Fatal("a certificate was issued to the second serial")
	}
	d := openDevice(t, sw.URI)
	if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SN-0001", Image: goldenImage(t), Reprovision: true}, nil); err != nil {
		t.Fatalf("re-provisioning the bound unit: %v", err)
	}
	d.Close()

	// Without the localca root: untrusted under record (a fresh station: no binding yet).
	rec := attestStation(t, AttestRecord)
	if _, err := provisionOne(t, rec, sw.URI, "SN-0003"); err != nil {
		t.Fatal(err)
	}
	if a := latestAttestation(t, rec, "SN-0003"); a.Status != inventory.AttestUntrusted {
		t.Fatalf("without the root: %+v", a)
	}
}

// A TPM without EK certificates: absent under record; required refuses it with the cause in words.
func TestAttestNoEKCertificate(t *testing.T) {
	testutil.RequireTool(t, "swtpm")
	sw := testutil.StartSwtpm(t)
	s := attestStation(t, AttestRecord)
	if _, err := provisionOne(t, s, sw.URI, "SN-0001"); err != nil {
		t.Fatal(err)
	}
	a := latestAttestation(t, s, "SN-0001")
	if a.Status != inventory.AttestAbsent || a.EKSHA256 == "" {
		t.Fatalf("no EK certificate: %+v", a)
	}
	if rep, err := s.VerifyAttestation(context.Background(), "SN-0001"); err != nil {
		t.Fatalf("attest verify of absent: %v (%v)", err, rep.Problems)
	}
	req := attestStation(t, AttestRequired)
	_, err := provisionOne(t, req, sw.URI, "SN-0002")
	if err == nil || !strings.Contains(err.Error(), "no EK certificate") {
		t.Fatalf("required, no EK certificate: %v", err)
	}
}

// An EK certificate that belongs to another TPM fails the unit even under record: the TPM contradicts itself.
func TestAttestForeignEKCertificate(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	donor := testutil.StartSwtpm(t, testutil.WithEKCert())
	d := openDevice(t, donor.URI)
	certs, _, err := d.EKCertificates(context.Background())
	if err != nil || len(certs) == 0 {
		t.Fatalf("donor EK certificates: %v", err)
	}
	d.Close()
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())
	for _, c := range certs {
		if err := sw.WriteNV(context.Background(), c.Index, c.Data); err != nil {
			t.Fatal(err)
		}
	}
	s := attestStation(t, AttestRecord, donor.EKRootsDir())
	_, err = provisionOne(t, s, sw.URI, "SN-0001")
	if !errors.Is(err, attest.ErrKeyMismatch) {
		t.Fatalf("foreign EK certificate: %v", err)
	}
	if activeCount(t, s, "SN-0001") != 0 {
		t.Fatal("a certificate was issued")
	}
}

// Tampered evidence is caught by attest verify: a changed byte in the certify blob, a swapped EK certificate, and
// evidence replaced wholesale (its fingerprint no longer the one the audit log names).
func TestAttestVerifyTampered(t *testing.T) {
	s := attestStation(t, AttestRecord, simRoots(t))
	for _, serial := range []string{"SN-0001", "SN-0002"} {
		if _, err := provisionOne(t, s, "sim", serial); err != nil {
			t.Fatal(err)
		}
	}
	orig := latestAttestation(t, s, "SN-0001")
	other := latestAttestation(t, s, "SN-0002")
	db, err := sql.Open("sqlite", s.Inv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	set := func(evidence []byte, consistent bool) {
		t.Helper()
		sum := orig.EvidenceSHA256
		if consistent {
			sum = inventory.EvidenceSHA256(evidence)
		}
		if _, err := db.Exec("UPDATE attestations SET evidence = ?, evidence_sha256 = ? WHERE id = ?", string(evidence), sum, orig.ID); err != nil {
			t.Fatal(err)
		}
	}
	var ev attest.Evidence
	json.Unmarshal(orig.Evidence, &ev)
	var otherEv attest.Evidence
	json.Unmarshal(other.Evidence, &otherEv)

	cases := map[string]func() attest.Evidence{
		"certify byte": func() attest.Evidence {
			e := ev
			e.CertifyAttest = append([]byte(nil), ev.CertifyAttest...)
			e.CertifyAttest[len(e.CertifyAttest)-3] ^= 1
			return e
		},
		"EK certificate swapped": func() attest.Evidence {
			e := ev
			e.EKCertificate = otherEv.EKCertificate
			return e
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			e := mk()
			b, _ := json.Marshal(e)
			for _, consistent := range []bool{false, true} {
				set(b, consistent)
				if _, err := s.VerifyAttestation(context.Background(), "SN-0001"); !errors.Is(err, ErrAttestation) {
					t.Fatalf("consistent fingerprint %v: got %v, want ErrAttestation", consistent, err)
				}
			}
		})
	}
	set([]byte("{not json"), true)
	if _, err := s.VerifyAttestation(context.Background(), "SN-0001"); !errors.Is(err, ErrAttestation) {
		t.Fatalf("unparseable evidence: %v", err)
	}
	set(orig.Evidence, true)
	if rep, err := s.VerifyAttestation(context.Background(), "SN-0001"); err != nil {
		t.Fatalf("restored evidence: %v %v", err, rep.Problems)
	}
	_ = x509.Certificate{}
}

// A profile that writes the unit's attestation key: the station certifies the AK (step-ca's device-attest-01 form:
// empty subject, tcg-kp-AIKCertificate only, the EK URI) and writes certificate and key file; verify checks them. With
// attestation off such a profile is refused before any key exists.
func TestAttestAKCertificateInImage(t *testing.T) {
	s := newStation(t)
	data := strings.Replace(string(s.Config.Marshal()), "\nprofile: ", "\nprofiles:\n  acme:\n    base: mender\n"+
		"    files:\n      - {to: \"data:/mender/ak.crt\", from: ak_cert, when: tpm}\n"+
		"      - {to: \"data:/mender/ak.tss2.pem\", from: ak_key, when: tpm}\nprofile: ", 1)
	c, err := ParseConfig("station.yaml", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	s.Config, s.ExtraTPMRoots = c, []string{simRoots(t)}
	ctx := context.Background()
	img := goldenImage(t)
	d := openDevice(t, "sim")
	if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-AK-1", Image: img, Profile: "acme"}, nil); err != nil {
		t.Fatal(err)
	}
	d.Close()
	checks, err := s.VerifyImage(ctx, img, "SN-AK-1", VerifyOptions{Profile: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for _, c := range checks {
		if strings.Contains(c.Name, "attestation key") {
			seen++
			if !c.OK {
				t.Errorf("%s: %s", c.Name, c.Detail)
			}
		}
	}
	if seen < 4 {
		t.Fatalf("verify made %d attestation key checks: %+v", seen, checks)
	}
	// A soft unit skips the when: tpm files; attestation off refuses the profile for TPM units.
	if _, err := s.Provision(ctx, openDevice(t, "soft"), ProvisionRequest{Serial: "SN-AK-2", Image: goldenImage(t), Profile: "acme"}, nil); err != nil {
		t.Fatalf("soft unit with the acme profile: %v", err)
	}
	s.Config.Attestation = AttestOff
	_, err = s.Provision(ctx, openDevice(t, "sim"), ProvisionRequest{Serial: "SN-AK-3", Image: goldenImage(t), Profile: "acme"}, nil)
	if !errors.Is(err, ErrProfile) || !strings.Contains(err.Error(), "attestation: record or required") {
		t.Fatalf("attestation off with an AK profile: %v", err)
	}
}
