package attest

// An independent check of what the station stores: tpm2-tools decodes the certify blob, OpenSSL checks its
// signature with the AK's public key.

import (
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"provision/internal/testutil"
)

func TestCertifyInteropWithTPM2ToolsAndOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "tpm2_print", "openssl")
	s := openSim(t)
	u := attestUnit(t, s, tpm2.ECCEKTemplate)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return string(out)
	}

	attest := write("attest.bin", u.attest)
	// tpm2_print (tpm2-tools 5.4) prints the TPMS_ATTEST header (magic, type, signer, extraData, clock, firmware),
	// then fails on the certify body: "Cannot print unsupported type 0x8017". The header is what it can check.
	b, err := exec.Command("tpm2_print", "-t", "TPMS_ATTEST", attest).CombinedOutput()
	out := string(b)
	if err != nil && !strings.Contains(out, "unsupported type 0x8017") {
		t.Fatalf("tpm2_print: %v\n%s", err, out)
	}
	for _, want := range []string{"magic: ff544347", "type: 8017", hex.EncodeToString(u.nonce)} {
		if !strings.Contains(strings.ToLower(out), want) {
			t.Errorf("tpm2_print output lacks %q:\n%s", want, out)
		}
	}

	akPub, err := PublicKey(u.ak.public)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(akPub)
	akPEM := write("ak.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	sig, err := SignatureForOpenSSL(u.sig)
	if err != nil {
		t.Fatal(err)
	}
	sigFile := write("sig.der", sig)
	if out := run("openssl", "dgst", "-sha256", "-verify", akPEM, "-signature", sigFile, attest); !strings.Contains(out, "Verified OK") {
		t.Errorf("openssl: %s", out)
	}
	tampered := append([]byte{}, u.attest...)
	tampered[len(tampered)-1] ^= 1
	if out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", akPEM, "-signature", sigFile, write("t.bin", tampered)).CombinedOutput(); err == nil {
		t.Errorf("openssl verified a changed attestation: %s", out)
	}
}
