package inventory

import (
	"context"
	"fmt"
)

// StateRule says which states a unit may be in when an entry with this step and outcome is its last state-changing
// one, or nil when such an entry changes nothing. The station passes its state machine's rule (Station's one table);
// DefaultStateRule is this package's own reading of the standard steps, for callers without one.
type StateRule func(step, outcome string) []State

// DefaultStateRule: failed → failed; shippable → shippable; ok of key → keyed, sign → certified (or keyed: enroll
// before the one state machine), image → imaged, verify → verified, bundle → certified; anything else changes nothing.
// The lifecycle steps (rma ok → returned; revoke, rotate: no change) are read the same way whichever rule is given
// (lifecycle.go).
func DefaultStateRule(step, outcome string) []State {
	switch outcome {
	case "failed":
		return []State{StateFailed}
	case "shippable":
		return []State{StateShippable}
	case "ok":
		switch step {
		case "key":
			return []State{StateKeyed}
		case "sign":
			return []State{StateCertified, StateKeyed}
		case "image":
			return []State{StateImaged}
		case "verify":
			return []State{StateVerified}
		case "bundle":
			return []State{StateCertified}
		}
	}
	return nil
}

// checkTables checks the units and certificates tables against the log: every unit has events and the state its last
// state-changing event leaves; every certificate has its issuing event (sign, ok, same fingerprint and unit); every
// event names a recorded unit, and a recorded certificate when it names one.
func checkTables(ctx context.Context, q queryer, events []Event, rule StateRule, problem func(int64, string, ...any)) error {
	if rule == nil {
		rule = DefaultStateRule
	}
	rule = lifecycleRule(rule)
	units := map[string]string{}
	rows, err := q.QueryContext(ctx, "SELECT serial, state FROM units ORDER BY serial")
	if err != nil {
		return fmt.Errorf("inventory: units: %w", classify(err))
	}
	var order []string
	for rows.Next() {
		var s, st string
		if err := rows.Scan(&s, &st); err != nil {
			rows.Close()
			return fmt.Errorf("inventory: units: %w", classify(err))
		}
		units[s] = st
		order = append(order, s)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("inventory: units: %w", classify(err))
	}
	type cert struct{ serial, unit, sha string }
	var certs []cert
	known := map[string]bool{}
	rows, err = q.QueryContext(ctx, "SELECT serial, unit, sha256 FROM certificates ORDER BY rowid")
	if err != nil {
		return fmt.Errorf("inventory: certificates: %w", classify(err))
	}
	for rows.Next() {
		var c cert
		if err := rows.Scan(&c.serial, &c.unit, &c.sha); err != nil {
			rows.Close()
			return fmt.Errorf("inventory: certificates: %w", classify(err))
		}
		certs = append(certs, c)
		known[c.sha] = true
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fmt.Errorf("inventory: certificates: %w", classify(err))
	}

	issued := map[[2]string]bool{} // unit, fingerprint
	lastState := map[string]Event{}
	hasEvents := map[string]bool{}
	reported := map[string]bool{}
	for _, e := range events {
		hasEvents[e.Serial] = true
		if _, ok := units[e.Serial]; !ok && !reported[e.Serial] {
			reported[e.Serial] = true
			problem(e.Seq, "names unit %s, which the units table does not hold (record removed)", e.Serial)
		}
		if e.CertSHA256 != "" && !known[e.CertSHA256] {
			problem(e.Seq, "names certificate %.16s…, which the certificates table does not hold (record removed or altered)", e.CertSHA256)
		}
		if issuingEntry(e) {
			issued[[2]string{e.Serial, e.CertSHA256}] = true
		}
		if rule(e.Step, e.Outcome) != nil {
			lastState[e.Serial] = e
		}
	}
	for _, s := range order {
		if !hasEvents[s] {
			problem(0, "unit %s has a record but no audit entries (inserted without the log)", s)
			continue
		}
		e, ok := lastState[s]
		if !ok {
			continue
		}
		allowed := rule(e.Step, e.Outcome)
		match := false
		for _, st := range allowed {
			match = match || string(st) == units[s]
		}
		if !match {
			problem(e.Seq, "unit %s is %s in the units table, but its last state-changing entry (%s %s) leaves it %s (record changed without the log)",
				s, units[s], e.Step, e.Outcome, allowed[0])
		}
	}
	for _, c := range certs {
		if !issued[[2]string{c.unit, c.sha}] {
			problem(0, "certificate %s of unit %s (%.16s…) has no issuing entry in the log (inserted or altered without the log)", c.serial, c.unit, c.sha)
		}
	}
	return nil
}
