// Package tpm reaches a unit's TPM 2.0 and makes its device key there: created under the standard ECC storage root key,
// usable as a crypto.Signer, exported as a TSS2 PRIVATE KEY file. A software key stands in for units without a TPM.
package tpm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
)

// Algorithm is a device key algorithm.
type Algorithm string

// Device key algorithms.
const (
	ECCP256 Algorithm = "ecc-p256"
	RSA2048 Algorithm = "rsa-2048"
)

// ParseAlgorithm checks a key algorithm name.
func ParseAlgorithm(s string) (Algorithm, error) {
	switch a := Algorithm(s); a {
	case ECCP256, RSA2048:
		return a, nil
	}
	return "", fmt.Errorf("tpm: key algorithm %q: use ecc-p256 or rsa-2048", s)
}

// Key kinds, as the inventory records them.
const (
	KindTPM  = "tpm"
	KindSoft = "soft"
)

// DialTimeout bounds reaching an mssim:// TPM.
const DialTimeout = 3 * time.Second

type options struct {
	simulator  func() (transport.TPMCloser, error)
	flushStale bool
	counter    *atomic.Int64
}

// Option configures Open.
type Option func(*options)

// WithSimulator supplies how to open the "sim" URI.
func WithSimulator(open func() (transport.TPMCloser, error)) Option {
	return func(o *options) { o.simulator = open }
}

// WithFlushStale flushes, at Open, every transient object the TPM holds: leftovers of a killed run on a TPM without a
// resource manager (swtpm, a simulator), which would otherwise fill its few object slots. Never useful through
// /dev/tpmrm0, whose resource manager flushes a client's objects itself.
func WithFlushStale(on bool) Option { return func(o *options) { o.flushStale = on } }

// WithCounter counts the TPM commands sent, retries included.
func WithCounter(n *atomic.Int64) Option { return func(o *options) { o.counter = n } }

// Device is an open TPM, or the software fallback.
type Device struct {
	uri string
	t   transport.TPMCloser // nil for soft

	mu      sync.Mutex // one command sequence at a time
	srk     tpm2.TPMHandle
	srkName tpm2.TPM2BName
	srkUp   bool
	closed  bool
}

// Open reaches the TPM named by uri: an absolute device path (/dev/tpmrm0), mssim://HOST:PORT, sim or soft.
func Open(ctx context.Context, uri string, opts ...Option) (*Device, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	d := &Device{uri: uri}
	var t transport.TPMCloser
	var err error
	switch {
	case uri == "soft":
		return d, nil
	case uri == "sim":
		if o.simulator == nil {
			return nil, fmt.Errorf("tpm: %s: no simulator wired in: %w", uri, ErrBadURI)
		}
		t, err = o.simulator()
		if err != nil {
			return nil, fmt.Errorf("tpm: open simulator: %w: %v", ErrUnreachable, err)
		}
	case strings.HasPrefix(uri, "mssim://"):
		addr := strings.TrimPrefix(uri, "mssim://")
		host, port, serr := net.SplitHostPort(addr)
		if p, perr := strconv.Atoi(port); serr != nil || perr != nil || host == "" || p <= 0 || p > 65534 {
			return nil, fmt.Errorf("tpm: %q: want mssim://HOST:PORT: %w", uri, ErrBadURI)
		}
		dctx, cancel := context.WithTimeout(ctx, DialTimeout)
		defer cancel()
		var m *mssim
		m, err = dialMSSimContext(dctx, addr)
		if err != nil {
			return nil, fmt.Errorf("tpm: %s: %w: %v", uri, ErrUnreachable, err)
		}
		t = m
	case filepath.IsAbs(uri):
		t, err = linuxtpm.Open(uri)
		if err != nil {
			return nil, fmt.Errorf("tpm: %s: %w: %v", uri, ErrUnreachable, err)
		}
	default:
		return nil, fmt.Errorf("tpm: %q: use /dev/tpmrm0, mssim://HOST:PORT, sim or soft: %w", uri, ErrBadURI)
	}
	d.t = &wrapped{t: t, counter: o.counter}
	// A first command proves the TPM answers (a socket that accepts is not yet a TPM).
	if _, err := (tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTManufacturer), PropertyCount: 1}).Execute(d.t); err != nil {
		d.t.Close()
		if errors.Is(err, ErrUnreachable) {
			return nil, fmt.Errorf("tpm: %s: %w", uri, err)
		}
		return nil, mapErr(uri+": first command", err)
	}
	if o.flushStale {
		if err := d.flushTransients(ctx); err != nil {
			d.t.Close()
			return nil, err
		}
	}
	return d, nil
}

