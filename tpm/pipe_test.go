package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/internal/testutil"
)

// sendCmd is the cmd: command that reaches swtpm through tpm2_send.
func sendCmd(s *testutil.Swtpm) string {
	return fmt.Sprintf("tpm2_send --tcti=swtpm:host=127.0.0.1,port=%d", s.Port)
}

// openPipe opens a cmd: TPM and returns it with its process's id.
func openPipe(tb testing.TB, uri string, opts ...Option) (*Device, int) {
	tb.Helper()
	d, err := Open(context.Background(), uri, append([]Option{WithFlushStale(true)}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d, d.l.s.(*pipe).cmd.Process.Pid
}

// checkGone fails the test unless process pid and its process group are gone (reaped: no zombie either).
func checkGone(tb testing.TB, pid int) {
	tb.Helper()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		tb.Errorf("process %d still there (%v)", pid, err)
	}
	if err := syscall.Kill(-pid, 0); !errors.Is(err, syscall.ESRCH) {
		tb.Errorf("process group %d still there (%v)", pid, err)
	}
}

// A whole unit over tpm2_send: key, signature, EK certificates; Close ends the process.
func TestPipeSwtpm(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send")
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	ctx := context.Background()
	d, pid := openPipe(t, "cmd:"+sendCmd(s))
	k, err := d.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	signVerify(t, k)
	certs, _, err := d.EKCertificates(ctx)
	if err != nil || len(certs) == 0 {
		t.Fatalf("EK certificates over the pipe: %d, %v", len(certs), err)
	}
	k.Close()
	checkNoLeaks(t, d)
	start := time.Now()
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > pipeExitGrace {
		t.Errorf("Close took %s: tpm2_send should end on its own when its stdin closes", took)
	}
	checkGone(t, pid)
}

// OpenSSL's tpm2 provider reaches the same TPM through the same command (its cmd TCTI) and signs with the key file.
func TestPipeOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send", "openssl")
	s := testutil.StartSwtpm(t)
	ctx := context.Background()
	d, _ := openPipe(t, "cmd:"+sendCmd(s))
	k, err := d.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	pemBytes, err := k.PEM()
	if err != nil {
		t.Fatal(err)
	}
	pub := k.Public().(*ecdsa.PublicKey)
	k.Close()
	d.Close() // swtpm serves one connection at a time

	msg := []byte("signed by the unit's TPM through tpm2_send")
	sig := testutil.OpenSSLSign(t, "cmd:"+sendCmd(s), pemBytes, msg)
	sum := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(pub, sum[:], sig) {
		t.Fatal("OpenSSL's signature does not verify with the key's public key")
	}
}

// pidFile is a command prefix that records the shell's pid (the process Open starts) in a file, then runs the rest.
func pidFile(t *testing.T) (path string, readPid func() int) {
	path = filepath.Join(t.TempDir(), "pid")
	return path, func() int {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		return pid
	}
}

// A command that starts but never answers fails Open within the command timeout; a cancel ends it within a second.
// Either way the process is gone.
func TestPipeSilent(t *testing.T) {
	for _, silent := range []string{"exec sleep 600", "exec cat 3>&1 >/dev/null"} {
		t.Run(strings.Fields(silent)[1], func(t *testing.T) {
			path, readPid := pidFile(t)
			uri := fmt.Sprintf(`cmd:sh -c 'echo $$ >%s; %s'`, path, silent)
			start := time.Now()
			_, err := Open(context.Background(), uri, WithCommandTimeout(300*time.Millisecond))
			took := time.Since(start)
			if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "did not answer within 300ms") {
				t.Fatalf("silent command: %v", err)
			}
			if took > 300*time.Millisecond+time.Second {
				t.Errorf("Open took %s", took)
			}
			checkGone(t, readPid())

			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(200*time.Millisecond, cancel)
			start = time.Now()
			_, err = Open(ctx, uri)
			took = time.Since(start)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled: %v", err)
			}
			if took > 200*time.Millisecond+time.Second {
				t.Errorf("cancel took %s", took)
			}
			checkGone(t, readPid())
		})
	}
}

