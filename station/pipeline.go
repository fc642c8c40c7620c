package station

import (
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"time"

	"provision/inventory"
	"provision/station/profile"
	"provision/tpm"
)

// run is one unit's pipeline in progress.
type run struct {
	s       *Station
	dev     *tpm.Device
	req     ProvisionRequest
	report  func(Event)
	res     Result
	key     crypto.Signer
	closeFn func() error
	keyPEM  []byte
	keyKind string
	pubSHA  string
	subject pkix.Name
	csr     *x509.CertificateRequest
	plan    *profile.Plan
	unclaim func() // drops the run's claim on the serial (claimUnit)
	m       machine
	sink    sink
	keyFile string       // the key file's name in a bundle (device.tss2.pem or device.key)
	ekSHA   string       // SHA-256 of the TPM's EK certificate, when it has one (enroll records it)
	att     *attestation // what the attest step found (attest.go)
	// statusOverride: the status a step that succeeded reports instead of ok (attest: soft, or skipped when off).
	statusOverride string
	bundle         string // where the bundle sink put the unit's bundle
	// deferred: record() queues its writes in pending instead of committing each (enroll commits a group at once).
	deferred bool
	pending  []func(*inventory.Tx) error
	last     Step            // the last step this run completed
	skipped  func(Step) bool // steps a resumed run leaves out
}

// Provision runs a unit through validate, key, csr, sign, image, verify and handshake, recording each step's outcome in
// the inventory as it happens, and marks it shippable when all passed. It resumes from what was recorded: a unit that
// reached the image step reuses the key file in its image (when that key loads on dev) and re-checks the rest; an
// earlier interruption starts over with a new key, superseding the certificate of the interrupted run. A shippable unit
// is refused (ErrRefused) unless req.Reprovision.
//
// The error is a *StepError naming the failed step, ErrRefused, or an environment error (TPM, inventory, CA) that
// stopped the run; ctx cancellation stops between steps and leaves the unit resumable.
func (s *Station) Provision(ctx context.Context, dev *tpm.Device, req ProvisionRequest, report func(Event)) (Result, error) {
	if report == nil {
		report = func(Event) {}
	}
	front := report
	report = func(e Event) { // -v: every step with its outcome and time on the debug log, then the front end
		if e.Status != StatusStarted {
			s.Log.Debug("step", "serial", e.Serial, "step", e.Step, "status", e.Status, "ms", e.Duration.Milliseconds(),
				"detail", e.Detail, "error", e.Err)
		}
		front(e)
	}
	m, snk := machine(unitSteps), sink(imageSink{})
	if s.machine != nil {
		m = s.machine
	}
	if s.sink != nil {
		snk = s.sink
	}
	r := s.newRun(dev, req, m, snk, report)
	defer r.closeKey()
	defer r.release()
	err := r.pipeline(ctx)
	return r.res, err
}

// newRun prepares one unit's run through table m, delivering to snk.
func (s *Station) newRun(dev *tpm.Device, req ProvisionRequest, m machine, snk sink, report func(Event)) *run {
	return &run{s: s, dev: dev, req: req, report: report, res: Result{Serial: req.Serial, State: inventory.StateNew}, m: m, sink: snk}
}

func (r *run) release() {
	if r.unclaim != nil {
		r.unclaim()
		r.unclaim = nil
	}
}

func (r *run) closeKey() {
	if r.closeFn != nil {
		r.closeFn()
		r.closeFn = nil
	}
	clear(r.keyPEM)
	if r.att != nil {
		clear(r.att.akKey)
	}
}

func (r *run) pipeline(ctx context.Context) error { return r.runUntil(ctx, "") }

// runUntil validates the unit, then runs the table's steps in order up to and including until ("" = to the end).
func (r *run) runUntil(ctx context.Context, until Step) error {
	resume, err := r.validate(ctx)
	if err != nil {
		return err
	}
	r.last = StepValidate
	// Where the run starts: a resumed unit reuses what its sink holds and goes on from the step after delivery.
	from := StepKey
	if resume {
		from = StepVerify
	}
	r.skipped = func(step Step) bool { return resume && r.m.index(step) < r.m.index(from) }
	for _, d := range r.m[1:] {
		if r.skipped(d.Name) {
			r.skip(d.Name, "done in an earlier run")
			continue
		}
		if err := r.next(ctx, d.Name); err != nil {
			return err
		}
		if d.Name == until {
			return nil
		}
	}
	return nil
}