func dialMSSimContext(ctx context.Context, addr string) (*mssim, error) {
	var dl net.Dialer
	c, err := dl.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &mssim{conn: c, timeout: 2 * time.Minute}, nil
}

// URI is what Open was given.
func (d *Device) URI() string { return d.uri }

// Kind is KindTPM, or KindSoft for the software fallback.
func (d *Device) Kind() string {
	if d.t == nil {
		return KindSoft
	}
	return KindTPM
}

// Close flushes the storage root key and closes the transport. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.t == nil {
		d.closed = true
		return nil
	}
	d.closed = true
	if d.srkUp {
		tpm2.FlushContext{FlushHandle: d.srk}.Execute(d.t)
		d.srkUp = false
	}
	return d.t.Close()
}

// ensureSRK creates the ECC P-256 storage root key under the owner hierarchy, once per Device: the TCG "H-2" template
// (empty unique field) that the TSS2 key file format names as parent 0x40000001, so OpenSSL's tpm2 provider and
// tpm2-tss derive the same SRK and load our key files. Callers hold d.mu.
func (d *Device) ensureSRK() error {
	if d.srkUp {
		return nil
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(keyfile.ECCSRK_H2_Template),
	}.Execute(d.t)
	if err != nil {
		return mapErr("create storage root key", err)
	}
	d.srk, d.srkName, d.srkUp = rsp.ObjectHandle, rsp.Name, true
	return nil
}

func (d *Device) parent() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: d.srk, Name: d.srkName, Auth: tpm2.PasswordAuth(nil)}
}

// TransientHandles lists the transient objects the TPM holds (for leak checks).
func (d *Device) TransientHandles(ctx context.Context) ([]uint32, error) {
	if d.t == nil {
		return nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.transients()
}

func (d *Device) transients() ([]uint32, error) {
	var out []uint32
	next := uint32(tpm2.TPMHTTransient) << 24
	for {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: next, PropertyCount: 64}.Execute(d.t)
		if err != nil {
			return nil, mapErr("list transient handles", err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, mapErr("list transient handles", err)
		}
		for _, h := range hs.Handle {
			if uint32(h)>>24 != uint32(tpm2.TPMHTTransient) {
				return out, nil
			}
			out = append(out, uint32(h))
			next = uint32(h) + 1
		}
		if !rsp.MoreData || len(hs.Handle) == 0 {
			return out, nil
		}
	}
}

func (d *Device) flushTransients(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	hs, err := d.transients()
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := (tpm2.FlushContext{FlushHandle: tpm2.TPMHandle(h)}).Execute(d.t); err != nil {
			return mapErr(fmt.Sprintf("flush stale transient object %#x", h), err)
		}
	}
	return nil
}

// EK certificate NV indices (TCG EK Credential Profile): RSA 2048, ECC P-256, ECC P-384.
var ekCertIndices = []tpm2.TPMHandle{0x01c00002, 0x01c0000a, 0x01c00016}

// EKCertificate returns the DER of the first EK certificate the TPM holds in NV (RSA, then ECC P-256, then ECC P-384),
// or nil when it holds none. Software keys have none.
func (d *Device) EKCertificate(ctx context.Context) ([]byte, error) {
	if d.t == nil {
		return nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, idx := range ekCertIndices {
		pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(d.t)
		if err != nil {
			if errors.Is(err, tpm2.TPMRCHandle) {
				continue
			}
			return nil, mapErr(fmt.Sprintf("read EK certificate index %#x", uint32(idx)), err)
		}
		contents, err := pub.NVPublic.Contents()
		if err != nil {
			return nil, mapErr("read EK certificate", err)
		}
		size := int(contents.DataSize)
		out := make([]byte, 0, size)
		const chunk = 512
		for off := 0; off < size; off += chunk {
			n := min(chunk, size-off)
			rsp, err := tpm2.NVRead{
				AuthHandle: tpm2.AuthHandle{Handle: idx, Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
				NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
				Size:       uint16(n),
				Offset:     uint16(off),
			}.Execute(d.t)
			if err != nil {
				return nil, mapErr(fmt.Sprintf("read EK certificate index %#x", uint32(idx)), err)
			}
			out = append(out, rsp.Data.Buffer...)
		}
		return trimDER(out), nil
	}
	return nil, nil
}

// trimDER cuts the padding some TPMs leave after the certificate in its NV index.
func trimDER(b []byte) []byte {
	if len(b) < 4 || b[0] != 0x30 {
		return b
	}
	var n int
	switch l := b[1]; {
	case l < 0x80:
		n = 2 + int(l)
	case l == 0x81:
		n = 3 + int(b[2])
	case l == 0x82:
		n = 4 + int(b[2])<<8 + int(b[3])
	default:
		return b
	}
	if n <= len(b) {
		return b[:n]
	}
	return b
}
