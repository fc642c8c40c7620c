package handshake

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"provision/internal/testutil"
)

// client is a unit's identity: a client certificate from the station's issuing CA for key.
func client(t testing.TB, c *testutil.CA, key crypto.Signer, cn string) Client {
	return Client{Certificate: c.Issue(t, key.Public(), cn, false), Chain: []*x509.Certificate{c.Issuing}, Key: key, ClientID: cn}
}

func builtin(t *testing.T, ca *testutil.CA) *Server {
	t.Helper()
	s, err := NewServer(ca.Pool())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func wantReason(t *testing.T, err, reason error) {
	t.Helper()
	if !errors.Is(err, reason) {
		t.Fatalf("got %v, want %v", err, reason)
	}
	if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "handshake with") {
		t.Fatalf("message %q is not one line naming the endpoint", err)
	}
}

func TestBuiltinServer(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	srv := builtin(t, ca)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, key := range []crypto.Signer{testutil.ECKey(), rsaKey} {
		c := client(t, ca, key, "device-1")
		done := srv.Expect(c.Certificate)
		res, err := Test(context.Background(), srv.URL(), srv.Roots(), c)
		done()
		if err != nil {
			t.Fatalf("%T: %v", key, err)
		}
		if res.TLSVersion != "TLS 1.3" || res.Protocol != "tls" || res.Detail != "accepted" {
			t.Fatalf("result %+v", res)
		}
	}
	// A valid certificate of the station, but not the one just issued.
	expected := client(t, ca, testutil.ECKey(), "device-2")
	other := client(t, ca, testutil.ECKey(), "device-3")
	done := srv.Expect(expected.Certificate)
	_, err := Test(context.Background(), srv.URL(), srv.Roots(), other)
	done()
	wantReason(t, err, ErrClientRejected)
	if !strings.Contains(err.Error(), "not the one just issued") {
		t.Fatalf("reason lost: %v", err)
	}
	// A certificate from another CA: the TLS layer rejects it.
	foreign := client(t, testutil.NewCA(t, "other"), testutil.ECKey(), "device-4")
	_, err = Test(context.Background(), srv.URL(), srv.Roots(), foreign)
	wantReason(t, err, ErrClientRejected)
	// A client that does not trust the station root refuses the server.
	_, err = Test(context.Background(), srv.URL(), testutil.NewCA(t, "x").Pool(), client(t, ca, testutil.ECKey(), "device-5"))
	wantReason(t, err, ErrServerUntrusted)
}

func TestBuiltinConcurrent(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	srv := builtin(t, ca)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := client(t, ca, testutil.ECKey(), fmt.Sprintf("device-%d", i))
			done := srv.Expect(c.Certificate)
			defer done()
			_, err := Test(context.Background(), srv.URL(), srv.Roots(), c)
			errs <- err
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestConnectionFailures(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	c := client(t, ca, testutil.ECKey(), "device-1")
	ctx := context.Background()
	// Nothing listens.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	_, err := Test(ctx, "tls://"+addr, ca.Pool(), c)
	wantReason(t, err, ErrUnreachable)
	// A listener that accepts and never speaks.
	stall, _ := net.Listen("tcp", "127.0.0.1:0")
	defer stall.Close()
	go func() {
		for {
			c, err := stall.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	start := time.Now()
	_, err = Test(ctx, "tls://"+stall.Addr().String(), ca.Pool(), c, WithTimeout(300*time.Millisecond))
	wantReason(t, err, ErrTimeout)
	if time.Since(start) > 3*time.Second {
		t.Fatalf("timeout took %s", time.Since(start))
	}
	// Bad endpoints.
	for _, ep := range []string{"ftp://x:1", "tls://nohost", "mqtts://h", "::"} {
		_, err := Test(ctx, ep, ca.Pool(), c)
		wantReason(t, err, ErrBadEndpoint)
	}
}

// tlsServer runs a Go TLS server with the given config; after each handshake it calls after with the connection
// (nil: answer "hi" when the handshake succeeded) and then closes it.
func tlsServer(t *testing.T, cfg *tls.Config, after func(*tls.Conn)) string {
	t.Helper()
	if after == nil {
		after = func(c *tls.Conn) {
			if c.Handshake() == nil {
				c.Write([]byte("hi\n"))
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				after(c.(*tls.Conn))
			}()
		}
	}()
	return "tls://" + l.Addr().String()
}

func TestServerSideProblems(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	c := client(t, ca, testutil.ECKey(), "device-1")
	sk := testutil.ECKey()
	serverFor := func(names ...string) tls.Certificate {
		return tls.Certificate{Certificate: [][]byte{ca.Issue(t, sk.Public(), "server", true, names...).Raw, ca.Issuing.Raw}, PrivateKey: sk}
	}
	// Not doing mTLS at all.
	ep := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("127.0.0.1")}}, nil)
	_, err := Test(context.Background(), ep, ca.Pool(), c)
	wantReason(t, err, ErrNoClientCertRequested)
	// A server certificate for another name.
	ep = tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("broker.example")}, ClientAuth: tls.RequireAnyClientCert}, nil)
	_, err = Test(context.Background(), ep, ca.Pool(), c)
	wantReason(t, err, ErrHostnameMismatch)
	// A correct mTLS server.
	ep = tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("127.0.0.1")}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()}, nil)
	res, err := Test(context.Background(), ep, ca.Pool(), c)
	if err != nil || res.TLSVersion != "TLS 1.3" {
		t.Fatalf("%+v %v", res, err)
	}
}

func BenchmarkBuiltin(b *testing.B) {
	ca := testutil.NewCA(b, "station")
	srv, err := NewServer(ca.Pool())
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	c := client(b, ca, testutil.ECKey(), "device-1")
	done := srv.Expect(c.Certificate)
	defer done()
	for b.Loop() {
		if _, err := Test(context.Background(), srv.URL(), srv.Roots(), c); err != nil {
			b.Fatal(err)
		}
	}
}

// failingSigner is a unit's key whose TPM went away: every signature fails.
type failingSigner struct {
	crypto.Signer
	err error
}

func (f failingSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, f.err }

// A key that cannot sign (its TPM unreachable, or an answer that failed its session check) is the unit's key failing,
// not the server refusing us: the reason says so and the key's own error stays in the chain. (Before: "protocol step
// failed … TLS worked; the application protocol refused us", and the TPM's error was lost.)
func TestKeyFailsToSign(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	srv := builtin(t, ca)
	tpmGone := errors.New("TPM at cmd:ssh unit tpm2_send: process exited (exit status 255)")
	c := client(t, ca, testutil.ECKey(), "device-1")
	c.Key = failingSigner{c.Key, tpmGone}
	done := srv.Expect(c.Certificate)
	_, err := Test(context.Background(), srv.URL(), srv.Roots(), c)
	done()
	wantReason(t, err, ErrKeyFailed)
	if !errors.Is(err, tpmGone) || strings.Contains(err.Error(), "application protocol") || !strings.Contains(err.Error(), "exit status 255") {
		t.Fatalf("got %v", err)
	}
}
