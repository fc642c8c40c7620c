package station

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"provision/inventory"
	"provision/station/ca"
	"provision/tpm"
)

// The table itself: what every step's success and failure lead to, from every state.
func TestMachineTransitions(t *testing.T) {
	want := map[Step]inventory.State{ // step → state its success leads to ("" = unchanged)
		StepValidate: "", StepKey: inventory.StateKeyed, StepAttest: "", StepCSR: "", StepSign: inventory.StateCertified,
		StepImage: inventory.StateImaged, StepVerify: inventory.StateVerified, StepHandshake: inventory.StateShippable,
	}
	states := []inventory.State{inventory.StateNew, inventory.StateKeyed, inventory.StateCertified, inventory.StateImaged,
		inventory.StateVerified, inventory.StateShippable, inventory.StateFailed}
	m := machine(unitSteps)
	if len(m) != len(want) {
		t.Fatalf("table has %d steps, want %d", len(m), len(want))
	}
	for i, step := range Steps {
		if m[i].Name != step {
			t.Fatalf("step %d is %s, want %s (the contract's order)", i, m[i].Name, step)
		}
	}
	for _, from := range states {
		for step, succ := range want {
			got, err := m.after(from, step, true)
			exp := succ
			if exp == "" {
				exp = from
			}
			if err != nil || got != exp {
				t.Errorf("%s --%s ok--> %q (%v), want %q", from, step, got, err, exp)
			}
			if got, err := m.after(from, step, false); err != nil || got != inventory.StateFailed {
				t.Errorf("%s --%s failed--> %q (%v), want failed", from, step, got, err)
			}
		}
		if _, err := m.after(from, "nosuch", true); err == nil {
			t.Errorf("a step the table does not hold was accepted")
		}
	}
}

// Which step may follow which: only the next one in the table, or the next after steps a resume skips.
func TestMachineOrder(t *testing.T) {
	m := machine(unitSteps)
	none := func(Step) bool { return false }
	for i, prev := range append([]Step{""}, Steps...) {
		for j, step := range Steps {
			allowed := j == i // Steps[i] follows Steps[i-1]; "" (the start) is followed by validate only
			if got := m.canFollow(prev, step, none); got != allowed {
				t.Errorf("canFollow(%q, %q) = %v, want %v", prev, step, got, allowed)
			}
		}
	}
	resumed := func(s Step) bool {
		return s == StepKey || s == StepAttest || s == StepCSR || s == StepSign || s == StepImage
	}
	if !m.canFollow(StepValidate, StepVerify, resumed) {
		t.Error("a resumed run may go from validate to verify")
	}
	if m.canFollow(StepValidate, StepHandshake, resumed) {
		t.Error("verify may never be left out")
	}
	if m.canFollow(StepKey, "nosuch", none) {
		t.Error("a step the table does not hold may not run")
	}
}

// Where a run starts, for a unit in each state (and failed at each step).
func TestMachineStartsFrom(t *testing.T) {
	m := machine(unitSteps)
	for _, tc := range []struct {
		state        inventory.State
		failed, want Step
	}{
		{inventory.StateNew, "", StepKey}, {inventory.StateKeyed, "", StepKey}, {inventory.StateCertified, "", StepKey},
		{inventory.StateImaged, "", StepVerify}, {inventory.StateVerified, "", StepVerify},
		{inventory.StateShippable, "", StepKey}, // only with --reprovision, which starts over
		{inventory.StateFailed, StepValidate, StepKey}, {inventory.StateFailed, StepKey, StepKey},
		{inventory.StateFailed, StepCSR, StepKey}, {inventory.StateFailed, StepSign, StepKey},
		{inventory.StateFailed, StepImage, StepKey}, {inventory.StateFailed, StepVerify, StepVerify},
		{inventory.StateFailed, StepHandshake, StepVerify},
	} {
		if got := m.startsFrom(tc.state, tc.failed); got != tc.want {
			t.Errorf("startsFrom(%s, %s) = %s, want %s", tc.state, tc.failed, got, tc.want)
		}
	}
}

// fakeSink keeps units' identities in memory instead of an image, and fails a step when told to.
type fakeSink struct {
	mu        sync.Mutex
	delivered map[string]fakeDelivery
	fail      map[Step]error // step (preflight, image, verify) → error
}

type fakeDelivery struct{ key, cert []byte }

