package tpm

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2/transport"

	"provision/internal/testutil"
	"provision/simulator"
)

// Within is generous: the point is "about a second", not the 30 s default or go-tpm's unbounded wait.
const within = 3 * time.Second

// openStalling opens a swtpm through a StallProxy (stale objects flushed), with opts.
func openStalling(t *testing.T, opts ...Option) (*testutil.StallProxy, *Device) {
	t.Helper()
	s := testutil.StartSwtpm(t)
	p := testutil.NewStallProxy(t, s.URI)
	d, err := Open(context.Background(), p.URI, append([]Option{WithFlushStale(true)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return p, d
}

func TestCommandCancelledOnStalledTPM(t *testing.T) {
	p, d := openStalling(t)
	defer d.Close()
	k, err := d.CreateKey(context.Background(), ECCP256) // the storage root key is up: the next Create is one command
	if err != nil {
		t.Fatal(err)
	}
	k.Close()

	p.Stall()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	_, err = d.CreateKey(ctx, ECCP256)
	took := time.Since(start)
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnreachable) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if took > within {
		t.Fatalf("cancel took %s", took)
	}
	if !strings.Contains(err.Error(), "TPM2_Create") {
		t.Errorf("error does not name the command: %v", err)
	}
	// The device is unusable now (a late answer would be read as the next command's), and says so.
	if _, err := d.CreateKey(context.Background(), ECCP256); !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "open the TPM again") {
		t.Fatalf("broken device: got %v", err)
	}
	start = time.Now()
	d.Close()
	if time.Since(start) > within {
		t.Fatalf("Close of a broken device took %s", time.Since(start))
	}
	// Opened again (the TPM answers again), it works, and stale objects are flushed.
	p.Resume()
	d2, err := Open(context.Background(), p.URI, WithFlushStale(true))
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	k, err = d2.CreateKey(context.Background(), ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
}

// A signature in flight stops with the context handed to Key.WithContext (crypto.Signer has none of its own).
func TestSignCancelledOnStalledTPM(t *testing.T) {
	p, d := openStalling(t)
	defer d.Close()
	k, err := d.CreateKey(context.Background(), ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	p.Stall()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	digest := sha256.Sum256([]byte("csr"))
	_, err = k.WithContext(ctx).Sign(rand.Reader, digest[:], crypto.SHA256)
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "TPM2_Sign") {
		t.Fatalf("got %v, want context.Canceled naming TPM2_Sign", err)
	}
	if took := time.Since(start); took > within {
		t.Fatalf("cancel took %s", took)
	}
	// The open Device answers Ping with the truth: it must be opened again.
	if err := d.Ping(context.Background()); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("ping of a broken device: %v", err)
	}
}

func TestCommandDeadlineOnStalledTPM(t *testing.T) {
	p, d := openStalling(t, WithCommandTimeout(500*time.Millisecond))
	defer d.Close()
	p.Stall()
	start := time.Now()
	_, err := d.CreateKey(context.Background(), ECCP256)
	if !errors.Is(err, ErrUnreachable) || errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want ErrUnreachable", err)
	}
	if want := "TPM at " + p.URI + " did not answer within 500ms"; !strings.Contains(err.Error(), want) {
		t.Fatalf("got %q, want it to say %q", err, want)
	}
	if took := time.Since(start); took > within {
		t.Fatalf("deadline took %s", took)
	}
}

// checkSilent checks a TPM at uri that never answers: Open cancelled while the first command waits returns promptly,
// the configured command deadline names the TPM, and Probe gives up within its own deadline.
func checkSilent(t *testing.T, uri string) {
	t.Helper()
	// Cancelled while the first command waits.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	_, err := Open(ctx, uri)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	if took := time.Since(start); took > within {
		t.Fatalf("cancel took %s", took)
	}
	// The configured deadline.
	_, err = Open(context.Background(), uri, WithCommandTimeout(300*time.Millisecond))
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "TPM at "+uri+" did not answer within 300ms") {
		t.Fatalf("got %v", err)
	}
	// Probe: within its own deadline.
	start = time.Now()
	if err := Probe(context.Background(), uri); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("probe of a silent TPM: %v", err)
	}
	if took := time.Since(start); took > ProbeTimeout+time.Second {
		t.Fatalf("probe took %s", took)
	}
}

func TestOpenSilentTPM(t *testing.T) {
	uri := testutil.StartSilentTPM(t)
	checkSilent(t, uri)
	if _, err := Open(context.Background(), uri, WithCommandTimeout(0)); err == nil {
		t.Fatal("zero command timeout accepted")
	}
}

