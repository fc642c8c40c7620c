package export

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"provision/internal/testutil"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

var fixed = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC)

// key is a deterministic Ed25519 key (Ed25519 signatures are deterministic, so the certificates are too).
func key(n byte) ed25519.PrivateKey {
	return ed25519.NewKeyFromSeed(bytes.Repeat([]byte{n}, ed25519.SeedSize))
}

// fixture is a CA certificate (PEM) and three units: a TPM unit with an RSA EK (Azure: TPM attestation), a soft unit
// (X.509), and a TPM unit with an ECC EK whose certificate the station has no copy of (Mender only).
func fixture(tb testing.TB) (caPEM []byte, units []Unit) {
	tb.Helper()
	caKey := key(1)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test issuing CA"},
		NotBefore: fixed, NotAfter: fixed.AddDate(5, 0, 0), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(nil, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		tb.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	cert := func(serial string, n byte) (Certificate, []byte) {
		k := key(n)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(int64(n) << 40), Subject: pkix.Name{CommonName: "device-" + serial},
			NotBefore: fixed, NotAfter: fixed.AddDate(2, 0, 0), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
		der, err := x509.CreateCertificate(nil, tmpl, ca, k.Public(), caKey)
		if err != nil {
			tb.Fatal(err)
		}
		sum := sha256.Sum256(der)
		pub, _ := x509.MarshalPKIXPublicKey(k.Public())
		return Certificate{Serial: tmpl.SerialNumber.Text(16), SHA256: hex.EncodeToString(sum[:]), NotAfter: tmpl.NotAfter, DER: der}, pub
	}
	c1, _ := cert("SN-0001", 11)
	c2, _ := cert("SN-0002", 12)
	c3, pub3 := cert("SN-0003", 13)
	c3.DER = nil
	units = []Unit{
		{Serial: "SN-0001", State: "shippable", Station: "line-1", Operator: "alice", Updated: fixed.Add(time.Minute),
			KeyKind: "tpm", Certificate: c1, EKSHA256: strings.Repeat("a1", 32), EKPublic: tpm2.Marshal(tpm2.RSAEKTemplate)},
		{Serial: "SN-0002", State: "certified", Station: "line-1", Operator: "bob", Updated: fixed.Add(2 * time.Minute),
			KeyKind: "soft", Certificate: c2},
		{Serial: "SN-0003", State: "shippable", Station: "line-2", Operator: "alice", Updated: fixed.Add(3 * time.Minute),
			KeyKind: "tpm", PublicKey: pub3, Certificate: c3, EKSHA256: strings.Repeat("c3", 32), EKPublic: tpm2.Marshal(tpm2.ECCEKTemplate)},
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), units
}

// golden compares got with testdata/name, or rewrites it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	testutil.Golden(t, filepath.Join("testdata", name), got)
}

func skippedText(s []Skipped) string {
	var b strings.Builder
	for _, x := range s {
		b.WriteString(x.String() + "\n")
	}
	return b.String()
}

func TestExportFormatsGolden(t *testing.T) {
	caPEM, units := fixture(t)
	for _, tc := range []struct {
		format      string
		wantLines   int
		wantSkipped []string
	}{
		{"mender", 3, nil},
		{"aws", 2, []string{"SN-0003"}},
		{"azure", 2, []string{"SN-0003"}},
	} {
		t.Run(tc.format, func(t *testing.T) {
			var buf bytes.Buffer
			skipped, err := Write(&buf, tc.format, units, caPEM)
			if err != nil {
				t.Fatal(err)
			}
			var serials []string
			for _, s := range skipped {
				serials = append(serials, s.Serial)
			}
			if strings.Join(serials, ",") != strings.Join(tc.wantSkipped, ",") {
				t.Errorf("skipped %v, want %v", skipped, tc.wantSkipped)
			}
			if n := strings.Count(buf.String(), "\n"); n != tc.wantLines {
				t.Errorf("%d lines, want %d", n, tc.wantLines)
			}
			golden(t, tc.format+".golden.jsonl", buf.Bytes())
			golden(t, tc.format+".skipped.golden", []byte(skippedText(skipped)))
		})
	}
	if _, err := Write(&bytes.Buffer{}, "csv", units, caPEM); err == nil {
		t.Error("unknown format accepted")
	}
}

