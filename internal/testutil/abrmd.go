package testutil

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// StartABRMD puts a resource manager (tpm2-abrmd on a private D-Bus session bus) in front of this swtpm, as
// /dev/tpmrm0 is on a device, and returns the environment OpenSSL's tpm2 provider needs to reach it. swtpm serves one
// client connection at a time: close every other connection to it first. Everything stops at test cleanup.
func (s *Swtpm) StartABRMD(tb testing.TB) []string {
	tb.Helper()
	RequireTool(tb, "dbus-daemon", "tpm2-abrmd")
	out, err := exec.Command("dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1").Output()
	if err != nil {
		tb.Fatalf("dbus-daemon: %v", err)
	}
	lines := strings.Fields(string(out))
	if len(lines) < 2 {
		tb.Fatalf("dbus-daemon printed %q", out)
	}
	addr := lines[0]
	if pid, err := strconv.Atoi(lines[1]); err == nil {
		tb.Cleanup(func() {
			if p, err := os.FindProcess(pid); err == nil {
				p.Kill()
			}
		})
	}
	// Each test gets its own bus name, so parallel test binaries do not meet.
	name := fmt.Sprintf("com.intel.tss2.Tabrmd.p%d", s.Port)
	abrmd := exec.Command("tpm2-abrmd", "--session", "--allow-root", "--dbus-name="+name,
		fmt.Sprintf("--tcti=swtpm:host=127.0.0.1,port=%d", s.Port))
	abrmd.Env = append(os.Environ(), "DBUS_SESSION_BUS_ADDRESS="+addr)
	if err := abrmd.Start(); err != nil {
		tb.Fatalf("tpm2-abrmd: %v", err)
	}
	tb.Cleanup(func() { abrmd.Process.Kill(); abrmd.Wait() })
	env := []string{"DBUS_SESSION_BUS_ADDRESS=" + addr, "TPM2OPENSSL_TCTI=tabrmd:bus_type=session,bus_name=" + name}
	// Wait until the resource manager owns its bus name.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c := exec.Command("dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
			"org.freedesktop.DBus.NameHasOwner", "string:"+name)
		c.Env = append(os.Environ(), "DBUS_SESSION_BUS_ADDRESS="+addr)
		if out, err := c.Output(); err == nil && strings.Contains(string(out), "true") {
			return env
		}
		time.Sleep(50 * time.Millisecond)
	}
	tb.Fatal("tpm2-abrmd did not come up")
	return nil
}

// OpenSSLConf is an OpenSSL configuration that activates the tpm2 provider next to the default one, with digests kept
// in the default provider (needed by Debian 12's tpm2-openssl 1.1).
const OpenSSLConf = `openssl_conf = openssl_init
[openssl_init]
providers = provider_sect
alg_section = algorithm_sect
[provider_sect]
default = default_sect
tpm2 = tpm2_sect
[default_sect]
activate = 1
[tpm2_sect]
activate = 1
[algorithm_sect]
default_properties = ?provider=tpm2,tpm2.digest!=yes
`

// OpenSSLSign signs msg (SHA-256) with `openssl dgst -sign` and the TSS2 key file keyPEM through OpenSSL's tpm2
// provider, its TPM reached through tcti (a TPM2OPENSSL_TCTI value such as `cmd:tpm2_send …`), and returns the
// signature (DER for ECDSA). It fails the test when OpenSSL does, within a minute.
func OpenSSLSign(tb testing.TB, tcti string, keyPEM, msg []byte) []byte {
	tb.Helper()
	dir := tb.TempDir()
	keyFile, msgFile, sigFile, conf := filepath.Join(dir, "key.pem"), filepath.Join(dir, "msg"), filepath.Join(dir, "sig"), filepath.Join(dir, "openssl.cnf")
	for name, b := range map[string][]byte{keyFile: keyPEM, msgFile: msg, conf: []byte(OpenSSLConf)} {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			tb.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := exec.CommandContext(ctx, "openssl", "dgst", "-sha256", "-sign", keyFile, "-out", sigFile, msgFile)
	c.Env = append(os.Environ(), "OPENSSL_CONF="+conf, "TPM2OPENSSL_TCTI="+tcti)
	if out, err := c.CombinedOutput(); err != nil {
		tb.Fatalf("openssl dgst -sign through %s: %v\n%s", tcti, err, out)
	}
	sig, err := os.ReadFile(sigFile)
	if err != nil {
		tb.Fatal(err)
	}
	return sig
}
