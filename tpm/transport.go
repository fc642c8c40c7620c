package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

var (
	// ErrUnreachable: the TPM transport cannot be opened, or the connection broke.
	ErrUnreachable = errors.New("TPM unreachable")
	// ErrLockout: the TPM is in dictionary-attack lockout.
	ErrLockout = errors.New("TPM in dictionary-attack lockout")
	// ErrObjectMemory: the TPM has no room for another object.
	ErrObjectMemory = errors.New("TPM out of object memory")
	// ErrBadURI: the TPM URI is not one of /dev/..., mssim://HOST:PORT, sim, soft.
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

// mssim speaks the TCP TPM simulator protocol (swtpm --server type=tcp, Microsoft's simulator) on the command port.
// go-tpm's tcp transport dials without a timeout and reads a response with a single Read (a short read on TCP breaks
// it); this one bounds the dial and every exchange and reads exactly.
type mssim struct {
	conn    net.Conn
	timeout time.Duration
}

const mssimSendCommand = 8 // TPM_SEND_COMMAND

func (m *mssim) Send(cmd []byte) ([]byte, error) {
	m.conn.SetDeadline(time.Now().Add(m.timeout))
	hdr := make([]byte, 9, 9+len(cmd))
	binary.BigEndian.PutUint32(hdr[0:4], mssimSendCommand)
	hdr[4] = 0 // locality
	binary.BigEndian.PutUint32(hdr[5:9], uint32(len(cmd)))
	if _, err := m.conn.Write(append(hdr, cmd...)); err != nil {
		return nil, fmt.Errorf("%w: send: %v", ErrUnreachable, err)
	}
	var n [4]byte
	if _, err := io.ReadFull(m.conn, n[:]); err != nil {
		return nil, fmt.Errorf("%w: read response: %v", ErrUnreachable, err)
	}
	size := binary.BigEndian.Uint32(n[:])
	if size > 1<<16 {
		return nil, fmt.Errorf("%w: response of %d bytes", ErrUnreachable, size)
	}
	rsp := make([]byte, size)
	if _, err := io.ReadFull(m.conn, rsp); err != nil {
		return nil, fmt.Errorf("%w: read response: %v", ErrUnreachable, err)
	}
	if _, err := io.ReadFull(m.conn, n[:]); err != nil { // the simulator's own ack, 0
		return nil, fmt.Errorf("%w: read response: %v", ErrUnreachable, err)
	}
	return rsp, nil
}

func (m *mssim) Close() error { return m.conn.Close() }

// wrapped retries the TPM's retry warnings (bounded) and counts commands.
type wrapped struct {
	t       transport.TPMCloser
	counter *atomic.Int64
}

func (w *wrapped) Send(cmd []byte) ([]byte, error) {
	for i := 0; ; i++ {
		if w.counter != nil {
			w.counter.Add(1)
		}
		rsp, err := w.t.Send(cmd)
		if err != nil {
			return nil, err
		}
		if len(rsp) >= 10 && i < maxRetries {
			switch binary.BigEndian.Uint32(rsp[6:10]) {
			case rcRetry, rcYielded, rcTesting:
				time.Sleep(time.Duration(i+1) * 5 * time.Millisecond)
				continue
			}
		}
		return rsp, nil
	}
}

func (w *wrapped) Close() error { return w.t.Close() }

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
