package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
)

// A cmd: TPM is a child process that reads TPM command buffers on its stdin and writes each response on its stdout,
// any number of them in one run: tpm2_send (tpm2-tools), or ssh running tpm2_send on the unit. It is started once per
// Device, in a process group of its own (so ssh's helpers end with it); its stdin and stdout are pipes in Go's poller,
// so every exchange takes the deadline that follows the context (bounded). A response is framed by its own header
// (tag, size, response code). The last few KiB of its stderr are kept for the error that reports its end.

// Bounds of a cmd: TPM's process.
const (
	pipeStderrMax  = 4 << 10                // the stderr kept: its last 4 KiB
	pipeExitGrace  = 300 * time.Millisecond // after stdin is closed, how long the process may take to end by itself
	pipeTermGrace  = 700 * time.Millisecond // after SIGTERM, before SIGKILL
	pipeExitReport = 500 * time.Millisecond // after its stdout ends, how long to wait for the exit status to report
	pipeLineMax    = 200                    // the longest stderr line put into an error
)

// pipe is a sender over a child process.
type pipe struct {
	cmd    *exec.Cmd
	ends   pipeEnds
	stderr *OutputTail
	errR   *os.File      // stderr's read end
	exited chan struct{} // closed when the process was reaped and its stderr read
	status error         // cmd.Wait's result; set before exited is closed

	once   sync.Once
	broken bool // an exchange failed: close ends the process without waiting for it to finish by itself
}

// pipeEnds is the process's stdin (w) and stdout (r) as the station holds them; a deadline applies to both.
type pipeEnds struct{ w, r *os.File }

func (e pipeEnds) SetDeadline(t time.Time) error {
	if err := e.w.SetDeadline(t); err != nil {
		return err
	}
	return e.r.SetDeadline(t)
}

// startPipe starts the process args (a cmd: URI's words) with its stdin, stdout and stderr on pipes.
func startPipe(args []string) (sender, error) {
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return nil, err
	}
	p := &pipe{ends: pipeEnds{w: inW, r: outR}, stderr: NewOutputTail(pipeStderrMax), errR: errR, exited: make(chan struct{})}
	p.cmd = exec.Command(args[0], args[1:]...)
	p.cmd.Stdin, p.cmd.Stdout, p.cmd.Stderr = inR, outW, errW // *os.File: handed to the child as they are, no copying
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = p.cmd.Start()
	inR.Close() // the child's ends: the child holds them now
	outW.Close()
	errW.Close()
	if err == nil {
		err = p.ends.SetDeadline(time.Time{}) // os.Pipe ends are in the poller on Linux; refuse rather than block unbounded
		if err != nil {
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			p.cmd.Wait()
		}
	}
	if err != nil {
		inW.Close()
		outR.Close()
		errR.Close()
		return nil, err
	}
	read := make(chan struct{})
	go func() {
		io.Copy(p.stderr, errR) // ends at EOF (every holder of the write end gone) or when close closes errR
		close(read)
	}()
	go func() {
		st := p.cmd.Wait()
		// What the leader left running in its group (a ProxyCommand, a backgrounded helper) ends with it.
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-read:
		case <-time.After(pipeExitReport): // a process outside the group holds stderr open: report what was read
		}
		p.status = st
		close(p.exited)
	}()
	return p, nil
}

func (p *pipe) send(ctx context.Context, deadline time.Time, cmd []byte) ([]byte, error) {
	var rsp []byte
	err := bounded(ctx, p.ends, deadline, func() error {
		if _, err := p.ends.w.Write(cmd); err != nil {
			return p.lost("send", err)
		}
		var hdr [10]byte
		if _, err := io.ReadFull(p.ends.r, hdr[:]); err != nil {
			return p.lost("read response", err)
		}
		tag, size := binary.BigEndian.Uint16(hdr[0:2]), binary.BigEndian.Uint32(hdr[2:6])
		if tag != uint16(0x8001) && tag != uint16(0x8002) && tag != 0x00c4 || size < 10 || size > maxResponse {
			return fmt.Errorf("not a TPM response (it begins %x): does the command write TPM responses, and nothing else, on stdout, as tpm2_send does?%s",
				hdr, p.stderr.Note())
		}
		rsp = make([]byte, size)
		copy(rsp, hdr[:])
		if _, err := io.ReadFull(p.ends.r, rsp[10:]); err != nil {
			return p.lost("read response", err)
		}
		return nil
	})
	if err != nil {
		p.broken = true
		return nil, err
	}
	return rsp, nil
}

