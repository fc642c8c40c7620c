package testutil

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// TamperProxy forwards the TCP simulator protocol (TPM_SEND_COMMAND frames) to a real TPM (swtpm) and, when armed,
// flips one bit in the parameter area of a chosen command, or of the TPM's answer to it: a host in the middle altering
// what passes. Tests use it to check that the TPM's session catches what the path changed.
type TamperProxy struct {
	URI     string // mssim://127.0.0.1:PORT
	mu      sync.Mutex
	armed   map[uint32]bool // command codes whose next successful response is altered
	armedIn map[uint32]bool // command codes whose next command is altered
	flipped atomic.Int32
	watch   []byte // Watch
	seen    bool
}

// Watch makes the proxy look for b in every response from now on (Seen): a secret that must not cross in clear.
func (p *TamperProxy) Watch(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.watch, p.seen = b, false
}

// Seen reports whether a response since Watch held the watched bytes.
func (p *TamperProxy) Seen() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen
}

// FlipNextCommand arms the proxy: the next command with code cc gets one bit of its parameter area flipped on its way
// to the TPM.
func (p *TamperProxy) FlipNextCommand(cc uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.armedIn[cc] = true
}

// FlipNext arms the proxy: the next successful response to command code cc (e.g. 0x153 TPM2_Create, 0x15d TPM2_Sign)
// gets one bit of its parameter area flipped.
func (p *TamperProxy) FlipNext(cc uint32) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.armed[cc] = true
}

// Flipped is how many responses the proxy altered.
func (p *TamperProxy) Flipped() int { return int(p.flipped.Load()) }

// commandHandles is the number of handles of a command, where it is not one (TPM 2.0 Part 3): TPM2_StartAuthSession,
// TPM2_ActivateCredential, TPM2_Certify; TPM2_GetCapability has none.
var commandHandles = map[uint32]int{0x176: 2, 0x147: 2, 0x148: 2, 0x17a: 0}

// responseHandles is the number of handles in the response to a command code, where it is not zero (TPM 2.0 Part 3):
// TPM2_StartAuthSession, TPM2_CreatePrimary, TPM2_Load, TPM2_LoadExternal, TPM2_CreateLoaded.
var responseHandles = map[uint32]int{0x176: 1, 0x131: 1, 0x157: 1, 0x167: 1, 0x191: 1}

// NewTamperProxy starts a proxy to the mssim:// TPM at target (e.g. Swtpm.URI). It stops at test cleanup.
func NewTamperProxy(tb testing.TB, target string) *TamperProxy {
	tb.Helper()
	p := &TamperProxy{armed: map[uint32]bool{}, armedIn: map[uint32]bool{}}
	addr := strings.TrimPrefix(target, "mssim://")
	l := listen(tb, func(c net.Conn, track func(net.Conn)) {
		defer c.Close()
		up, err := net.Dial("tcp", addr)
		if err != nil {
			return
		}
		track(up)
		defer up.Close()
		for {
			// Client: TPM_SEND_COMMAND (8), locality, size, command.
			var hdr [9]byte
			if _, err := io.ReadFull(c, hdr[:]); err != nil || binary.BigEndian.Uint32(hdr[:4]) != 8 {
				return
			}
			cmd := make([]byte, binary.BigEndian.Uint32(hdr[5:]))
			if _, err := io.ReadFull(c, cmd); err != nil || len(cmd) < 10 {
				return
			}
			p.tamperCommand(cmd)
			if _, err := up.Write(append(hdr[:], cmd...)); err != nil {
				return
			}
			// TPM: size, response, acknowledgement.
			var n [4]byte
			if _, err := io.ReadFull(up, n[:]); err != nil {
				return
			}
			rsp := make([]byte, binary.BigEndian.Uint32(n[:])+4)
			if _, err := io.ReadFull(up, rsp); err != nil {
				return
			}
			p.tamper(binary.BigEndian.Uint32(cmd[6:10]), rsp[:len(rsp)-4])
			if _, err := c.Write(append(n[:], rsp...)); err != nil {
				return
			}
		}
	})
	p.URI = "mssim://" + l.Addr().String()
	return p
}

