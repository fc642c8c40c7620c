// Package server owns the HTTP side of `provision serve`: the read-only JSON API over the central store (units, one
// unit's history, stations), Prometheus /metrics (a collector that reads the store's Stats on each scrape, on a private
// registry), the line supervisor's dashboard (server-rendered HTML with embedded CSS, complete on first render and
// refreshed by polling), and the CRL hook. It reads the store through Source, which *central.Store satisfies.
//
// Security: loopback by default. A listen address that is not loopback is refused (ErrInsecure) unless the server has a
// TLS certificate and authenticates its clients, by a client certificate from ClientCA (mTLS) or by a bearer token read
// from a file only its owner can read. docs/api.md documents the paths, parameters and JSON fields.
package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"provision/central"
)

// Source is what the server reads: the central store's queries.
type Source interface {
	Units(ctx context.Context, f central.UnitFilter) ([]central.Unit, string, error)
	Unit(ctx context.Context, serial string) (central.UnitDetail, error)
	Stations(ctx context.Context) ([]central.StationInfo, error)
	Stats(ctx context.Context) (central.Stats, error)
	Conflicts(ctx context.Context, limit int) ([]central.Conflict, error)
}

var _ Source = (*central.Store)(nil)

// RecentSource is a Source that also lists the units updated last (newest first). It is optional: with it, the
// dashboard shows the latest units and each station's last unit.
type RecentSource interface {
	RecentUnits(ctx context.Context, limit int) ([]central.Unit, error)
}

// ErrInsecure: the configuration would expose the store without TLS and client authentication (a listen address that
// is not loopback without them, or a token file others can read). The CLI maps it to exit 2.
var ErrInsecure = errors.New("insecure serve configuration")

// DefaultListen is the listen address when Config.Listen is empty.
const DefaultListen = "127.0.0.1:8080"

// Config is how the server listens and whom it lets in.
type Config struct {
	Listen string // host:port; default DefaultListen

	TLSCert, TLSKey string // PEM files: serve HTTPS
	ClientCA        string // PEM file: require a client certificate issued by one of these CAs (needs TLS)
	TokenFile       string // file holding the bearer token (mode 0600 or stricter); exclusive with ClientCA

	// CRL returns the DER CRL of a station (issue #13); nil, or an error wrapping central.ErrNotFound, answers 404.
	CRL func(stationID string) ([]byte, error)

	Refresh     time.Duration    // dashboard polling interval; default 10 s
	SilentAfter time.Duration    // a station whose last sync is older is flagged silent; default 5 min
	Timeout     time.Duration    // bound on each request's (and scrape's) store queries; default 10 s
	Now         func() time.Time // default time.Now
	Logger      *slog.Logger     // store errors are logged here, not shown to clients; default discards
}

// Server serves the API, metrics and dashboard of one Source.
type Server struct {
	src     Source
	cfg     Config
	tls     *tls.Config // nil: plain HTTP (loopback only)
	token   []byte      // SHA-256 of the bearer token; nil: no token auth
	handler http.Handler
}

// New checks cfg (ErrInsecure for an exposed address without TLS and client authentication), loads the TLS files and
// the token, and builds the handler.
func New(src Source, cfg Config) (*Server, error) {
	if cfg.Listen == "" {
		cfg.Listen = DefaultListen
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = 10 * time.Second
	}
	if cfg.SilentAfter <= 0 {
		cfg.SilentAfter = 5 * time.Minute
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{src: src, cfg: cfg}
	host, _, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("serve: listen address %q: %w", cfg.Listen, err)
	}
	if err := s.checkExposure(host, cfg.Listen); err != nil {
		return nil, err
	}
	if (cfg.TLSCert == "") != (cfg.TLSKey == "") {
		return nil, errors.New("serve: a TLS certificate needs its key, and a key its certificate")
	}
	if cfg.ClientCA != "" && cfg.TokenFile != "" {
		return nil, errors.New("serve: choose one client authentication: a client CA or a token file")
	}
	if cfg.ClientCA != "" && cfg.TLSCert == "" {
		return nil, errors.New("serve: client certificates need TLS (a certificate and key)")
	}
	if cfg.TLSCert != "" {
		if s.tls, err = loadTLS(cfg); err != nil {
			return nil, err
		}
	}
	if cfg.TokenFile != "" {
		if s.token, err = loadToken(cfg.TokenFile); err != nil {
			return nil, err
		}
	}
	s.handler = s.routes()
	return s, nil
}

// checkExposure refuses to serve addr, whose host is host, when it is not loopback and the server lacks TLS or
// client authentication.
func (s *Server) checkExposure(host, addr string) error {
	if isLoopback(host) || (s.cfg.TLSCert != "" && (s.cfg.ClientCA != "" || s.cfg.TokenFile != "")) {
		return nil
	}
	return fmt.Errorf("serve: listening on %s (not loopback) needs TLS (a certificate and its key) and client "+
		"authentication (a client CA or a token file): %w", addr, ErrInsecure)
}

// isLoopback says whether host names only this machine: 127.0.0.0/8, ::1 or "localhost". The empty host and the
// unspecified addresses mean every interface; any other name may resolve anywhere.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"))
	return ip != nil && ip.IsLoopback()
}

// loadTLS reads the server's certificate and, with ClientCA, requires and verifies client certificates.
func loadTLS(cfg Config) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("serve: TLS certificate: %w", err)
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if cfg.ClientCA != "" {
		pem, err := os.ReadFile(cfg.ClientCA)
		if err != nil {
			return nil, fmt.Errorf("serve: client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("serve: client CA %s holds no PEM certificate", cfg.ClientCA)
		}
		tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return tc, nil
}

// Handler is the server's HTTP handler (authentication included), for tests and for embedding.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves on ln (with TLS when configured) until ctx is cancelled, then shuts down gracefully (in-flight requests
// get a few seconds) and returns nil. A listener that is not on loopback is refused as New refuses the address.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if tcp, ok := ln.Addr().(*net.TCPAddr); ok && !tcp.IP.IsLoopback() {
		if err := s.checkExposure(tcp.IP.String(), tcp.String()); err != nil {
			ln.Close()
			return err
		}
	}
	srv := &http.Server{
		Handler:           s.handler,
		TLSConfig:         s.tls,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       15 * time.Second,
		WriteTimeout:      s.cfg.Timeout + 20*time.Second,
		IdleTimeout:       60 * time.Second,
		MaxHeaderBytes:    32 << 10,
		ErrorLog:          slog.NewLogLogger(s.cfg.Logger.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() {
		select {
		case <-ctx.Done():
		case <-stop:
			done <- nil
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := srv.Shutdown(sctx)
		if err != nil {
			srv.Close()
			err = fmt.Errorf("serve: shutdown: %w", err)
		}
		done <- err
	}()
	var err error
	if s.tls != nil {
		err = srv.ServeTLS(ln, "", "")
	} else {
		err = srv.Serve(ln)
	}
	if !errors.Is(err, http.ErrServerClosed) {
		close(stop)
		srv.Close()
		<-done
		return fmt.Errorf("serve: %w", err)
	}
	return <-done
}

// Listen opens Config.Listen, for a caller that wants the bound address (port 0) before serving on it with Serve.
func (s *Server) Listen(ctx context.Context) (net.Listener, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", s.cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("serve: %w", err)
	}
	return ln, nil
}

// ListenAndServe listens on Config.Listen and serves until ctx is cancelled.
func (s *Server) ListenAndServe(ctx context.Context) error {
	ln, err := s.Listen(ctx)
	if err != nil {
		return err
	}
	return s.Serve(ctx, ln)
}
