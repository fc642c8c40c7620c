package tpm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"provision/internal/testutil"
	"provision/simulator"
)

// openSim opens the in-process simulator and fails the test if any transient object is left at the end, besides
// the SRK the device keeps until Close.
func openSim(tb testing.TB, opts ...Option) *Device {
	tb.Helper()
	return openChecked(tb, "sim", append([]Option{WithSimulator(simulator.Open)}, opts...)...)
}

func openSwtpm(tb testing.TB, s *testutil.Swtpm, opts ...Option) *Device {
	tb.Helper()
	return openChecked(tb, s.URI, append([]Option{WithFlushStale(true)}, opts...)...)
}

// openChecked opens the TPM at uri and, at cleanup, checks for leaked transient objects and closes it.
func openChecked(tb testing.TB, uri string, opts ...Option) *Device {
	tb.Helper()
	d, err := Open(context.Background(), uri, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		checkNoLeaks(tb, d)
		d.Close()
	})
	return d
}

func checkNoLeaks(tb testing.TB, d *Device) {
	tb.Helper()
	hs, err := d.TransientHandles(context.Background())
	if err != nil {
		tb.Errorf("list handles: %v", err)
		return
	}
	want := 0
	if d.srkUp {
		want = 1
	}
	if len(hs) != want {
		tb.Errorf("transient handles left: %#x (want %d: the SRK only)", hs, want)
	}
}

func signVerify(t *testing.T, k *Key) {
	t.Helper()
	msg := []byte("provision")
	sum := sha256.Sum256(msg)
	switch pub := k.Public().(type) {
	case *ecdsa.PublicKey:
		sig, err := k.Sign(rand.Reader, sum[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if !ecdsa.VerifyASN1(pub, sum[:], sig) {
			t.Fatal("ECDSA signature does not verify")
		}
	case *rsa.PublicKey:
		sig, err := k.Sign(rand.Reader, sum[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, sum[:], sig); err != nil {
			t.Fatal(err)
		}
		sig, err = k.Sign(rand.Reader, sum[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256})
		if err != nil {
			t.Fatal(err)
		}
		if err := rsa.VerifyPSS(pub, crypto.SHA256, sum[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
			t.Fatal(err)
		}
	default:
		t.Fatalf("public key %T", pub)
	}
	// A wrong digest length is refused before the TPM sees it.
	if _, err := k.Sign(rand.Reader, sum[:20], crypto.SHA256); err == nil {
		t.Fatal("short digest signed")
	}
}

func testKeys(t *testing.T, d *Device) {
	ctx := context.Background()
	for _, alg := range []Algorithm{ECCP256, RSA2048} {
		t.Run(string(alg), func(t *testing.T) {
			k, err := d.CreateKey(ctx, alg)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			if k.Kind() != KindTPM || k.FileName() != "device.tss2.pem" {
				t.Fatalf("kind %s file %s", k.Kind(), k.FileName())
			}
			signVerify(t, k)
			// The key cannot leave the TPM.
			fixedTPM, fixedParent, sdo, err := k.Attributes()
			if err != nil || !fixedTPM || !fixedParent || !sdo {
				t.Fatalf("attributes fixedTPM=%v fixedParent=%v sensitiveDataOrigin=%v err=%v", fixedTPM, fixedParent, sdo, err)
			}
			// The TPM refuses to duplicate it.
			d.mu.Lock()
			_, derr := tpm2.Duplicate{
				ObjectHandle:    tpm2.AuthHandle{Handle: k.handle, Name: k.name, Auth: tpm2.PasswordAuth(nil)},
				NewParentHandle: tpm2.TPMRHNull,
				Symmetric:       tpm2.TPMTSymDef{Algorithm: tpm2.TPMAlgNull},
			}.Execute(d.l.with(ctx))
			d.mu.Unlock()
			if derr == nil {
				t.Fatal("TPM duplicated a fixedTPM/fixedParent key")
			}
			// The key file round-trips on the same TPM, and its public part is readable without one.
			pemBytes, err := k.PEM()
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(pemBytes), "BEGIN TSS2 PRIVATE KEY") {
				t.Fatalf("not a TSS2 key file:\n%s", pemBytes)
			}
			pub, err := PublicFromPEM(pemBytes)
			if err != nil || !publicEqual(pub, k.Public()) {
				t.Fatalf("PublicFromPEM: %v", err)
			}
			k2, err := LoadKeyFile(ctx, d, pemBytes)
			if err != nil {
				t.Fatal(err)
			}
			signVerify(t, k2)
			k2.Close()
			// CSR and a TLS 1.3 handshake with the TPM key as the client key.
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "dev"}}, k)
			if err != nil {
				t.Fatal(err)
			}
			csr, _ := x509.ParseCertificateRequest(der)
			if err := csr.CheckSignature(); err != nil {
				t.Fatal(err)
			}
			tlsHandshake(t, k)
		})
	}
}

