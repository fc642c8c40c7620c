package station

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"provision/inventory"
	"provision/station/ca"
	"provision/tpm"
)

// Steps (docs/states.md). StepBundle is recorded in the audit log only: the enroll bundle written to disk.
const (
	StepValidate  = "validate"
	StepKey       = "key"
	StepCSR       = "csr"
	StepSign      = "sign"
	StepImage     = "image"
	StepVerify    = "verify"
	StepHandshake = "handshake"
	StepBundle    = "bundle"
)

// Bundle file names (docs/station.md).
const (
	BundleCert  = "device.crt"
	BundleChain = "chain.crt"
	BundleRoot  = "ca.crt"
)

// enrollGroup is how many units share one pair of inventory commits and one file-system sync.
const enrollGroup = 64

// EnrollOptions configure Enroll.
type EnrollOptions struct {
	OutDir      string // bundles go to OutDir/<serial>/
	Reprovision bool   // issue a new certificate to a unit that holds an active one (the old one is superseded)
	Operator    string
}

// UnitRequest is one unit to enroll.
type UnitRequest struct {
	Serial string
	Fields map[string]string // extra placeholders for the subject template

	line int // where a serial list had it
}

// EnrollResult is the outcome for one unit.
type EnrollResult struct {
	Serial       string
	State        string
	KeyKind      string
	PublicSHA256 string
	Certificate  *x509.Certificate
	CertSHA256   string
	EKCertSHA256 string
	Bundle       string
	Err          error // nil on success; wraps ErrRefused, ErrBadSerial or a *StepError
}

// StepError is a failed step of a unit.
type StepError struct {
	Serial string
	Step   string
	Err    error
}

func (e *StepError) Error() string { return fmt.Sprintf("unit %s: %s: %v", e.Serial, e.Step, e.Err) }
func (e *StepError) Unwrap() error { return e.Err }

// Enroll creates each unit's key on dev, has the CA certify it and writes its bundle. Per-unit outcomes are in the
// results (in request order); the error is set only when the station itself cannot go on (CA not loaded, inventory or TPM
// gone), in which case the results hold the units finished so far.
//
// Durability: a unit's certificate is recorded (synced) before its bundle exists; the unit becomes "certified" only after
// its bundle is on stable storage. An interrupted enroll leaves the unit "keyed" or "failed", which the next run enrolls
// again, superseding the certificate that never reached a finished bundle.
func (s *Station) Enroll(ctx context.Context, dev *tpm.Device, units []UnitRequest, opt EnrollOptions) ([]EnrollResult, error) {
	if s.CA == nil {
		return nil, fmt.Errorf("enroll: %w: CA not loaded", ErrCA)
	}
	if opt.OutDir == "" {
		return nil, errors.New("enroll: no output directory")
	}
	if err := os.MkdirAll(opt.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("enroll: output directory: %w", err)
	}
	removeStaleTemps(opt.OutDir)
	alg, err := tpm.ParseAlgorithm(s.Config.Key.Algorithm)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	ekSHA := ""
	if ek, err := dev.EKCertificate(ctx); err != nil {
		return nil, fmt.Errorf("enroll: read EK certificate: %w", err)
	} else if ek != nil {
		sum := sha256.Sum256(ek)
		ekSHA = hex.EncodeToString(sum[:])
	}
	var results []EnrollResult
	for start := 0; start < len(units); start += enrollGroup {
		end := min(start+enrollGroup, len(units))
		rs, err := s.enrollGroup(ctx, dev, alg, ekSHA, units[start:end], opt)
		results = append(results, rs...)
		if err != nil {
			return results, err
		}
	}
	return results, nil
}

// prepared is a unit whose certificate is issued but whose bundle is not written yet.
type prepared struct {
	res      EnrollResult
	keyPEM   []byte
	keyFile  string
	steps    []inventory.Event
	failed   *StepError
	bundleMS int64
	fields   map[string]string
}

