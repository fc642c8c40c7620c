package inventory

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Life after the line (docs/lifecycle.md): revocation, the CRL's number, returned units, expiring certificates.

// Audit steps of the lifecycle commands. rma ok leaves a unit returned; revoke and rotate change no state (rotate ok
// is the issuing entry of a rotated certificate, as sign ok is of the others).
const (
	StepRevoke = "revoke"
	StepRMA    = "rma"
	StepRotate = "rotate"
)

// ReasonSuperseded is the revocation reason of a certificate a newer one replaced.
const ReasonSuperseded = "superseded"

// ErrAlreadyRevoked: the certificate is revoked already.
var ErrAlreadyRevoked = errors.New("certificate already revoked")

// lifecycleRule adds the lifecycle steps to a state rule: rma ok → returned; revoke and rotate → no change.
func lifecycleRule(rule StateRule) StateRule {
	return func(step, outcome string) []State {
		switch step {
		case StepRMA:
			if outcome == "ok" {
				return []State{StateReturned}
			}
		case StepRevoke, StepRotate:
			if outcome != "failed" {
				return nil
			}
		}
		return rule(step, outcome)
	}
}

// issuingEntry reports whether an entry records the issue of the certificate it names.
func issuingEntry(e Event) bool {
	return (e.Step == "sign" || e.Step == StepRotate) && e.Outcome == "ok" && e.CertSHA256 != ""
}

// AddRotatedCertificate records a rotated certificate (same key, new certificate) as the unit's active one. The one it
// replaces is marked superseded but stays valid (not on the CRL) until the device has switched: revoke it then
// (Revoke, reason superseded).
func (tx *Tx) AddRotatedCertificate(c Certificate) error { return tx.addCertificate(c, false) }

// Certificate returns the certificate with this serial number (lowercase hex), or ErrNotFound.
func (db *DB) Certificate(ctx context.Context, certSerial string) (Certificate, error) {
	c, err := scanCert(db.db.QueryRowContext(ctx, "SELECT "+certColumns+" FROM certificates WHERE serial = ?", certSerial))
	if errors.Is(err, sql.ErrNoRows) {
		return Certificate{}, fmt.Errorf("inventory: certificate %s: %w", certSerial, ErrNotFound)
	}
	if err != nil {
		return Certificate{}, fmt.Errorf("inventory: certificate %s: %w", certSerial, classify(err))
	}
	return c, nil
}

// Revoke marks a certificate revoked at the given time for reason (an RFC 5280 reason name). A certificate revoked
// already is ErrAlreadyRevoked; a superseded one on the CRL gets the new reason and keeps its revocation time.
func (tx *Tx) Revoke(certSerial, reason string, at time.Time) error {
	var status, revokedAt string
	err := tx.tx.QueryRowContext(tx.ctx, "SELECT status, revoked_at FROM certificates WHERE serial = ?", certSerial).Scan(&status, &revokedAt)
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("inventory: certificate %s: %w", certSerial, ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("inventory: revoke %s: %w", certSerial, classify(err))
	}
	if status == CertRevoked {
		return fmt.Errorf("inventory: certificate %s: %w", certSerial, ErrAlreadyRevoked)
	}
	if revokedAt == "" {
		revokedAt = fmtTime(at)
	}
	_, err = tx.tx.ExecContext(tx.ctx, "UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? WHERE serial = ?",
		revokedAt, reason, certSerial)
	if err != nil {
		return fmt.Errorf("inventory: revoke %s: %w", certSerial, classify(err))
	}
	return nil
}

// RevokedCertificates lists the certificates on the CRL at time now: revoked (or superseded and revoked) and not yet
// expired (an expired certificate ages out of the CRL), oldest revocation first. Times are compared as stored text
// (RFC 3339 UTC), so the bound is taken to the second, as certificates' times are.
func (db *DB) RevokedCertificates(ctx context.Context, now time.Time) ([]Certificate, error) {
	certs, err := db.listCerts(ctx, "WHERE revoked_at != '' AND not_after > ? ORDER BY revoked_at, rowid", fmtTime(now.Truncate(time.Second)))
	if err != nil {
		return nil, fmt.Errorf("inventory: revoked certificates: %w", err)
	}
	return certs, nil
}

// ExpiringCertificates lists the active certificates that expire before the given time, soonest first.
func (db *DB) ExpiringCertificates(ctx context.Context, before time.Time) ([]Certificate, error) {
	certs, err := db.listCerts(ctx, "WHERE status = 'active' AND not_after < ? ORDER BY not_after, unit", fmtTime(before.Truncate(time.Second)))
	if err != nil {
		return nil, fmt.Errorf("inventory: expiring certificates: %w", err)
	}
	return certs, nil
}

// listCerts lists certificates by a WHERE (and ORDER BY) clause.

func (db *DB) listCerts(ctx context.Context, where string, args ...any) ([]Certificate, error) {
	rows, err := db.db.QueryContext(ctx, "SELECT "+certColumns+" FROM certificates "+where, args...)
	if err != nil {
		return nil, classify(err)
	}
	defer rows.Close()
	var out []Certificate
	for rows.Next() {
		c, err := scanCert(rows)
		if err != nil {
			return nil, classify(err)
		}
		out = append(out, c)
	}
	return out, classify(rows.Err())
}

// NextCRLNumber takes the next CRL number (1, 2, 3, …; never reused, even when the CRL is not kept) and records the
// CRL's thisUpdate with it. thisUpdate never goes backwards either: an earlier time is moved to the last one's.
func (tx *Tx) NextCRLNumber(thisUpdate time.Time) (int64, time.Time, error) {
	var n int64
	var last string
	err := tx.tx.QueryRowContext(tx.ctx, "SELECT number, this_update FROM crl_state WHERE id = 1").Scan(&n, &last)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return 0, time.Time{}, fmt.Errorf("inventory: crl number: %w", classify(err))
	}
	if lt := parseTime(last); thisUpdate.Before(lt) {
		thisUpdate = lt
	}
	n++
	_, err = tx.tx.ExecContext(tx.ctx, `INSERT INTO crl_state (id, number, this_update) VALUES (1, ?, ?)
		ON CONFLICT(id) DO UPDATE SET number = excluded.number, this_update = excluded.this_update`, n, fmtTime(thisUpdate))
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("inventory: crl number: %w", classify(err))
	}
	return n, thisUpdate, nil
}
