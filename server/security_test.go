package server

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/internal/testutil"
)

const testToken = "s3cret-token-0123456789abcdef"

// pki is a throw-away CA with a server certificate for 127.0.0.1 and a client certificate, written as files.
type pki struct {
	ca                          *testutil.CA
	cert, key, clientCA, tokenF string
	client                      tls.Certificate
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	dir := t.TempDir()
	p := &pki{ca: testutil.NewCA(t, "serve test"), cert: filepath.Join(dir, "srv.crt"), key: filepath.Join(dir, "srv.key"),
		clientCA: filepath.Join(dir, "clients.crt"), tokenF: filepath.Join(dir, "token")}
	sk := testutil.ECKey()
	testutil.WritePEM(t, p.cert, p.ca.Issue(t, sk.Public(), "127.0.0.1", true, "127.0.0.1"), p.ca.Issuing)
	testutil.WritePEM(t, p.key, sk)
	testutil.WritePEM(t, p.clientCA, p.ca.Root)
	ck := testutil.ECKey()
	p.client = tls.Certificate{Certificate: [][]byte{p.ca.Issue(t, ck.Public(), "supervisor", false).Raw, p.ca.Issuing.Raw},
		PrivateKey: ck}
	if err := os.WriteFile(p.tokenF, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// start runs a Server on a loopback listener; stop cancels its context and returns what Serve returned (failing the
// test when Serve takes more than 10 s to stop).
func start(t *testing.T, cfg Config) (addr string, stop func() error) {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	s, err := New(newFake(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ln, err := s.Listen(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, ln) }()
	return ln.Addr().String(), func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not stop after cancel")
			return nil
		}
	}
}

// serve starts a Server for the rest of the test and returns its https URL.
func serve(t *testing.T, cfg Config) string {
	t.Helper()
	addr, stop := start(t, cfg)
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Serve after cancel: %v", err)
		}
	})
	return "https://" + addr
}

// client verifies the server against the test CA (never InsecureSkipVerify), presenting certs.
func (p *pki) httpClient(certs ...tls.Certificate) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: p.ca.Pool(), Certificates: certs}}}
}

func TestInsecureConfigRefused(t *testing.T) {
	p := newPKI(t)
	tests := []struct {
		name string
		cfg  Config
		want error // nil: accepted
	}{
		{"default", Config{}, nil},
		{"loopback v4", Config{Listen: "127.0.0.1:0"}, nil},
		{"loopback 127/8", Config{Listen: "127.1.2.3:9000"}, nil},
		{"loopback v6", Config{Listen: "[::1]:0"}, nil},
		{"localhost", Config{Listen: "localhost:8080"}, nil},
		{"every interface", Config{Listen: ":8080"}, ErrInsecure},
		{"0.0.0.0", Config{Listen: "0.0.0.0:8080"}, ErrInsecure},
		{"::", Config{Listen: "[::]:8080"}, ErrInsecure},
		{"lan address", Config{Listen: "10.0.0.7:8080"}, ErrInsecure},
		{"host name", Config{Listen: "station.example:8080"}, ErrInsecure},
		{"TLS without auth", Config{Listen: "0.0.0.0:8080", TLSCert: p.cert, TLSKey: p.key}, ErrInsecure},
		{"token without TLS", Config{Listen: "0.0.0.0:8080", TokenFile: p.tokenF}, ErrInsecure},
		{"TLS and token", Config{Listen: "0.0.0.0:8080", TLSCert: p.cert, TLSKey: p.key, TokenFile: p.tokenF}, nil},
		{"TLS and client CA", Config{Listen: "0.0.0.0:8080", TLSCert: p.cert, TLSKey: p.key, ClientCA: p.clientCA}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(newFake(), tt.cfg)
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Errorf("New: %v, want %v", err, tt.want)
			}
		})
	}
}

