package simulator

import (
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// StartSilentTPM listens on loopback and accepts connections that never answer: a forwarded TPM whose far end hung,
// as mssim://127.0.0.1:PORT. It stops at test cleanup.
func StartSilentTPM(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	tb.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go io.Copy(io.Discard, c) // read and drop every command
		}
	}()
	return "mssim://" + l.Addr().String()
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
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &StallProxy{URI: "mssim://" + l.Addr().String()}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	tb.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	addr := strings.TrimPrefix(target, "mssim://")
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", addr)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, up)
			mu.Unlock()
			wg.Add(2)
			go func() {
				defer wg.Done()
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
			go func() {
				defer wg.Done()
				defer c.Close()
				io.Copy(c, up)
			}()
		}
	}()
	return p
}
