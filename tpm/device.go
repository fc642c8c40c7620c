// Package tpm reaches a unit's TPM 2.0 and makes its device key there: created under the standard ECC storage root key,
// usable as a crypto.Signer, exported as a TSS2 PRIVATE KEY file. A software key stands in for units without a TPM.
package tpm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	keyfile "github.com/foxboron/go-tpm-keyfiles"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
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

// DefaultCommandTimeout bounds every TPM command unless WithCommandTimeout says otherwise: long enough for an RSA key
// on a slow discrete TPM, short enough that a TPM that stopped answering is reported while the operator waits.
const DefaultCommandTimeout = 30 * time.Second

// ProbeTimeout bounds Probe (the transport's dial and its one command).
const ProbeTimeout = 3 * time.Second

type options struct {
	simulator  func() (transport.TPMCloser, error)
	flushStale bool
	counter    *atomic.Int64
	timeout    time.Duration
	log        *slog.Logger
}

func (o *options) validate() error {
	if o.timeout <= 0 {
		return fmt.Errorf("tpm: command timeout %s: it must be positive", o.timeout)
	}
	return nil
}

// Option configures Open.
type Option func(*options)

// WithSimulator supplies how to open the "sim" URI.
func WithSimulator(open func() (transport.TPMCloser, error)) Option {
	return func(o *options) { o.simulator = open }
}

// WithFlushStale flushes, at Open, every transient object and session the TPM holds: leftovers of a killed run on a TPM without a
// resource manager (swtpm, a simulator), which would otherwise fill its few object slots. Never useful through
// /dev/tpmrm0, whose resource manager flushes a client's objects itself.
func WithFlushStale(on bool) Option { return func(o *options) { o.flushStale = on } }

// WithCounter counts the TPM commands sent, retries included.
func WithCounter(n *atomic.Int64) Option { return func(o *options) { o.counter = n } }

// WithCommandTimeout bounds each TPM command (default DefaultCommandTimeout). A command the TPM does not answer in
// time fails with ErrUnreachable ("TPM at URI did not answer within D"), and the Device must be opened again.
func WithCommandTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithLogger logs every TPM command at debug level: its name ("TPM2_Create"), response code and duration, never its
// parameters or any key material.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// Device is an open TPM, or the software fallback.
//
// Every command is bounded by the command timeout and by the context of the call that sends it (for methods without
// one, such as Sign and Close, by the timeout alone). A command that times out, is cancelled or loses its connection
// breaks the Device: its transport is closed (a late answer would otherwise be read as the next command's) and every
// later call fails with ErrUnreachable until the TPM is opened again.
type Device struct {
	uri string
	l   *link // nil for soft

	mu      sync.Mutex // one command sequence at a time; guards l too
	srk     tpm2.TPMHandle
	srkName tpm2.TPM2BName
	srkUp   bool
	nvMax   int // TPM_PT_NV_BUFFER_MAX, once read
	closed  bool
	sess    *session // the salted HMAC session, once StartSession ran (session.go)
}

// Open reaches the TPM named by uri (ParseURI: an absolute device path such as /dev/tpmrm0, mssim://HOST:PORT,
// cmd:COMMAND, sim or soft), and proves it answers with one command. A cmd: TPM's process runs until Close.
func Open(ctx context.Context, uri string, opts ...Option) (*Device, error) {
	o := options{timeout: DefaultCommandTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	if o.log == nil {
		o.log = slog.New(slog.DiscardHandler)
	}
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	d := &Device{uri: uri}
	var s sender
	switch u.Kind {
	case URISoft:
		return d, nil
	case URISim:
		if o.simulator == nil {
			return nil, fmt.Errorf("tpm: %s: no simulator wired in: %w", uri, ErrBadURI)
		}
		t, err := o.simulator()
		if err != nil {
			return nil, fmt.Errorf("tpm: open simulator: %w: %v", ErrUnreachable, err)
		}
		s = &async{t: t}
	case URIMssim:
		dctx, cancel := context.WithTimeout(ctx, DialTimeout)
		defer cancel()
		var dl net.Dialer
		c, err := dl.DialContext(dctx, "tcp", u.Addr)
		if err != nil {
			if errors.Is(ctx.Err(), context.Canceled) {
				return nil, fmt.Errorf("tpm: %s: %w", uri, context.Canceled)
			}
			return nil, fmt.Errorf("tpm: %s: %w: %v", uri, ErrUnreachable, err)
		}
		s = &mssim{conn: c}
	case URIDevice:
		if s, err = openDevice(u.Addr); err != nil {
			return nil, fmt.Errorf("tpm: %s: %w: %w", uri, ErrUnreachable, err)
		}
	case URICmd:
		if s, err = startPipe(u.Args); err != nil {
			return nil, fmt.Errorf("tpm: %s: %w: %w", uri, ErrUnreachable, err)
		}
	}
	d.l = &link{uri: uri, s: s, timeout: o.timeout, log: o.log, counter: o.counter}
	// A first command proves the TPM answers (a socket that accepts is not yet a TPM).
	if err := d.ping(ctx); err != nil {
		d.l.close()
		if errors.Is(err, ErrUnreachable) || errors.Is(err, context.Canceled) {
			return nil, fmt.Errorf("tpm: open: %w", err)
		}
		return nil, mapErr(uri+": first command", err)
	}
	if o.flushStale {
		if err := d.flushTransients(ctx); err != nil {
			d.l.close()
			return nil, err
		}
	}
	return d, nil
}

// ping sends one cheap command (the manufacturer property). Callers hold d.mu, or own d alone.
func (d *Device) ping(ctx context.Context) error {
	_, err := tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: uint32(tpm2.TPMPTManufacturer), PropertyCount: 1}.Execute(d.l.with(ctx))
	return err
}

