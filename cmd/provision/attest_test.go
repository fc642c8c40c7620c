package main

import (
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"provision/internal/testutil"
)

type attestShown struct {
	Attestation struct {
		Status   string `json:"status"`
		Outcome  string `json:"outcome"`
		EKSHA256 string `json:"ek_sha256"`
		EKIssuer string `json:"ek_issuer"`
		TPMMaker string `json:"tpm_manufacturer"`
	} `json:"attestation"`
}

// A unit on swtpm with EK certificates from its own swtpm-localca, whose root the station trusts (tpm_roots): attest
// passes as trusted, the evidence re-verifies offline and with other tools (tpm2_print, openssl), the TPM is bound to
// the unit, and tampered evidence fails attest verify.
func TestAttestCLI(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca", "tpm2_print", "openssl")
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())
	dir, st, img := sampleStation(t, "attest", "unit.img")
	roots := filepath.Join(st, "tpm_roots")
	if err := os.CopyFS(roots, os.DirFS(sw.EKRootsDir())); err != nil {
		t.Fatal(err)
	}
	out := mustCLI(t, st, "unit", "--serial", "AT-0001", "--image", img, "--tpm", sw.URI)
	if !strings.Contains(out, "✓ attest") || !strings.Contains(out, "trusted: EK") {
		t.Fatalf("unit output:\n%s", out)
	}
	var s attestShown
	if err := json.Unmarshal([]byte(mustCLI(t, st, "inventory", "show", "AT-0001", "--json")), &s); err != nil {
		t.Fatal(err)
	}
	if a := s.Attestation; a.Status != "trusted" || a.Outcome != "ok" || len(a.EKSHA256) != 64 || a.EKIssuer == "" || !strings.Contains(a.TPMMaker, "IBM") {
		t.Fatalf("inventory show attestation: %+v", a)
	}
	if out := mustCLI(t, st, "inventory", "export", "--format", "csv"); !strings.Contains(out, ",trusted,"+s.Attestation.EKSHA256) {
		t.Fatalf("export csv:\n%s", out)
	}
	if out := mustCLI(t, st, "attest", "verify", "AT-0001"); !strings.Contains(out, "✓ AT-0001: attestation trusted verifies") {
		t.Fatalf("attest verify:\n%s", out)
	}
	var v struct {
		Verified bool     `json:"verified"`
		Problems []string `json:"problems"`
	}
	if err := json.Unmarshal([]byte(mustCLI(t, st, "attest", "verify", "AT-0001", "--json")), &v); err != nil || !v.Verified || len(v.Problems) != 0 {
		t.Fatalf("attest verify --json: %+v %v", v, err)
	}

	// The evidence checked by other tools: tpm2_print decodes the certify blob, OpenSSL checks its signature with the
	// AK's public key.
	ev := filepath.Join(dir, "evidence")
	mustCLI(t, st, "attest", "export", "AT-0001", "--out", ev)
	// tpm2-tools 5.4 prints the header (magic, type TPM_ST_ATTEST_CERTIFY = 8017, the nonce) and then exits 1 with
	// "Cannot print unsupported type 0x8017": the header is what it can check.
	printed, _ := exec.Command("tpm2_print", "-t", "TPMS_ATTEST", filepath.Join(ev, "certify.attest")).CombinedOutput()
	if !strings.Contains(string(printed), "magic: ff544347") || !strings.Contains(string(printed), "type: 8017") {
		t.Fatalf("tpm2_print:\n%s", printed)
	}
	ok, err := exec.Command("openssl", "dgst", "-sha256", "-verify", filepath.Join(ev, "ak.pem"), "-signature",
		filepath.Join(ev, "certify.sig.der"), filepath.Join(ev, "certify.attest")).CombinedOutput()
	if err != nil || !strings.Contains(string(ok), "Verified OK") {
		t.Fatalf("openssl dgst -verify: %v\n%s", err, ok)
	}

	// One TPM, one unit: the same swtpm for another serial is refused (exit 3) and issues nothing.
	img2 := filepath.Join(dir, "unit2.img")
	mustCLI(t, st, "sample-image", img2)
	_, errs, code := cli(t, st, "unit", "--serial", "AT-0002", "--image", img2, "--tpm", sw.URI)
	if code != 3 || !strings.Contains(errs, "this TPM is already unit AT-0001") {
		t.Fatalf("second serial on one TPM: exit %d\n%s", code, errs)
	}

	// Tampered evidence: a changed byte in the certify blob.
	db, err := sql.Open("sqlite", filepath.Join(st, "inventory.db"))
	if err != nil {
		t.Fatal(err)
	}
	var id int64
	var raw string
	if err := db.QueryRow("SELECT id, evidence FROM attestations WHERE serial = 'AT-0001' ORDER BY id DESC LIMIT 1").Scan(&id, &raw); err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	json.Unmarshal([]byte(raw), &doc)
	b, err := base64.StdEncoding.DecodeString(doc["certify_attest"].(string))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-3] ^= 0x01
	doc["certify_attest"] = base64.StdEncoding.EncodeToString(b)
	tampered, _ := json.Marshal(doc)
	if _, err := db.Exec("UPDATE attestations SET evidence = ? WHERE id = ?", string(tampered), id); err != nil {
		t.Fatal(err)
	}
	db.Close()
	out, _, code = cli(t, st, "attest", "verify", "AT-0001")
	if code != 1 || !strings.Contains(out, "✗") {
		t.Fatalf("tampered evidence: exit %d\n%s", code, out)
	}
	if _, _, code := cli(t, st, "attest", "verify", "NOPE-0001"); code != 3 {
		t.Fatalf("unknown unit: exit %d", code)
	}
}
