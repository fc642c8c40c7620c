package tpm

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

var (
	// ErrUnreachable: the TPM transport cannot be opened, the connection broke, or the TPM did not answer a command
	// within its deadline.
	ErrUnreachable = errors.New("TPM unreachable")
	// ErrLockout: the TPM is in dictionary-attack lockout.
	ErrLockout = errors.New("TPM in dictionary-attack lockout")
	// ErrObjectMemory: the TPM has no room for another object.
	ErrObjectMemory = errors.New("TPM out of object memory")
	// ErrBadURI: the TPM URI is not one of /dev/..., mssim://HOST:PORT, cmd:COMMAND, sim, soft (ParseURI).
	ErrBadURI = errors.New("bad TPM URI")
)

// Warning response codes the TPM asks us to retry (TPM 2.0 Part 2, 6.6.3).
const (
	rcYielded = 0x908
	rcTesting = 0x90A
	rcRetry   = 0x922
)

// maxRetries bounds the retry of TPM_RC_RETRY / YIELDED / TESTING.
const maxRetries = 8

// maxResponse is the largest response accepted (TPM 2.0 responses are at most a few KiB; 64 KiB is generous).
const maxResponse = 1 << 16

// errNoAnswer: the TPM did not answer before the command's deadline.
var errNoAnswer = errors.New("no answer before the deadline")

// sender is one TPM transport whose commands are bounded: each send gives up at its deadline or as soon as ctx is
// done. After a failed send the stream may be out of step (a late response would answer the next command), so the
// caller drops the sender and never sends on it again.
type sender interface {
	send(ctx context.Context, deadline time.Time, cmd []byte) ([]byte, error)
	close() error
}

// deadliner is what net.Conn and a pollable *os.File share.
type deadliner interface{ SetDeadline(time.Time) error }

// bounded runs fn, an exchange on c, under the deadline, and moves the deadline to the past when ctx is done so a
// blocked read or write returns at once.
func bounded(ctx context.Context, c deadliner, deadline time.Time, fn func() error) error {
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.SetDeadline(time.Unix(1, 0))
		close(fired)
	})
	err := fn()
	if !stop() {
		<-fired // the interrupt ran; wait for it so it cannot move a later command's deadline
	}
	if err != nil && isDeadline(err) && ctx.Err() == nil {
		return errNoAnswer
	}
	return err
}

