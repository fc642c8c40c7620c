package station

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"provision/inventory"
	"provision/tpm"
)

// BatchUnit is one unit of a batch: cloned from a golden image (Target empty) or personalised in place (Target set).
type BatchUnit struct {
	UnitRequest
	Target string // an existing per-unit image or block device (--targets)
}

// BatchOptions configure Batch.
type BatchOptions struct {
	Golden      string // cloned per unit to OutDir/<serial>.img
	OutDir      string
	Workers     int
	Profile     string
	Handshake   HandshakeConfig // Station.HandshakeConfig, as unit and tui use it
	FailFast    bool            // take no new unit after the first failure (running ones finish)
	Hash        bool            // SHA-256 of every finished image (reads it whole)
	Reprovision bool            // provision shippable units again (new key and certificate, the old one superseded)
	Operator    string
	// Jobs, when set, shares the batch with other workers (batch --central): a unit runs here only when Jobs hands it
	// out; the units other workers did are BatchSkipped ("done by another batch worker").
	Jobs BatchJobs
	// OpenTPM, when set, opens a TPM for each unit (closed after it): each unit brings its own TPM, as the in-process
	// simulator models it (a fresh simulator per unit). Batch's dev is then unused.
	OpenTPM func(ctx context.Context, serial string) (*tpm.Device, error)
}

// BatchJobs is a distributed batch's queue of units (the central store's batch_jobs): each unit handed out once; a
// unit whose worker died (its lease expired) is handed out again.
type BatchJobs interface {
	// Take hands out the next unit no live worker holds; ok is false when none is available right now.
	Take(ctx context.Context) (serial string, ok bool, err error)
	// Finish records the unit's outcome (a Batch status).
	Finish(ctx context.Context, serial, status string) error
	// Remaining is how many units are not finished (pending, or held by a worker).
	Remaining(ctx context.Context) (int, error)
}

// batchJobPoll is how often a worker with nothing to take asks again while other workers still hold units (one of
// them may die, and its units come back when their lease expires).
const batchJobPoll = time.Second

// batchJobGiveUp is how long a worker keeps trying a queue it cannot read before its remaining units are not started.
const batchJobGiveUp = 30 * time.Second

// Batch statuses: what happened to a unit in this run (BatchResult.Status; report.json "status").
const (
	BatchOK          = "ok"          // provisioned in this run: shippable
	BatchFailed      = "failed"      // a step failed (Err names it); the next run retries the unit
	BatchSkipped     = "skipped"     // already shippable: not provisioned again (Detail says why)
	BatchNotStarted  = "not_started" // the batch stopped (interrupt or fail-fast) before the unit was taken
	BatchInterrupted = "interrupted" // stopped between steps by an interrupt; the next run resumes it
)

// BatchResult is one unit's outcome.
type BatchResult struct {
	Serial string
	Status string // BatchOK, BatchFailed, BatchSkipped, BatchNotStarted or BatchInterrupted
	// State is the unit's state in the inventory after this run ("" when the inventory has no record of the unit).
	State  inventory.State
	Detail string // why a unit was skipped, or how it finished
	Image  string // the unit's image, when there is one: the finished <serial>.img, or the --targets image
	SHA256 string // of the image, with BatchOptions.Hash
	// Certificate is the unit's active certificate in the inventory after this run (zero when it has none).
	Certificate inventory.Certificate
	Result      Result // the pipeline's run (zero when the unit did not run)
	Err         error
	Duration    time.Duration
}

// Why units were not started.
var (
	errBatchInterrupted = errors.New("not started: the batch was interrupted")
	errBatchFailFast    = errors.New("not started: the batch stopped at the first failure")
)