func TestBadSecurityFiles(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	open := filepath.Join(dir, "token-644")
	short := filepath.Join(dir, "token-short")
	os.WriteFile(open, []byte(testToken), 0o644)
	os.WriteFile(short, []byte("abc\n"), 0o600)
	withTLS := func(c Config) Config { c.Listen, c.TLSCert, c.TLSKey = "0.0.0.0:8443", p.cert, p.key; return c }
	tests := []struct {
		name     string
		cfg      Config
		insecure bool
	}{
		{"token readable by others", withTLS(Config{TokenFile: open}), true},
		{"short token", withTLS(Config{TokenFile: short}), true},
		{"missing token file", withTLS(Config{TokenFile: filepath.Join(dir, "none")}), false},
		{"both authentications", withTLS(Config{TokenFile: p.tokenF, ClientCA: p.clientCA}), false},
		{"client CA not PEM", withTLS(Config{ClientCA: p.tokenF}), false},
		{"key without certificate", Config{TLSKey: p.key}, false},
		{"client CA without TLS", Config{ClientCA: p.clientCA}, false},
		{"no port", Config{Listen: "127.0.0.1"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(newFake(), tt.cfg)
			if err == nil || errors.Is(err, ErrInsecure) != tt.insecure {
				t.Errorf("New: %v (want an error, insecure %v)", err, tt.insecure)
			}
		})
	}
}

func TestServeRefusesExposedListener(t *testing.T) {
	s, err := New(newFake(), Config{})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(context.Background(), ln); !errors.Is(err, ErrInsecure) {
		t.Errorf("Serve on %s: %v, want ErrInsecure", ln.Addr(), err)
	}
}

func TestTLSToken(t *testing.T) {
	p := newPKI(t)
	base := serve(t, Config{TLSCert: p.cert, TLSKey: p.key, TokenFile: p.tokenF})
	c := p.httpClient()
	for _, tt := range []struct {
		name, auth string
		want       int
	}{
		{"no token", "", 401},
		{"wrong token", "Bearer " + strings.Repeat("x", len(testToken)), 401},
		{"token as basic", "Basic " + testToken, 401},
		{"right token", "Bearer " + testToken, 200},
	} {
		for _, path := range []string{"/api/stations", "/metrics", "/"} {
			req, _ := http.NewRequest("GET", base+path, nil)
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			resp, err := c.Do(req)
			if err != nil {
				t.Fatalf("%s %s: %v", tt.name, path, err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("%s %s: status %d, want %d", tt.name, path, resp.StatusCode, tt.want)
			}
		}
	}
	// A browser signs in with the form: the wrong token is refused, the right one sets a cookie that opens the page.
	resp, err := c.PostForm(base+"/login", url.Values{"token": {"nope"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || len(resp.Cookies()) != 0 {
		t.Errorf("wrong login: %d %v", resp.StatusCode, resp.Cookies())
	}
	resp, err = c.PostForm(base+"/login", url.Values{"token": {testToken}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	cookies := resp.Cookies()
	if resp.StatusCode != http.StatusSeeOther || len(cookies) != 1 || !cookies[0].HttpOnly || !cookies[0].Secure ||
		cookies[0].SameSite != http.SameSiteStrictMode {
		t.Fatalf("login: %d %v", resp.StatusCode, cookies)
	}
	req, _ := http.NewRequest("GET", base+"/", nil)
	req.AddCookie(cookies[0])
	if resp, err = c.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("dashboard with the login cookie: %d", resp.StatusCode)
	}
}

func TestTLSClientCertificate(t *testing.T) {
	p := newPKI(t)
	base := serve(t, Config{TLSCert: p.cert, TLSKey: p.key, ClientCA: p.clientCA})
	if _, err := p.httpClient().Get(base + "/api/stations"); err == nil {
		t.Error("no client certificate: the request went through")
	}
	other := testutil.NewCA(t, "someone else")
	ok := testutil.ECKey()
	stranger := tls.Certificate{Certificate: [][]byte{other.Issue(t, ok.Public(), "stranger", false).Raw, other.Issuing.Raw}, PrivateKey: ok}
	if _, err := p.httpClient(stranger).Get(base + "/api/stations"); err == nil {
		t.Error("a client certificate from another CA: the request went through")
	}
	resp, err := p.httpClient(p.client).Get(base + "/api/stations")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("with the client certificate: %d", resp.StatusCode)
	}
}

func TestServeStopsOnCancel(t *testing.T) {
	addr, stop := start(t, Config{})
	resp, err := http.Get("http://" + addr + "/api/stations")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if err := stop(); err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("still listening after Serve returned")
	}
}