func (s *Station) enrollGroup(ctx context.Context, dev *tpm.Device, alg tpm.Algorithm, ekSHA string, units []UnitRequest, opt EnrollOptions) ([]EnrollResult, error) {
	preps := make([]*prepared, 0, len(units))
	var fatal error
	for _, u := range units {
		if err := ctx.Err(); err != nil {
			fatal = err
			break
		}
		p, err := s.prepare(ctx, dev, alg, ekSHA, u, opt)
		if err != nil {
			fatal = err
			break
		}
		preps = append(preps, p)
	}
	defer func() {
		for _, p := range preps {
			clear(p.keyPEM)
		}
	}()
	// Commit 1: every issued certificate is recorded before any bundle holds it.
	err := s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		for _, p := range preps {
			if errors.Is(p.res.Err, ErrRefused) || errors.Is(p.res.Err, ErrBadSerial) {
				continue
			}
			if err := s.record(tx, p, opt); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return results(preps), fmt.Errorf("enroll: record certificates: %w", err)
	}
	// Bundles, then one sync of the file system that holds them.
	wrote := false
	for _, p := range preps {
		if p.res.Err != nil {
			continue
		}
		start := time.Now()
		dir, err := writeBundle(opt.OutDir, p, s.CA)
		if err != nil {
			p.fail(StepBundle, err)
			continue
		}
		wrote = true
		p.res.Bundle = dir
		p.bundleMS = time.Since(start).Milliseconds()
	}
	if wrote {
		var dirs []string
		for _, p := range preps {
			if p.res.Err == nil {
				dirs = append(dirs, p.res.Bundle)
			}
		}
		if err := syncBundles(opt.OutDir, dirs); err != nil {
			for _, p := range preps {
				if p.res.Err == nil {
					p.fail(StepBundle, fmt.Errorf("sync %s: %w", opt.OutDir, err))
				}
			}
		}
	}
	// Commit 2: units whose bundle is durable become certified.
	err = s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		for _, p := range preps {
			if p.res.Err != nil && !isStep(p.res.Err, StepBundle) {
				continue
			}
			u, err := tx.Unit(p.res.Serial)
			if err != nil {
				return err
			}
			if p.res.Err != nil {
				u.State, u.FailedStep, u.Error = inventory.StateFailed, StepBundle, p.failed.Err.Error()
			} else {
				u.State, _ = enrollSteps.after(u.State, StepBundle, true) // stays certified, now with its bundle
				u.FailedStep, u.Error = "", ""
				p.res.State = u.State
			}
			if err := tx.PutUnit(u); err != nil {
				return err
			}
			e := inventory.Event{Serial: u.Serial, Step: StepBundle, Outcome: "ok", Detail: p.res.Bundle, MS: p.bundleMS,
				Operator: opt.Operator, Station: s.Config.StationID, CertSHA256: p.res.CertSHA256}
			if p.res.Err != nil {
				e.Outcome, e.Detail = "failed", p.failed.Err.Error()
			}
			if err := tx.Append(e); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return results(preps), fmt.Errorf("enroll: record bundles: %w", err)
	}
	return results(preps), fatal
}

func results(preps []*prepared) []EnrollResult {
	out := make([]EnrollResult, len(preps))
	for i, p := range preps {
		out[i] = p.res
	}
	return out
}

func isStep(err error, step string) bool {
	var se *StepError
	return errors.As(err, &se) && se.Step == step
}

func (p *prepared) fail(step string, err error) {
	p.failed = &StepError{Serial: p.res.Serial, Step: step, Err: err}
	p.res.Err = p.failed
	p.res.State = inventory.StateFailed
}

func (s *Station) event(serial, step, outcome, detail string, start time.Time, opt EnrollOptions, certSHA string) inventory.Event {
	return inventory.Event{Serial: serial, Step: step, Outcome: outcome, Detail: detail, MS: time.Since(start).Milliseconds(),
		Operator: opt.Operator, Station: s.Config.StationID, CertSHA256: certSHA}
}

