package station

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"provision/image"
	"provision/inventory"
	"provision/station/ca"
	"provision/station/handshake"
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
	r := &run{s: s, dev: dev, req: req, report: report, res: Result{Serial: req.Serial, State: inventory.StateNew}}
	defer r.closeKey()
	defer r.release()
	err := r.pipeline(ctx)
	return r.res, err
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
}

func (r *run) pipeline(ctx context.Context) error {
	resume, err := r.validate(ctx)
	if err != nil {
		return err
	}
	steps := []struct {
		name string
		fn   func(context.Context) (string, error)
	}{
		{StepKey, r.stepKey}, {StepCSR, r.stepCSR}, {StepSign, r.stepSign}, {StepImage, r.stepImage},
		{StepVerify, r.stepVerify}, {StepHandshake, r.stepHandshake},
	}
	for _, st := range steps {
		if resume && (st.name == StepKey || st.name == StepCSR || st.name == StepSign || st.name == StepImage) {
			r.skip(st.name, "done in an earlier run")
			continue
		}
		if ctx.Err() != nil {
			return r.interrupted(ctx, st.name, 0)
		}
		if err := r.step(ctx, st.name, st.fn); err != nil {
			return err
		}
	}
	return r.record(ctx, inventory.StateShippable, "", nil, inventory.Event{Step: StepHandshake, Outcome: "shippable"})
}

// interrupted ends a run whose context was cancelled (Esc, Ctrl-C, SIGTERM) before or during step: the step is reported
// cancelled, the unit keeps the state of its last completed step (so it resumes), and an event with outcome
// "interrupted" is recorded with a context that outlives the cancellation.
func (r *run) interrupted(ctx context.Context, step string, d time.Duration) error {
	cause := fmt.Errorf("%w: %w", ErrInterrupted, context.Cause(ctx))
	r.res.Steps = append(r.res.Steps, StepResult{Name: step, Status: StatusCancelled, Duration: d, Err: cause})
	r.report(Event{Serial: r.req.Serial, Step: step, Status: StatusCancelled, Err: cause, Duration: d})
	se := &StepError{Serial: r.req.Serial, Step: step, Err: cause}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err := r.s.Inv.Update(rctx, func(tx *inventory.Tx) error {
		if _, err := tx.Unit(r.req.Serial); err != nil {
			if errors.Is(err, inventory.ErrNotFound) {
				return nil // nothing was recorded for this unit yet: nothing to resume
			}
			return err
		}
		return tx.Append(inventory.Event{Serial: r.req.Serial, Step: step, Outcome: OutcomeInterrupted,
			Detail: "stopped by the operator or a signal; run the unit again to resume", MS: d.Milliseconds(),
			Operator: r.req.Operator, Station: r.s.Config.StationID})
	})
	if err != nil {
		return errors.Join(se, err)
	}
	return se
}

func (r *run) skip(step, why string) {
	r.res.Steps = append(r.res.Steps, StepResult{Name: step, Status: StatusSkipped})
	r.report(Event{Serial: r.req.Serial, Step: step, Status: StatusSkipped, Detail: why})
}

// step runs one step: reports it, times it, records the outcome.
func (r *run) step(ctx context.Context, name string, fn func(context.Context) (string, error)) error {
	r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusStarted})
	start := time.Now()
	detail, err := fn(ctx)
	d := time.Since(start)
	if err != nil && ctx.Err() != nil {
		return r.interrupted(ctx, name, d)
	}
	if err != nil {
		if isEnvironment(err) || errors.Is(err, ErrCA) || errors.Is(err, inventory.ErrLocked) || errors.Is(err, inventory.ErrDamaged) {
			r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusFailed, Duration: d, Err: err})
			r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusFailed, Err: err, Duration: d})
			return &StepError{Serial: r.req.Serial, Step: name, Err: err}
		}
		se := &StepError{Serial: r.req.Serial, Step: name, Err: err}
		r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusFailed, Duration: d, Err: err})
		r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusFailed, Err: err, Duration: d})
		// Record the failure with a fresh context: a cancelled run must still leave its record consistent.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		if rerr := r.record(rctx, inventory.StateFailed, name, err, inventory.Event{Step: name, Outcome: "failed", Detail: err.Error(), MS: d.Milliseconds()}); rerr != nil {
			return errors.Join(se, rerr)
		}
		r.res.State = inventory.StateFailed
		return se
	}
	r.res.Steps = append(r.res.Steps, StepResult{Name: name, Status: StatusOK, Duration: d})
	r.report(Event{Serial: r.req.Serial, Step: name, Status: StatusOK, Detail: detail, Duration: d})
	return nil
}

