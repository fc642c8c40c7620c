package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"provision/internal/testutil"
	"provision/simulator"
)

// startSession salts d's session to the EK of the certificate at index (0: the default EK, want nil).
func startSession(t *testing.T, d *Device, index uint32) {
	t.Helper()
	var want crypto.PublicKey
	if index != 0 {
		certs, _, err := d.EKCertificates(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range certs {
			if c.Index == index {
				want = parseNVCert(t, c).PublicKey
			}
		}
		if want == nil {
			t.Fatalf("no EK certificate at %#x", index)
		}
	}
	if err := d.StartSession(context.Background(), index, want); err != nil {
		t.Fatal(err)
	}
}

// openUnchecked opens the TPM at uri, to be closed by the test (Close flushes the session: the leak check of
// openChecked would run on a closed Device).
func openUnchecked(t *testing.T, uri string, opts ...Option) *Device {
	t.Helper()
	d, err := Open(context.Background(), uri, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// sessions lists the sessions the TPM holds.
func sessions(t *testing.T, d *Device) []uint32 {
	t.Helper()
	hs, err := d.SessionHandles(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return hs
}

// Through a session salted to each kind of EK swtpm has (the persistent P-384 high-range one, the RSA low-range one
// made from its template, the default EK trusted on first use): keys, signatures, AK, activation (with the EK's
// policy session: three sessions at once) and certification work, one session is loaded, and Close flushes it.
func TestSessionSwtpm(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	for _, tc := range []struct {
		name  string
		index uint32
		evict bool
	}{
		{"H-3 persistent", 0x01c00016, false},
		{"default EK", 0, false},
		{"L-1 template", 0x01c00002, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var n atomic.Int64
			d := openUnchecked(t, s.URI, WithFlushStale(true), WithCounter(&n))
			if tc.evict {
				evictEKs(t, d)
			}
			measure(t, &n, "StartSession", func() { startSession(t, d, tc.index) })
			if src, idx := d.SessionEK(); idx != tc.index || src == "" {
				t.Fatalf("SessionEK %q %#x", src, idx)
			}
			if err := d.StartSession(context.Background(), tc.index, nil); err != nil { // again: the same session
				t.Fatal(err)
			}
			if hs := sessions(t, d); len(hs) != 1 || tpm2.TPMHT(hs[0]>>24) != tpm2.TPMHTHMACSession {
				t.Fatalf("sessions %#x, want one HMAC session", hs)
			}
			if hs, _ := d.TransientHandles(context.Background()); len(hs) != 0 {
				t.Fatalf("the EK stays loaded after the session started: %#x", hs)
			}
			k, err := d.CreateKey(context.Background(), ECCP256)
			if err != nil {
				t.Fatal(err)
			}
			signVerify(t, k)
			k.Close()
			attestAll(t, d, &n, !tc.evict)
			if hs := sessions(t, d); len(hs) != 1 {
				t.Fatalf("sessions after the unit %#x, want the Device's one", hs)
			}
			checkNoLeaks(t, d)
			d.Close()
			after := openUnchecked(t, s.URI)
			if hs := sessions(t, after); len(hs) != 0 {
				t.Fatalf("sessions left after Close: %#x", hs)
			}
			after.Close()
		})
	}
}

// The simulator's certified low-range ECC P-256 EK, made from its template.
func TestSessionSimulator(t *testing.T) {
	var n atomic.Int64
	d := openSim(t, WithCounter(&n))
	measure(t, &n, "StartSession", func() { startSession(t, d, 0x01c0000a) })
	attestAll(t, d, &n, false)
	if hs := sessions(t, d); len(hs) != 1 {
		t.Fatalf("sessions %#x, want one", hs)
	}
}

// A session is refused when the TPM's EK is not the key the certificate names, and a running session is not
// re-salted to another EK.
func TestSessionEKMismatch(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	d := openSwtpm(t, testutil.StartSwtpm(t, testutil.WithEKCert()))
	ctx := context.Background()
	other, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	for _, index := range []uint32{0x01c00016, 0x01c00002} {
		err := d.StartSession(ctx, index, other.Public())
		if !errors.Is(err, ErrEKMismatch) {
			t.Fatalf("%#x with a foreign key: %v, want ErrEKMismatch", index, err)
		}
	}
	if d.InSession() {
		t.Fatal("a refused session is running")
	}
	if hs := sessions(t, d); len(hs) != 0 {
		t.Fatalf("sessions %#x after refusals", hs)
	}
	startSession(t, d, 0x01c00016)
	if err := d.StartSession(ctx, 0x01c00016, other.Public()); err == nil {
		t.Fatal("a running session was re-salted to another key")
	}
	soft, _ := Open(ctx, "soft")
	if err := soft.StartSession(ctx, 0, nil); err == nil {
		t.Fatal("soft: a session started")
	}
}

// Command codes the tamper tests alter the response of.
const (
	ccCreate             = 0x153
	ccLoad               = 0x157
	ccSign               = 0x15d
	ccCertify            = 0x148
	ccActivateCredential = 0x147
	ccCreatePrimary      = 0x131
)

// A host in the middle flips one bit in the parameters of the TPM's response to each protected command: the call fails
// with ErrTampered and returns nothing, and the Device is broken from then on. Without a session the same flip in
// TPM2_Create goes unnoticed (the control).
func TestSessionTamper(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	proxy := testutil.NewTamperProxy(t, s.URI)
	ctx := context.Background()
	sum := sha256.Sum256([]byte("provision"))
	open := func(t *testing.T, session bool) *Device {
		d, err := Open(ctx, proxy.URI, WithFlushStale(true))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		if session {
			startSession(t, d, 0x01c00016)
		}
		return d
	}
	for _, tc := range []struct {
		name string
		cc   uint32
		run  func(d *Device) (any, error)
	}{
		{"TPM2_Create", ccCreate, func(d *Device) (any, error) { return d.CreateKey(ctx, ECCP256) }},
		{"TPM2_CreatePrimary (SRK)", ccCreatePrimary, func(d *Device) (any, error) { return d.CreateKey(ctx, ECCP256) }},
		{"TPM2_Load", ccLoad, func(d *Device) (any, error) { return d.CreateKey(ctx, ECCP256) }},
		{"TPM2_Sign", ccSign, func(d *Device) (any, error) {
			k, err := d.CreateKey(ctx, ECCP256)
			if err != nil {
				return nil, err
			}
			proxy.FlipNext(ccSign)
			return k.Sign(rand.Reader, sum[:], crypto.SHA256)
		}},
		{"TPM2_Certify", ccCertify, func(d *Device) (any, error) {
			k, err := d.CreateKey(ctx, ECCP256)
			if err != nil {
				return nil, err
			}
			ak, err := d.CreateAK(ctx)
			if err != nil {
				return nil, err
			}
			proxy.FlipNext(ccCertify)
			a, _, err := d.Certify(ctx, k, ak, []byte("nonce"))
			return a, err
		}},
		{"TPM2_ActivateCredential", ccActivateCredential, func(d *Device) (any, error) {
			ak, err := d.CreateAK(ctx)
			if err != nil {
				return nil, err
			}
			ek, err := d.EndorsementKey(ctx, 0, nil)
			if err != nil {
				return nil, err
			}
			pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ek.Public)
			encap, _ := tpm2.ImportEncapsulationKey(pub)
			blob, secret, _ := tpm2.CreateCredential(rand.Reader, encap, ak.Name(), []byte("secret"))
			proxy.FlipNext(ccActivateCredential)
			return d.ActivateCredential(ctx, ak, ek, blob, secret)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := open(t, true)
			before := proxy.Flipped()
			if tc.cc != ccSign && tc.cc != ccCertify && tc.cc != ccActivateCredential {
				proxy.FlipNext(tc.cc)
			}
			got, err := tc.run(d)
			if proxy.Flipped() != before+1 {
				t.Fatalf("the proxy altered %d responses", proxy.Flipped()-before)
			}
			if !errors.Is(err, ErrTampered) {
				t.Fatalf("altered %s: %v, %v; want ErrTampered", tc.name, got, err)
			}
			switch v := got.(type) {
			case *Key:
				if v != nil {
					t.Fatal("a key came back")
				}
			case []byte:
				if v != nil {
					t.Fatal("a value came back")
				}
			}
			t.Log(err)
			if _, err := d.CreateKey(ctx, ECCP256); !errors.Is(err, ErrUnreachable) {
				t.Fatalf("after tampering, the Device still answers: %v", err)
			}
		})
	}
	// The path alters the command instead: the TPM refuses the session's HMAC, which is as much a sign of tampering.
	t.Run("TPM2_Sign command", func(t *testing.T) {
		d := open(t, true)
		k, err := d.CreateKey(ctx, ECCP256)
		if err != nil {
			t.Fatal(err)
		}
		before := proxy.Flipped()
		proxy.FlipNextCommand(ccSign)
		sig, err := k.Sign(rand.Reader, sum[:], crypto.SHA256)
		if proxy.Flipped() != before+1 || !errors.Is(err, ErrTampered) || sig != nil {
			t.Fatalf("altered TPM2_Sign command: %x, %v; want ErrTampered", sig, err)
		}
		t.Log(err)
	})
	// The credential ActivateCredential recovers crosses the path encrypted (and in clear without a session).
	for _, session := range []bool{false, true} {
		d := open(t, session)
		ak, err := d.CreateAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ek, err := d.EndorsementKey(ctx, 0x01c00016, nil)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ek.Public)
		encap, _ := tpm2.ImportEncapsulationKey(pub)
		secret := []byte("a credential for the middle to read")
		blob, enc, _ := tpm2.CreateCredential(rand.Reader, encap, ak.Name(), secret)
		proxy.Watch(secret)
		got, err := d.ActivateCredential(ctx, ak, ek, blob, enc)
		if err != nil || string(got) != string(secret) {
			t.Fatalf("session %v: activation %q, %v", session, got, err)
		}
		if proxy.Seen() == session {
			t.Fatalf("session %v: the credential crossed the path in clear: %v", session, proxy.Seen())
		}
		ek.Close()
		ak.Close()
		d.Close()
	}
	t.Run("without a session", func(t *testing.T) {
		d := open(t, false)
		proxy.FlipNext(ccCreate)
		k, err := d.CreateKey(ctx, ECCP256)
		t.Logf("altered TPM2_Create without a session: %v", err)
		if err == nil {
			k.Close()
		}
		if errors.Is(err, ErrTampered) {
			t.Fatal("ErrTampered without a session")
		}
	})
}

// BenchmarkSessionCost measures what the session adds to one unit's TPM work (EK certificates, key, CSR and handshake
// signatures, AK, activation, certification), without and with it, on swtpm (P-384 persistent EK) and the simulator
// (ECC P-256 EK from its template): time per unit and TPM commands per unit (docs/attestation.md).
func BenchmarkSessionCost(b *testing.B) {
	unit := func(b *testing.B, d *Device, index uint32, session bool) {
		ctx := context.Background()
		certs, _, err := d.EKCertificates(ctx)
		if err != nil {
			b.Fatal(err)
		}
		var want crypto.PublicKey
		for _, c := range certs {
			if c.Index == index {
				want = parseNVCert(b, c).PublicKey
			}
		}
		if session {
			if err := d.StartSession(ctx, index, want); err != nil {
				b.Fatal(err)
			}
		}
		k, err := d.CreateKey(ctx, ECCP256)
		if err != nil {
			b.Fatal(err)
		}
		defer k.Close()
		sum := sha256.Sum256([]byte("csr"))
		for range 2 {
			if _, err := k.Sign(rand.Reader, sum[:], crypto.SHA256); err != nil {
				b.Fatal(err)
			}
		}
		ak, err := d.CreateAK(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer ak.Close()
		ek, err := d.EndorsementKey(ctx, index, want)
		if err != nil {
			b.Fatal(err)
		}
		pub, _ := tpm2.Unmarshal[tpm2.TPMTPublic](ek.Public)
		encap, _ := tpm2.ImportEncapsulationKey(pub)
		blob, secret, _ := tpm2.CreateCredential(rand.Reader, encap, ak.Name(), []byte("secret"))
		if _, err := d.ActivateCredential(ctx, ak, ek, blob, secret); err != nil {
			b.Fatal(err)
		}
		ek.Close()
		if _, _, err := d.Certify(ctx, k, ak, []byte("nonce")); err != nil {
			b.Fatal(err)
		}
	}
	compare := func(b *testing.B, uri string, index uint32, opts ...Option) {
		for _, session := range []bool{false, true} {
			b.Run(map[bool]string{false: "off", true: "session"}[session], func(b *testing.B) {
				var n atomic.Int64
				for b.Loop() {
					d, err := Open(context.Background(), uri, append([]Option{WithCounter(&n)}, opts...)...)
					if err != nil {
						b.Fatal(err)
					}
					unit(b, d, index, session)
					d.Close()
				}
				b.ReportMetric(float64(n.Load())/float64(b.N), "tpm-cmds/unit")
			})
		}
	}
	b.Run("swtpm", func(b *testing.B) {
		testutil.RequireTool(b, "swtpm", "swtpm_setup", "swtpm_localca")
		s := testutil.StartSwtpm(b, testutil.WithEKCert())
		compare(b, s.URI, 0x01c00016, WithFlushStale(true))
	})
	b.Run("simulator", func(b *testing.B) {
		compare(b, "sim", 0x01c0000a, WithSimulator(simulator.Open))
	})
}

// A run killed with its session loaded leaves it in swtpm (it survives the connection, as transient objects do): the
// next Open WithFlushStale flushes it.
func TestSessionStaleFlushed(t *testing.T) {
	testutil.RequireTool(t, "swtpm")
	s := testutil.StartSwtpm(t)
	killed := openUnchecked(t, s.URI)
	startSession(t, killed, 0)
	killed.mu.Lock()
	killed.l.close() // the process dies: no flush
	killed.mu.Unlock()
	plain := openUnchecked(t, s.URI)
	if hs := sessions(t, plain); len(hs) != 1 {
		t.Fatalf("sessions after the killed run: %#x, want its one", hs)
	}
	plain.Close()
	fresh := openUnchecked(t, s.URI, WithFlushStale(true))
	if hs := sessions(t, fresh); len(hs) != 0 {
		t.Fatalf("sessions after WithFlushStale: %#x", hs)
	}
}