func TestSimulatorKeys(t *testing.T) { testKeys(t, openSim(t)) }

func TestSwtpmKeys(t *testing.T) {
	s := testutil.StartSwtpm(t)
	testKeys(t, openSwtpm(t, s))
}

// A killed run on a TPM without a resource manager leaves transient objects; Open with WithFlushStale clears them so
// the next run is not blocked by the TPM's 3 object slots.
func TestSwtpmStaleTransients(t *testing.T) {
	s := testutil.StartSwtpm(t)
	ctx := context.Background()
	raw, err := Open(ctx, s.URI)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := (tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHOwner, InPublic: tpm2.New2B(tpm2.ECCSRKTemplate)}).Execute(raw.l.with(ctx)); err != nil {
			t.Fatal(err)
		}
	}
	raw.l.close() // dropped without flushing, as kill -9 would
	// Without the flush the TPM is full.
	full, err := Open(ctx, s.URI)
	if err != nil {
		t.Fatal(err)
	}
	_, err = full.CreateKey(ctx, ECCP256)
	if !errors.Is(err, ErrObjectMemory) {
		t.Fatalf("full TPM: got %v, want ErrObjectMemory", err)
	}
	full.l.close()
	d := openSwtpm(t, s)
	for i := 0; i < 5; i++ {
		k, err := d.CreateKey(ctx, ECCP256)
		if err != nil {
			t.Fatalf("key %d: %v", i, err)
		}
		k.Close()
	}
}

func TestNoLeakOnFailure(t *testing.T) {
	d := openSim(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := d.CreateKey(ctx, ECCP256); err == nil {
		t.Fatal("cancelled context ignored")
	}
	k, err := d.CreateKey(context.Background(), ECCP256)
	if err != nil {
		t.Fatal(err)
	}
	k.Close()
	k.Close() // idempotent
	if _, err := k.Sign(rand.Reader, make([]byte, 32), crypto.SHA256); err == nil {
		t.Fatal("closed key signed")
	}
	if _, err := LoadKeyFile(context.Background(), d, []byte("-----BEGIN TSS2 PRIVATE KEY-----\nAAAA\n-----END TSS2 PRIVATE KEY-----\n")); err == nil {
		t.Fatal("garbage key file loaded")
	}
}

func TestSoftKeys(t *testing.T) {
	d, err := Open(context.Background(), "soft")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, alg := range []Algorithm{ECCP256, RSA2048} {
		k, err := d.CreateKey(context.Background(), alg)
		if err != nil {
			t.Fatal(err)
		}
		if k.Kind() != KindSoft || k.FileName() != "device.key" {
			t.Fatalf("kind %s file %s", k.Kind(), k.FileName())
		}
		p, err := k.PEM()
		if err != nil || !strings.Contains(string(p), "BEGIN PRIVATE KEY") {
			t.Fatalf("PEM: %v", err)
		}
		pub, err := PublicFromPEM(p)
		if err != nil || !publicEqual(pub, k.Public()) {
			t.Fatalf("PublicFromPEM: %v", err)
		}
		if ek, err := d.EKCertificate(context.Background()); ek != nil || err != nil {
			t.Fatalf("soft EK: %v %v", ek, err)
		}
	}
}

func TestEKCertificate(t *testing.T) {
	d := openSim(t)
	// The simulator is manufactured with an ECC EK certificate.
	if ek, err := d.EKCertificate(context.Background()); err != nil || len(ek) < 100 || ek[0] != 0x30 {
		t.Fatalf("simulator EK certificate: %x, %v", ek, err)
	}
	s := testutil.StartSwtpm(t, testutil.WithEKCert())
	dev := openSwtpm(t, s)
	ek, err := dev.EKCertificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(ek) < 100 || ek[0] != 0x30 {
		t.Fatalf("EK certificate %x", ek)
	}
	if c, err := x509.ParseCertificate(ek); err == nil && len(c.UnhandledCriticalExtensions) == 0 && c.PublicKey == nil {
		t.Fatal("EK certificate without a key")
	}
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	start := time.Now()
	_, err := Open(ctx, "mssim://127.0.0.1:1")
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "mssim://127.0.0.1:1") {
		t.Fatalf("got %v, want ErrUnreachable naming the URI", err)
	}
	if time.Since(start) > DialTimeout+time.Second {
		t.Fatalf("took %s", time.Since(start))
	}
	// A port that accepts and never answers is not a TPM: bounded by DialTimeout for the dial only, then the first
	// command; covered by the transport's own deadline.
	for _, uri := range []string{"tcp://x", "mssim://nohostport", "mssim://:1", "relative/path", ""} {
		if _, err := Open(ctx, uri); !errors.Is(err, ErrBadURI) {
			t.Errorf("Open(%q) = %v, want ErrBadURI", uri, err)
		}
	}
	if _, err := Open(ctx, "/dev/no-such-tpm"); !errors.Is(err, ErrUnreachable) {
		t.Errorf("missing device: %v", err)
	}
	if _, err := Open(ctx, "sim"); !errors.Is(err, ErrBadURI) {
		t.Errorf("sim without a simulator: %v", err)
	}
}

