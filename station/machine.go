package station

import (
	"fmt"
	"slices"

	"provision/inventory"
)

// The unit state machine. A unit's state says what exists durably, whichever command reached it:
//
//	new        recorded, nothing made yet (not stored: a unit without a row is new)
//	keyed      its key exists (in its TPM, or a software key held by the run); no certificate yet
//	certified  a certificate for that key is issued and recorded as the unit's active one
//	           (enroll ends here, with its bundle on stable storage: an event "bundle ok" follows)
//	imaged     the certificate, key file and configuration are written into its image, read back and synced
//	verified   the image passed the verification checklist
//	shippable  a live mTLS handshake with its key and certificate passed: every step passed
//	failed     a step failed (FailedStep names it); the next run resumes or starts over
//
// Each step, when it succeeds, leads to one state (or leaves the state as it is); a failure leads to failed; an
// interruption leaves the state of the last completed step. The table below is the only place that says so: the
// runner (Station.Provision) records every state change through it.

// Step is one step of a unit's run, recorded in the audit log as these strings (docs/states.md). StepBundle is enroll's
// delivery: the bundle written to disk.
type Step string

const (
	StepValidate  Step = "validate"
	StepKey       Step = "key"
	StepAttest    Step = "attest"
	StepCSR       Step = "csr"
	StepSign      Step = "sign"
	StepImage     Step = "image"
	StepVerify    Step = "verify"
	StepHandshake Step = "handshake"
	StepBundle    Step = "bundle"
)

// stepDef is one row of the table: a step, the state its success leads to ("" = unchanged) and the audit outcome it
// records ("" = "ok"). A step with neither records nothing on success (validate, csr).
type stepDef struct {
	Name    Step
	Success inventory.State
	Outcome string
}

// unitSteps is the table for a unit whose identity goes into its image (unit, tui, batch), in order.
var unitSteps = []stepDef{
	{StepValidate, "", ""},
	{StepKey, inventory.StateKeyed, ""},
	{StepAttest, "", "ok"}, // an entry of its own (the evidence's fingerprint); the unit stays keyed
	{StepCSR, "", ""},
	{StepSign, inventory.StateCertified, ""},
	{StepImage, inventory.StateImaged, ""},
	{StepVerify, inventory.StateVerified, ""},
	{StepHandshake, inventory.StateShippable, "shippable"},
}

// enrollSteps is the table for `provision enroll`, whose identity goes into a bundle directory: the unit ends certified,
// its bundle on stable storage (the bundle step records an event and leaves the state as it is).
var enrollSteps = machine{
	{StepValidate, "", ""},
	{StepKey, inventory.StateKeyed, ""},
	{StepAttest, "", "ok"},
	{StepCSR, "", ""},
	{StepSign, inventory.StateCertified, ""},
	{StepBundle, "", "ok"}, // an entry of its own: the bundle of this certificate is on stable storage
}

// machine is a table of steps in order.
type machine []stepDef

// index is the step's position, or -1.
func (m machine) index(step Step) int {
	return slices.IndexFunc(m, func(d stepDef) bool { return d.Name == step })
}

// after is the state a step's outcome leads to from state from: failure → failed; success → the step's state, or from
// when the step changes nothing. A step the table does not hold is an error (a programming mistake, never a unit's).
func (m machine) after(from inventory.State, step Step, ok bool) (inventory.State, error) {
	i := m.index(step)
	if i < 0 {
		return "", fmt.Errorf("state machine: unknown step %q", step)
	}
	if !ok {
		return inventory.StateFailed, nil
	}
	if m[i].Success == "" {
		return from, nil
	}
	return m[i].Success, nil
}

// canFollow reports whether step may run right after prev completed in the same run ("" = the run's start, which
// only validate may follow): steps run in table order, none twice, none left out except those a resume skips.
func (m machine) canFollow(prev, step Step, skipped func(Step) bool) bool {
	i := m.index(step)
	if i < 0 {
		return false
	}
	if prev == "" {
		return i == 0
	}
	j := m.index(prev)
	if j < 0 || j >= i {
		return false
	}
	for k := j + 1; k < i; k++ {
		if !skipped(m[k].Name) {
			return false
		}
	}
	return true
}

// startsFrom is where a run of a unit in state (with failedStep when failed) starts: the image-resume point (the step
// after image) when the unit's image may hold its identity, else the key step. Whether the image's identity is
// really reused is for the runner to check (it may still start over).
func (m machine) startsFrom(state inventory.State, failedStep Step) Step {
	switch state {
	case inventory.StateImaged, inventory.StateVerified:
		return StepVerify
	case inventory.StateFailed:
		if fi := m.index(failedStep); fi > m.index(StepImage) {
			return StepVerify
		}
	}
	return StepKey
}

// withStep is the table with a step inserted after another: how a new step (e.g. attest after key) joins the
// machine. Used by tests; a real new step is a new row in unitSteps.
func (m machine) withStep(after Step, d stepDef) machine {
	i := m.index(after)
	out := append(machine{}, m[:i+1]...)
	out = append(out, d)
	return append(out, m[i+1:]...)
}

// AuditStateRule is the state machine's reading of an audit entry, for the audit check of the units table
// (inventory.StateRule): failed → failed; a step's success → the state the tables say it leads to; entries of steps
// that change no state (validate, csr, bundle, interrupted, ...) → nil. Logs written before the one state machine
// left enroll's units keyed after sign: that stays allowed.
func AuditStateRule(step, outcome string) []inventory.State {
	if outcome == "failed" {
		return []inventory.State{inventory.StateFailed}
	}
	var out []inventory.State
	for _, m := range []machine{unitSteps, enrollSteps} {
		i := m.index(Step(step))
		if i < 0 || m[i].Success == "" {
			continue
		}
		want := m[i].Outcome
		if want == "" {
			want = "ok"
		}
		if outcome == want && !slices.Contains(out, m[i].Success) {
			out = append(out, m[i].Success)
		}
	}
	if Step(step) == StepSign && out != nil {
		out = append(out, inventory.StateKeyed)
	}
	return out
}
