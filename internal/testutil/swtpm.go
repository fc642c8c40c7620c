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
	// The CA's certificates alone, apart from its private keys, for --tpm-roots.
	roots := filepath.Join(dir, "ekroots")
	if err := os.MkdirAll(roots, 0o700); err != nil {
		return err
	}
	for _, name := range []string{"swtpm-localca-rootca-cert.pem", "issuercert.pem"} {
		b, err := os.ReadFile(filepath.Join(ca, name))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(roots, name), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// EKRootsDir is a directory holding only the certificates of the swtpm-localca that signed the EK certificates of a
// swtpm made WithEKCert (its root and the intermediate that issues EK certificates), for --tpm-roots; "" without
// WithEKCert.
func (s *Swtpm) EKRootsDir() string {
	d := filepath.Join(s.Dir, "ekroots")
	if _, err := os.Stat(d); err != nil {
		return ""
	}
	return d
}

// WriteNV replaces NV index with data, as a TPM vendor writes an EK certificate: the index is (re)defined under
// platform authorization (ppwrite, writedefine, ppread, ownerread, authread, no_da, platformcreate) and written.
// For fixtures such as an EK certificate that belongs to another TPM. It runs tpm2-tools (tpm2_nvdefine, tpm2_nvwrite)
// against the swtpm, so call it while no other client is connected (swtpm serves one connection at a time); tests
// check for the tools with RequireTool(tb, "tpm2_nvdefine").
func (s *Swtpm) WriteNV(ctx context.Context, index uint32, data []byte) error {
	f, err := os.CreateTemp("", "nv-*.bin")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	idx := fmt.Sprintf("%#x", index)
	run := func(args ...string) error {
		cmd := exec.CommandContext(ctx, args[0], args[1:]...)
		cmd.Env = append(os.Environ(), fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", s.Port))
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", args[0], err, out)
		}
		return nil
	}
	_ = run("tpm2_nvundefine", "-C", "p", idx) // absent is fine: defining it says what is wrong
	if err := run("tpm2_nvdefine", "-C", "p", "-s", strconv.Itoa(len(data)),
		"-a", "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate", idx); err != nil {
		return err
	}
	return run("tpm2_nvwrite", "-C", "p", "-i", f.Name(), idx)
}
