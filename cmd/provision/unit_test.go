package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/image"
	"provision/internal/testutil"
	"provision/tpm"
)

// cli runs the real provision binary (testscript put it on PATH) and returns stdout, stderr and the exit code.
func cli(t *testing.T, station string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command("provision", append([]string{"--station", station}, args...)...)
	cmd.Env = append(os.Environ(), "PROVISION_OPERATOR=tester")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// inProcess runs provision in this process (the same root command as the binary) against station: stdout, stderr (with
// the one error line the binary prints) and the exit code.
func inProcess(t *testing.T, station string, args ...string) (string, string, int) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), append([]string{"--station", station}, args...), strings.NewReader(""), &out, &errb)
	code := report(err, &errb)
	return out.String(), errb.String(), code
}

func mustCLI(t *testing.T, station string, args ...string) string {
	t.Helper()
	out, errs, code := cli(t, station, args...)
	if code != 0 {
		t.Fatalf("provision %s: exit %d\n%s%s", strings.Join(args, " "), code, out, errs)
	}
	return out
}

// imageTools are the programs `provision sample-image` needs.
var imageTools = []string{"sfdisk", "mke2fs", "mkfs.fat", "mcopy"}

// sampleStation requires the image tools (and extraTools), initialises a station with the given id in a temp dir and
// writes a sample image named name next to it. It returns the temp dir, the station directory and the image path.
func sampleStation(t *testing.T, id, name string, extraTools ...string) (dir, st, img string) {
	t.Helper()
	testutil.RequireTool(t, append(append([]string(nil), imageTools...), extraTools...)...)
	dir = t.TempDir()
	st = filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", id)
	img = filepath.Join(dir, name)
	mustCLI(t, st, "sample-image", img)
	return dir, st, img
}

type shown struct {
	State        string `json:"state"`
	FailedStep   string `json:"failed_step"`
	Certificates []struct {
		Status string `json:"status"`
	} `json:"certificates"`
}

func showUnit(t *testing.T, station, serial string) shown {
	t.Helper()
	var s shown
	if err := json.Unmarshal([]byte(mustCLI(t, station, "inventory", "show", serial, "--json")), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// checkConsistent: one active certificate, the audit chain verifies, the image's file systems are clean and hold the
// unit's identity.
func checkConsistent(t *testing.T, station, serial, img string) {
	t.Helper()
	s := showUnit(t, station, serial)
	active := 0
	for _, c := range s.Certificates {
		if c.Status == "active" {
			active++
		}
	}
	if s.State != "shippable" || active != 1 {
		t.Fatalf("%s: state %s with %d active certificates (%d in all)", serial, s.State, active, len(s.Certificates))
	}
	mustCLI(t, station, "audit", "verify")
	mustCLI(t, station, "verify", "--image", img, "--serial", serial)
	im, err := image.Open(context.Background(), img, image.ReadOnly())
	if err != nil {
		t.Fatal(err)
	}
	parts := im.Partitions()
	im.Close()
	for _, p := range parts {
		if p.FS == "ext4" {
			if out, err := exec.Command("e2fsck", "-fn", fmt.Sprintf("%s?offset=%d", img, p.Start)).CombinedOutput(); err != nil {
				t.Fatalf("partition %d not clean: %s", p.Number, out)
			}
		}
	}
}

// Kill the unit run at each step boundary and at random moments; the next run finishes the unit with exactly one
// active certificate, a clean image and a consistent inventory and audit chain.
func TestUnitCrashInjection(t *testing.T) {
	testutil.RequireTool(t, "e2fsck", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "crash")
	img := filepath.Join(dir, "unit.img")
	mustCLI(t, st, "sample-image", img, "--table", "gpt")
	type kill struct {
		afterStep string
		delay     time.Duration
	}
	var kills []kill
	for _, s := range []string{"validate", "key", "csr", "sign", "image", "verify"} {
		kills = append(kills, kill{afterStep: s})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 8; i++ {
		kills = append(kills, kill{delay: time.Duration(rng.IntN(20000)) * time.Microsecond})
	}
	for i, k := range kills {
		serial := fmt.Sprintf("CR-%03d", i)
		cmd := exec.Command("provision", "--station", st, "unit", "--serial", serial, "--image", img, "--tpm", "soft")
		stdout, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if k.afterStep != "" {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				if strings.HasPrefix(strings.TrimSpace(sc.Text()), "✓ "+k.afterStep+" ") {
					cmd.Process.Kill()
					break
				}
			}
		} else {
			time.Sleep(k.delay)
			cmd.Process.Kill()
		}
		go func() { bufio.NewScanner(stdout).Scan() }()
		cmd.Wait()
		out, errs, code := cli(t, st, "unit", "--serial", serial, "--image", img, "--tpm", "soft")
		if code != 0 && !(code == 3 && strings.Contains(errs, "already provisioned")) {
			t.Fatalf("rerun after kill %+v: exit %d\n%s%s", k, code, out, errs)
		}
		validate := ""
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "validate") {
				validate = strings.TrimSpace(l)
			}
		}
		t.Logf("kill %+v, rerun: %s", k, validate)
		checkConsistent(t, st, serial, img)
	}
}