// prepare validates, creates the key, builds the CSR and has it signed. A returned error is fatal for the whole run
// (the TPM or the inventory is gone); a unit's own failure is recorded in prepared.
func (s *Station) prepare(ctx context.Context, dev *tpm.Device, alg tpm.Algorithm, ekSHA string, u UnitRequest, opt EnrollOptions) (*prepared, error) {
	p := &prepared{res: EnrollResult{Serial: u.Serial, KeyKind: dev.Kind(), EKCertSHA256: ekSHA}, fields: u.Fields}
	start := time.Now()
	if err := s.Config.SerialRule().Check(u.Serial); err != nil {
		p.res.Err, p.res.State = err, inventory.StateNew
		return p, nil
	}
	if err := s.checkRefusal(ctx, u.Serial, opt.Reprovision); err != nil {
		if !errors.Is(err, ErrRefused) {
			return nil, err
		}
		p.res.Err = err
		if unit, uerr := s.Inv.Unit(ctx, u.Serial); uerr == nil {
			p.res.State = unit.State
		}
		return p, nil
	}
	subject, err := s.Config.SubjectTemplate().Render(u.Serial, u.Fields)
	if err != nil {
		p.fail(StepValidate, err)
		return p, nil
	}
	p.steps = append(p.steps, s.event(u.Serial, StepValidate, "ok", "", start, opt, ""))

	start = time.Now()
	key, err := dev.CreateKey(ctx, alg)
	if err != nil {
		if isEnvironment(err) {
			return nil, &StepError{Serial: u.Serial, Step: StepKey, Err: err}
		}
		p.fail(StepKey, err)
		return p, nil
	}
	defer key.Close()
	pubDER, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		p.fail(StepKey, err)
		return p, nil
	}
	sum := sha256.Sum256(pubDER)
	p.res.PublicSHA256 = hex.EncodeToString(sum[:])
	p.steps = append(p.steps, s.event(u.Serial, StepKey, "ok", fmt.Sprintf("%s %s key %s", key.Kind(), alg, p.res.PublicSHA256[:16]), start, opt, ""))

	start = time.Now()
	uri := SerialURI(u.Serial)
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: subject, URIs: []*url.URL{uri}}, key)
	if err != nil {
		if isEnvironment(err) {
			return nil, &StepError{Serial: u.Serial, Step: StepCSR, Err: err}
		}
		p.fail(StepCSR, err)
		return p, nil
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		p.fail(StepCSR, err)
		return p, nil
	}
	p.steps = append(p.steps, s.event(u.Serial, StepCSR, "ok", "", start, opt, ""))

	start = time.Now()
	cert, err := s.CA.Sign(ca.Request{CSR: csr, Subject: subject, URIs: []*url.URL{uri},
		Validity: time.Duration(s.Config.Certificate.ValidityDays) * 24 * time.Hour, PublicKey: key.Public()})
	if err != nil {
		if errors.Is(err, ca.ErrExpired) {
			return nil, &StepError{Serial: u.Serial, Step: StepSign, Err: fmt.Errorf("%w: %w", ErrCA, err)}
		}
		p.fail(StepSign, err)
		return p, nil
	}
	p.res.Certificate, p.res.CertSHA256 = cert, ca.Fingerprint(cert)
	p.keyPEM, err = key.PEM()
	if err != nil {
		p.fail(StepKey, fmt.Errorf("export key file: %w", err))
		return p, nil
	}
	p.keyFile = key.FileName()
	p.steps = append(p.steps, s.event(u.Serial, StepSign, "ok", "certificate "+CertSerial(cert), start, opt, p.res.CertSHA256))
	p.res.State, _ = enrollSteps.after(inventory.StateKeyed, StepSign, true)
	return p, nil
}

