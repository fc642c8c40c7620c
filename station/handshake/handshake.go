// Package handshake proves a unit's identity works: a live mTLS handshake with the issued certificate and the unit's
// key (TPM-resident in production), against a built-in loopback server or a real endpoint (tls://, mqtts://,
// https://). The server is always verified, against the given roots and the endpoint's host name. Failures come back
// in an operator's words with their cause.
package handshake

import (
	"bufio"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// Why a handshake failed; every error from Test wraps exactly one of these.
var (
	ErrServerUntrusted       = errors.New("the server's certificate is not trusted")
	ErrHostnameMismatch      = errors.New("the server's certificate is not valid for this host name")
	ErrClientRejected        = errors.New("the server rejected our certificate")
	ErrUnreachable           = errors.New("endpoint unreachable")
	ErrNameNotResolved       = errors.New("the endpoint's host name does not resolve")
	ErrTimeout               = errors.New("timed out")
	ErrNoClientCertRequested = errors.New("the server never asked for a client certificate")
	ErrProtocol              = errors.New("protocol step failed")
	ErrBadEndpoint           = errors.New("bad endpoint")
	ErrKeyFailed             = errors.New("the unit's key did not sign") // its TPM unreachable, or an answer altered
)

var advice = map[error]string{
	ErrServerUntrusted:       "check the endpoint CA (--endpoint-ca): it must be the CA that signed the server's certificate",
	ErrHostnameMismatch:      "check the endpoint address: use the name the server's certificate was issued for",
	ErrClientRejected:        "does the server trust the station CA? (e.g. the broker's cafile must hold the station chain)",
	ErrUnreachable:           "is the server running and the address and port right? check cabling and firewall",
	ErrNameNotResolved:       "check the endpoint's host name or the station's DNS",
	ErrTimeout:               "the endpoint did not answer in time: unreachable, overloaded, or not speaking TLS",
	ErrNoClientCertRequested: "the server is not doing mutual TLS: enable client certificates (e.g. require_certificate true)",
	ErrProtocol:              "TLS worked; the application protocol refused us",
	ErrBadEndpoint:           Forms,
	ErrKeyFailed:             "check the unit's TPM connection (fixture, cable), then run the unit again",
}

// Error is a failed handshake test.
type Error struct {
	Endpoint string
	Reason   error // one of the Err* values
	Detail   string
	Advice   string // what to do, when it is more precise than the reason's usual advice
	Cause    error
}

func (e *Error) Error() string {
	s := fmt.Sprintf("handshake with %s: %v", e.Endpoint, e.Reason)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	a := e.Advice
	if a == "" {
		a = advice[e.Reason]
	}
	if a != "" {
		s += " (" + a + ")"
	}
	return s
}

func (e *Error) Unwrap() []error {
	if e.Cause != nil {
		return []error{e.Reason, e.Cause}
	}
	return []error{e.Reason}
}

// Client is what the unit presents.
type Client struct {
	Certificate *x509.Certificate   // the issued leaf
	Chain       []*x509.Certificate // intermediates sent after the leaf (the issuing CA)
	Key         crypto.Signer       // the unit's key
	ClientID    string              // MQTT client id; default the certificate's CN
}

// Result is a passed handshake test.
type Result struct {
	Endpoint   string
	Protocol   string // "tls", "mqtt", "https"
	TLSVersion string
	Duration   time.Duration
	Detail     string
}

type options struct {
	timeout  time.Duration
	minTLS12 bool
}

// Option configures Test.
type Option func(*options)

// WithTimeout bounds the whole test (default 10 s).
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithMinTLS12 accepts TLS 1.2 (for older brokers); TLS 1.3 is required otherwise.
func WithMinTLS12() Option { return func(o *options) { o.minTLS12 = true } }

// Test connects to endpoint presenting the client, verifying the server against roots and the endpoint's host name.
// A key that fails to sign fails the test with ErrKeyFailed, the key's own error in the chain (crypto/tls keeps only
// its text).
func Test(ctx context.Context, endpoint string, roots *x509.CertPool, c Client, opts ...Option) (Result, error) {
	var key *recordingSigner
	if c.Key != nil {
		key = &recordingSigner{Signer: c.Key}
		c.Key = key
	}
	res, err := test(ctx, endpoint, roots, c, opts...)
	if err != nil && key != nil {
		if kerr := key.failed(); kerr != nil {
			return Result{}, &Error{Endpoint: endpoint, Reason: ErrKeyFailed, Detail: kerr.Error(), Cause: kerr}
		}
	}
	return res, err
}

// recordingSigner keeps the first error of the unit's key.
type recordingSigner struct {
	crypto.Signer
	mu  sync.Mutex
	err error
}

func (s *recordingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := s.Signer.Sign(r, digest, opts)
	if err != nil {
		s.mu.Lock()
		if s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
	}
	return sig, err
}

func (s *recordingSigner) failed() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

func test(ctx context.Context, endpoint string, roots *x509.CertPool, c Client, opts ...Option) (Result, error) {
	o := options{timeout: 10 * time.Second}
	for _, opt := range opts {
		opt(&o)
	}
	fail := func(reason error, detail string, cause error) (Result, error) {
		return Result{}, &Error{Endpoint: endpoint, Reason: reason, Detail: detail, Cause: cause}
	}
	ep, err := ParseEndpoint(endpoint)
	if err != nil {
		detail := fmt.Sprintf("%q", endpoint)
		if ee := (*EndpointError)(nil); errors.As(err, &ee) && ee.Problem != "" {
			detail = ee.Problem
		}
		return fail(ErrBadEndpoint, detail, err)
	}
	if c.Certificate == nil || c.Key == nil {
		return fail(ErrBadEndpoint, "no client certificate or key", nil)
	}
	if roots == nil {
		return fail(ErrBadEndpoint, "no CA to verify the server with", nil)
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	start := time.Now()
	requested := false
	chain := [][]byte{c.Certificate.Raw}
	for _, ic := range c.Chain {
		chain = append(chain, ic.Raw)
	}
	cfg := &tls.Config{
		RootCAs:    roots,
		ServerName: ep.Host,
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			requested = true
			return &tls.Certificate{Certificate: chain, PrivateKey: c.Key, Leaf: c.Certificate}, nil
		},
	}
	if o.minTLS12 {
		cfg.MinVersion = tls.VersionTLS12
	}
	res := Result{Endpoint: endpoint}
	if ep.Scheme == "https" {
		return testHTTPS(ctx, ep.URL, cfg, &requested, res, start)
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", ep.Addr())
	if err != nil {
		return Result{}, classify(ctx, endpoint, err, false)
	}
	defer raw.Close()
	conn := tls.Client(raw, cfg)
	if err := conn.HandshakeContext(ctx); err != nil {
		return Result{}, classify(ctx, endpoint, err, requested)
	}
	if !requested {
		return fail(ErrNoClientCertRequested, "", nil)
	}
	res.TLSVersion = tls.VersionName(conn.ConnectionState().Version)
	if ep.Scheme == "mqtts" {
		return testMQTT(ctx, conn, c, res, start)
	}
	// TLS 1.3 finishes the client's handshake before the server has judged our certificate, so the server's reaction
	// is read before the verdict (tls:// has no application protocol to ask):
	//   - a TLS alert (bad_certificate, unknown_ca, certificate_required, ...): rejected, naming the alert;
	//   - the built-in server's line: "REJECTED <why>" is a rejection, "OK" an acceptance;
	//   - other data, a clean close (close_notify or FIN: io.EOF) or silence for verdictWait: accepted, saying so in
	//     the detail. A server that refuses a certificate says so with an alert; one that closes without an alert has
	//     no complaint (a TLS port that closes after the handshake, such as a health check);
	//   - a reset (RST) without an alert: rejected. An accepting server has no reason to abort the connection, and a
	//     false PASS ships a unit the server will not take, where a false FAIL costs a retry.
	deadline := time.Now().Add(verdictWait)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	conn.SetReadDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	line, err := bufio.NewReader(conn).ReadString('\n')
	switch {
	case strings.HasPrefix(line, "REJECTED"):
		return fail(ErrClientRejected, strings.TrimSpace(strings.TrimPrefix(line, "REJECTED")), nil)
	case strings.HasPrefix(line, "OK"):
		res.Detail = "accepted"
	case line != "":
		res.Detail = "the server sent data after the handshake, without an alert"
	case errors.Is(ctx.Err(), context.Canceled):
		return fail(ErrTimeout, "cancelled while waiting for the server's verdict", ctx.Err())
	case isTimeout(err):
		res.Detail = "no alert from the server"
	case errors.Is(err, io.EOF):
		res.Detail = "the server closed the connection without complaint (no alert) after the handshake"
	case errors.Is(err, syscall.ECONNRESET):
		return fail(ErrClientRejected, "the server reset the connection right after receiving our certificate, without an alert", err)
	default:
		return Result{}, classify(ctx, endpoint, err, true)
	}
	res.Protocol, res.Duration = "tls", time.Since(start)
	return res, nil
}

// verdictWait is how long a tls:// test waits after the handshake for the server's reaction to our certificate.
const verdictWait = 750 * time.Millisecond

func testMQTT(ctx context.Context, conn *tls.Conn, c Client, res Result, start time.Time) (Result, error) {
	id := c.ClientID
	if id == "" {
		id = c.Certificate.Subject.CommonName
	}
	cli := paho.NewClient(paho.ClientConfig{Conn: conn})
	ca, err := cli.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30})
	if err != nil {
		if ca != nil && ca.ReasonCode != 0 {
			return mqttRefused(res.Endpoint, ca.ReasonCode, ca.Properties)
		}
		e := classify(ctx, res.Endpoint, err, true)
		if e.Reason == ErrProtocol || errors.Is(err, io.EOF) {
			e.Reason, e.Detail, e.Advice = ErrClientRejected, "the broker closed the connection during CONNECT: "+err.Error(), ""
		}
		return Result{}, e
	}
	if ca.ReasonCode != 0 {
		return mqttRefused(res.Endpoint, ca.ReasonCode, ca.Properties)
	}
	cli.Disconnect(&paho.Disconnect{ReasonCode: 0})
	res.Protocol, res.Detail, res.Duration = "mqtt", "CONNACK 0", time.Since(start)
	return res, nil
}