// record stores the unit's new state and appends the event, in one synced transaction.
func (r *run) record(ctx context.Context, state, failedStep string, stepErr error, e inventory.Event) error {
	cert := r.res.Certificate
	err := r.s.Inv.Update(ctx, func(tx *inventory.Tx) error {
		u, err := tx.Unit(r.req.Serial)
		if errors.Is(err, inventory.ErrNotFound) {
			u = inventory.Unit{Serial: r.req.Serial}
		} else if err != nil {
			return err
		}
		u.State, u.FailedStep, u.Error = state, failedStep, ""
		if stepErr != nil {
			u.Error = stepErr.Error()
		}
		if r.keyKind != "" {
			u.KeyKind, u.PublicSHA256 = r.keyKind, r.pubSHA
		}
		if len(r.req.Fields) > 0 {
			u.Fields = r.req.Fields
		}
		u.Operator, u.Station = r.req.Operator, r.s.Config.StationID
		if err := tx.PutUnit(u); err != nil {
			return err
		}
		if state == inventory.StateCertified && cert != nil {
			if err := tx.AddCertificate(inventory.Certificate{Serial: CertSerial(cert), Unit: u.Serial, SHA256: r.res.CertSHA256,
				NotBefore: cert.NotBefore, NotAfter: cert.NotAfter}); err != nil {
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
	})
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
	if r.unclaim, err = r.s.claimUnit(r.req.Serial, r.req.Operator); err != nil {
		return fail(err)
	}
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
	switch {
	case unit.Serial == "":
	case unit.State == inventory.StateShippable && !r.req.Reprovision:
		return fail(fmt.Errorf("unit %s is already provisioned (shippable since %s, operator %s): use --reprovision to do it again: %w",
			r.req.Serial, unit.Updated.Local().Format("2006-01-02 15:04"), unit.Operator, ErrRefused))
	case !r.req.Reprovision && resumable(unit):
		resume = r.loadFromImage(ctx)
	}
	if !resume {
		if err := r.preflight(ctx); err != nil {
			if ctx.Err() != nil {
				return false, r.interrupted(ctx, StepValidate, time.Since(start))
			}
			// Recorded (the supervisor sees the attempt and its cause), except over a shippable unit being
			// re-provisioned: a wrong image named for it changes nothing about the unit that shipped.
			if unit.State != inventory.StateShippable {
				d := time.Since(start)
				if rerr := r.record(ctx, inventory.StateFailed, StepValidate, err, inventory.Event{Step: StepValidate,
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
		detail = "earlier run stopped at " + unit.State + ": starting over"
	}
	r.report(Event{Serial: r.req.Serial, Step: StepValidate, Status: StatusOK, Detail: detail, Duration: time.Since(start)})
	return resume, nil
}

// resumable: the unit's image was written in an earlier run.
func resumable(u inventory.Unit) bool {
	switch u.State {
	case inventory.StateImaged, inventory.StateVerified:
		return true
	case inventory.StateFailed:
		return u.FailedStep == StepVerify || u.FailedStep == StepHandshake
	}
	return false
}

// loadFromImage reuses the key and certificate an earlier run wrote into the image, when the certificate is the unit's
// active one and the key loads on this TPM. Any doubt means starting over.
func (r *run) loadFromImage(ctx context.Context) bool {
	active, err := r.s.Inv.ActiveCertificate(ctx, r.req.Serial)
	if err != nil {
		return false
	}
	plan, err := r.planFor(profile.Material{Serial: r.req.Serial, Fields: r.req.Fields, KeyKind: tpm.KindSoft})
	if err != nil {
		return false
	}
	keyPEM, certPEM, err := readIdentity(ctx, r.req.Image, plan, r.s.ImageOptions(r.req.Image)...)
	if err != nil {
		return false
	}
	certs, err := ca.ParseCerts(certPEM)
	if err != nil || ca.Fingerprint(certs[0]) != active.SHA256 {
		return false
	}
	switch pemType(keyPEM) {
	case "TSS2 PRIVATE KEY":
		if r.dev.Kind() != tpm.KindTPM {
			return false
		}
		k, err := tpm.LoadKeyFile(ctx, r.dev, keyPEM)
		if err != nil {
			return false
		}
		r.key, r.closeFn, r.keyKind = k, k.Close, tpm.KindTPM
	default:
		signer, err := ca.ParseKey(keyPEM, nil)
		if err != nil {
			return false
		}
		r.key, r.keyKind = signer, tpm.KindSoft
	}
	if !publicEqual(r.key.Public(), certs[0].PublicKey) {
		r.closeKey()
		r.key = nil
		return false
	}
	if r.pubSHA, err = publicSHA256(r.key.Public()); err != nil {
		r.closeKey()
		r.key = nil
		return false
	}
	r.keyPEM = keyPEM
	r.res.Certificate, r.res.CertSHA256, r.res.KeyKind = certs[0], active.SHA256, r.keyKind
	return true
}

func (r *run) planFor(m profile.Material) (*profile.Plan, error) {
	name := r.req.Profile
	if name == "" {
		name = r.s.Config.Profile
	}
	prof, err := r.s.Config.ResolveProfile(name)
	if err != nil {
		return nil, err
	}
	return prof.Plan(name, r.s.Layout, m)
}

func (r *run) stepKey(ctx context.Context) (string, error) {
	alg, err := tpm.ParseAlgorithm(r.s.Config.Key.Algorithm)
	if err != nil {
		return "", err
	}
	k, err := r.dev.CreateKey(ctx, alg)
	if err != nil {
		return "", err
	}
	r.key, r.closeFn, r.keyKind = k, k.Close, k.Kind()
	r.res.KeyKind = k.Kind()
	if r.pubSHA, err = publicSHA256(k.Public()); err != nil {
		return "", err
	}
	if r.keyPEM, err = k.PEM(); err != nil {
		return "", fmt.Errorf("export key file: %w", err)
	}
	detail := fmt.Sprintf("%s %s key %s", k.Kind(), alg, r.pubSHA[:16])
	return detail, r.record(ctx, inventory.StateKeyed, "", nil, inventory.Event{Step: StepKey, Detail: detail})
}

func (r *run) stepCSR(ctx context.Context) (string, error) {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: r.subject,
		URIs: []*url.URL{SerialURI(r.req.Serial)}}, r.signer(ctx))
	if err != nil {
		return "", err
	}
	r.csr, err = x509.ParseCertificateRequest(der)
	return r.subject.String(), err
}

func (r *run) stepSign(ctx context.Context) (string, error) {
	cert, err := r.s.CA.Sign(ca.Request{CSR: r.csr, Subject: r.subject, URIs: []*url.URL{SerialURI(r.req.Serial)},
		Validity: time.Duration(r.s.Config.Certificate.ValidityDays) * 24 * time.Hour, PublicKey: r.key.Public()})
	if err != nil {
		if errors.Is(err, ca.ErrExpired) {
			return "", fmt.Errorf("%w: %w", ErrCA, err)
		}
		return "", err
	}
	r.res.Certificate, r.res.CertSHA256 = cert, ca.Fingerprint(cert)
	detail := "certificate " + CertSerial(cert)
	return detail, r.record(ctx, inventory.StateCertified, "", nil, inventory.Event{Step: StepSign, Detail: detail})
}

func (r *run) material() (profile.Material, error) {
	serverCA, err := r.s.ServerCA()
	if err != nil {
		return profile.Material{}, err
	}
	return profile.Material{Serial: r.req.Serial, Fields: r.req.Fields, KeyKind: r.keyKind, Cert: ca.EncodeCerts(r.res.Certificate),
		Issuing: ca.EncodeCerts(r.s.CA.Issuing), Root: ca.EncodeCerts(r.s.CA.Root), ServerCA: serverCA, Key: r.keyPEM}, nil
}

func (r *run) stepImage(ctx context.Context) (string, error) {
	m, err := r.material()
	if err != nil {
		return "", err
	}
	plan, err := r.planFor(m)
	if err != nil {
		return "", err
	}
	r.plan = plan
	if err := Inject(ctx, r.req.Image, plan, r.s.ImageOptions(r.req.Image)...); err != nil {
		return "", err
	}
	detail := fmt.Sprintf("%d files, profile %s, synced", len(plan.Files)+len(plan.Merges), plan.Profile)
	if plan.OpenSSL.Form != "" {
		detail += "; TPM OpenSSL " + plan.OpenSSL.String()
	}
	return detail, r.record(ctx, inventory.StateImaged, "", nil, inventory.Event{Step: StepImage, Detail: r.req.Image})
}

func (r *run) stepVerify(ctx context.Context) (string, error) {
	checks, err := r.s.VerifyImage(ctx, r.req.Image, r.req.Serial, VerifyOptions{Profile: r.req.Profile})
	if err != nil {
		for _, c := range checks {
			if !c.OK {
				return "", fmt.Errorf("%s: %s: %w", c.Name, c.Detail, err)
			}
		}
		return "", err
	}
	detail := fmt.Sprintf("%d checks passed", len(checks))
	return detail, r.record(ctx, inventory.StateVerified, "", nil, inventory.Event{Step: StepVerify, Detail: detail})
}

func (r *run) stepHandshake(ctx context.Context) (string, error) {
	client := handshake.Client{Certificate: r.res.Certificate, Chain: []*x509.Certificate{r.s.CA.Issuing}, Key: r.signer(ctx),
		ClientID: r.req.Serial}
	hc := r.req.Handshake
	if len(hc.Endpoints) == 0 {
		srv, err := r.s.builtinServer()
		if err != nil {
			return "", err
		}
		done := srv.Expect(r.res.Certificate)
		defer done()
		res, err := handshake.Test(ctx, srv.URL(), srv.Roots(), client, hc.options()...)
		if err != nil {
			return "", err
		}
		r.res.Handshakes = append(r.res.Handshakes, HandshakeResult(res))
		return fmt.Sprintf("%s %s %s", res.Endpoint, res.TLSVersion, res.Detail), nil
	}
	roots := hc.CA
	if roots == nil {
		return "", fmt.Errorf("no CA to verify %s with (Station.HandshakeConfig resolves it): %w", hc.Endpoints[0], ErrEndpoint)
	}
	detail := ""
	for _, ep := range hc.Endpoints {
		res, err := handshake.Test(ctx, ep, roots, client, hc.options()...)
		if err != nil {
			return "", err
		}
		r.res.Handshakes = append(r.res.Handshakes, HandshakeResult(res))
		detail += fmt.Sprintf("%s %s %s; ", res.Endpoint, res.TLSVersion, res.Detail)
	}
	return detail[:len(detail)-2], nil
}

// builtinServer is the station's loopback mTLS test server, started on first use and shared by every unit.
func (s *Station) builtinServer() (*handshake.Server, error) {
	s.srvOnce.Do(func() {
		clientRoots := x509.NewCertPool()
		clientRoots.AddCert(s.CA.Root)
		s.srv, s.srvErr = handshake.NewServer(clientRoots)
	})
	return s.srv, s.srvErr
}

// readIdentity reads the key file and certificate file a plan writes, from the first partition each goes to.
func readIdentity(ctx context.Context, imagePath string, plan *profile.Plan, opts ...image.OpenOption) (keyPEM, certPEM []byte, err error) {
	im, err := image.Open(ctx, imagePath, append(opts, image.ReadOnly())...)
	if err != nil {
		return nil, nil, err
	}
	defer im.Close()
	parts, err := resolvePartitions(im, plan)
	if err != nil {
		return nil, nil, err
	}
	v := &verifier{im: im, ctx: ctx}
	for _, f := range plan.Files {
		switch {
		case f.From == "key" && keyPEM == nil:
			keyPEM, err = v.read(parts[f.Part].parts[0], f.Path)
		case (f.From == "cert" || f.From == "cert+chain") && certPEM == nil:
			certPEM, err = v.read(parts[f.Part].parts[0], f.Path)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	if keyPEM == nil || certPEM == nil {
		return nil, nil, errors.New("profile writes no key or no certificate")
	}
	return keyPEM, certPEM, nil
}

// pemType is the type of the first PEM block.
func pemType(b []byte) string {
	blk, _ := pem.Decode(b)
	if blk == nil {
		return ""
	}
	return blk.Type
}

// publicSHA256 is the SHA-256 of a public key's PKIX DER, lowercase hex: the unit's key fingerprint.
func publicSHA256(pub crypto.PublicKey) (string, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:]), nil
}

// signer is the unit's key bound to ctx where the key supports it (TPM keys): a cancelled run stops a signature in
// flight instead of waiting for the TPM's command timeout.
func (r *run) signer(ctx context.Context) crypto.Signer {
	if k, ok := r.key.(interface {
		WithContext(context.Context) crypto.Signer
	}); ok {
		return k.WithContext(ctx)
	}
	return r.key
}
