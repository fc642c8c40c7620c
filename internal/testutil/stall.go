package testutil

import (
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// listen listens on a loopback port and serves every accepted connection with serve (in its own goroutine, which may
// add connections of its own through track). At test cleanup it closes the listener and every tracked connection,
// then waits for the serving goroutines.
func listen(tb testing.TB, serve func(c net.Conn, track func(net.Conn))) net.Listener {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	track := func(c net.Conn) {
		mu.Lock()
		conns = append(conns, c)
		mu.Unlock()
	}
	tb.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			track(c)
			wg.Add(1)
			go func() { defer wg.Done(); serve(c, track) }()
		}
	}()
	return l
}

// SilentListener listens on loopback and accepts connections that never answer (what they send is read and dropped):
// a peer whose far end hung. It returns host:port and a channel signalled (without blocking) on each accepted
// connection. It stops at test cleanup.
func SilentListener(tb testing.TB) (addr string, accepted <-chan struct{}) {
	tb.Helper()
	acc := make(chan struct{}, 64)
	l := listen(tb, func(c net.Conn, _ func(net.Conn)) {
		select {
		case acc <- struct{}{}:
		default:
		}
		io.Copy(io.Discard, c) // read and drop every command
	})
	return l.Addr().String(), acc
}

// StartSilentTPM listens on loopback and accepts connections that never answer: a forwarded TPM whose far end hung,
// as mssim://127.0.0.1:PORT. It stops at test cleanup.
func StartSilentTPM(tb testing.TB) string {
	tb.Helper()
	addr, _ := SilentListener(tb)
	return "mssim://" + addr
}

// StallProxy forwards the TCP simulator protocol to a real TPM (swtpm) until Stall is called; from then on it drops
// every command, so the TPM never sees them and never answers, until Resume. Tests use it to hang a TPM in the middle
// of a unit.
type StallProxy struct {
	URI   string // mssim://127.0.0.1:PORT
	stall atomic.Bool
}

// Stall makes the proxy drop commands from now on.
func (p *StallProxy) Stall() { p.stall.Store(true) }

// Resume forwards commands again (on connections opened after a stalled exchange: the old ones are out of step).
func (p *StallProxy) Resume() { p.stall.Store(false) }

// NewStallProxy starts a proxy to the mssim:// TPM at target (e.g. Swtpm.URI). It stops at test cleanup.
func NewStallProxy(tb testing.TB, target string) *StallProxy {
	tb.Helper()
	p := &StallProxy{}
	addr := strings.TrimPrefix(target, "mssim://")
	l := listen(tb, func(c net.Conn, track func(net.Conn)) {
		up, err := net.Dial("tcp", addr)
		if err != nil {
			c.Close()
			return
		}
		track(up)
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer up.Close()
			buf := make([]byte, 4096)
			for {
				n, err := c.Read(buf)
				if n > 0 && !p.stall.Load() {
					if _, werr := up.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
		io.Copy(c, up)
		c.Close()
		<-done
	})
	p.URI = "mssim://" + l.Addr().String()
	return p
}
