package handshake

import (
	"crypto"
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
type Server struct {
	l      net.Listener
	roots  *x509.CertPool
	mu     sync.Mutex
	expect map[[32]byte]int
	wg     sync.WaitGroup
}

// NewServer listens on 127.0.0.1 with a fresh P-256 server certificate for localhost/127.0.0.1/::1 (valid one hour)
// issued by issuer (the station's issuing CA), accepting client certificates that chain to clientRoots.
func NewServer(issuerCert *x509.Certificate, issuerKey crypto.Signer, clientRoots, clientIntermediates *x509.CertPool) (*Server, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "provision built-in handshake server"},
		NotBefore: now.Add(-5 * time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuerCert, key.Public(), issuerKey)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server certificate: %w", err)
	}
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der, issuerCert.Raw}, PrivateKey: key}},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    clientRoots,
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		return nil, fmt.Errorf("handshake: built-in server: %w", err)
	}
	s := &Server{l: l, roots: clientRoots, expect: map[[32]byte]int{}}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

// URL is the server's endpoint, tls://127.0.0.1:PORT.
func (s *Server) URL() string { return "tls://" + s.l.Addr().String() }

// Roots is what a client trusts to verify this server (the station root).
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