func TestMapErr(t *testing.T) {
	if err := mapErr("x", tpm2.TPMRCLockout); !errors.Is(err, ErrLockout) {
		t.Errorf("lockout: %v", err)
	}
	if err := mapErr("x", tpm2.TPMRCObjectMemory); !errors.Is(err, ErrObjectMemory) {
		t.Errorf("object memory: %v", err)
	}
}

// tlsHandshake runs TLS 1.3 with client authentication in-process, the client key being k.
func tlsHandshake(t *testing.T, k crypto.Signer) {
	t.Helper()
	ca := testutil.NewCA(t, "test")
	srvKey := testutil.ECKey()
	srvCert := ca.Issue(t, srvKey.Public(), "server", true, "127.0.0.1")
	cliCert := ca.Issue(t, k.Public(), "device", false)
	pool := ca.Pool()
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS13, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: pool, Certificates: []tls.Certificate{{Certificate: [][]byte{srvCert.Raw, ca.Issuing.Raw}, PrivateKey: srvKey}}})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- err
			return
		}
		defer c.Close()
		err = c.(*tls.Conn).Handshake()
		if err == nil && len(c.(*tls.Conn).ConnectionState().PeerCertificates) == 0 {
			err = errors.New("no client certificate")
		}
		if err == nil {
			_, err = c.Write([]byte("ok"))
		}
		got <- err
	}()
	c, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool,
		Certificates: []tls.Certificate{{Certificate: [][]byte{cliCert.Raw, ca.Issuing.Raw}, PrivateKey: k}}})
	if err != nil {
		t.Fatalf("TLS 1.3 with the TPM key: %v", err)
	}
	buf := make([]byte, 2)
	c.Read(buf)
	c.Close()
	if err := <-got; err != nil {
		t.Fatalf("server: %v", err)
	}
}

func BenchmarkCreateKey(b *testing.B) {
	for _, tc := range []struct {
		uri string
		alg Algorithm
	}{{"soft", ECCP256}, {"sim", ECCP256}, {"sim", RSA2048}} {
		b.Run(tc.uri+"/"+string(tc.alg), func(b *testing.B) {
			var n atomic.Int64
			d, err := Open(context.Background(), tc.uri, WithSimulator(simulator.Open), WithCounter(&n))
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			n.Store(0)
			for b.Loop() {
				k, err := d.CreateKey(context.Background(), tc.alg)
				if err != nil {
					b.Fatal(err)
				}
				k.Close()
			}
			b.ReportMetric(float64(n.Load())/float64(b.N), "tpm-cmds/key")
		})
	}
}

func publicEqual(a, b crypto.PublicKey) bool {
	type eq interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(eq)
	return ok && e.Equal(b)
}
