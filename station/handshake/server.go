package handshake

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"sync"
	"time"
)

// Server is the built-in mTLS test server on loopback: TLS 1.3 only, a client certificate required and verified
// against the station root, and — when Expect was called — exactly one of the expected certificates accepted. It tells
// the client its verdict in one line after the handshake ("OK" or "REJECTED <reason>"), so a rejection shows on the
// client side with its reason.
//
// The server's own certificate comes from a throwaway CA made in memory for this server alone (never the station's
// issuing CA, whose key vouches only for devices). Its leaf is renewed while the server runs, before it expires, so a
// station that runs for days keeps passing handshakes.
type Server struct {
	l      net.Listener
	roots  *x509.CertPool // trusts the throwaway CA only
	mu     sync.Mutex
	expect map[[32]byte]int
	wg     sync.WaitGroup

	caCert   *x509.Certificate
	caKey    *ecdsa.PrivateKey
	validity time.Duration
	now      func() time.Time
	leafMu   sync.Mutex
	leaf     *tls.Certificate
}

type serverOptions struct {
	validity time.Duration
	now      func() time.Time
}

// ServerOption configures NewServer.
type ServerOption func(*serverOptions)

// WithLeafValidity sets how long each server certificate is valid (default one hour); it is renewed when less than
// half of that is left.
func WithLeafValidity(d time.Duration) ServerOption { return func(o *serverOptions) { o.validity = d } }

// WithServerClock sets the clock the server renews its certificate by (tests).
func WithServerClock(now func() time.Time) ServerOption {
	return func(o *serverOptions) { o.now = now }
}

// NewServer listens on 127.0.0.1, accepting client certificates that chain to clientRoots (the client sends its
// intermediates). It makes its own P-256 CA in memory (server authentication only, gone with the process) and
// serves a certificate from it for localhost/127.0.0.1/::1, renewed before it expires; Roots is what a client trusts.
func NewServer(clientRoots *x509.CertPool, opts ...ServerOption) (*Server, error) {
	o := serverOptions{validity: time.Hour, now: time.Now}
	for _, opt := range opts {
		opt(&o)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server CA key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server CA: %w", err)
	}
	now := o.now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "provision built-in handshake server CA (throwaway)"},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.AddDate(100, 0, 0),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server CA: %w", err)
	}
	caCert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server CA: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(caCert)
	s := &Server{roots: roots, expect: map[[32]byte]int{}, caCert: caCert, caKey: caKey, validity: o.validity, now: o.now}
	if _, err := s.certificate(); err != nil {
		return nil, err
	}
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return s.certificate() },
		ClientAuth:     tls.RequireAndVerifyClientCert,
		ClientCAs:      clientRoots,
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server: %w", err)
	}
	s.l = l
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// certificate is the current server certificate, renewed when less than half its validity is left.
func (s *Server) certificate() (*tls.Certificate, error) {
	s.leafMu.Lock()
	defer s.leafMu.Unlock()
	now := s.now()
	if s.leaf != nil && now.Before(s.leaf.Leaf.NotAfter.Add(-s.validity/2)) {
		return s.leaf, nil
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server certificate: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server certificate: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "provision built-in handshake server"},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(s.validity),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.caCert, key.Public(), s.caKey)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server certificate: %w", err)
	}
	s.leaf = &tls.Certificate{Certificate: [][]byte{der, s.caCert.Raw}, PrivateKey: key, Leaf: leaf}
	return s.leaf, nil
}

// URL is the server's endpoint, tls://127.0.0.1:PORT.
func (s *Server) URL() string { return "tls://" + s.l.Addr().String() }

// Roots is what a client trusts to verify this server: the server's throwaway CA.
func (s *Server) Roots() *x509.CertPool { return s.roots }

// Expect makes the server accept exactly this certificate (among others expected at the same time) until done.
func (s *Server) Expect(cert *x509.Certificate) (done func()) {
	fp := sha256.Sum256(cert.Raw)
	s.mu.Lock()
	s.expect[fp]++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if s.expect[fp]--; s.expect[fp] <= 0 {
				delete(s.expect, fp)
			}
			s.mu.Unlock()
		})
	}
}

// Close stops the server.
func (s *Server) Close() error {
	err := s.l.Close()
	s.wg.Wait()
	return err
}

func (s *Server) serve() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.handle(c.(*tls.Conn))
		}()
	}
}

func (s *Server) handle(c *tls.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.Handshake(); err != nil {
		return // the client sees the alert
	}
	peers := c.ConnectionState().PeerCertificates
	if len(peers) == 0 {
		c.Write([]byte("REJECTED no client certificate\n"))
		return
	}
	fp := sha256.Sum256(peers[0].Raw)
	s.mu.Lock()
	ok := len(s.expect) == 0 || s.expect[fp] > 0
	s.mu.Unlock()
	if !ok {
		fmt.Fprintf(c, "REJECTED certificate %x (%s) is not the one just issued\n", peers[0].SerialNumber, peers[0].Subject.CommonName)
		return
	}
	c.Write([]byte("OK\n"))
}