func mqttRefused(endpoint string, code byte, props *paho.ConnackProperties) (Result, error) {
	detail := fmt.Sprintf("CONNACK reason %#x", code)
	if props != nil && props.ReasonString != "" {
		detail += " " + props.ReasonString
	}
	reason := ErrProtocol
	if code == 0x86 || code == 0x87 || code == 0x8a { // bad user name or password, not authorized, banned
		reason = ErrClientRejected
	}
	return Result{}, &Error{Endpoint: endpoint, Reason: reason, Detail: detail}
}

func testHTTPS(ctx context.Context, u *url.URL, cfg *tls.Config, requested *bool, res Result, start time.Time) (Result, error) {
	tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true, ForceAttemptHTTP2: false}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return Result{}, &Error{Endpoint: res.Endpoint, Reason: ErrBadEndpoint, Cause: err}
	}
	resp, err := (&http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}).Do(req)
	if err != nil {
		return Result{}, classify(ctx, res.Endpoint, err, *requested)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if !*requested {
		return Result{}, &Error{Endpoint: res.Endpoint, Reason: ErrNoClientCertRequested}
	}
	switch {
	case resp.StatusCode == 401 || resp.StatusCode == 403:
		return Result{}, &Error{Endpoint: res.Endpoint, Reason: ErrClientRejected, Detail: resp.Status}
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return Result{}, &Error{Endpoint: res.Endpoint, Reason: ErrProtocol, Detail: resp.Status}
	}
	res.Protocol, res.Detail, res.Duration = "https", "HTTP "+resp.Status, time.Since(start)
	if resp.TLS != nil {
		res.TLSVersion = tls.VersionName(resp.TLS.Version)
	}
	return res, nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded)
}