func newFakeSink() *fakeSink {
	return &fakeSink{delivered: map[string]fakeDelivery{}, fail: map[Step]error{}}
}

func (f *fakeSink) failing(step Step) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail[step]
}

func (f *fakeSink) preflight(ctx context.Context, r *run) error { return f.failing("preflight") }

func (f *fakeSink) refuse(ctx context.Context, r *run, u inventory.Unit) error {
	return imageSink{}.refuse(ctx, r, u)
}

func (f *fakeSink) deliver(ctx context.Context, r *run) (string, error) {
	if err := f.failing(StepImage); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.delivered[r.req.Serial] = fakeDelivery{key: bytes.Clone(r.keyPEM), cert: ca.EncodeCerts(r.res.Certificate)}
	return "delivered", nil
}

func (f *fakeSink) check(ctx context.Context, r *run) (string, error) {
	if err := f.failing(StepVerify); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !bytes.Equal(f.delivered[r.req.Serial].cert, ca.EncodeCerts(r.res.Certificate)) {
		return "", errors.New("the sink holds another certificate")
	}
	return "checked", nil
}

func (f *fakeSink) reload(ctx context.Context, r *run) bool {
	f.mu.Lock()
	d, ok := f.delivered[r.req.Serial]
	f.mu.Unlock()
	active, err := r.s.Inv.ActiveCertificate(ctx, r.req.Serial)
	if !ok || err != nil {
		return false
	}
	certs, err := ca.ParseCerts(d.cert)
	if err != nil || ca.Fingerprint(certs[0]) != active.SHA256 {
		return false
	}
	k, err := tpm.LoadKeyFile(ctx, r.dev, d.key)
	if err != nil {
		return false
	}
	r.key, r.closeFn, r.keyKind, r.keyPEM = k, k.Close, tpm.KindTPM, d.key
	if r.pubSHA, err = publicSHA256(k.Public()); err != nil {
		return false
	}
	r.res.Certificate, r.res.CertSHA256, r.res.KeyKind = certs[0], active.SHA256, tpm.KindTPM
	return true
}

// machineStation is a station whose units go to a fake sink, on the in-process simulator. Its many units share one
// simulator, so attestation is off (one TPM is one unit otherwise; attest_test.go tests the attest step).
func machineStation(t *testing.T) (*Station, *fakeSink, *tpm.Device) {
	s := newStation(t)
	s.Config.Attestation = AttestOff
	f := newFakeSink()
	s.sink = f
	return s, f, openDevice(t, "sim")
}

func unitState(t *testing.T, s *Station, serial string) inventory.State {
	t.Helper()
	u, err := s.Inv.Unit(context.Background(), serial)
	if errors.Is(err, inventory.ErrNotFound) {
		return inventory.StateNew
	}
	if err != nil {
		t.Fatal(err)
	}
	return u.State
}

// A whole run records exactly the table's state after each step, in the table's order.
func TestRunnerFollowsTheTable(t *testing.T) {
	s, _, d := machineStation(t)
	var seen []string
	res, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SM-0001"}, func(e Event) {
		if e.Status == StatusOK {
			seen = append(seen, string(e.Step)+"→"+string(unitState(t, s, e.Serial)))
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"validate→new", "key→keyed", "csr→keyed", "sign→certified", "image→imaged", "verify→verified",
		"handshake→shippable"}
	if strings.Join(seen, " ") != strings.Join(want, " ") {
		t.Fatalf("got  %v\nwant %v", seen, want)
	}
	if res.State != inventory.StateShippable || activeCount(t, s, "SM-0001") != 1 {
		t.Fatalf("result %s, %d active certificates", res.State, activeCount(t, s, "SM-0001"))
	}
}