func TestProbe(t *testing.T) {
	ctx := context.Background()
	if err := Probe(ctx, "soft"); err != nil {
		t.Fatalf("soft: %v", err)
	}
	if err := Probe(ctx, "sim", WithSimulator(simulator.Open)); err != nil {
		t.Fatalf("sim: %v", err)
	}
	if err := Probe(ctx, "sim"); !errors.Is(err, ErrBadURI) {
		t.Fatalf("sim without a simulator: %v", err)
	}
	s := testutil.StartSwtpm(t)
	if err := Probe(ctx, s.URI); err != nil {
		t.Fatalf("swtpm: %v", err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := "mssim://" + l.Addr().String()
	l.Close()
	if err := Probe(ctx, closed); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("closed port: %v", err)
	}
	if err := Probe(ctx, "/dev/no-such-tpm"); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("missing device: %v", err)
	}
	// An open device answers Ping.
	d, err := Open(ctx, s.URI, WithFlushStale(true))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
}

// A swtpm killed under a running key creation gives ErrUnreachable at once, and once swtpm is back, Open works.
func TestSwtpmKilledMidOperation(t *testing.T) {
	s := testutil.StartSwtpm(t)
	d, err := Open(context.Background(), s.URI, WithFlushStale(true))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	errc := make(chan error, 1)
	first := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			k, err := d.CreateKey(context.Background(), RSA2048)
			if err != nil {
				errc <- err
				return
			}
			k.Close()
			if i == 0 {
				close(first)
			}
		}
	}()
	<-first
	s.Stop()
	select {
	case err := <-errc:
		if !errors.Is(err, ErrUnreachable) {
			t.Fatalf("got %v, want ErrUnreachable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("key creation still running 10 s after swtpm was killed")
	}
	if err := s.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	d2, err := Open(context.Background(), s.URI, WithFlushStale(true))
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	k, err := d2.CreateKey(context.Background(), ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
}

// openPTY opens a pseudo-terminal pair and returns the secondary's path: a character device that supports poll and
// never answers, standing in for a hung /dev/tpmrm0.
func openPTY(t *testing.T) string {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	testutil.RequireFacility(t, err == nil, "no pseudo-terminals: %v", err)
	t.Cleanup(func() { m.Close() })
	var unlock int32
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCSPTLCK, uintptr(unsafe.Pointer(&unlock))); e != 0 {
		t.Fatalf("unlockpt: %v", e)
	}
	var n uint32
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, m.Fd(), syscall.TIOCGPTN, uintptr(unsafe.Pointer(&n))); e != 0 {
		t.Fatalf("ptsname: %v", e)
	}
	return "/dev/pts/" + itoa(int(n))
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}

func TestDeviceFileDeadlines(t *testing.T) { checkSilent(t, openPTY(t)) }

// blockingTPM is a transport whose commands never return until released: a device without poll support that hung.
type blockingTPM struct {
	release chan struct{}
	closed  atomic.Bool
}

func (b *blockingTPM) Send([]byte) ([]byte, error) { <-b.release; return nil, io.EOF }
func (b *blockingTPM) Close() error                { b.closed.Store(true); return nil }

func TestAsyncAbandon(t *testing.T) {
	b := &blockingTPM{release: make(chan struct{})}
	d, err := Open(context.Background(), "sim", WithSimulator(func() (transport.TPMCloser, error) { return b, nil }),
		WithCommandTimeout(200*time.Millisecond))
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "did not answer within 200ms") {
		t.Fatalf("got %v (%v)", err, d)
	}
	if b.closed.Load() {
		t.Fatal("transport closed while its command still runs")
	}
	close(b.release)
	for i := 0; !b.closed.Load(); i++ {
		if i > 1000 {
			t.Fatal("abandoned transport never closed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCommandLog(t *testing.T) {
	var buf bytes.Buffer
	var mu sync.Mutex
	log := slog.New(slog.NewJSONHandler(&lockedWriter{w: &buf, mu: &mu}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	d, err := Open(context.Background(), "sim", WithSimulator(simulator.Open), WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	k, err := d.CreateKey(context.Background(), ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	pemBytes, _ := k.PEM()
	k.Close()
	d.Close()
	mu.Lock()
	out := buf.String()
	mu.Unlock()
	for _, want := range []string{`"cmd":"TPM2_GetCapability"`, `"cmd":"TPM2_CreatePrimary"`, `"cmd":"TPM2_Create"`, `"cmd":"TPM2_Load"`,
		`"cmd":"TPM2_FlushContext"`, `"rc":"TPM_RC_SUCCESS"`, `"ms":`, `"msg":"tpm command"`, `"level":"DEBUG"`, `"tpm":"sim"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	// Names, codes and durations only: no parameters, no key material.
	allowed := map[string]bool{"time": true, "level": true, "msg": true, "tpm": true, "cmd": true, "ms": true, "rc": true, "error": true}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		for _, f := range strings.Split(strings.Trim(line, "{}"), ",\"") {
			key := strings.Trim(strings.SplitN(f, ":", 2)[0], `"`)
			if !allowed[key] {
				t.Errorf("log field %q in %s", key, line)
			}
		}
	}
	if strings.Contains(out, string(pemBytes[40:80])) {
		t.Error("log holds key material")
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
