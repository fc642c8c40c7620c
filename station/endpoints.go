package station

import (
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"provision/station/ca"
	"provision/station/handshake"
)

// EndpointForms says in words which handshake endpoints the station takes.
const EndpointForms = handshake.Forms

// ErrEndpoint: a handshake endpoint or its CA file is unusable (a usage error: exit 2).
var ErrEndpoint = errors.New("bad handshake endpoint")

// CheckEndpoint checks one handshake endpoint URL as the handshake step takes it (handshake.ParseEndpoint): a known
// scheme, a host, and a port where the scheme has no default.
func CheckEndpoint(s string) error {
	if _, err := handshake.ParseEndpoint(s); err != nil {
		return fmt.Errorf("%v: %w", err, ErrEndpoint)
	}
	return nil
}

// HandshakeConfig is where the handshake step goes and how it verifies the servers. unit, tui and batch all resolve it
// the same way (Station.HandshakeConfig), so a PASS on the line means the same thing whichever front end showed it.
type HandshakeConfig struct {
	Endpoints []string       // empty: the built-in loopback server
	CA        *x509.CertPool // the servers are verified against this (unused for the built-in server)
	CAFile    string         // where CA came from, for the operator's header
	Timeout   time.Duration  // bounds each endpoint's test; 0: the handshake package's default (10 s)
}

func (h HandshakeConfig) options() []handshake.Option {
	if h.Timeout > 0 {
		return []handshake.Option{handshake.WithTimeout(h.Timeout)}
	}
	return nil
}

// String says in a few words what the handshake tests, for headers and logs.
func (h HandshakeConfig) String() string {
	if len(h.Endpoints) == 0 {
		return "built-in loopback server"
	}
	return strings.Join(h.Endpoints, ", ") + " (server CA " + h.CAFile + ")"
}

// HandshakeConfig resolves the handshake step's targets: endpoints given on the command line replace station.yaml's
// `endpoints:`; caFile (--endpoint-ca) replaces station.yaml's `endpoint_ca:`, which defaults to `server_ca:`, which
// defaults to the station root: the station checks servers with what the device will check them with. Errors wrap
// ErrEndpoint (exit 2).
func (s *Station) HandshakeConfig(endpoints []string, caFile string) (HandshakeConfig, error) {
	if len(endpoints) == 0 {
		endpoints = s.Config.Endpoints
	}
	for _, e := range endpoints {
		if err := CheckEndpoint(e); err != nil {
			return HandshakeConfig{}, err
		}
	}
	h := HandshakeConfig{Endpoints: endpoints}
	path, shown := caFile, caFile
	if path == "" {
		shown = s.Config.EndpointCA
		if shown == "" {
			shown = s.Config.ServerCA
		}
		if shown == "" {
			shown = "ca/root.crt"
		}
		p, err := s.Layout.StationFile("endpoint_ca", shown)
		if err != nil {
			return HandshakeConfig{}, fmt.Errorf("%w: %w", err, ErrEndpoint)
		}
		path = p
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return HandshakeConfig{}, fmt.Errorf("endpoint CA %s: %v: %w", shown, err, ErrEndpoint)
	}
	certs, err := ca.ParseCerts(b)
	if err != nil {
		return HandshakeConfig{}, fmt.Errorf("endpoint CA %s: %v: %w", shown, err, ErrEndpoint)
	}
	h.CA, h.CAFile = x509.NewCertPool(), shown
	for _, c := range certs {
		h.CA.AddCert(c)
	}
	return h, nil
}
