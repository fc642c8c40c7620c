// Package station is the per-unit pipeline: it turns a serial into a key, a certificate and (later) a verified image,
// recording every step in the inventory.
package station

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"provision/internal/fsutil"
	"provision/inventory"
	"provision/station/ca"
	"provision/station/handshake"
	"provision/tpm/attest"
)

var (
	// ErrNotInitialised: the station directory has no station.yaml.
	ErrNotInitialised = errors.New("station is not initialised")
	// ErrExists: init found a station already there.
	ErrExists = errors.New("station already exists")
	// ErrCA: the CA files are missing, unreadable, insecure or inconsistent.
	ErrCA = errors.New("station CA unusable")
	// ErrRefused: the inventory refuses the unit (it holds an active certificate, or is shippable).
	ErrRefused = errors.New("refused by the inventory")
)

// Layout names the files of a station directory (docs/station.md).
type Layout struct{ Dir string }

func (l Layout) Config() string      { return filepath.Join(l.Dir, "station.yaml") }
func (l Layout) RootCert() string    { return filepath.Join(l.Dir, "ca", "root.crt") }
func (l Layout) RootKey() string     { return filepath.Join(l.Dir, "ca", "root.key") }
func (l Layout) IssuingCert() string { return filepath.Join(l.Dir, "ca", "issuing.crt") }
func (l Layout) IssuingKey() string  { return filepath.Join(l.Dir, "ca", "issuing.key") }
func (l Layout) Inventory() string   { return filepath.Join(l.Dir, "inventory.db") }
func (l Layout) AuditHead() string   { return filepath.Join(l.Dir, "audit.head") }
func (l Layout) AuditKey() string    { return filepath.Join(l.Dir, "ca", "audit.key") }
func (l Layout) AuditPub() string    { return filepath.Join(l.Dir, "ca", "audit.pub") }

// Station is an opened station directory.
type Station struct {
	Layout Layout
	Config *Config
	Inv    *inventory.DB
	CA     *ca.CA // nil until LoadCA
	Log    *slog.Logger
	// ExtraTPMRoots are folders of trusted TPM vendor roots besides the built-in set and tpm_roots (--tpm-roots).
	ExtraTPMRoots []string

	syncMu  sync.Mutex   // one Sync at a time
	central *centralLink // nil: no central store (central.go)

	rootsOnce sync.Once // TPMRoots
	roots     *attest.Roots
	rootsErr  error

	// Test hooks: another step table, a step's function, another sink (nil: the unit table, the image sink).
	machine    machine
	extraSteps map[Step]func(context.Context, *run) (string, error)
	sink       sink

	srvOnce sync.Once // the built-in handshake server, started on first use
	srv     *handshake.Server
	srvErr  error
}

// Open reads station.yaml and opens the inventory. The CA is loaded separately (LoadCA), since only some commands sign.
func Open(ctx context.Context, dir string, log *slog.Logger) (*Station, error) {
	l := Layout{dir}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	data, err := os.ReadFile(l.Config())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("station %s: %w: run `provision init --station %s` first", dir, ErrNotInitialised, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("station %s: %w", dir, err)
	}
	cfg, err := ParseConfig(l.Config(), data)
	if err != nil {
		return nil, err
	}
	auditOpts, err := auditOptions(l)
	if err != nil {
		return nil, fmt.Errorf("station %s: %w", dir, err)
	}
	inv, err := inventory.Open(ctx, l.Inventory(), append(auditOpts, inventory.WithAuditHead(l.AuditHead()), inventory.WithStateRule(AuditStateRule))...)
	if err != nil {
		return nil, fmt.Errorf("station %s: %w", dir, err)
	}
	return &Station{Layout: l, Config: cfg, Inv: inv, Log: log}, nil
}

// Exit releases what a one-shot command holds without closing the inventory, for a process about to exit: closing
// the last connection makes SQLite checkpoint its WAL into the database (two more fsyncs, 5-10 ms here, more than a
// whole enroll), while every commit is already durable in the WAL (synchronous=FULL) and the next open replays it,
// SQLite's ordinary recovery. Long-running front ends (TUI, batch) and tests use Close.
func (s *Station) Exit() {
	s.closeServer()
	s.CloseCentral()
}