// A command that fails says why, in its own words (the last lines of its stderr), and wraps ErrUnreachable.
func TestPipeFails(t *testing.T) {
	for _, tt := range []struct{ uri, want string }{
		{`cmd:sh -c 'echo "ssh: connect to host 10.9.9.9 port 22: Connection refused" >&2; exit 255'`,
			"TPM2_GetCapability: TPM at cmd:sh -c 'echo \"ssh: connect to host 10.9.9.9 port 22: Connection refused\" >&2; exit 255': " +
				"process exited (exit status 255): ssh: connect to host 10.9.9.9 port 22: Connection refused: TPM unreachable"},
		{"cmd:tpm2_sendx", `tpm: cmd:tpm2_sendx: TPM unreachable: exec: "tpm2_sendx": executable file not found in $PATH`},
		{"cmd:/nonexistent/tpm2_send", `fork/exec /nonexistent/tpm2_send: no such file or directory`},
		{`cmd:sh -c 'echo "bash: line 1: tpm2_send: command not found" >&2; exit 127'`,
			"process exited (exit status 127): bash: line 1: tpm2_send: command not found: TPM unreachable"},
		{`cmd:sh -c 'printf "WARNING:tcti: Failed to open /dev/tpmrm0\n\033[31mlots\033[0m\n\nERROR: Could not load tcti\n" >&2; exit 1'`,
			"process exited (exit status 1): WARNING:tcti: Failed to open /dev/tpmrm0 … ERROR: Could not load tcti: TPM unreachable"},
		{`cmd:sh -c 'echo "Welcome to the provisioning image"; cat >/dev/null'`,
			"not a TPM response (it begins 57656c636f6d6520746f): does the command write TPM responses, and nothing else, on stdout"},
		{"cmd:true", "process exited (exit status 0): TPM unreachable"},
		{`cmd:sh -c 'kill -9 $$'`, "process exited (signal: killed): TPM unreachable"},
	} {
		_, err := Open(context.Background(), tt.uri, WithCommandTimeout(5*time.Second))
		if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Open(%q) = %v\nwant ErrUnreachable and %q", tt.uri, err, tt.want)
		}
	}
}

// The error keeps the last 4 KiB of stderr and no more, shown safely.
func TestPipeStderrTail(t *testing.T) {
	tl := NewOutputTail(64)
	fmt.Fprintf(tl, "%s\n", strings.Repeat("x", 100))
	fmt.Fprintf(tl, "first kept\r\n\x1b[2Jsecond\tline\n")
	if got, want := tl.lines(), []string{"first kept", "?[2Jsecond line"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("lines = %q, want %q", got, want)
	}
	if len(tl.buf) > 64 {
		t.Errorf("kept %d bytes", len(tl.buf))
	}
	tl = NewOutputTail(pipeStderrMax)
	fmt.Fprintf(tl, "%s\n", strings.Repeat("é", 300))
	if l := tl.lines(); len(l) != 1 || len(l[0]) > pipeLineMax+len("…") || !strings.HasSuffix(l[0], "…") {
		t.Errorf("long line: %q", l)
	}
}

// A TPM pipe that stops answering in the middle of a unit (its process stopped): the command fails at its deadline, a
// cancel ends it within a second, and the process is gone either way.
func TestPipeStallMidUnit(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send")
	s := testutil.StartSwtpm(t)
	sum := sha256.Sum256([]byte("unit"))
	for _, cancelled := range []bool{false, true} {
		d, pid := openPipe(t, "cmd:"+sendCmd(s), WithCommandTimeout(400*time.Millisecond))
		k, err := d.CreateKey(context.Background(), ECCP256)
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		if cancelled {
			d.l.timeout = time.Minute
			time.AfterFunc(200*time.Millisecond, cancel)
		}
		start := time.Now()
		_, err = k.SignContext(ctx, rand.Reader, sum[:], crypto.SHA256)
		took := time.Since(start)
		cancel()
		if cancelled && !errors.Is(err, context.Canceled) || !cancelled && (!errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "did not answer within 400ms")) {
			t.Fatalf("stalled TPM (cancelled %v): %v", cancelled, err)
		}
		if took > 400*time.Millisecond+time.Second {
			t.Errorf("cancelled %v: took %s", cancelled, took)
		}
		checkGone(t, pid)
		k.Close()
		d.Close()
	}
	d, _ := openPipe(t, "cmd:"+sendCmd(s)) // the next unit
	if _, err := d.CreateKey(context.Background(), ECCP256); err != nil {
		t.Fatal(err)
	}
}