// next runs step right after the run's last one, as the table allows (enroll runs its bundle step this way, after
// its group's first commit).
func (r *run) next(ctx context.Context, step Step) error {
	skipped := r.skipped
	if skipped == nil {
		skipped = func(Step) bool { return false }
	}
	if !r.m.canFollow(r.last, step, skipped) {
		return fmt.Errorf("state machine: %s may not follow %s", step, r.last) // a table mistake, caught by its tests
	}
	i := r.m.index(step)
	if ctx.Err() != nil {
		return r.interrupted(ctx, step, 0)
	}
	fn := r.stepFuncs()[step]
	if fn == nil {
		return fmt.Errorf("state machine: no function for step %s", step)
	}
	if err := r.step(ctx, r.m[i], fn); err != nil {
		return err
	}
	r.last = step
	return nil
}

// stepFuncs binds each step of the table to what it does for this run.
func (r *run) stepFuncs() map[Step]func(context.Context) (string, error) {
	fns := map[Step]func(context.Context) (string, error){
		StepKey: r.stepKey, StepAttest: r.stepAttest, StepCSR: r.stepCSR, StepSign: r.stepSign,
		StepImage:     func(ctx context.Context) (string, error) { return r.sink.deliver(ctx, r) },
		StepVerify:    func(ctx context.Context) (string, error) { return r.sink.check(ctx, r) },
		StepHandshake: r.stepHandshake,
		StepBundle:    func(ctx context.Context) (string, error) { return r.sink.deliver(ctx, r) },
	}
	for name, fn := range r.s.extraSteps {
		fns[Step(name)] = func(ctx context.Context) (string, error) { return fn(ctx, r) }
	}
	return fns
}

// interrupted ends a run whose context was cancelled (Esc, Ctrl-C, SIGTERM) before or during step: the step is reported
// cancelled, the unit keeps the state of its last completed step (so it resumes), and an event with outcome
// "interrupted" is recorded with a context that outlives the cancellation.
func (r *run) interrupted(ctx context.Context, step Step, d time.Duration) error {
	cause := fmt.Errorf("%w: %w", ErrInterrupted, context.Cause(ctx))
	r.res.Steps = append(r.res.Steps, StepResult{Name: step, Status: StatusCancelled, Duration: d, Err: cause})
	r.report(Event{Serial: r.req.Serial, Step: step, Status: StatusCancelled, Err: cause, Duration: d})
	se := &StepError{Serial: r.req.Serial, Step: step, Err: cause}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	write := func(tx *inventory.Tx) error {
		if _, err := tx.Unit(r.req.Serial); err != nil {
			if errors.Is(err, inventory.ErrNotFound) {
				return nil // nothing was recorded for this unit yet: nothing to resume
			}
			return err
		}
		return tx.Append(inventory.Event{Serial: r.req.Serial, Step: string(step), Outcome: OutcomeInterrupted,
			Detail: "stopped by the operator or a signal; run the unit again to resume", MS: d.Milliseconds(),
			Operator: r.req.Operator, Station: r.s.Config.StationID})
	}
	if r.deferred {
		r.pending = append(r.pending, write)
		return se
	}
	if err := r.s.Inv.Update(rctx, write); err != nil {
		return errors.Join(se, err)
	}
	return se
}

func (r *run) skip(step Step, why string) {
	r.res.Steps = append(r.res.Steps, StepResult{Name: step, Status: StatusSkipped})
	r.report(Event{Serial: r.req.Serial, Step: step, Status: StatusSkipped, Detail: why})
}