// Batch provisions units with a pool of workers, calling report as each is settled (from one goroutine at a time).
// Results are in the order of units.
//
// A unit already shippable is skipped, unless opt.Reprovision: it is never provisioned a second time by accident. A
// failed or interrupted one is resumed. A cloned image is created 0600 as <serial>.img.partial (whatever the golden
// image's mode), synced, and renamed to <serial>.img only once the unit is shippable; the golden image is only read.
// The caller owns opt.OutDir for the run (PrepareOutDir, LockOutDir).
//
// Cancelling ctx stops taking new units (they are BatchNotStarted); a running unit stops between steps
// (BatchInterrupted, recorded in the inventory as interrupted, resumable). With opt.FailFast the first failure stops
// taking new units too, while running units finish. The error is set only when the inventory cannot be read at all.
func (s *Station) Batch(ctx context.Context, dev *tpm.Device, units []BatchUnit, opt BatchOptions, report func(BatchResult)) ([]BatchResult, error) {
	if opt.Workers < 1 {
		opt.Workers = 1
	}
	if report == nil {
		report = func(BatchResult) {}
	}
	if opt.OpenTPM == nil && dev.Kind() == tpm.KindTPM && s.Config.AttestationPolicy() != AttestOff && len(units) > 1 {
		return nil, fmt.Errorf("batch: %d units on one TPM (%s): with attestation: %s a TPM is one unit (use --tpm soft to "+
			"prepare images without the units, or set attestation: off for several keys on one TPM): %w",
			len(units), dev.URI(), s.Config.AttestationPolicy(), ErrRefused)
	}
	results := make([]BatchResult, len(units))
	settled := make([]bool, len(units))
	var mu sync.Mutex
	settle := func(i int, r BatchResult) {
		mu.Lock()
		defer mu.Unlock()
		results[i], settled[i] = r, true
		report(r)
	}

	// Units already shippable are settled first, without touching them.
	var todo []int
	shippable := make([]bool, len(units))
	for i, u := range units {
		if ctx.Err() != nil {
			break
		}
		unit, err := s.Inv.Unit(ctx, u.Serial)
		switch {
		case errors.Is(err, inventory.ErrNotFound):
		case err != nil && ctx.Err() != nil:
		case err != nil:
			return nil, fmt.Errorf("batch: %w", err)
		}
		shippable[i] = err == nil && unit.State == inventory.StateShippable
		if shippable[i] && !opt.Reprovision {
			if r, done := s.batchShippable(ctx, u, opt); done {
				settle(i, r)
				continue
			}
		}
		todo = append(todo, i)
	}

	var stopOnce sync.Once
	stop := make(chan struct{})
	jobs := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < opt.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				select {
				case <-stop:
					continue // settled as not started below
				default:
				}
				if ctx.Err() != nil {
					continue
				}
				r := s.batchUnit(ctx, dev, units[i], shippable[i], opt)
				s.batchRecord(ctx, &r)
				if opt.Jobs != nil {
					fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
					if err := opt.Jobs.Finish(fctx, r.Serial, r.Status); err != nil {
						s.Log.Warn("batch: recording the unit's outcome in the central store", "serial", r.Serial, "error", err)
					}
					cancel()
				}
				settle(i, r)
				if r.Status == BatchFailed && opt.FailFast {
					stopOnce.Do(func() { close(stop) })
				}
			}
		}()
	}
	var jobsErr error
	if opt.Jobs != nil {
		jobsErr = s.feedJobs(ctx, opt.Jobs, units, todo, jobs, stop)
	} else {
	feed:
		for _, i := range todo {
			select {
			case jobs <- i:
			case <-ctx.Done():
				break feed
			case <-stop:
				break feed
			}
		}
	}
	close(jobs)
	wg.Wait()
	if opt.Jobs != nil && ctx.Err() == nil && jobsErr == nil {
		for i, u := range units { // what this worker did not take, another did
			if !settled[i] && slices.Contains(todo, i) {
				r := BatchResult{Serial: u.Serial, Status: BatchSkipped, Detail: "done by another batch worker"}
				s.batchRecord(ctx, &r)
				settle(i, r)
			}
		}
	}

	why := errBatchFailFast
	if ctx.Err() != nil {
		why = errBatchInterrupted
	} else if jobsErr != nil {
		why = jobsErr
	}
	for i, u := range units {
		if !settled[i] {
			r := BatchResult{Serial: u.Serial, Status: BatchNotStarted, Err: why}
			if u.Target != "" {
				r.Image = u.Target
			}
			s.batchRecord(ctx, &r)
			settle(i, r)
		}
	}
	return results, nil
}

// batchShippable settles a unit the inventory says is shippable, without provisioning it again. done is false when the
// unit needs a worker: an earlier run stopped between marking it shippable and renaming its image.
func (s *Station) batchShippable(ctx context.Context, u BatchUnit, opt BatchOptions) (r BatchResult, done bool) {
	r = BatchResult{Serial: u.Serial, Status: BatchSkipped}
	switch {
	case u.Target != "":
		r.Image, r.Detail = u.Target, "already shippable: not provisioned again (reprovision to do it again)"
	default:
		final := filepath.Join(opt.OutDir, u.Serial+".img")
		if _, err := os.Stat(final + ".partial"); err == nil {
			return r, false
		}
		if _, err := os.Stat(final); err == nil {
			r.Image, r.Detail = final, "already shippable, image in place"
			if err := privateImage(final); err != nil {
				r.Status, r.Err = BatchFailed, err
			}
		} else {
			r.Detail = "already shippable (provisioned elsewhere; its image is not in " + opt.OutDir + "): not provisioned again (reprovision to make a new image)"
		}
	}
	s.batchRecord(ctx, &r)
	return r, true
}

// batchRecord fills the unit's state and active certificate from the inventory, even after ctx was cancelled.
func (s *Station) batchRecord(ctx context.Context, r *BatchResult) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if u, err := s.Inv.Unit(rctx, r.Serial); err == nil {
		r.State = u.State
	} else if !errors.Is(err, inventory.ErrNotFound) {
		r.State = r.Result.State
	}
	if c, err := s.Inv.ActiveCertificate(rctx, r.Serial); err == nil {
		r.Certificate = c
	}
}

