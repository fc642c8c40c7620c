package station

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"provision/inventory"
	"provision/tpm/attest"
)

// AttestReport is `provision attest verify`: the stored attestation of a unit, re-checked offline.
type AttestReport struct {
	Serial      string
	Attestation inventory.Attestation
	Check       attest.Check // the evidence re-verified against the stored chain and the station's roots
	Problems    []string     // everything that does not verify, Check's included; empty: it verifies
}

// ErrAttestation: a unit's stored attestation does not verify (exit 1).
var ErrAttestation = errors.New("attestation does not verify")

// VerifyAttestation re-checks a unit's latest attestation offline: the evidence itself (attest.VerifyEvidence, with
// the unit's recorded key fingerprint), its fingerprint against the attest entry of the audit log, and the unit's
// TPM binding against the evidence's EK. A unit never attested is ErrNotFound; evidence that does not verify is
// ErrAttestation, with the report saying why.
func (s *Station) VerifyAttestation(ctx context.Context, serial string) (AttestReport, error) {
	rep := AttestReport{Serial: serial}
	u, err := s.Inv.Unit(ctx, serial)
	if err != nil {
		return rep, err
	}
	a, err := s.Inv.Attestation(ctx, serial)
	if err != nil {
		return rep, err
	}
	rep.Attestation = a
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }
	switch {
	case a.Status == inventory.AttestOff || a.Status == inventory.AttestSoft:
		if a.Outcome != "ok" {
			problem("the last attest run failed: %s", a.Cause)
		}
		return rep, rep.err()
	case len(a.Evidence) == 0:
		problem("no evidence stored for a %s attestation", a.Status)
		return rep, rep.err()
	}
	if got := inventory.EvidenceSHA256(a.Evidence); got != a.EvidenceSHA256 {
		problem("the evidence's fingerprint %.16s is not the one recorded with it (%.16s)", got, a.EvidenceSHA256)
	}
	if a.Outcome == "ok" {
		if err := s.auditVouches(ctx, serial, a.EvidenceSHA256); err != nil {
			problem("%v", err)
		}
	} else {
		problem("the last attest run failed: %s", a.Cause)
	}
	var ev attest.Evidence
	if err := json.Unmarshal(a.Evidence, &ev); err != nil {
		problem("the evidence does not parse: %v", err)
		return rep, rep.err()
	}
	roots, err := s.TPMRoots()
	if err != nil {
		return rep, err
	}
	rep.Check = attest.VerifyEvidence(&ev, roots, u.PublicSHA256)
	rep.Problems = append(rep.Problems, rep.Check.Problems...)
	if ev.Status != a.Status {
		problem("the evidence says %s, the inventory %s", ev.Status, a.Status)
	}
	if pub, err := attest.PublicKey(ev.EKPublic); err == nil {
		if sum, _ := attest.KeySHA256(pub); sum != a.EKSHA256 {
			problem("the evidence's EK %.16s is not the recorded ek_sha256 %.16s", sum, a.EKSHA256)
		} else if a.Outcome == "ok" && u.EKSHA256 != "" && u.EKSHA256 != sum {
			problem("the unit is bound to EK %.16s, its evidence shows EK %.16s", u.EKSHA256, sum)
		}
	}
	return rep, rep.err()
}

func (rep AttestReport) err() error {
	if len(rep.Problems) == 0 {
		return nil
	}
	return fmt.Errorf("%s: %s: %w", rep.Serial, strings.Join(rep.Problems, "; "), ErrAttestation)
}

// auditVouches checks that the audit log's last successful attest entry of the unit names this evidence.
func (s *Station) auditVouches(ctx context.Context, serial, evidenceSHA string) error {
	events, err := s.Inv.Events(ctx, serial)
	if err != nil {
		return err
	}
	for i := len(events) - 1; i >= 0; i-- {
		e := events[i]
		if e.Step != string(StepAttest) || e.Outcome != "ok" {
			continue
		}
		if strings.HasSuffix(e.Detail, "evidence sha256 "+evidenceSHA) {
			return nil
		}
		return fmt.Errorf("the audit log's attest entry %d names other evidence than the one stored", e.Seq)
	}
	return errors.New("the audit log has no attest entry for this evidence")
}
