package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"provision/simulator"
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
	simulator.RequireTool(t, "openssl", "swtpm", "tpm2-abrmd", "dbus-daemon", "dbus-send")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	sw := simulator.StartSwtpm(t)
	runCLI(t, "--station", st, "init", "--id", "interop")
	runCLI(t, "--station", st, "enroll", "--serial", "IOP-0001", "--tpm", sw.URI, "--out", filepath.Join(dir, "out"))
	bundle := filepath.Join(dir, "out", "IOP-0001")
	if out, err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(st, "ca", "root.crt"), "-untrusted",
		filepath.Join(st, "ca", "issuing.crt"), filepath.Join(bundle, "device.crt")).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify of the swtpm unit's certificate: %v\n%s", err, out)
	}
	env := append(os.Environ(), sw.StartABRMD(t)...)
	conf := filepath.Join(dir, "openssl-tpm2.cnf")
	if err := os.WriteFile(conf, []byte(simulator.OpenSSLConf), 0o644); err != nil {
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

	srvCA, srvCert, srvKey := serverIdentity(t, dir)
	trust := filepath.Join(dir, "station-trust.pem")
	root, _ := os.ReadFile(filepath.Join(st, "ca", "root.crt"))
	iss, _ := os.ReadFile(filepath.Join(st, "ca", "issuing.crt"))
	os.WriteFile(trust, append(root, iss...), 0o644)
	port := freePort(t)
	srv := command(env, "openssl", "s_server", "-accept", fmt.Sprint(port), "-cert", srvCert, "-key", srvKey, "-CAfile", trust,
		"-Verify", "1", "-verify_return_error", "-tls1_3", "-www")
	var srvOut lockedBuffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	waitPort(t, port)

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

// lockedBuffer collects a running process's output for reading while it runs.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func command(env []string, name string, args ...string) *exec.Cmd {
	c := exec.Command(name, args...)
	c.Env = env
	return c
}

// serverIdentity makes a throw-away server CA and a server certificate for 127.0.0.1.
func serverIdentity(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "interop server CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	caCert, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	write := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	return write("srv-ca.crt", "CERTIFICATE", caDER), write("srv.crt", "CERTIFICATE", der), write("srv.key", "PRIVATE KEY", keyDER)
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitPort(t *testing.T, port int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %d", port)
}