func (s *Station) batchUnit(ctx context.Context, dev *tpm.Device, u BatchUnit, shippable bool, opt BatchOptions) BatchResult {
	start := time.Now()
	r := BatchResult{Serial: u.Serial}
	done := func(status string, err error) BatchResult {
		r.Status, r.Err, r.Duration = status, err, time.Since(start)
		if status == BatchOK && opt.Hash && r.Image != "" && ctx.Err() == nil {
			if r.SHA256, err = ImageSHA256(r.Image); err != nil {
				r.Status, r.Err = BatchFailed, fmt.Errorf("image %s is shippable but could not be read back for its hash: %w", r.Image, err)
			}
		}
		return r
	}
	outcome := func(err error) string {
		if errors.Is(err, ErrInterrupted) || (ctx.Err() != nil && errors.Is(err, context.Canceled)) {
			return BatchInterrupted
		}
		return BatchFailed
	}
	req := ProvisionRequest{Serial: u.Serial, Fields: u.Fields, Profile: opt.Profile, Handshake: opt.Handshake,
		Operator: opt.Operator, Reprovision: shippable && opt.Reprovision}
	if opt.OpenTPM != nil {
		d, err := opt.OpenTPM(ctx, u.Serial)
		if err != nil {
			return done(outcome(err), fmt.Errorf("open the unit's TPM: %w", err))
		}
		defer d.Close()
		dev = d
	}
	if u.Target != "" {
		r.Image, req.Image = u.Target, u.Target
		if err := privateImage(u.Target); err != nil {
			return done(BatchFailed, err)
		}
		res, err := s.Provision(ctx, dev, req, nil)
		r.Result = res
		if err != nil {
			return done(outcome(err), err)
		}
		return done(BatchOK, nil)
	}
	final := filepath.Join(opt.OutDir, u.Serial+".img")
	partial := final + ".partial"
	if shippable && !opt.Reprovision {
		// Shippable but not renamed: an earlier run stopped between the two. The partial image passed; check it
		// again, then finish the rename. If it no longer verifies, the unit is still not provisioned again by accident.
		if _, err := s.VerifyImage(ctx, partial, u.Serial, VerifyOptions{Profile: opt.Profile}); err != nil {
			if ctx.Err() != nil {
				return done(BatchInterrupted, fmt.Errorf("%w while checking %s: %w", ErrInterrupted, partial, context.Cause(ctx)))
			}
			return done(BatchFailed, fmt.Errorf("unit %s is shippable but the image an earlier run left, %s, fails verification (%v): reprovision to make a new one", u.Serial, partial, err))
		}
		if err := publish(partial, final); err != nil {
			return done(BatchFailed, err)
		}
		r.Image, r.Detail = final, "already shippable: finished the rename of the image an earlier run verified"
		return done(BatchOK, nil)
	}
	os.Remove(partial)
	if err := CloneImage(ctx, opt.Golden, partial); err != nil {
		if ctx.Err() != nil {
			return done(BatchInterrupted, fmt.Errorf("%w while cloning the golden image (nothing recorded): %w", ErrInterrupted, context.Cause(ctx)))
		}
		return done(BatchFailed, fmt.Errorf("clone %s: %w", opt.Golden, err))
	}
	req.Image = partial
	res, err := s.Provision(ctx, dev, req, nil)
	r.Result = res
	if err != nil {
		os.Remove(partial)
		return done(outcome(err), err)
	}
	if err := publish(partial, final); err != nil {
		return done(BatchFailed, err)
	}
	r.Image = final
	return done(BatchOK, nil)
}

// feedJobs hands this worker's goroutines the units the shared queue gives it, until the queue has none left (waiting
// while other workers still hold units: a dead worker's come back), ctx ends or fail-fast stops the batch.
// It gives up (the error) when the queue cannot be read for batchJobGiveUp.
func (s *Station) feedJobs(ctx context.Context, q BatchJobs, units []BatchUnit, todo []int, jobs chan<- int, stop <-chan struct{}) error {
	index := map[string]int{}
	for _, i := range todo {
		index[units[i].Serial] = i
	}
	var failingSince time.Time
	for {
		serial, ok, err := q.Take(ctx)
		if err != nil {
			s.Log.Warn("batch: taking a unit from the central store", "error", err)
			if failingSince.IsZero() {
				failingSince = time.Now()
			} else if time.Since(failingSince) > batchJobGiveUp {
				return fmt.Errorf("not started: the central store's batch queue cannot be read: %w", err)
			}
		} else {
			failingSince = time.Time{}
		}
		if ok {
			i, known := index[serial]
			if !known { // not in this worker's list, or settled here already (shippable): nothing to do for it here
				q.Finish(ctx, serial, BatchSkipped)
				continue
			}
			select {
			case jobs <- i:
				continue
			case <-ctx.Done():
				return nil
			case <-stop:
				return nil
			}
		}
		if err == nil {
			if n, rerr := q.Remaining(ctx); rerr == nil && n == 0 {
				return nil
			}
		}
		select {
		case <-time.After(batchJobPoll):
		case <-ctx.Done():
			return nil
		case <-stop:
			return nil
		}
	}
}