// tamperCommand flips the lowest bit of the middle byte of cmd's parameter area, if the proxy is armed for its code.
func (p *TamperProxy) tamperCommand(cmd []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cc := binary.BigEndian.Uint32(cmd[6:10])
	if !p.armedIn[cc] {
		return
	}
	nh, ok := commandHandles[cc]
	if !ok {
		nh = 1
	}
	start := 10 + 4*nh
	if binary.BigEndian.Uint16(cmd[0:2]) == 0x8002 { // TPM_ST_SESSIONS: authorizationSize, sessions, parameters
		if start+4 > len(cmd) {
			return
		}
		start += 4 + int(binary.BigEndian.Uint32(cmd[start:]))
	}
	if start >= len(cmd) {
		return
	}
	cmd[start+(len(cmd)-start)/2] ^= 1
	delete(p.armedIn, cc)
	p.flipped.Add(1)
}

// tamper flips the lowest bit of the middle byte of rsp's parameter area, if the proxy is armed for cc and the TPM
// answered TPM_RC_SUCCESS.
func (p *TamperProxy) tamper(cc uint32, rsp []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.watch) > 0 && bytes.Contains(rsp, p.watch) {
		p.seen = true
	}
	if !p.armed[cc] || len(rsp) < 10 || binary.BigEndian.Uint32(rsp[6:10]) != 0 {
		return
	}
	start, end := 10+4*responseHandles[cc], len(rsp)
	if binary.BigEndian.Uint16(rsp[0:2]) == 0x8002 { // TPM_ST_SESSIONS: parameterSize, parameters, sessions
		if start+4 > len(rsp) {
			return
		}
		size := int(binary.BigEndian.Uint32(rsp[start:]))
		start += 4
		end = min(start+size, len(rsp))
	}
	if start >= end {
		return
	}
	rsp[start+(end-start)/2] ^= 1
	delete(p.armed, cc)
	p.flipped.Add(1)
}

// PipeMiddleEnv names the environment variable that turns a test binary into a pipe middle (RunPipeMiddle): its value
// is the command code (hex, e.g. 15d for TPM2_Sign) whose first successful response gets a bit flipped.
const PipeMiddleEnv = "PROVISION_TEST_PIPE_MIDDLE"

// RunPipeMiddle is a process in the middle of a cmd: TPM pipe: it runs argv (e.g. tpm2_send …), passes TPM commands
// from its stdin to it and the answers back, and flips one bit in the parameter area of the first successful answer
// to the command code PipeMiddleEnv names. A test binary calls it from TestMain when PipeMiddleEnv is set, and exits
// with what it returns.
func RunPipeMiddle(argv []string) int {
	var cc uint32
	if _, err := fmt.Sscanf(os.Getenv(PipeMiddleEnv), "%x", &cc); err != nil || len(argv) == 0 {
		fmt.Fprintln(os.Stderr, "pipe middle: want", PipeMiddleEnv, "=hex command code and a command")
		return 2
	}
	child := exec.Command(argv[0], argv[1:]...)
	child.Stderr = os.Stderr
	in, err := child.StdinPipe()
	if err != nil {
		return 2
	}
	out, err := child.StdoutPipe()
	if err != nil {
		return 2
	}
	if err := child.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "pipe middle:", err)
		return 127
	}
	p := &TamperProxy{armed: map[uint32]bool{cc: true}, armedIn: map[uint32]bool{}}
	frame := func(r io.Reader) ([]byte, error) {
		hdr := make([]byte, 10)
		if _, err := io.ReadFull(r, hdr); err != nil {
			return nil, err
		}
		size := binary.BigEndian.Uint32(hdr[2:6])
		if size < 10 || size > 1<<16 {
			return nil, fmt.Errorf("frame of %d bytes", size)
		}
		b := make([]byte, size)
		copy(b, hdr)
		_, err := io.ReadFull(r, b[10:])
		return b, err
	}
	for {
		cmd, err := frame(os.Stdin)
		if err != nil {
			break
		}
		if _, err := in.Write(cmd); err != nil {
			break
		}
		rsp, err := frame(out)
		if err != nil {
			break
		}
		p.tamper(binary.BigEndian.Uint32(cmd[6:10]), rsp)
		if _, err := os.Stdout.Write(rsp); err != nil {
			break
		}
	}
	in.Close()
	child.Wait()
	return 0
}