// Probe reports whether the TPM named by uri answers: it opens it and sends one cheap command, all within
// ProbeTimeout (or ctx's deadline, if sooner), then closes it. For front ends that show the TPM's state between units.
// "soft" always answers. "sim" (the in-process simulator, which answers while the process runs) is not opened: a second
// simulator would wait for the one in use. A device that another client holds open (/dev/tpm0, without the resource
// manager) answers nil: it is there. swtpm and Microsoft's simulator serve one connection at a time, so probe an
// mssim:// TPM only while no Device is open on it (or call Ping on the open Device); a cmd: TPM starts its command
// for the probe and ends it.
func Probe(ctx context.Context, uri string, opts ...Option) error {
	switch u, _ := ParseURI(uri); u.Kind { // a bad URI is Open's to refuse
	case URISoft:
		return nil
	case URISim:
		var o options
		for _, opt := range opts {
			opt(&o)
		}
		if o.simulator == nil {
			return fmt.Errorf("tpm: %s: no simulator wired in: %w", uri, ErrBadURI)
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	d, err := Open(ctx, uri, opts...)
	if errors.Is(err, syscall.EBUSY) {
		return nil // a TPM device without a resource manager (/dev/tpm0) that another client holds open: present
	}
	if err != nil {
		return err
	}
	return d.Close()
}

// Ping sends one cheap command to an open TPM within ProbeTimeout (or ctx's deadline, if sooner). A Device busy with
// another command answers nil at once: that command is bounded by its own deadline.
func (d *Device) Ping(ctx context.Context) error {
	if d.l == nil {
		return nil
	}
	if !d.mu.TryLock() {
		return nil
	}
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("tpm: %s: closed: %w", d.uri, ErrUnreachable)
	}
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	if err := d.ping(ctx); err != nil {
		return mapErr("ping", err)
	}
	return nil
}

// URI is what Open was given.
func (d *Device) URI() string { return d.uri }

// Kind is KindTPM, or KindSoft for the software fallback.
func (d *Device) Kind() string {
	if d.l == nil {
		return KindSoft
	}
	return KindTPM
}

// Close flushes the storage root key and the session, and closes the transport. It is idempotent.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.l == nil {
		d.closed = true
		return nil
	}
	d.closed = true
	d.endSession()
	if d.srkUp && d.l.broken == nil {
		tpm2.FlushContext{FlushHandle: d.srk}.Execute(d.l.with(context.Background()))
	}
	d.srkUp = false
	return d.l.close()
}

// ensureSRK creates the ECC P-256 storage root key under the owner hierarchy, once per Device: the TCG "H-2" template
// (empty unique field) that the TSS2 key file format names as parent 0x40000001, so OpenSSL's tpm2 provider and
// tpm2-tss derive the same SRK and load our key files. Callers hold d.mu.
func (d *Device) ensureSRK(ctx context.Context) error {
	if d.srkUp {
		return nil
	}
	auth := d.auth()
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: auth},
		InPublic:      tpm2.New2B(keyfile.ECCSRK_H2_Template),
	}.Execute(d.l.with(ctx))
	if err != nil {
		return d.sessionErr("create storage root key", auth, err)
	}
	d.srk, d.srkName, d.srkUp = rsp.ObjectHandle, rsp.Name, true
	return nil
}

func (d *Device) parent() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: d.srk, Name: d.srkName, Auth: d.auth()}
}

// TransientHandles lists the transient objects the TPM holds (for leak checks).
func (d *Device) TransientHandles(ctx context.Context) ([]uint32, error) {
	if d.l == nil {
		return nil, nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.transients(ctx)
}

func (d *Device) transients(ctx context.Context) ([]uint32, error) {
	first := uint32(tpm2.TPMHTTransient) << 24
	return d.handles(ctx, first, first|0xffffff, "list transient handles")
}

// handles lists the handles the TPM has in use from first to last (TPM2_GetCapability, TPM_CAP_HANDLES): NV indices,
// persistent or transient objects. Callers hold d.mu.
func (d *Device) handles(ctx context.Context, first, last uint32, what string) ([]uint32, error) {
	var out []uint32
	next := first
	for {
		rsp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: next, PropertyCount: 64}.Execute(d.l.with(ctx))
		if err != nil {
			return nil, mapErr(what, err)
		}
		hs, err := rsp.CapabilityData.Data.Handles()
		if err != nil {
			return nil, mapErr(what, err)
		}
		for _, h := range hs.Handle {
			if uint32(h) > last || uint32(h)>>24 != first>>24 {
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

// flushTransients flushes the transient objects and the sessions a killed run left (WithFlushStale).
func (d *Device) flushTransients(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.flushSessions(ctx); err != nil {
		return err
	}
	hs, err := d.transients(ctx)
	if err != nil {
		return err
	}
	for _, h := range hs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := (tpm2.FlushContext{FlushHandle: tpm2.TPMHandle(h)}).Execute(d.l.with(ctx)); err != nil {
			return mapErr(fmt.Sprintf("flush stale transient object %#x", h), err)
		}
	}
	return nil
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