func isDeadline(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// mssim speaks the TCP TPM simulator protocol (swtpm --server type=tcp, Microsoft's simulator) on the command port.
// go-tpm's tcp transport dials without a timeout and reads a response with a single Read (a short read on TCP breaks
// it); this one bounds the dial and every exchange and reads exactly.
type mssim struct {
	conn net.Conn
}

const mssimSendCommand = 8 // TPM_SEND_COMMAND

func (m *mssim) send(ctx context.Context, deadline time.Time, cmd []byte) ([]byte, error) {
	var rsp []byte
	err := bounded(ctx, m.conn, deadline, func() error {
		hdr := make([]byte, 9, 9+len(cmd))
		binary.BigEndian.PutUint32(hdr[0:4], mssimSendCommand)
		hdr[4] = 0 // locality
		binary.BigEndian.PutUint32(hdr[5:9], uint32(len(cmd)))
		if _, err := m.conn.Write(append(hdr, cmd...)); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		var n [4]byte
		if _, err := io.ReadFull(m.conn, n[:]); err != nil {
			return fmt.Errorf("read response: %w", err)
		}
		size := binary.BigEndian.Uint32(n[:])
		if size > maxResponse {
			return fmt.Errorf("response of %d bytes", size)
		}
		rsp = make([]byte, size)
		if _, err := io.ReadFull(m.conn, rsp); err != nil {
			return fmt.Errorf("read response: %w", err)
		}
		if _, err := io.ReadFull(m.conn, n[:]); err != nil { // the simulator's own ack, 0
			return fmt.Errorf("read response: %w", err)
		}
		return nil
	})
	return rsp, err
}

func (m *mssim) close() error { return m.conn.Close() }

// devFile is a TPM character device (/dev/tpmrm0). The kernel's TPM driver supports poll, so the file joins Go's
// poller and takes deadlines; a device that does not falls back to async.
type devFile struct {
	f *os.File
}

func openDevice(path string) (sender, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode()&os.ModeDevice == 0 {
		return nil, fmt.Errorf("%s is not a device (%s)", path, fi.Mode())
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	if f.SetDeadline(time.Time{}) != nil { // not pollable: blocking reads that only a goroutine can abandon
		return &async{t: transport.FromReadWriteCloser(f)}, nil
	}
	return &devFile{f: f}, nil
}

func (d *devFile) send(ctx context.Context, deadline time.Time, cmd []byte) ([]byte, error) {
	var rsp []byte
	err := bounded(ctx, d.f, deadline, func() error {
		if _, err := d.f.Write(cmd); err != nil {
			return fmt.Errorf("send: %w", err)
		}
		buf := make([]byte, 4096) // the driver hands over the whole response in one read
		n, err := d.f.Read(buf)
		if err != nil {
			return fmt.Errorf("read response: %w", err)
		}
		rsp = buf[:n]
		return nil
	})
	return rsp, err
}

func (d *devFile) close() error { return d.f.Close() }

// async bounds a transport that has no deadlines (the in-process simulator, a device without poll support): each
// command runs in a goroutine; one that does not finish in time is abandoned, and the transport is closed when it
// finally returns.
type async struct {
	t         transport.TPMCloser
	abandoned bool
}

func (a *async) send(ctx context.Context, deadline time.Time, cmd []byte) ([]byte, error) {
	type result struct {
		rsp []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		rsp, err := a.t.Send(cmd)
		done <- result{rsp, err}
	}()
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	select {
	case r := <-done:
		return r.rsp, r.err
	case <-ctx.Done():
	case <-timer.C:
	}
	a.abandoned = true
	go func() {
		<-done
		a.t.Close()
	}()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return nil, errNoAnswer
}

func (a *async) close() error {
	if a.abandoned {
		return nil // closed by the abandoned command when it returns
	}
	return a.t.Close()
}

// link is a Device's way to its TPM: every command bounded by the command timeout and the caller's context, the TPM's
// retry warnings retried (bounded), every command counted and logged. Callers hold the Device's lock.
type link struct {
	uri     string
	s       sender
	timeout time.Duration
	log     *slog.Logger
	counter *atomic.Int64
	broken  error // set by a failed exchange: the sender is closed and the Device must be opened again
}

// with binds ctx to the commands sent through the returned transport (go-tpm's commands take no context).
func (l *link) with(ctx context.Context) transport.TPM { return bound{l, ctx} }

type bound struct {
	l   *link
	ctx context.Context
}

func (b bound) Send(cmd []byte) ([]byte, error) { return b.l.exchange(b.ctx, cmd) }

func (l *link) exchange(ctx context.Context, cmd []byte) ([]byte, error) {
	name := "TPM command"
	if len(cmd) >= 10 {
		name = commandName(tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:10])))
	}
	if l.broken != nil {
		return nil, fmt.Errorf("%s: %w", name, l.broken)
	}
	for i := 0; ; i++ {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%s not sent: %w", name, err)
		}
		if l.counter != nil {
			l.counter.Add(1)
		}
		start := time.Now()
		deadline := start.Add(l.timeout)
		budget := l.timeout
		if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
			deadline, budget = dl, dl.Sub(start).Round(time.Millisecond)
			if budget >= time.Second {
				budget = budget.Round(100 * time.Millisecond)
			}
		}
		rsp, err := l.s.send(ctx, deadline, cmd)
		took := time.Since(start)
		if err == nil && len(rsp) < 10 {
			err = fmt.Errorf("response of %d bytes", len(rsp))
		}
		if err != nil {
			err = l.fail(ctx, name, budget, err)
			l.log.LogAttrs(ctx, slog.LevelDebug, "tpm command", slog.String("tpm", l.uri), slog.String("cmd", name),
				slog.Float64("ms", ms(took)), slog.String("error", err.Error()))
			return nil, err
		}
		rc := binary.BigEndian.Uint32(rsp[6:10])
		l.log.LogAttrs(ctx, slog.LevelDebug, "tpm command", slog.String("tpm", l.uri), slog.String("cmd", name),
			slog.Float64("ms", ms(took)), slog.String("rc", rcName(rc)))
		if i < maxRetries {
			switch rc {
			case rcRetry, rcYielded, rcTesting:
				select {
				case <-time.After(time.Duration(i+1) * 5 * time.Millisecond):
				case <-ctx.Done():
				}
				continue
			}
		}
		return rsp, nil
	}
}

// fail closes the sender after a failed exchange (the stream may be out of step) and says why in words.
func (l *link) fail(ctx context.Context, name string, budget time.Duration, err error) error {
	l.s.close()
	var out error
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		out = fmt.Errorf("%s to %s interrupted: %w", name, l.uri, context.Canceled)
	case errors.Is(err, errNoAnswer) || ctx.Err() != nil || isDeadline(err):
		out = fmt.Errorf("%s: TPM at %s did not answer within %s: %w", name, l.uri, budget, ErrUnreachable)
	default:
		out = fmt.Errorf("%s: TPM at %s: %v: %w", name, l.uri, err, ErrUnreachable)
	}
	l.broken = fmt.Errorf("TPM at %s: connection dropped after an earlier command failed; open the TPM again: %w", l.uri, ErrUnreachable)
	return out
}

func (l *link) close() error {
	if l.broken != nil {
		return nil // closed when it broke
	}
	l.broken = fmt.Errorf("TPM at %s: closed: %w", l.uri, ErrUnreachable)
	return l.s.close()
}

// ms is a duration in milliseconds, to 0.01 ms.
func ms(d time.Duration) float64 { return math.Round(float64(d)/float64(time.Millisecond)*100) / 100 }

// rcName is a response code as the specification names it ("TPM_RC_SUCCESS", "TPM_RC_RETRY").
func rcName(rc uint32) string {
	if rc == 0 {
		return "TPM_RC_SUCCESS"
	}
	s := tpm2.TPMRC(rc).Error()
	if i := strings.IndexAny(s, ": "); i > 0 {
		s = s[:i]
	}
	return fmt.Sprintf("%s (%#x)", s, rc)
}

// mapErr turns TPM response codes into this package's sentinels, keeping the TPM's own error in the chain.
func mapErr(op string, err error) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("tpm: %s: %w: %w", op, ErrLockout, err)
	case errors.Is(err, tpm2.TPMRCObjectMemory), errors.Is(err, tpm2.TPMRCSessionMemory), errors.Is(err, tpm2.TPMRCObjectHandles):
		return fmt.Errorf("tpm: %s: %w: %w", op, ErrObjectMemory, err)
	}
	return fmt.Errorf("tpm: %s: %w", op, err)
}