// The full pipeline on swtpm, with a kill right after the key was made in the TPM (a transient object left behind).
func TestUnitSwtpm(t *testing.T) {
	testutil.RequireTool(t, "e2fsck", "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	sw := testutil.StartSwtpm(t)
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "swtpm")
	img := filepath.Join(dir, "unit.img")
	mustCLI(t, st, "sample-image", img)
	cmd := exec.Command("provision", "--station", st, "unit", "--serial", "SW-0001", "--image", img, "--tpm", sw.URI)
	stdout, _ := cmd.StdoutPipe()
	cmd.Start()
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "✓ key ") {
			cmd.Process.Kill()
			break
		}
	}
	cmd.Wait()
	out := mustCLI(t, st, "unit", "--serial", "SW-0001", "--image", img, "--tpm", sw.URI)
	if !strings.Contains(out, "SHIPPABLE") || !strings.Contains(out, "tpm ecc-p256 key") {
		t.Fatalf("output:\n%s", out)
	}
	checkConsistent(t, st, "SW-0001", img)
	// One TPM is one unit: a second serial on the same TPM is refused (exit 3) and issues nothing; the refused run
	// leaves no transient object behind either.
	_, errs, code := cli(t, st, "unit", "--serial", "SW-0002", "--image", img, "--tpm", sw.URI, "--reprovision")
	if code != 3 || !strings.Contains(errs, "this TPM is already unit SW-0001") {
		t.Fatalf("second serial on one TPM: exit %d: %s", code, errs)
	}
	d, err := tpm.Open(context.Background(), sw.URI)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if hs, _ := d.TransientHandles(context.Background()); len(hs) != 0 {
		t.Fatalf("transient objects left in the TPM: %#x", hs)
	}
}

func TestUnitEndpoints(t *testing.T) {
	dir, st, img := sampleStation(t, "ep", "unit.img", "openssl")
	srvCA, srvCert, srvKey := testutil.ServerIdentity(t, dir)
	chain := filepath.Join(dir, "station-chain.pem")
	root, _ := os.ReadFile(filepath.Join(st, "ca", "root.crt"))
	iss, _ := os.ReadFile(filepath.Join(st, "ca", "issuing.crt"))
	os.WriteFile(chain, append(root, iss...), 0o644)

	// A real broker trusting the station chain: shippable, and the broker saw the unit's CN.
	m := testutil.StartMosquitto(t, srvCert, srvKey, chain)
	ep := fmt.Sprintf("mqtts://127.0.0.1:%d", m.Port)
	out := mustCLI(t, st, "unit", "--serial", "MQ-0001", "--image", img, "--tpm", "sim", "--endpoint", ep, "--endpoint-ca", srvCA)
	if !strings.Contains(out, "CONNACK 0") || !strings.Contains(out, "SHIPPABLE") {
		t.Fatalf("output:\n%s", out)
	}
	time.Sleep(100 * time.Millisecond)
	if !strings.Contains(m.LogText(), "device-MQ-0001") {
		t.Fatalf("broker log lacks the unit's CN:\n%s", m.LogText())
	}

	// A broker trusting another CA: the unit fails at the handshake, exit 1, with the cause; the inventory says so.
	other := filepath.Join(dir, "other-ca.pem")
	os.WriteFile(other, []byte(mustReadFile(t, srvCA)), 0o644)
	m2 := testutil.StartMosquitto(t, srvCert, srvKey, other)
	_, errs, code := cli(t, st, "unit", "--serial", "MQ-0002", "--image", img, "--tpm", "sim",
		"--endpoint", fmt.Sprintf("mqtts://127.0.0.1:%d", m2.Port), "--endpoint-ca", srvCA)
	if code != 1 || !strings.Contains(errs, "handshake") || !strings.Contains(errs, "rejected our certificate") {
		t.Fatalf("exit %d: %s", code, errs)
	}
	if s := showUnit(t, st, "MQ-0002"); s.State != "failed" || s.FailedStep != "handshake" {
		t.Fatalf("inventory: %+v", s)
	}

	// An endpoint CA that does not trust the broker: refused, never connects blindly.
	_, errs, code = cli(t, st, "unit", "--serial", "MQ-0003", "--image", img, "--tpm", "sim", "--endpoint", ep, "--endpoint-ca", chain)
	if code != 1 || !strings.Contains(errs, "not trusted") {
		t.Fatalf("exit %d: %s", code, errs)
	}
	// An unreadable endpoint CA file is a usage error.
	if _, _, code := cli(t, st, "unit", "--serial", "MQ-0004", "--image", img, "--endpoint", ep, "--endpoint-ca", filepath.Join(dir, "nope.pem")); code != 2 {
		t.Fatalf("missing endpoint CA: exit %d", code)
	}

	// An HTTPS endpoint requiring client certificates.
	port := testutil.FreePort(t)
	srv := exec.Command("openssl", "s_server", "-accept", fmt.Sprint(port), "-cert", srvCert, "-key", srvKey, "-CAfile", chain,
		"-Verify", "1", "-verify_return_error", "-tls1_3", "-www")
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	testutil.WaitPort(t, port)
	out = mustCLI(t, st, "unit", "--serial", "HT-0001", "--image", img, "--tpm", "sim",
		"--endpoint", fmt.Sprintf("https://127.0.0.1:%d/", port), "--endpoint-ca", srvCA, "--json")
	if !strings.Contains(out, `"state":"shippable"`) || !strings.Contains(out, `"protocol":"https"`) {
		t.Fatalf("output:\n%s", out)
	}
}

func mustReadFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

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