// A unit on a fixture: the TPM behind sshd, reached with ssh; the connection killed mid-unit fails the next command
// with the cause, and the next Open works again.
func TestPipeSSH(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send")
	s := testutil.StartSwtpm(t)
	sshd := testutil.StartSSHD(t)
	uri := "cmd:" + sshd.Command() + " " + sendCmd(s)
	ctx := context.Background()
	d, pid := openPipe(t, uri)
	k, err := d.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatalf("%v\nsshd: %s", err, sshd.Log.String())
	}
	signVerify(t, k)

	sshd.KillSessions(t) // the unit unplugged in the middle
	_, err = d.CreateKey(ctx, ECCP256)
	// ssh's last words depend on how the connection went (a close: "Connection to 127.0.0.1 closed by remote host"; a
	// reset: sometimes nothing): its exit status is what is certain.
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "process exited (exit status 255)") {
		t.Fatalf("after the connection was killed: %v", err)
	}
	t.Logf("connection killed: %v", err)
	if _, err := d.CreateKey(ctx, ECCP256); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("a broken device answered: %v", err)
	}
	d.Close()
	checkGone(t, pid)

	d2, _ := openPipe(t, uri) // resumable: WithFlushStale clears what the killed run left in swtpm
	k2, err := d2.CreateKey(ctx, ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	signVerify(t, k2)
	k2.Close()
	checkNoLeaks(t, d2)

	// A fixture whose unit is not there: ssh's own words.
	port := testutil.FreePort(t)
	_, err = Open(ctx, fmt.Sprintf("cmd:ssh -F /dev/null -o BatchMode=yes -o LogLevel=ERROR -p %d root@127.0.0.1 tpm2_send", port))
	if want := fmt.Sprintf("process exited (exit status 255): ssh: connect to host 127.0.0.1 port %d: Connection refused: TPM unreachable", port); !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), want) {
		t.Fatalf("no sshd: %v\nwant %q", err, want)
	}
}

// A unit over the pipe against the same unit over mssim:// on the same swtpm: Open, an ECC key, a signature, Close.
// The pipe starts one process per unit, not one per command; "ssh" runs tpm2_send behind a local sshd.
func BenchmarkUnitOverPipe(b *testing.B) {
	testutil.RequireTool(b, "tpm2_send")
	s := testutil.StartSwtpm(b)
	sshd := testutil.StartSSHD(b)
	ctx := context.Background()
	sum := sha256.Sum256([]byte("unit"))
	for _, tc := range []struct{ name, uri string }{{"mssim", s.URI}, {"cmd", "cmd:" + sendCmd(s)}, {"ssh", "cmd:" + sshd.Command() + " " + sendCmd(s)}} {
		b.Run(tc.name, func(b *testing.B) {
			for b.Loop() {
				d, err := Open(ctx, tc.uri, WithFlushStale(true))
				if err != nil {
					b.Fatal(err)
				}
				k, err := d.CreateKey(ctx, ECCP256)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := k.Sign(rand.Reader, sum[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
				k.Close()
				if err := d.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// One command (an ECDSA signature) on an open TPM, over the pipe and over mssim://: the pipe's own cost per command.
func BenchmarkSignOverPipe(b *testing.B) {
	testutil.RequireTool(b, "tpm2_send")
	s := testutil.StartSwtpm(b)
	ctx := context.Background()
	sum := sha256.Sum256([]byte("unit"))
	for _, tc := range []struct{ name, uri string }{{"mssim", s.URI}, {"cmd", "cmd:" + sendCmd(s)}} {
		b.Run(tc.name, func(b *testing.B) {
			d, err := Open(ctx, tc.uri, WithFlushStale(true))
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			k, err := d.CreateKey(ctx, ECCP256)
			if err != nil {
				b.Fatal(err)
			}
			defer k.Close()
			for b.Loop() {
				if _, err := k.Sign(rand.Reader, sum[:], crypto.SHA256); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