// classify names the cause of a connection or handshake error. sentCert says our certificate already went out.
func classify(ctx context.Context, endpoint string, err error, sentCert bool) *Error {
	reason, detail, advice := diagnose(ctx, err, sentCert)
	return &Error{Endpoint: endpoint, Reason: reason, Detail: detail, Advice: advice, Cause: err}
}

func diagnose(ctx context.Context, err error, sentCert bool) (reason error, detail, advice string) {
	var hostErr x509.HostnameError
	var authErr x509.UnknownAuthorityError
	var invErr x509.CertificateInvalidError
	var verErr *tls.CertificateVerificationError
	var alert tls.AlertError
	var dnsErr *net.DNSError
	var opErr *net.OpError
	switch {
	case errors.As(err, &hostErr):
		return ErrHostnameMismatch, hostErr.Error(), ""
	case errors.As(err, &authErr):
		return ErrServerUntrusted, "signed by an unknown authority", ""
	case errors.As(err, &invErr):
		return ErrServerUntrusted, invErr.Error(), ""
	case errors.As(err, &verErr):
		return ErrServerUntrusted, verErr.Err.Error(), ""
	case errors.As(err, &alert):
		switch alert {
		case 42, 43, 44, 45, 46, 48, 49, 116: // bad/unsupported/revoked/expired/unknown certificate, unknown CA, access denied, certificate required
			return ErrClientRejected, "TLS alert: " + alert.Error(), ""
		}
		return ErrProtocol, "TLS alert: " + alert.Error(), ""
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		// An alert the server sent (Go reports received alerts with an unexported type).
		msg := opErr.Err.Error()
		for _, a := range []string{"bad certificate", "unsupported certificate", "revoked certificate", "expired certificate",
			"unknown certificate", "access denied", "certificate required"} {
			if strings.Contains(msg, a) {
				return ErrClientRejected, "TLS alert from the server: " + strings.TrimPrefix(msg, "tls: "), ""
			}
		}
		return ErrProtocol, "TLS alert from the server: " + strings.TrimPrefix(msg, "tls: "), ""
	case errors.As(err, &dnsErr):
		// Before the timeout case: a DNS server that does not answer is a DNS problem, not a silent endpoint.
		why := dnsErr.Err
		if dnsErr.IsNotFound {
			why = "no such host"
		}
		return ErrNameNotResolved, fmt.Sprintf("cannot resolve host %s: %s", dnsErr.Name, why), ""
	case errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil || isTimeout(err):
		return ErrTimeout, "", ""
	case errors.Is(err, syscall.ECONNREFUSED):
		return ErrUnreachable, "connection refused", "the host answered but nothing listens on that port: is the server running and the port right?"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return ErrUnreachable, err.Error(), "no route to the host: check cabling, the station's network and firewall"
	case sentCert && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.ErrUnexpectedEOF)):
		return ErrClientRejected, "the server closed the connection after receiving our certificate", ""
	case strings.Contains(err.Error(), "tls:"):
		return ErrProtocol, err.Error(), ""
	}
	return ErrUnreachable, err.Error(), ""
}
