package handshake

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"provision/simulator"
)

// testCA is a root and an issuing CA, as a station has.
type testCA struct {
	root, issuing *x509.Certificate
	rootKey, key  crypto.Signer
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	rk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rt := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " Root"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	rd, _ := x509.CreateCertificate(rand.Reader, rt, rt, rk.Public(), rk)
	root, _ := x509.ParseCertificate(rd)
	ik, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	it := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: name + " Issuing"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, MaxPathLenZero: true}
	id, _ := x509.CreateCertificate(rand.Reader, it, root, ik.Public(), rk)
	iss, _ := x509.ParseCertificate(id)
	return &testCA{root: root, issuing: iss, rootKey: rk, key: ik}
}

func (c *testCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.root)
	return p
}

func (c *testCA) issue(t testing.TB, pub crypto.PublicKey, cn string, server bool, names ...string) *x509.Certificate {
	t.Helper()
	sn, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	tmpl := &x509.Certificate{SerialNumber: sn, Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		for _, n := range names {
			if ip := net.ParseIP(n); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, n)
			}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.issuing, pub, c.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return cert
}

func (c *testCA) client(t testing.TB, key crypto.Signer, cn string) Client {
	return Client{Certificate: c.issue(t, key.Public(), cn, false), Chain: []*x509.Certificate{c.issuing}, Key: key, ClientID: cn}
}

func ecKey() crypto.Signer { k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader); return k }

func builtin(t *testing.T, ca *testCA) *Server {
	t.Helper()
	s, err := NewServer(ca.pool())
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
	ca := newTestCA(t, "station")
	srv := builtin(t, ca)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	for _, key := range []crypto.Signer{ecKey(), rsaKey} {
		c := ca.client(t, key, "device-1")
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
	expected := ca.client(t, ecKey(), "device-2")
	other := ca.client(t, ecKey(), "device-3")
	done := srv.Expect(expected.Certificate)
	_, err := Test(context.Background(), srv.URL(), srv.Roots(), other)
	done()
	wantReason(t, err, ErrClientRejected)
	if !strings.Contains(err.Error(), "not the one just issued") {
		t.Fatalf("reason lost: %v", err)
	}
	// A certificate from another CA: the TLS layer rejects it.
	foreign := newTestCA(t, "other").client(t, ecKey(), "device-4")
	_, err = Test(context.Background(), srv.URL(), srv.Roots(), foreign)
	wantReason(t, err, ErrClientRejected)
	// A client that does not trust the station root refuses the server.
	_, err = Test(context.Background(), srv.URL(), newTestCA(t, "x").pool(), ca.client(t, ecKey(), "device-5"))
	wantReason(t, err, ErrServerUntrusted)
}

func TestBuiltinConcurrent(t *testing.T) {
	ca := newTestCA(t, "station")
	srv := builtin(t, ca)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			c := ca.client(t, ecKey(), fmt.Sprintf("device-%d", i))
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
	ca := newTestCA(t, "station")
	c := ca.client(t, ecKey(), "device-1")
	ctx := context.Background()
	// Nothing listens.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	_, err := Test(ctx, "tls://"+addr, ca.pool(), c)
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
	_, err = Test(ctx, "tls://"+stall.Addr().String(), ca.pool(), c, WithTimeout(300*time.Millisecond))
	wantReason(t, err, ErrTimeout)
	if time.Since(start) > 3*time.Second {
		t.Fatalf("timeout took %s", time.Since(start))
	}
	// Bad endpoints.
	for _, ep := range []string{"ftp://x:1", "tls://nohost", "mqtts://h", "::"} {
		_, err := Test(ctx, ep, ca.pool(), c)
		wantReason(t, err, ErrBadEndpoint)
	}
}

// tlsServer runs a Go TLS server with the given config, answering "hi" after the handshake.
func tlsServer(t *testing.T, cfg *tls.Config) string {
	t.Helper()
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
				if c.(*tls.Conn).Handshake() == nil {
					c.Write([]byte("hi\n"))
					time.Sleep(100 * time.Millisecond)
				}
			}()
		}
	}()
	return "tls://" + l.Addr().String()
}

func TestServerSideProblems(t *testing.T) {
	ca := newTestCA(t, "station")
	c := ca.client(t, ecKey(), "device-1")
	sk := ecKey()
	serverFor := func(names ...string) tls.Certificate {
		return tls.Certificate{Certificate: [][]byte{ca.issue(t, sk.Public(), "server", true, names...).Raw, ca.issuing.Raw}, PrivateKey: sk}
	}
	// Not doing mTLS at all.
	ep := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("127.0.0.1")}})
	_, err := Test(context.Background(), ep, ca.pool(), c)
	wantReason(t, err, ErrNoClientCertRequested)
	// A server certificate for another name.
	ep = tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("broker.example")}, ClientAuth: tls.RequireAnyClientCert})
	_, err = Test(context.Background(), ep, ca.pool(), c)
	wantReason(t, err, ErrHostnameMismatch)
	// A correct mTLS server.
	ep = tlsServer(t, &tls.Config{Certificates: []tls.Certificate{serverFor("127.0.0.1")}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.pool()})
	res, err := Test(context.Background(), ep, ca.pool(), c)
	if err != nil || res.TLSVersion != "TLS 1.3" {
		t.Fatalf("%+v %v", res, err)
	}
}

