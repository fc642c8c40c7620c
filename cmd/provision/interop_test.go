package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"provision/internal/testutil"
)

// runCLI runs the CLI in-process and returns stdout, failing the test on a non-zero exit.
func runCLI(t *testing.T, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	if err := run(context.Background(), args, strings.NewReader(""), &out, &errb); err != nil {
		t.Fatalf("provision %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

// The TSS2 key file and certificate that enroll writes complete a TLS 1.3 mTLS handshake through OpenSSL's tpm2
// provider (swtpm behind tpm2-abrmd, as /dev/tpmrm0 is on a device) against `openssl s_server -Verify 1
// -verify_return_error` trusting the station CA.
func TestOpenSSLTPM2Interop(t *testing.T) {
	testutil.RequireTool(t, "openssl", "swtpm", "tpm2-abrmd", "dbus-daemon", "dbus-send")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	sw := testutil.StartSwtpm(t)
	runCLI(t, "--station", st, "init", "--id", "interop")
	runCLI(t, "--station", st, "enroll", "--serial", "IOP-0001", "--tpm", sw.URI, "--out", filepath.Join(dir, "out"))
	bundle := filepath.Join(dir, "out", "IOP-0001")
	if out, err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(st, "ca", "root.crt"), "-untrusted",
		filepath.Join(st, "ca", "issuing.crt"), filepath.Join(bundle, "device.crt")).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify of the swtpm unit's certificate: %v\n%s", err, out)
	}
	env := append(os.Environ(), sw.StartABRMD(t)...)
	conf := filepath.Join(dir, "openssl-tpm2.cnf")
	if err := os.WriteFile(conf, []byte(testutil.OpenSSLConf), 0o644); err != nil {
		t.Fatal(err)
	}
	tpmEnv := append(env, "OPENSSL_CONF="+conf)

	// The provider reads the key file's public part: the same key as the certificate's.
	pkeyOut, err := command(tpmEnv, "openssl", "pkey", "-in", filepath.Join(bundle, "device.tss2.pem"), "-pubout").Output()
	if err != nil {
		t.Fatalf("openssl pkey with the tpm2 provider: %v", err)
	}
	certPub, err := command(env, "openssl", "x509", "-in", filepath.Join(bundle, "device.crt"), "-noout", "-pubkey").Output()
	if err != nil || !bytes.Equal(pkeyOut, certPub) {
		t.Fatalf("key file public key\n%s\ndiffers from the certificate's\n%s", pkeyOut, certPub)
	}

	srvCA, srvCert, srvKey := testutil.ServerIdentity(t, dir)
	trust := filepath.Join(dir, "station-trust.pem")
	root, _ := os.ReadFile(filepath.Join(st, "ca", "root.crt"))
	iss, _ := os.ReadFile(filepath.Join(st, "ca", "issuing.crt"))
	os.WriteFile(trust, append(root, iss...), 0o644)
	port := testutil.FreePort(t)
	srv := command(env, "openssl", "s_server", "-accept", fmt.Sprint(port), "-cert", srvCert, "-key", srvKey, "-CAfile", trust,
		"-Verify", "1", "-verify_return_error", "-tls1_3", "-www")
	var srvOut testutil.LockedBuffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	testutil.WaitPort(t, port)

	cli := command(tpmEnv, "openssl", "s_client", "-connect", fmt.Sprintf("127.0.0.1:%d", port), "-tls1_3",
		"-key", filepath.Join(bundle, "device.tss2.pem"), "-cert", filepath.Join(bundle, "device.crt"),
		"-CAfile", srvCA, "-verify_return_error", "-ign_eof")
	cli.Stdin = strings.NewReader("GET / HTTP/1.0\r\n\r\n")
	out, err := cli.CombinedOutput()
	if err != nil {
		t.Fatalf("openssl s_client with the TPM key: %v\n%s\nserver:\n%s", err, out, srvOut.String())
	}
	s := string(out)
	for _, want := range []string{"Protocol  : TLSv1.3", "Verify return code: 0 (ok)", "HTTP/1.0 200 ok"} {
		if !strings.Contains(s, want) {
			t.Errorf("s_client output lacks %q:\n%s\nserver:\n%s", want, s, srvOut.String())
		}
	}
	// The server verified the unit's certificate through the station chain (-verify_return_error: no unverified peer).
	if !strings.Contains(srvOut.String(), "CN = device-IOP-0001\nverify return:1") {
		t.Errorf("server did not verify the unit's certificate:\n%s", srvOut.String())
	}
}

func command(env []string, name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.Env = env
	return c
}
