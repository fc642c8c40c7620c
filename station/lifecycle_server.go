package station

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"provision/internal/fsutil"
	"provision/station/ca"
)

// The server CA: the station's self-signed server root (ca/server-root.crt, key ca/server-root.key 0600), separate
// from the device root, that issues TLS server certificates for the fleet's broker or proxy. It is made on first use
// (`provision ca server-cert`); devices trust it when station.yaml says server_ca: ca/server-root.crt.

func (l Layout) ServerRootCert() string { return filepath.Join(l.Dir, "ca", "server-root.crt") }
func (l Layout) ServerRootKey() string  { return filepath.Join(l.Dir, "ca", "server-root.key") }

// Server certificate directory files (`provision ca server-cert --out DIR`).
const (
	ServerCertFile     = "server.crt"
	ServerKeyFile      = "server.key"
	ServerCAFile       = "ca.crt"        // the server root: what devices verify the server with
	ServerClientCAFile = "client-ca.crt" // the device chain (issuing CA, root): what the server verifies devices with
)

// MakeServerRoot makes the station's server root (ca/server-root.crt, key ca/server-root.key 0600, encrypted with
// passphrase when set) unless it exists; created reports whether it did. For init, and on first use.
func MakeServerRoot(l Layout, stationID string, passphrase []byte) (sca *ca.ServerCA, created bool, err error) {
	if _, err := os.Stat(l.ServerRootCert()); err == nil {
		return nil, false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, false, fmt.Errorf("server CA: %w: %v", ErrCA, err)
	}
	g, err := ca.GenerateServerRoot(stationID, time.Time{})
	if err != nil {
		return nil, false, err
	}
	key, err := ca.MarshalKey(g.Signer, passphrase)
	if err != nil {
		return nil, false, err
	}
	if err := fsutil.WriteFileSync(l.ServerRootKey(), key, 0o600); err != nil {
		return nil, false, fmt.Errorf("server CA: %w", err)
	}
	if err := fsutil.WriteFileSync(l.ServerRootCert(), ca.EncodeCerts(g.Root), 0o644); err != nil {
		return nil, false, fmt.Errorf("server CA: %w", err)
	}
	return g, true, nil
}

// ServerRoot loads the server root, making it first when the station has none (created reports that). The key is
// encrypted at rest with passphrase, as the CA keys are.
func (s *Station) ServerRoot(passphrase []byte) (sca *ca.ServerCA, created bool, err error) {
	l := s.Layout
	if sca, created, err := MakeServerRoot(l, s.Config.StationID, passphrase); err != nil || created {
		return sca, created, err
	}
	certPEM, err := os.ReadFile(l.ServerRootCert())
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %v", ErrCA, err)
	}
	certs, err := ca.ParseCerts(certPEM)
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %s: %v", ErrCA, l.ServerRootCert(), err)
	}
	st, err := os.Stat(l.ServerRootKey())
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %v", ErrCA, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, false, fmt.Errorf("server CA: %w: %s is readable by others (mode %04o): run chmod 600 on it", ErrCA, l.ServerRootKey(), st.Mode().Perm())
	}
	kb, err := os.ReadFile(l.ServerRootKey())
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %v", ErrCA, err)
	}
	key, err := ca.ParseKey(kb, passphrase)
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %s: %w", ErrCA, l.ServerRootKey(), err)
	}
	sca, err = ca.NewServerCA(certs[0], key)
	if err != nil {
		return nil, false, fmt.Errorf("server CA: %w: %w", ErrCA, err)
	}
	return sca, false, nil
}

// ServerCertResult says what IssueServerCert wrote.
type ServerCertResult struct {
	Dir           string
	Serial        string
	RootCreated   bool   // the server root was made now
	ServerCAInUse bool   // station.yaml server_ca names the server root
	ServerCAFile  string // station.yaml server_ca as it is
}

// IssueServerCert issues a TLS server certificate (serverAuth; SANs dnsNames and ips; a new P-256 key) from the
// server root and writes OutDir/server.crt, server.key (0600), ca.crt (the server root) and client-ca.crt (the
// device chain, for the server's client verification). The device issuing CA never signs it.
func (s *Station) IssueServerCert(passphrase []byte, dnsNames []string, ips []net.IP, outDir string) (*ServerCertResult, error) {
	sca, created, err := s.ServerRoot(passphrase)
	if err != nil {
		return nil, err
	}
	if s.CA == nil {
		return nil, fmt.Errorf("server certificate: %w: the CA is not loaded", ErrCA)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	cert, err := sca.SignServer(key.Public(), dnsNames, ips, 0)
	if err != nil {
		return nil, err
	}
	keyPEM, err := ca.MarshalKey(key, nil)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return nil, err
	}
	for _, f := range []pendingFile{
		{filepath.Join(outDir, ServerKeyFile), keyPEM, 0o600},
		{filepath.Join(outDir, ServerCertFile), ca.EncodeCerts(cert), 0o644},
		{filepath.Join(outDir, ServerCAFile), ca.EncodeCerts(sca.Root), 0o644},
		{filepath.Join(outDir, ServerClientCAFile), ca.EncodeCerts(s.CA.Chain()...), 0o644},
	} {
		if err := fsutil.WriteFileSync(f.path, f.data, f.mode); err != nil {
			return nil, err
		}
		if err := os.Chmod(f.path, f.mode); err != nil { // an existing file keeps its mode otherwise
			return nil, err
		}
	}
	return &ServerCertResult{Dir: outDir, Serial: CertSerial(cert), RootCreated: created, ServerCAFile: s.Config.ServerCA,
		ServerCAInUse: filepath.Clean(s.Config.ServerCA) == filepath.Join("ca", "server-root.crt")}, nil
}

// BrokerConfig is the mosquitto configuration for a broker using the files of `provision ca server-cert --out dir`:
// TLS on port, the server certificate, client certificates required and checked against the device chain and the
// station's CRL (crl.pem, refreshed by provision crl: mosquitto reads it at start and on SIGHUP), the certificate's CN
// as the MQTT user name.
func (s *Station) BrokerConfig(dir string, port int) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	crl, err := filepath.Abs(s.Layout.CRLPEMFile())
	if err != nil {
		return "", err
	}
	lines := []string{
		fmt.Sprintf("# mosquitto listener for the devices of station %s (provision ca broker-config)", s.Config.StationID),
		fmt.Sprintf("listener %d", port),
		"cafile " + filepath.Join(abs, ServerClientCAFile),
		"certfile " + filepath.Join(abs, ServerCertFile),
		"keyfile " + filepath.Join(abs, ServerKeyFile),
		"crlfile " + crl,
		"require_certificate true",
		"use_identity_as_username true",
		"tls_version tlsv1.2",
	}
	return strings.Join(lines, "\n") + "\n", nil
}
