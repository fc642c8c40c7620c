package inventory

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Attestation statuses (attest step; docs/attestation.md).
const (
	AttestTrusted   = "trusted"
	AttestUntrusted = "untrusted"
	AttestAbsent    = "absent"
	AttestOff       = "off"
	AttestSoft      = "soft"
)

// Attestation is one attest run of a unit: its verdict and the evidence (JSON, as the station's attestation package
// writes it), kept so the proof outlives the station.
type Attestation struct {
	ID              int64
	Serial          string
	Time            time.Time
	Policy          string // off | record | required
	Outcome         string // ok | failed
	Status          string // trusted | untrusted | absent | off | soft
	EKSHA256        string // SHA-256 of the EK public key (SPKI DER)
	EKCertSHA256    string // SHA-256 of the EK certificate (DER)
	EKIssuer        string
	TPMManufacturer string
	Cause           string   // why not trusted, or why the step failed
	Warnings        []string // e.g. a manufacturer named differently by certificate and TPM
	Evidence        []byte   // JSON
	EvidenceSHA256  string   // SHA-256 of Evidence, also written in the attest event's detail (the audit log vouches for it)
}

// EvidenceSHA256 is the fingerprint of an evidence document, as Attestation.EvidenceSHA256 and the audit log carry it.
func EvidenceSHA256(evidence []byte) string {
	if len(evidence) == 0 {
		return ""
	}
	sum := sha256.Sum256(evidence)
	return hex.EncodeToString(sum[:])
}

const attestColumns = "id, serial, time, policy, outcome, status, ek_sha256, ek_certificate_sha256, ek_issuer, tpm_manufacturer, cause, warnings, evidence, evidence_sha256"

// AddAttestation records an attest run. EvidenceSHA256 is computed from Evidence.
func (tx *Tx) AddAttestation(a Attestation) error {
	if a.Time.IsZero() {
		a.Time = time.Now()
	}
	a.EvidenceSHA256 = EvidenceSHA256(a.Evidence)
	_, err := tx.tx.ExecContext(tx.ctx, "INSERT INTO attestations ("+attestColumns[len("id, "):]+") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
		a.Serial, fmtTime(a.Time), a.Policy, a.Outcome, a.Status, a.EKSHA256, a.EKCertSHA256, a.EKIssuer, a.TPMManufacturer,
		a.Cause, strings.Join(a.Warnings, "\n"), string(a.Evidence), a.EvidenceSHA256)
	if err != nil {
		return fmt.Errorf("inventory: add attestation of %q: %w", a.Serial, classify(err))
	}
	return nil
}

func scanAttestation(row interface{ Scan(...any) error }) (Attestation, error) {
	var a Attestation
	var t, warnings, evidence string
	err := row.Scan(&a.ID, &a.Serial, &t, &a.Policy, &a.Outcome, &a.Status, &a.EKSHA256, &a.EKCertSHA256, &a.EKIssuer,
		&a.TPMManufacturer, &a.Cause, &warnings, &evidence, &a.EvidenceSHA256)
	a.Time = parseTime(t)
	if warnings != "" {
		a.Warnings = strings.Split(warnings, "\n")
	}
	if evidence != "" {
		a.Evidence = []byte(evidence)
	}
	return a, err
}

// Attestation is the unit's latest attest run, or ErrNotFound.
func (db *DB) Attestation(ctx context.Context, serial string) (Attestation, error) {
	a, err := scanAttestation(db.db.QueryRowContext(ctx, "SELECT "+attestColumns+" FROM attestations WHERE serial = ? ORDER BY id DESC LIMIT 1", serial))
	if errors.Is(err, sql.ErrNoRows) {
		return Attestation{}, fmt.Errorf("inventory: attestation of %q: %w", serial, ErrNotFound)
	}
	if err != nil {
		return Attestation{}, fmt.Errorf("inventory: attestation of %q: %w", serial, classify(err))
	}
	return a, nil
}

// UnitByEK is the unit bound to the TPM whose EK public key has this SHA-256, or ErrNotFound.
func (tx *Tx) UnitByEK(ekSHA256 string) (Unit, error) {
	return unitByEK(tx.ctx, tx.tx, ekSHA256)
}

// UnitByEK is the unit bound to the TPM whose EK public key has this SHA-256, or ErrNotFound.
func (db *DB) UnitByEK(ctx context.Context, ekSHA256 string) (Unit, error) {
	return unitByEK(ctx, db.db, ekSHA256)
}

func unitByEK(ctx context.Context, q queryer, ek string) (Unit, error) {
	if ek == "" {
		return Unit{}, fmt.Errorf("inventory: unit of an empty EK fingerprint: %w", ErrNotFound)
	}
	u, err := scanUnit(q.QueryRowContext(ctx, "SELECT "+unitColumns+" FROM units WHERE ek_sha256 = ?", ek))
	if errors.Is(err, sql.ErrNoRows) {
		return Unit{}, fmt.Errorf("inventory: unit with EK %.16s: %w", ek, ErrNotFound)
	}
	if err != nil {
		return Unit{}, fmt.Errorf("inventory: unit with EK %.16s: %w", ek, classify(err))
	}
	return u, nil
}