// The Mender public key is the certificate's key, or the attested key when the station has no certificate copy;
// the Azure TPM endorsement key is TPM2B_PUBLIC (size, then TPMT_PUBLIC).
func TestExportFieldsMeanWhatTheySay(t *testing.T) {
	caPEM, units := fixture(t)
	_ = caPEM
	var buf bytes.Buffer
	if _, err := Mender(&buf, units[2:]); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), `"identity_data":{"serial":"SN-0003"}`) {
		t.Errorf("mender identity: %s", buf.String())
	}
	blk, _ := pem.Decode([]byte(strings.ReplaceAll(strings.Split(buf.String(), `"pubkey":"`)[1], `\n`, "\n")))
	if blk == nil || !bytes.Equal(blk.Bytes, units[2].PublicKey) {
		t.Errorf("mender pubkey is not the unit's key")
	}
	buf.Reset()
	if _, err := Azure(&buf, units[:1]); err != nil {
		t.Fatal(err)
	}
	ek := units[0].EKPublic
	want := b64(append([]byte{byte(len(ek) >> 8), byte(len(ek))}, ek...))
	if !strings.Contains(buf.String(), `"endorsementKey":"`+want+`"`) {
		t.Errorf("azure endorsementKey is not TPM2B_PUBLIC of the EK: %s", buf.String())
	}
	// go-tpm reads it back as a TPM2B_PUBLIC holding the RSA EK.
	raw, _ := base64.StdEncoding.DecodeString(want)
	t2b, err := tpm2.Unmarshal[tpm2.TPM2BPublic](raw)
	if err != nil {
		t.Fatal(err)
	}
	if pub, err := t2b.Contents(); err != nil || pub.Type != tpm2.TPMAlgRSA {
		t.Errorf("endorsementKey does not hold the RSA EK: %v", err)
	}
	// A copy that is not the inventory's certificate is never exported.
	bad := units[1]
	bad.Certificate.DER = units[0].Certificate.DER
	if skipped, _ := AWS(&bytes.Buffer{}, []Unit{bad}, caPEM); len(skipped) != 1 {
		t.Errorf("a mismatched certificate copy was exported")
	}
}

func TestExportManifestSignedAndVerifiedByOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	_, units := fixture(t)
	doc, err := Manifest("line-1", fixed.Add(time.Hour), units)
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "manifest.golden.json", doc)
	audit := key(99)
	sig, err := Sign(audit, doc)
	if err != nil {
		t.Fatal(err)
	}
	if len(sig) != ed25519.SignatureSize || !Verify(audit.Public().(ed25519.PublicKey), doc, sig) {
		t.Fatal("signature does not verify in Go")
	}
	if _, err := Sign(nil, doc); err == nil {
		t.Error("signed without a key")
	}
	dir := t.TempDir()
	pubDER, _ := x509.MarshalPKIXPublicKey(audit.Public())
	for name, b := range map[string][]byte{"audit.pub": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}),
		"manifest.json": doc, "manifest.json.sig": sig, "tampered.json": bytes.Replace(doc, []byte("SN-0002"), []byte("SN-0009"), 1)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	verify := func(file string) ([]byte, error) {
		return exec.Command("openssl", "pkeyutl", "-verify", "-pubin", "-inkey", filepath.Join(dir, "audit.pub"), "-rawin",
			"-in", filepath.Join(dir, file), "-sigfile", filepath.Join(dir, "manifest.json.sig")).CombinedOutput()
	}
	if out, err := verify("manifest.json"); err != nil {
		t.Fatalf("openssl pkeyutl -verify: %v\n%s", err, out)
	}
	if out, err := verify("tampered.json"); err == nil {
		t.Fatalf("openssl verified a tampered manifest:\n%s", out)
	}
}

// Every format's output validates against its schema in testdata/schema (written from the published API references:
// each schema's $comment says which), with Python's jsonschema (Debian python3-jsonschema).
func TestExportSchemas(t *testing.T) {
	testutil.RequireTool(t, "python3")
	if err := exec.Command("python3", "-c", "import jsonschema").Run(); err != nil {
		testutil.RequireFacility(t, false, "python3 jsonschema module missing (Debian python3-jsonschema)")
	}
	caPEM, units := fixture(t)
	dir := t.TempDir()
	for _, format := range []string{"mender", "aws", "azure"} {
		var buf bytes.Buffer
		if _, err := Write(&buf, format, units, caPEM); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, format+".jsonl"), buf.Bytes(), 0o644)
	}
	doc, err := Manifest("line-1", fixed, units)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "manifest.json"), doc, 0o644)
	// Broken documents must fail: the schemas are not vacuous.
	os.WriteFile(filepath.Join(dir, "bad-mender.jsonl"), []byte(`{"identity_data":{},"pubkey":"x"}`+"\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "bad-azure.jsonl"), []byte(`{"registrationId":"-x","attestation":{"type":"tpm"}}`+"\n"), 0o644)
	const script = `
import json, sys, jsonschema
schema_dir, data_dir = sys.argv[1], sys.argv[2]
def check(schema, path, lines):
    s = json.load(open(schema_dir + "/" + schema + ".schema.json"))
    jsonschema.Draft202012Validator.check_schema(s)
    v = jsonschema.Draft202012Validator(s)
    docs = [json.loads(l) for l in open(path)] if lines else [json.load(open(path))]
    return [e.message for d in docs for e in v.iter_errors(d)]
bad = 0
for f in ("mender", "aws", "azure"):
    errs = check(f, data_dir + "/" + f + ".jsonl", True)
    if errs: print(f, errs); bad = 1
errs = check("manifest", data_dir + "/manifest.json", False)
if errs: print("manifest", errs); bad = 1
for f in ("mender", "azure"):
    if not check(f, data_dir + "/bad-" + f + ".jsonl", True): print("bad", f, "passed"); bad = 1
sys.exit(bad)
`
	schemas, _ := filepath.Abs(filepath.Join("testdata", "schema"))
	if out, err := exec.Command("python3", "-c", script, schemas, dir).CombinedOutput(); err != nil {
		t.Fatalf("schema validation: %v\n%s", err, out)
	}
}