// Interrupting between every pair of steps: the next step says cancelled, the unit keeps the state of the last
// completed step, an interrupted event is recorded, and the next run finishes it with one active certificate.
func TestRunnerInterruptedBetweenEveryPair(t *testing.T) {
	s, _, d := machineStation(t)
	for i := 0; i+1 < len(unitSteps); i++ {
		after, next := unitSteps[i].Name, unitSteps[i+1].Name
		t.Run(string(after)+"|"+string(next), func(t *testing.T) {
			serial := fmt.Sprintf("SM-INT-%d", i)
			ctx, cancel := context.WithCancel(context.Background())
			var last Event
			var stateAt inventory.State
			_, err := s.Provision(ctx, d, ProvisionRequest{Serial: serial}, func(e Event) {
				last = e
				if e.Step == after && (e.Status == StatusOK || e.Status == StatusSkipped) { // attest is skipped (off)
					stateAt = unitState(t, s, serial)
					cancel()
				}
			})
			cancel()
			if !errors.Is(err, ErrInterrupted) {
				t.Fatalf("got %v, want ErrInterrupted", err)
			}
			if last.Step != next || last.Status != StatusCancelled {
				t.Fatalf("last event %s %s, want %s cancelled", last.Step, last.Status, next)
			}
			if got := unitState(t, s, serial); got != stateAt {
				t.Fatalf("state %s after the interruption, want %s (the last completed step's)", got, stateAt)
			}
			if stateAt != inventory.StateNew {
				evs, _ := s.Inv.Events(context.Background(), serial)
				if e := evs[len(evs)-1]; e.Outcome != OutcomeInterrupted || e.Step != string(next) {
					t.Fatalf("last audit entry %s %s, want %s interrupted", e.Step, e.Outcome, next)
				}
			}
			if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: serial}, nil); err != nil {
				t.Fatalf("rerun: %v", err)
			}
			if n := activeCount(t, s, serial); n != 1 || unitState(t, s, serial) != inventory.StateShippable {
				t.Fatalf("after the rerun: %s with %d active certificates", unitState(t, s, serial), n)
			}
		})
	}
}

// A unit that failed at each step resumes as the table says: from verify when its identity was delivered, else from
// the key step (a new key and certificate, the old one superseded). Refusals change nothing.
func TestRunnerResumesFromEachState(t *testing.T) {
	s, f, d := machineStation(t)
	ctx := context.Background()
	for _, failAt := range []Step{"preflight", StepImage, StepVerify} {
		t.Run("failed at "+string(failAt), func(t *testing.T) {
			serial := "SM-RES-" + string(failAt)
			f.mu.Lock()
			f.fail[failAt] = errors.New("injected")
			f.mu.Unlock()
			if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: serial}, nil); err == nil {
				t.Fatal("the injected failure did not fail the unit")
			}
			f.mu.Lock()
			delete(f.fail, failAt)
			f.mu.Unlock()
			u, _ := s.Inv.Unit(ctx, serial)
			wantStep := failAt
			if failAt == "preflight" {
				wantStep = StepValidate
			}
			if u.State != inventory.StateFailed || u.FailedStep != string(wantStep) {
				t.Fatalf("unit %s at %s, want failed at %s", u.State, u.FailedStep, wantStep)
			}
			before, _ := s.Inv.Certificates(ctx, serial)
			var ran []Step
			if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: serial}, func(e Event) {
				if e.Status == StatusOK {
					ran = append(ran, e.Step)
				}
			}); err != nil {
				t.Fatalf("resume: %v", err)
			}
			from := machine(unitSteps).startsFrom(inventory.StateFailed, wantStep)
			if ran[1] != from {
				t.Fatalf("resumed run ran %v, want it to start at %s", ran, from)
			}
			after, _ := s.Inv.Certificates(ctx, serial)
			newCerts := len(after) - len(before)
			if (from == StepVerify) != (newCerts == 0) {
				t.Fatalf("resume from %s issued %d new certificates", from, newCerts)
			}
			if activeCount(t, s, serial) != 1 {
				t.Fatalf("%d active certificates", activeCount(t, s, serial))
			}
		})
	}
	// A shippable unit is refused without --reprovision, and the refusal changes nothing.
	evs, _ := s.Inv.Events(ctx, "SM-RES-image")
	if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SM-RES-image"}, nil); !errors.Is(err, ErrRefused) {
		t.Fatalf("shippable unit: got %v, want ErrRefused", err)
	}
	if evs2, _ := s.Inv.Events(ctx, "SM-RES-image"); len(evs2) != len(evs) || unitState(t, s, "SM-RES-image") != inventory.StateShippable {
		t.Fatal("a refused run changed the unit's record")
	}
}

