package testutil

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Swtpm is a swtpm process serving the TCP simulator protocol on loopback.
type Swtpm struct {
	URI  string // mssim://127.0.0.1:PORT
	Port int    // data port; the control port is Port+1
	Dir  string // TPM state
	cmd  *exec.Cmd
	done chan struct{}
}

type swtpmOptions struct {
	ekCert bool
}

// SwtpmOption configures NewSwtpm.
type SwtpmOption func(*swtpmOptions)

// WithEKCert provisions the TPM first with swtpm_setup: an RSA and an ECC EK with certificates in NV (signed by
// swtpm_localca), a platform certificate, and an SRK persisted at 0x81000001.
func WithEKCert() SwtpmOption { return func(o *swtpmOptions) { o.ekCert = true } }

// NewSwtpm starts swtpm with its state in dir (created if needed) on free loopback ports and waits until it accepts.
func NewSwtpm(ctx context.Context, dir string, opts ...SwtpmOption) (*Swtpm, error) {
	var o swtpmOptions
	for _, opt := range opts {
		opt(&o)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if o.ekCert {
		if err := provisionEK(ctx, dir); err != nil {
			return nil, err
		}
	}
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePortPair()
		if err != nil {
			return nil, err
		}
		s := &Swtpm{URI: fmt.Sprintf("mssim://127.0.0.1:%d", port), Port: port, Dir: dir, done: make(chan struct{})}
		s.cmd = exec.Command("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir,
			"--server", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port),
			"--ctrl", fmt.Sprintf("type=tcp,port=%d,bindaddr=127.0.0.1", port+1),
			"--flags", "not-need-init,startup-clear")
		s.cmd.Stdout, s.cmd.Stderr = nil, nil
		if err := s.cmd.Start(); err != nil {
			return nil, fmt.Errorf("start swtpm: %w", err)
		}
		go func() { s.cmd.Wait(); close(s.done) }()
		if lastErr = s.waitReady(ctx); lastErr == nil {
			return s, nil
		}
		s.Stop()
	}
	return nil, fmt.Errorf("swtpm did not come up: %w", lastErr)
}

func (s *Swtpm) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return errors.New("swtpm exited (port taken?)")
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(s.Port), 200*time.Millisecond)
		if err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("timed out waiting for swtpm")
}

// Stop ends the swtpm process (its state stays in Dir).
func (s *Swtpm) Stop() error {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	s.cmd.Process.Kill()
	<-s.done
	return nil
}

// Restart stops swtpm and starts it again on the same state (a TPM power cycle).
func (s *Swtpm) Restart(ctx context.Context) error {
	s.Stop()
	ns, err := NewSwtpm(ctx, s.Dir)
	if err != nil {
		return err
	}
	*s = *ns
	return nil
}

// StartSwtpm starts swtpm for a test in a temp dir and stops it at cleanup. swtpm is required under CI; elsewhere the
// test is skipped when it is missing.
func StartSwtpm(tb testing.TB, opts ...SwtpmOption) *Swtpm {
	tb.Helper()
	RequireTool(tb, "swtpm")
	s, err := NewSwtpm(context.Background(), tb.TempDir(), opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Stop() })
	return s
}

func provisionEK(ctx context.Context, dir string) error {
	conf := filepath.Join(dir, "swtpm_setup.conf")
	ca := filepath.Join(dir, "localca")
	if err := os.MkdirAll(ca, 0o700); err != nil {
		return err
	}
	// swtpm_localca keeps its CA in the directory its config names.
	localConf := filepath.Join(dir, "swtpm-localca.conf")
	body := fmt.Sprintf("statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n", ca, ca, ca, ca)
	if err := os.WriteFile(localConf, []byte(body), 0o600); err != nil {
		return err
	}
	opts := filepath.Join(dir, "swtpm-localca.options")
	if err := os.WriteFile(opts, []byte("--platform-manufacturer provision\n--platform-version 2.1\n--platform-model sim\n"), 0o600); err != nil {
		return err
	}
	setup := fmt.Sprintf("create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\n", localConf, opts)
	if err := os.WriteFile(conf, []byte(setup), 0o600); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "swtpm_setup", "--tpm2", "--tpmstate", dir, "--createek", "--create-ek-cert",
		"--create-platform-cert", "--ecc", "--create-spk", "--config", conf, "--overwrite")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("swtpm_setup: %v: %s", err, out)
	}
	return nil
}

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