// step runs one step: reports it, times it, and records its outcome through the table: the state its success leads
// to (when it changes anything) or failed.
func (r *run) step(ctx context.Context, d stepDef, fn func(context.Context) (string, error)) error {
	name := d.Name
	r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusStarted})
	start := time.Now()
	detail, err := fn(ctx)
	took := time.Since(start)
	if err != nil && ctx.Err() != nil {
		return r.interrupted(ctx, name, took)
	}
	if err != nil {
		if stopsStation(err) {
			r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusFailed, Duration: took, Err: err})
			r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusFailed, Err: err, Duration: took})
			return &StepError{Serial: r.req.Serial, Step: name, Err: err}
		}
		se := &StepError{Serial: r.req.Serial, Step: name, Err: err}
		r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusFailed, Duration: took, Err: err})
		r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusFailed, Err: err, Duration: took})
		// Record the failure with a fresh context: a cancelled run must still leave its record consistent.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		failed, _ := r.m.after(r.res.State, name, false)
		if rerr := r.record(rctx, failed, name, err, inventory.Event{Step: string(name), Outcome: "failed", Detail: err.Error(), MS: took.Milliseconds()}); rerr != nil {
			return errors.Join(se, rerr)
		}
		r.res.State = inventory.StateFailed
		return se
	}
	if d.Success != "" || d.Outcome != "" { // a state change, or an entry of its own (enroll's bundle)
		state, err := r.m.after(r.res.State, name, true)
		if err != nil {
			return err
		}
		outcome := d.Outcome
		if outcome == "" {
			outcome = "ok"
		}
		// The step's work is done: record it even if the run is being cancelled right now (database/sql rolls back a
		// transaction whose context ends, and the unit would lose a step it completed).
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if err := r.record(rctx, state, "", nil, inventory.Event{Step: string(name), Outcome: outcome, Detail: detail, MS: took.Milliseconds()}); err != nil {
			se := &StepError{Serial: r.req.Serial, Step: name, Err: err}
			r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusFailed, Duration: took, Err: err})
			r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusFailed, Err: err, Duration: took})
			return se
		}
	}
	took = time.Since(start) // the step's time includes recording it
	status := StatusOK
	if r.statusOverride != "" {
		status, r.statusOverride = r.statusOverride, ""
	}
	r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: status, Duration: took})
	r.report(Event{Serial: r.req.Serial, Step: name, Status: status, Detail: detail, Duration: took})
	return nil
}

// record stores the unit's new state and appends the event, in one synced transaction.
func (r *run) record(ctx context.Context, state inventory.State, failedStep Step, stepErr error, e inventory.Event) error {
	cert := r.res.Certificate
	write := func(tx *inventory.Tx) error {
		u, err := tx.Unit(r.req.Serial)
		if errors.Is(err, inventory.ErrNotFound) {
			u = inventory.Unit{Serial: r.req.Serial}
		} else if err != nil {
			return err
		}
		u.State, u.FailedStep, u.Error = state, string(failedStep), ""
		if stepErr != nil {
			u.Error = stepErr.Error()
		}
		if r.keyKind != "" {
			u.KeyKind, u.PublicSHA256 = r.keyKind, r.pubSHA
		}
		if r.ekSHA != "" {
			u.EKCertSHA256 = r.ekSHA
		}
		if r.att != nil && e.Step == string(StepAttest) {
			if stepErr == nil && r.att.bind != "" {
				if other, err := tx.UnitByEK(r.att.bind); err == nil && other.Serial != u.Serial {
					return boundError(other) // another station's run bound this TPM since the step looked
				}
				u.EKSHA256, u.EKCertSHA256 = r.att.bind, r.att.row.EKCertSHA256
			}
		}
		if len(r.req.Fields) > 0 {
			u.Fields = r.req.Fields
		}
		u.Operator, u.Station = r.req.Operator, r.s.Config.StationID
		if err := tx.PutUnit(u); err != nil {
			return err
		}
		if e.Step == string(StepSign) && state == inventory.StateCertified && cert != nil { // sign records the certificate
			if err := tx.AddCertificate(inventory.Certificate{Serial: CertSerial(cert), Unit: u.Serial, SHA256: r.res.CertSHA256,
				NotBefore: cert.NotBefore, NotAfter: cert.NotAfter, DER: cert.Raw}); err != nil {
				return err
			}
		}
		if r.att != nil && e.Step == string(StepAttest) {
			a := r.att.row
			a.Serial, a.Outcome = u.Serial, "ok"
			if stepErr != nil {
				a.Outcome = "failed"
			}
			if err := tx.AddAttestation(a); err != nil {
				return err
			}
		}
		e.Serial, e.Operator, e.Station = u.Serial, r.req.Operator, r.s.Config.StationID
		if e.Outcome == "" {
			e.Outcome = "ok"
		}
		if cert != nil {
			e.CertSHA256 = r.res.CertSHA256
		}
		return tx.Append(e)
	}
	if r.deferred {
		r.pending = append(r.pending, write)
		r.res.State = state
		return nil
	}
	err := r.s.Inv.Update(ctx, write)
	if err == nil {
		r.res.State = state
	}
	return err
}