// Close stops the built-in handshake server and closes the inventory.
func (s *Station) Close() error {
	s.closeServer()
	s.CloseCentral()
	return s.Inv.Close()
}

// LoadCA reads ca/root.crt, ca/issuing.crt and ca/issuing.key. The key must not be readable by group or others.
func (s *Station) LoadCA(passphrase []byte) error {
	c, err := loadCA(s.Layout, passphrase)
	if err != nil {
		return err
	}
	s.CA = c
	return nil
}

func loadCA(l Layout, passphrase []byte) (*ca.CA, error) {
	readCert := func(path string) (*x509.Certificate, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrCA, err)
		}
		certs, err := ca.ParseCerts(b)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrCA, path, err)
		}
		return certs[0], nil
	}
	root, err := readCert(l.RootCert())
	if err != nil {
		return nil, err
	}
	iss, err := readCert(l.IssuingCert())
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(l.IssuingKey())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCA, err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s is readable by others (mode %04o): run chmod 600 on it", ErrCA, l.IssuingKey(), st.Mode().Perm())
	}
	kb, err := os.ReadFile(l.IssuingKey())
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCA, err)
	}
	key, err := ca.ParseKey(kb, passphrase)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrCA, l.IssuingKey(), err)
	}
	c, err := ca.Load(root, iss, key)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrCA, err)
	}
	return c, nil
}

// InitOptions configure Init.
type InitOptions struct {
	StationID  string // default: host name
	TPM        string // default TPM URI in station.yaml; default /dev/tpmrm0
	Force      bool   // replace an existing station whose inventory is empty
	Passphrase []byte // encrypt CA keys at rest
	// Import an existing issuing CA instead of generating one (PEM contents).
	ImportCert, ImportKey, ImportRoot []byte
	Now                               time.Time
}

// InitResult says what Init made.
type InitResult struct {
	Dir          string
	Root         *x509.Certificate
	Issuing      *x509.Certificate
	RootKeyFile  string // empty when the root was imported
	KeyEncrypted bool
	AuditPub     string // the station audit public key file
	TPM          string // the TPM URI written to station.yaml
	ServerCA     string // server_ca as written to station.yaml
	// Warnings are things the operator should act on (an imported issuing CA that may vouch for servers).
	Warnings []string
}