// lost says why an exchange broke: a deadline as it is (bounded turns it into "did not answer" or the cancel), else
// how the process ended and the last words of its stderr, once it has ended (or its stdout closed while it runs on).
func (p *pipe) lost(op string, err error) error {
	if isDeadline(err) {
		return fmt.Errorf("%s: %w", op, err)
	}
	select {
	case <-p.exited:
		st := "exit status 0"
		if p.status != nil {
			st = p.status.Error() // "exit status 255", "signal: killed"
		}
		return fmt.Errorf("process exited (%s)%s", st, p.stderr.Note())
	case <-time.After(pipeExitReport):
	}
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%s: the process closed its stdout%s", op, p.stderr.Note())
	}
	return fmt.Errorf("%s: %v%s", op, err, p.stderr.Note())
}

// close ends the process: stdin closed (tpm2_send, and ssh with it, end by themselves), then SIGTERM to its group,
// then SIGKILL, within about a second; it is reaped before close returns. A process whose exchange failed is out of
// step and gets SIGTERM at once.
func (p *pipe) close() error {
	p.once.Do(func() {
		p.ends.w.Close()
		grace := pipeExitGrace
		if p.broken {
			grace = 0
		}
		if !p.wait(grace) {
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGCONT) // a stopped process acts on SIGTERM only once it runs
			if !p.wait(pipeTermGrace) {
				syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
				<-p.exited
			}
		}
		p.ends.r.Close()
		p.errR.Close()
	})
	return nil
}

// wait waits up to d for the process to end.
func (p *pipe) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.exited:
		return true
	case <-t.C:
		return false
	}
}

// tail keeps the last max bytes written to it.
// OutputTail keeps the last bytes a command wrote (its stderr) for the error that reports how it ended: bounded,
// safe to write from a copying goroutine while it is read. The pipe of a cmd: TPM and the station's unit_serial command
// use it.
type OutputTail struct {
	mu    sync.Mutex
	max   int
	buf   []byte
	trunc bool // bytes were dropped from the front
}

// NewOutputTail keeps the last max bytes written.
func NewOutputTail(max int) *OutputTail { return &OutputTail{max: max} }

func (t *OutputTail) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	if over := len(t.buf) - t.max; over > 0 {
		t.buf = append(t.buf[:0], t.buf[over:]...)
		t.trunc = true
	}
	return len(b), nil
}

// lines are the non-blank lines kept, trimmed, control characters (a remote end's terminal escapes) shown as '?', each
// cut to pipeLineMax bytes; a first line cut by the 4 KiB limit is left out.
func (t *OutputTail) lines() []string {
	t.mu.Lock()
	s := string(t.buf)
	trunc := t.trunc
	t.mu.Unlock()
	all := strings.Split(s, "\n")
	if trunc && len(all) > 1 {
		all = all[1:]
	}
	var out []string
	for _, l := range all {
		l = strings.TrimSpace(strings.Map(func(r rune) rune {
			if r == '\t' {
				return ' '
			}
			if unicode.IsControl(r) || r == unicode.ReplacementChar {
				return '?'
			}
			return r
		}, strings.TrimRight(l, "\r")))
		if l == "" {
			continue
		}
		if len(l) > pipeLineMax {
			l = strings.ToValidUTF8(l[:pipeLineMax], "") + "…"
		}
		out = append(out, l)
	}
	return out
}

// Note is ": " and the meaningful lines of what was kept (the first and last non-blank lines, control characters shown
// as '?'), or "" when nothing was written: for the end of an error message.
func (t *OutputTail) Note() string {
	lines := t.lines()
	switch len(lines) {
	case 0:
		return ""
	case 1:
		return ": " + strings.TrimSuffix(lines[0], ".") // ssh's "Connection to HOST closed by remote host."
	}
	return ": " + lines[0] + " … " + strings.TrimSuffix(lines[len(lines)-1], ".")
}