// validate checks the serial and decides where the run starts: resume is true when the unit's image holds a key and
// certificate from an earlier run that are reused.
func (r *run) validate(ctx context.Context) (resume bool, err error) {
	start := time.Now()
	r.report(Event{Serial: r.req.Serial, Step: StepValidate, Status: StatusStarted})
	if ctx.Err() != nil {
		return false, r.interrupted(ctx, StepValidate, 0)
	}
	fail := func(err error) (bool, error) {
		r.res.Steps = append(r.res.Steps, StepResult{Name: StepValidate, Status: StatusFailed, Duration: time.Since(start), Err: err})
		r.report(Event{Serial: r.req.Serial, Step: StepValidate, Status: StatusFailed, Err: err, Duration: time.Since(start)})
		return false, err
	}
	if err := r.s.Config.SerialRule().Check(r.req.Serial); err != nil {
		return fail(err)
	}
	// The unit's own serial, before anything is claimed or created under the scanned one.
	unitNote, err := r.s.checkUnitSerial(ctx, r.req.Serial, r.req.Fixture)
	if err != nil {
		if ctx.Err() != nil {
			return false, r.interrupted(ctx, StepValidate, time.Since(start))
		}
		return fail(err)
	}
	if r.unclaim, err = r.s.claimUnit(r.req.Serial, r.req.Operator); err != nil {
		return fail(err)
	}
	// Across the factory: the central store's claim (refused when another station has or had the unit).
	releaseCentral, err := r.s.claimCentral(ctx, r.req.Serial, r.req.Operator)
	if err != nil {
		return fail(err)
	}
	unclaimLocal := r.unclaim
	r.unclaim = func() { releaseCentral(); unclaimLocal() }
	unit, err := r.s.Inv.Unit(ctx, r.req.Serial)
	if err != nil && ctx.Err() != nil {
		return false, r.interrupted(ctx, StepValidate, time.Since(start))
	}
	if err != nil && !errors.Is(err, inventory.ErrNotFound) {
		return fail(err)
	}
	if len(r.req.Fields) == 0 && len(unit.Fields) > 0 {
		r.req.Fields = unit.Fields // the unit's own data, recorded by the run that first had it (batch CSV)
	}
	subject, err := r.s.Config.SubjectTemplate().Render(r.req.Serial, r.req.Fields)
	if err != nil {
		return fail(fmt.Errorf("subject: %w: %w", err, ErrBadSerial))
	}
	r.subject = subject
	if _, err := r.s.Config.ResolveProfile(r.req.Profile); err != nil {
		return fail(err)
	}
	if unit.Serial != "" {
		r.res.State = unit.State
		if err := r.sink.refuse(ctx, r, unit); err != nil {
			return fail(err)
		}
	}
	switch {
	case unit.Serial == "":
	case !r.req.Reprovision && r.m.startsFrom(unit.State, Step(unit.FailedStep)) != StepKey:
		resume = r.sink.reload(ctx, r)
	}
	if !resume {
		if err := r.sink.preflight(ctx, r); err != nil {
			if ctx.Err() != nil {
				return false, r.interrupted(ctx, StepValidate, time.Since(start))
			}
			// Recorded (the supervisor sees the attempt and its cause), except over a shippable unit being
			// re-provisioned: a wrong image named for it changes nothing about the unit that shipped.
			if unit.State != inventory.StateShippable {
				d := time.Since(start)
				if rerr := r.record(ctx, inventory.StateFailed, StepValidate, err, inventory.Event{Step: string(StepValidate),
					Outcome: "failed", Detail: err.Error(), MS: d.Milliseconds()}); rerr != nil {
					return fail(errors.Join(err, rerr))
				}
			}
			return fail(err)
		}
	}
	r.res.State = unit.State
	r.res.Steps = append(r.res.Steps, StepResult{Name: StepValidate, Status: StatusOK, Duration: time.Since(start)})
	detail := "new unit"
	switch {
	case resume:
		detail = "resuming from the image written earlier"
	case unit.State != "":
		detail = "earlier run stopped at " + string(unit.State) + ": starting over"
	}
	if unitNote != "" {
		detail += "; " + unitNote
	}
	r.report(Event{Serial: r.req.Serial, Step: StepValidate, Status: StatusOK, Detail: detail, Duration: time.Since(start)})
	return resume, nil
}