// Init creates a station directory: CA, inventory and, last, station.yaml (so an interrupted init is simply run again).
func Init(ctx context.Context, dir string, opt InitOptions) (*InitResult, error) {
	l := Layout{dir}
	if _, err := os.Stat(l.Config()); err == nil {
		if !opt.Force {
			return nil, fmt.Errorf("init %s: %w (use --force to replace a station whose inventory is empty)", dir, ErrExists)
		}
		if err := refuseNonEmpty(ctx, l); err != nil {
			return nil, err
		}
	}
	if opt.StationID == "" {
		h, _ := os.Hostname()
		opt.StationID = sanitizeID(h)
	}
	cfg := DefaultConfig(opt.StationID)
	if opt.TPM != "" {
		cfg.TPM = opt.TPM
	}
	if _, err := ParseConfig("station.yaml", cfg.Marshal()); err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "ca"), 0o700); err != nil {
		return nil, fmt.Errorf("init %s: %w", dir, err)
	}
	res := &InitResult{Dir: dir, KeyEncrypted: len(opt.Passphrase) > 0, AuditPub: l.AuditPub(), TPM: cfg.TPM, ServerCA: cfg.ServerCA}
	var files []pendingFile
	if opt.ImportCert != nil || opt.ImportKey != nil || opt.ImportRoot != nil {
		c, err := importCA(opt)
		if err != nil {
			return nil, err
		}
		key, err := ca.MarshalKey(c.Signer, opt.Passphrase)
		if err != nil {
			return nil, err
		}
		res.Root, res.Issuing = c.Root, c.Issuing
		if !ca.ClientAuthOnly(c.Issuing) {
			res.Warnings = append(res.Warnings, fmt.Sprintf("the imported issuing CA %q is not constrained to client authentication "+
				"(extended key usage clientAuth only): this station's online key could issue certificates that servers' clients "+
				"accept; ask for an issuing CA with extendedKeyUsage = clientAuth", c.Issuing.Subject.CommonName))
		}
		files = append(files, pendingFile{l.IssuingKey(), key, 0o600})
		os.Remove(l.RootKey()) // a replaced station's own root key must not linger next to an imported CA
	} else {
		g, err := ca.Generate(opt.StationID, opt.Now)
		if err != nil {
			return nil, err
		}
		issKey, err := ca.MarshalKey(g.CA.Signer, opt.Passphrase)
		if err != nil {
			return nil, err
		}
		rootKey, err := ca.MarshalKey(g.RootKey, opt.Passphrase)
		if err != nil {
			return nil, err
		}
		res.Root, res.Issuing, res.RootKeyFile = g.CA.Root, g.CA.Issuing, l.RootKey()
		files = append(files, pendingFile{l.IssuingKey(), issKey, 0o600}, pendingFile{l.RootKey(), rootKey, 0o600})
	}
	files = append(files, pendingFile{l.RootCert(), ca.EncodeCerts(res.Root), 0o644},
		pendingFile{l.IssuingCert(), ca.EncodeCerts(res.Issuing), 0o644})
	for _, f := range files {
		if err := fsutil.WriteFileSync(f.path, f.data, f.mode); err != nil {
			return nil, fmt.Errorf("init: write %s: %w", f.path, err)
		}
	}
	for _, p := range []string{l.Inventory(), l.Inventory() + "-wal", l.Inventory() + "-shm", l.AuditHead()} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("init: %w", err)
		}
	}
	// The audit key signs the head from the first entry on; init writes the first (empty) head.
	auditKey, err := generateAuditKey(l)
	if err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	inv, err := inventory.Open(ctx, l.Inventory(), inventory.Create(), inventory.WithAuditHead(l.AuditHead()), inventory.WithAuditKey(auditKey))
	if err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	err = inv.InitHead(ctx)
	inv.Close()
	if err != nil {
		return nil, fmt.Errorf("init: %w", err)
	}
	if err := fsutil.WriteFileSync(l.Config(), cfg.Marshal(), 0o644); err != nil {
		return nil, fmt.Errorf("init: write %s: %w", l.Config(), err)
	}
	return res, nil
}

type pendingFile struct {
	path string
	data []byte
	mode os.FileMode
}

func refuseNonEmpty(ctx context.Context, l Layout) error {
	inv, err := inventory.Open(ctx, l.Inventory())
	if errors.Is(err, inventory.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("init %s: --force needs a readable inventory to prove it is empty: %w", l.Dir, err)
	}
	defer inv.Close()
	n, err := inv.UnitCount(ctx)
	if err != nil {
		return fmt.Errorf("init %s: %w", l.Dir, err)
	}
	if n > 0 {
		return fmt.Errorf("init %s: %w and its inventory holds %d unit(s): refusing to replace its CA and records", l.Dir, ErrExists, n)
	}
	return nil
}

func importCA(opt InitOptions) (*ca.CA, error) {
	if opt.ImportCert == nil || opt.ImportKey == nil || opt.ImportRoot == nil {
		return nil, fmt.Errorf("init: importing a CA needs --ca-cert, --ca-key and --ca-root together: %w", ErrCA)
	}
	iss, err := ca.ParseCerts(opt.ImportCert)
	if err != nil {
		return nil, fmt.Errorf("init: --ca-cert: %v: %w", err, ErrCA)
	}
	root, err := ca.ParseCerts(opt.ImportRoot)
	if err != nil {
		return nil, fmt.Errorf("init: --ca-root: %v: %w", err, ErrCA)
	}
	key, err := ca.ParseKey(opt.ImportKey, opt.Passphrase)
	if err != nil {
		return nil, fmt.Errorf("init: --ca-key: %w: %w", err, ErrCA)
	}
	c, err := ca.New(root[0], iss[0], key)
	if err != nil {
		return nil, fmt.Errorf("init: %w: %w", err, ErrCA)
	}
	return c, nil
}

func sanitizeID(s string) string {
	out := make([]rune, 0, len(s))
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '_', c == '-':
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		return "station"
	}
	if len(out) > 64 {
		out = out[:64]
	}
	return string(out)
}

func (s *Station) closeServer() {
	if s.srv != nil {
		s.srv.Close()
		s.srv = nil
	}
}