// Adding a step is a row in the table and a function: here a test-only step after key (where attest goes), which the
// runner runs in order, reports, and interrupts like any other.
func TestRunnerWithAddedStep(t *testing.T) {
	s, _, d := machineStation(t)
	const attest Step = "attest-test"
	s.machine = machine(unitSteps).withStep(StepKey, stepDef{Name: attest})
	calls := 0
	s.extraSteps = map[Step]func(context.Context, *run) (string, error){
		attest: func(ctx context.Context, r *run) (string, error) {
			calls++
			if r.key == nil {
				return "", errors.New("no key yet")
			}
			return "key is in the TPM", nil
		},
	}
	var order []Step
	if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SM-ADD-1"}, func(e Event) {
		if e.Status == StatusOK {
			order = append(order, e.Step)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(order) != "[validate key attest-test csr sign image verify handshake]" || calls != 1 {
		t.Fatalf("ran %v (%d calls)", order, calls)
	}
	// Interrupted right after key: the new step is the one cancelled.
	ctx, cancel := context.WithCancel(context.Background())
	var last Event
	s.Provision(ctx, d, ProvisionRequest{Serial: "SM-ADD-2"}, func(e Event) {
		last = e
		if e.Step == StepKey && e.Status == StatusOK {
			cancel()
		}
	})
	cancel()
	if last.Step != attest || last.Status != StatusCancelled {
		t.Fatalf("last event %s %s", last.Step, last.Status)
	}
}

// One meaning per state, whichever command reached it: a unit the pipeline left certified (its certificate recorded,
// never delivered) is enrolled again by enroll, which ends it certified with its bundle; only then does enroll refuse
// it; and the pipeline starts such a unit over from its key.
func TestStatesMeanTheSameForEnrollAndUnit(t *testing.T) {
	s, _, d := machineStation(t)
	ctx, cancel := context.WithCancel(context.Background())
	s.Provision(ctx, d, ProvisionRequest{Serial: "SM-BOTH-1"}, func(e Event) {
		if e.Step == StepSign && e.Status == StatusOK {
			cancel()
		}
	})
	cancel()
	if st := unitState(t, s, "SM-BOTH-1"); st != inventory.StateCertified {
		t.Fatalf("interrupted after sign: %s, want certified", st)
	}
	out := t.TempDir()
	r := enrollOne(t, s, d, "SM-BOTH-1", out, false)
	if r.Err != nil || r.State != inventory.StateCertified {
		t.Fatalf("enroll of an undelivered certified unit: %+v", r)
	}
	evs, _ := s.Inv.Events(context.Background(), "SM-BOTH-1")
	if e := evs[len(evs)-1]; e.Step != string(StepBundle) || e.Outcome != "ok" || e.CertSHA256 != r.CertSHA256 {
		t.Fatalf("last entry %s %s, want the bundle of the new certificate", e.Step, e.Outcome)
	}
	if r2 := enrollOne(t, s, d, "SM-BOTH-1", out, false); !errors.Is(r2.Err, ErrRefused) {
		t.Fatalf("second enroll: %v, want refused", r2.Err)
	}
	var ran []Step
	if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SM-BOTH-1"}, func(e Event) {
		if e.Status == StatusOK {
			ran = append(ran, e.Step)
		}
	}); err != nil {
		t.Fatal(err)
	}
	if ran[1] != StepKey || activeCount(t, s, "SM-BOTH-1") != 1 {
		t.Fatalf("unit after enroll ran %v", ran)
	}
}

// The audit check reads entries through the state machine: each state-changing step's success leaves the state the
// table says, failures leave failed, the rest change nothing.
func TestAuditStateRule(t *testing.T) {
	for _, tc := range []struct {
		step    Step
		outcome string
		want    []inventory.State
	}{
		{StepKey, "ok", []inventory.State{inventory.StateKeyed}},
		{StepSign, "ok", []inventory.State{inventory.StateCertified, inventory.StateKeyed}},
		{StepImage, "ok", []inventory.State{inventory.StateImaged}},
		{StepVerify, "ok", []inventory.State{inventory.StateVerified}},
		{StepHandshake, "shippable", []inventory.State{inventory.StateShippable}},
		{StepHandshake, "ok", nil},
		{StepValidate, "ok", nil}, {StepCSR, "ok", nil}, {StepBundle, "ok", nil},
		{StepImage, OutcomeInterrupted, nil},
		{StepVerify, "failed", []inventory.State{inventory.StateFailed}},
	} {
		if got := AuditStateRule(string(tc.step), tc.outcome); fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s %s: %v, want %v", tc.step, tc.outcome, got, tc.want)
		}
	}
}
