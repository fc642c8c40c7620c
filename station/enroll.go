package station

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"time"

	"provision/internal/fsutil"
	"provision/inventory"
	"provision/tpm"
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
	State        inventory.State
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
	Step   Step
	Err    error
}

func (e *StepError) Error() string { return fmt.Sprintf("unit %s: %s: %v", e.Serial, e.Step, e.Err) }
func (e *StepError) Unwrap() error { return e.Err }

// Enroll creates each unit's key on dev, has the CA certify it and writes its bundle: the same runner and state table
// as Provision (validate, key, csr, sign), delivering to a bundle directory instead of an image. Per-unit outcomes are
// in the results (in request order); the error is set only when the station itself cannot go on (CA not loaded,
// inventory or TPM gone, interrupted), in which case the results hold the units finished so far.
//
// Units go in groups of enrollGroup that share two commits and one file-system sync. Durability: a unit's certificate
// is recorded (synced, commit 1) before its bundle exists; its "bundle ok" entry is recorded (commit 2) only after the
// bundle is on stable storage. A unit interrupted in between is certified without that entry: the next enroll issues
// it a new certificate (the undelivered one is superseded).
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
	if dev.Kind() == tpm.KindTPM && s.Config.AttestationPolicy() != AttestOff && len(units) > 1 {
		return nil, fmt.Errorf("enroll: %d serials on one TPM: with attestation: %s a TPM is one unit (enroll one serial per "+
			"TPM, or set attestation: off in station.yaml for bundles of several keys on one TPM): %w",
			len(units), s.Config.AttestationPolicy(), ErrRefused)
	}
	// The attest step reads the EK certificates (and records the one it attested); read it here only when it does not.
	ekSHA := ""
	if s.Config.AttestationPolicy() == AttestOff {
		if ek, err := dev.EKCertificate(ctx); err != nil {
			return nil, fmt.Errorf("enroll: read EK certificate: %w", err)
		} else if ek != nil {
			sum := sha256.Sum256(ek)
			ekSHA = hex.EncodeToString(sum[:])
		}
	}
	var results []EnrollResult
	for start := 0; start < len(units); start += enrollGroup {
		end := min(start+enrollGroup, len(units))
		rs, err := s.enrollGroup(ctx, dev, ekSHA, units[start:end], opt)
		results = append(results, rs...)
		if err != nil {
			return results, err
		}
	}
	return results, nil
}

// stopsEnroll reports errors that stop the whole enroll rather than fail one unit: the station's own (stopsStation) or
// an interruption.
func stopsEnroll(err error) bool {
	return stopsStation(err) || errors.Is(err, ErrInterrupted) || errors.Is(err, inventory.ErrAudit)
}

func (s *Station) enrollGroup(ctx context.Context, dev *tpm.Device, ekSHA string, units []UnitRequest, opt EnrollOptions) ([]EnrollResult, error) {
	snk := &bundleSink{out: opt.OutDir}
	log := func(e Event) {
		if e.Status != StatusStarted {
			s.Log.Debug("step", "serial", e.Serial, "step", e.Step, "status", e.Status, "ms", e.Duration.Milliseconds(),
				"detail", e.Detail, "error", e.Err)
		}
	}
	var runs []*run
	errs := map[*run]error{}
	defer func() {
		for _, r := range runs {
			r.closeKey()
			r.release()
		}
	}()
	var fatal error
	for _, u := range units {
		r := s.newRun(dev, ProvisionRequest{Serial: u.Serial, Fields: u.Fields, Reprovision: opt.Reprovision,
			Operator: opt.Operator}, enrollSteps, snk, log)
		r.deferred, r.ekSHA = true, ekSHA
		runs = append(runs, r)
		if err := r.runUntil(ctx, StepSign); err != nil {
			errs[r] = err
			if stopsEnroll(err) {
				fatal = err
				break
			}
		}
	}
	// What was issued is recorded, even when the run was interrupted: a certificate never outlives its record.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	// Commit 1: every issued certificate is recorded before any bundle holds it.
	if err := s.flush(rctx, runs); err != nil {
		return enrollResults(runs, errs, dev), fmt.Errorf("enroll: record certificates: %w", err)
	}
	if fatal != nil {
		return enrollResults(runs, errs, dev), fatal
	}
	// Bundles (the sink's deliver, through the runner), then one sync of the file system that holds them.
	var delivered []*run
	for _, r := range runs {
		if errs[r] != nil {
			continue
		}
		if err := r.next(ctx, StepBundle); err != nil {
			errs[r] = err
			if stopsEnroll(err) {
				fatal = err
				break
			}
			continue
		}
		delivered = append(delivered, r)
	}
	if len(delivered) > 0 {
		var dirs []string
		for _, r := range delivered {
			dirs = append(dirs, r.bundle)
		}
		if err := fsutil.SyncDirs(opt.OutDir, dirs); err != nil {
			for _, r := range delivered {
				r.pending = nil // the bundle is not durable: its entry must not be written
				serr := fmt.Errorf("sync %s: %w", opt.OutDir, err)
				errs[r] = &StepError{Serial: r.req.Serial, Step: StepBundle, Err: serr}
				failed, _ := r.m.after(r.res.State, StepBundle, false)
				r.record(rctx, failed, StepBundle, serr, inventory.Event{Step: string(StepBundle), Outcome: "failed", Detail: serr.Error()})
			}
		}
	}
	// Commit 2: the bundles that are durable get their entry.
	if err := s.flush(rctx, runs); err != nil {
		return enrollResults(runs, errs, dev), fmt.Errorf("enroll: record bundles: %w", err)
	}
	return enrollResults(runs, errs, dev), fatal
}

// flush commits the writes the runs queued, in one transaction.
func (s *Station) flush(ctx context.Context, runs []*run) error {
	n := 0
	for _, r := range runs {
		n += len(r.pending)
	}
	if n == 0 {
		return nil
	}
	err := s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		for _, r := range runs {
			for _, w := range r.pending {
				if err := w(tx); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err == nil {
		for _, r := range runs {
			r.pending = nil
		}
	}
	return err
}

func enrollResults(runs []*run, errs map[*run]error, dev *tpm.Device) []EnrollResult {
	out := make([]EnrollResult, len(runs))
	for i, r := range runs {
		kind := r.res.KeyKind
		if kind == "" {
			kind = dev.Kind()
		}
		out[i] = EnrollResult{Serial: r.req.Serial, State: r.res.State, KeyKind: kind, PublicSHA256: r.pubSHA,
			Certificate: r.res.Certificate, CertSHA256: r.res.CertSHA256, EKCertSHA256: r.ekSHA, Bundle: r.bundle, Err: errs[r]}
		if out[i].Err != nil {
			out[i].Bundle = ""
		}
	}
	return out
}

// CertSerial is a certificate's serial number as lowercase hex.
func CertSerial(c *x509.Certificate) string { return fmt.Sprintf("%x", c.SerialNumber) }

// isEnvironment reports errors that stop the whole run rather than fail one unit.
func isEnvironment(err error) bool {
	return errors.Is(err, tpm.ErrUnreachable) || errors.Is(err, tpm.ErrLockout) || errors.Is(err, context.Canceled)
}

// stopsStation reports errors of the station itself (TPM gone, CA unusable, inventory locked or damaged): a step that
// meets one is not the unit's failure and is not recorded as such.
func stopsStation(err error) bool {
	return isEnvironment(err) || errors.Is(err, ErrCA) || errors.Is(err, inventory.ErrLocked) || errors.Is(err, inventory.ErrDamaged) ||
		errors.Is(err, ErrCentralUnreachable)
}