func writePEM(t *testing.T, path string, blocks ...any) {
	t.Helper()
	var buf bytes.Buffer
	for _, b := range blocks {
		switch v := b.(type) {
		case *x509.Certificate:
			pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: v.Raw})
		case crypto.Signer:
			der, _ := x509.MarshalPKCS8PrivateKey(v)
			pem.Encode(&buf, &pem.Block{Type: "PRIVATE KEY", Bytes: der})
		}
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func waitListen(t *testing.T, port int) {
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %d", port)
}

// mosquittoBroker starts mosquitto with mTLS on a free loopback port, trusting trustCA's chain.
func mosquittoBroker(t *testing.T, serverCA *testCA, trustCA *testCA) (port int, logFile string) {
	t.Helper()
	dir := t.TempDir()
	sk := ecKey()
	writePEM(t, filepath.Join(dir, "server.crt"), serverCA.issue(t, sk.Public(), "broker", true, "127.0.0.1", "localhost"), serverCA.issuing)
	writePEM(t, filepath.Join(dir, "server.key"), sk)
	writePEM(t, filepath.Join(dir, "ca.crt"), trustCA.root, trustCA.issuing)
	m := simulator.StartMosquitto(t, filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.crt"))
	return m.Port, m.Log
}

func TestMosquitto(t *testing.T) {
	station := newTestCA(t, "station")
	fleet := newTestCA(t, "fleet") // signs the broker's certificate
	ctx := context.Background()
	c := station.client(t, ecKey(), "device-SN-42")
	c.ClientID = "SN-42"

	port, logFile := mosquittoBroker(t, fleet, station)
	ep := fmt.Sprintf("mqtts://127.0.0.1:%d", port)
	res, err := Test(ctx, ep, fleet.pool(), c)
	if err != nil {
		t.Fatal(err)
	}
	if res.Detail != "CONNACK 0" || res.Protocol != "mqtt" {
		t.Fatalf("result %+v", res)
	}
	time.Sleep(100 * time.Millisecond)
	log, _ := os.ReadFile(logFile)
	if !strings.Contains(string(log), "device-SN-42") {
		t.Fatalf("broker log does not show the unit's CN:\n%s", log)
	}
	// The endpoint CA does not trust the broker: refused before our certificate is ever sent.
	before := strings.Count(string(log), "New client connected")
	_, err = Test(ctx, ep, station.pool(), c)
	wantReason(t, err, ErrServerUntrusted)
	time.Sleep(100 * time.Millisecond)
	log, _ = os.ReadFile(logFile)
	if strings.Count(string(log), "New client connected") != before {
		t.Fatal("a client connection completed with an untrusted broker")
	}

	// A broker trusting another CA rejects the unit.
	port2, _ := mosquittoBroker(t, fleet, newTestCA(t, "someone else"))
	_, err = Test(ctx, fmt.Sprintf("mqtts://127.0.0.1:%d", port2), fleet.pool(), c)
	wantReason(t, err, ErrClientRejected)
}

func TestHTTPSWithOpenSSL(t *testing.T) {
	simulator.RequireTool(t, "openssl")
	station := newTestCA(t, "station")
	dir := t.TempDir()
	sk := ecKey()
	writePEM(t, filepath.Join(dir, "srv.crt"), station.issue(t, sk.Public(), "server", true, "127.0.0.1"), station.issuing)
	writePEM(t, filepath.Join(dir, "srv.key"), sk)
	writePEM(t, filepath.Join(dir, "ca.crt"), station.root, station.issuing)
	start := func(verify bool) string {
		port := freePort(t)
		args := []string{"s_server", "-accept", fmt.Sprint(port), "-cert", filepath.Join(dir, "srv.crt"), "-key", filepath.Join(dir, "srv.key"),
			"-tls1_3", "-www", "-CAfile", filepath.Join(dir, "ca.crt")}
		if verify {
			args = append(args, "-Verify", "1", "-verify_return_error")
		}
		cmd := exec.Command("openssl", args...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitListen(t, port)
		return fmt.Sprintf("127.0.0.1:%d", port)
	}
	c := station.client(t, ecKey(), "device-1")
	addr := start(true)
	res, err := Test(context.Background(), "https://"+addr+"/", station.pool(), c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.Detail, "HTTP 200") {
		t.Fatalf("result %+v", res)
	}
	// The same server without -Verify does not ask for a client certificate: not mTLS.
	_, err = Test(context.Background(), "tls://"+start(false), station.pool(), c)
	wantReason(t, err, ErrNoClientCertRequested)
}

func BenchmarkBuiltin(b *testing.B) {
	ca := newTestCA(b, "station")
	srv, err := NewServer(ca.pool())
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	c := ca.client(b, ecKey(), "device-1")
	done := srv.Expect(c.Certificate)
	defer done()
	for b.Loop() {
		if _, err := Test(context.Background(), srv.URL(), srv.Roots(), c); err != nil {
			b.Fatal(err)
		}
	}
}
