// Package testutil owns the helpers the tests of every package share, so that none keeps its own copy: tool checks
// (RequireTool), TPMs for tests (swtpm processes with and without EK certificates, tpm2-abrmd in front of one, silent
// and stalling TPMs), a mosquitto broker, throw-away PostgreSQL clusters and databases (StartPostgres, PostgresDB),
// throw-away CAs and server identities, an OpenSSH server on loopback (StartSSHD), free loopback ports, golden files
// (Golden) and golden disk images. Only tests import it (internal/deptest checks that): the shipped binary does not link the testing package.
package testutil

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"
)

// RequireTool skips the test when a tool is missing and CI is unset; under CI a missing tool fails it.
func RequireTool(tb testing.TB, names ...string) {
	tb.Helper()
	for _, name := range names {
		missing, err := Missing(name)
		if err != nil {
			tb.Fatal(err)
		}
		if missing {
			tb.Skipf("%s not installed", name)
		}
	}
}

// RequireFacility is RequireTool for what the machine itself must offer (pseudo-terminals, a block device, loop
// devices, root): when ok is false the test skips while CI is unset, and fails under CI, whose machine has them.
func RequireFacility(tb testing.TB, ok bool, format string, args ...any) {
	tb.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") != "" {
		tb.Fatalf("CI: "+format, args...)
	}
	tb.Skipf(format, args...)
}

// Missing says whether a tool is not installed (for skipping what needs it); under CI a missing tool is an error.
func Missing(name string) (bool, error) {
	if _, err := exec.LookPath(name); err != nil {
		if os.Getenv("CI") != "" {
			return false, fmt.Errorf("%s is required under CI: %v", name, err)
		}
		return true, nil
	}
	return false, nil
}

// FreePort is a loopback port that was free a moment ago.
func FreePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// WaitPort waits (about five seconds) until something listens on the loopback port, and fails the test otherwise.
func WaitPort(tb testing.TB, port int) {
	tb.Helper()
	if !listening(port, 200) {
		tb.Fatalf("nothing listens on %d", port)
	}
}

// listening dials the loopback port up to tries times, 25ms apart, and says whether it answered.
func listening(port, tries int) bool {
	for i := 0; i < tries; i++ {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 100*time.Millisecond); err == nil {
			c.Close()
			return true
		}
		time.Sleep(25 * time.Millisecond)
	}
	return false
}

// freePortPair finds a free loopback port P with P+1 free too.
func freePortPair() (int, error) {
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p+1))
		l.Close()
		if err == nil {
			l2.Close()
			return p, nil
		}
	}
	return 0, errors.New("no free pair of loopback ports")
}

// FileSum is the SHA-256 of a file's content.
func FileSum(tb testing.TB, p string) [32]byte {
	tb.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		tb.Fatal(err)
	}
	return sha256.Sum256(b)
}

// LockedBuffer collects a running process's output for reading while it runs.
type LockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *LockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