// checkRefusal refuses a unit whose active certificate was delivered (its bundle written: certified with a "bundle ok"
// entry last; or imaged and later), unless reprovisioning. A unit that is new, keyed or failed, or certified by a run
// interrupted before its bundle was durable, is enrolled again (a new key; the undelivered certificate is superseded).
func (s *Station) checkRefusal(ctx context.Context, serial string, reprovision bool) error {
	unit, err := s.Inv.Unit(ctx, serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	switch unit.State {
	case inventory.StateNew, inventory.StateKeyed, inventory.StateFailed:
		return nil
	}
	cert, err := s.Inv.ActiveCertificate(ctx, serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if reprovision {
		return nil
	}
	if unit.State == inventory.StateCertified {
		evs, err := s.Inv.Events(ctx, serial)
		if err != nil {
			return err
		}
		if n := len(evs); n == 0 || evs[n-1].Step != StepBundle || evs[n-1].Outcome != "ok" || evs[n-1].CertSHA256 != cert.SHA256 {
			return nil // never delivered: start over
		}
	}
	return fmt.Errorf("unit %s is %s and holds active certificate %s (expires %s): use --reprovision to replace it: %w",
		serial, unit.State, cert.Serial, cert.NotAfter.Format(time.DateOnly), ErrRefused)
}

// record writes a prepared unit to the inventory: its state, its certificate (active, superseding any other) and its
// events, or its failure.
func (s *Station) record(tx *inventory.Tx, p *prepared, opt EnrollOptions) error {
	u := inventory.Unit{Serial: p.res.Serial, KeyKind: p.res.KeyKind, PublicSHA256: p.res.PublicSHA256,
		EKCertSHA256: p.res.EKCertSHA256, Operator: opt.Operator, Station: s.Config.StationID, Fields: p.fields}
	if p.failed != nil {
		u.State, u.FailedStep, u.Error = inventory.StateFailed, p.failed.Step, p.failed.Err.Error()
	} else {
		u.State, _ = enrollSteps.after(inventory.StateKeyed, StepSign, true) // certified: the certificate is recorded
	}
	if err := tx.PutUnit(u); err != nil {
		return err
	}
	if p.failed == nil {
		c := p.res.Certificate
		err := tx.AddCertificate(inventory.Certificate{Serial: CertSerial(c), Unit: u.Serial, SHA256: p.res.CertSHA256,
			NotBefore: c.NotBefore, NotAfter: c.NotAfter})
		if err != nil {
			return err
		}
	}
	for _, e := range p.steps {
		if err := tx.Append(e); err != nil {
			return err
		}
	}
	if p.failed != nil {
		return tx.Append(inventory.Event{Serial: u.Serial, Step: p.failed.Step, Outcome: "failed", Detail: p.failed.Err.Error(),
			Operator: opt.Operator, Station: s.Config.StationID})
	}
	return nil
}

// CertSerial is a certificate's serial number as lowercase hex.
func CertSerial(c *x509.Certificate) string { return fmt.Sprintf("%x", c.SerialNumber) }

// isEnvironment reports errors that stop the whole run rather than fail one unit.
func isEnvironment(err error) bool {
	return errors.Is(err, tpm.ErrUnreachable) || errors.Is(err, tpm.ErrLockout) || errors.Is(err, context.Canceled)
}

const tempPrefix = ".provision-tmp-"

// writeBundle writes OutDir/<serial>/ through a temp directory and an atomic swap, so no half bundle ever carries the
// final name. The caller syncs the file system afterwards.
func writeBundle(outDir string, p *prepared, c *ca.CA) (string, error) {
	final := filepath.Join(outDir, p.res.Serial)
	tmp, err := os.MkdirTemp(outDir, tempPrefix+p.res.Serial+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) // after a swap it holds the old bundle
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{BundleCert, ca.EncodeCerts(p.res.Certificate), 0o644},
		{BundleChain, ca.EncodeCerts(c.Chain()...), 0o644},
		{BundleRoot, ca.EncodeCerts(c.Root), 0o644},
		{p.keyFile, p.keyPEM, 0o600},
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(tmp, f.name), f.data, f.mode); err != nil {
			return "", err
		}
	}
	dirMode := os.FileMode(0o755)
	if p.res.KeyKind == tpm.KindSoft {
		dirMode = 0o700 // it holds a plain private key
	}
	if err := os.Chmod(tmp, dirMode); err != nil {
		return "", err
	}
	err = unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE)
	if errors.Is(err, unix.ENOENT) {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		return "", fmt.Errorf("install bundle %s: %w", final, err)
	}
	return final, nil
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// removeStaleTemps deletes temp bundle directories that an interrupted run left (they may hold a software key).
func removeStaleTemps(outDir string) {
	entries, err := os.ReadDir(outDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), tempPrefix) {
			os.RemoveAll(filepath.Join(outDir, e.Name()))
		}
	}
}

// syncBundles makes the given bundles durable: a single bundle by fsyncing its files and directories (cheaper than
// flushing the whole file system, which may hold other programs' dirty data); many at once with one syncfs(2).
func syncBundles(outDir string, dirs []string) error {
	if len(dirs) > 4 {
		return syncFS(outDir)
	}
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := fsyncPath(filepath.Join(d, e.Name())); err != nil {
				return err
			}
		}
		if err := fsyncPath(d); err != nil {
			return err
		}
	}
	return fsyncPath(outDir)
}

func fsyncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// syncFS makes everything written under dir durable with one syncfs(2).
func syncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil && !errors.Is(err, fs.ErrInvalid) {
		return err
	}
	return nil
}
