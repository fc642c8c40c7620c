package central

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// ClaimError is a refusal: the serial (or TPM) is held at another station. It wraps ErrClaimed.
type ClaimError struct {
	Serial   string    // the serial asked for
	Station  string    // the station holding it
	Operator string    // its operator (claims only)
	Since    time.Time // shippable since, claimed since, or bound since
	What     string    // "shippable", "provisioning", or "ek" (the TPM is bound to HeldBy)
	HeldBy   string    // for "ek": the serial the TPM is bound to
}

func (e *ClaimError) Error() string {
	switch e.What {
	case "shippable":
		return fmt.Sprintf("%s is shippable at station %s since %s", e.Serial, e.Station, e.Since.Format(time.DateOnly))
	case "ek":
		return fmt.Sprintf("the TPM of %s is bound to %s at station %s since %s", e.Serial, e.HeldBy, e.Station,
			e.Since.Format(time.DateOnly))
	}
	op := ""
	if e.Operator != "" {
		op = " (operator " + e.Operator + ")"
	}
	return fmt.Sprintf("%s is being provisioned at station %s%s since %s", e.Serial, e.Station, op,
		e.Since.Format("2006-01-02 15:04 MST"))
}

func (e *ClaimError) Unwrap() error { return ErrClaimed }

// ClaimUnit claims serial for station before the unit's key is made. It fails with ErrClaimed (the message names the
// other station and the date) when the unit is shippable at another station, or another station's unexpired claim
// holds it. A claim expires after ttl; the same station's claim is renewed.
func (s *Store) ClaimUnit(ctx context.Context, serial, station, operator string, ttl time.Duration) error {
	if ttl <= 0 {
		return errors.New("central: claim: ttl must be positive")
	}
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		var holder string
		var since time.Time
		err := tx.QueryRow(ctx, `SELECT station, updated FROM units WHERE serial = $1 AND state = 'shippable'
			AND station <> $2`, serial, station).Scan(&holder, &since)
		if err == nil {
			return &ClaimError{Serial: serial, Station: holder, Since: since.UTC(), What: "shippable"}
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		var got string
		err = tx.QueryRow(ctx, `INSERT INTO claims (serial, station, operator, since, expires)
			VALUES ($1, $2, $3, statement_timestamp(), statement_timestamp() + $4::interval)
			ON CONFLICT (serial) DO UPDATE SET station = excluded.station, operator = excluded.operator,
				since = CASE WHEN claims.station = excluded.station THEN claims.since ELSE excluded.since END,
				expires = excluded.expires
			WHERE claims.station = excluded.station OR claims.expires < statement_timestamp()
			RETURNING serial`, serial, station, operator, ttl).Scan(&got)
		if err == nil {
			return nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		ce := &ClaimError{Serial: serial, What: "provisioning"}
		if err := tx.QueryRow(ctx, "SELECT station, operator, since FROM claims WHERE serial = $1", serial).
			Scan(&ce.Station, &ce.Operator, &ce.Since); err != nil {
			return err
		}
		ce.Since = ce.Since.UTC()
		return ce
	})
	if err != nil {
		return classify(s.where, "claim "+serial, err)
	}
	return nil
}

// ReleaseUnit drops station's claim on serial (no-op when it holds none).
func (s *Store) ReleaseUnit(ctx context.Context, serial, station string) error {
	if _, err := s.pool.Exec(ctx, "DELETE FROM claims WHERE serial = $1 AND station = $2", serial, station); err != nil {
		return classify(s.where, "release "+serial, err)
	}
	return nil
}

// CheckEK fails with ErrClaimed when the TPM with this EK fingerprint is bound to another serial in the store.
func (s *Store) CheckEK(ctx context.Context, ekSHA256, serial string) error {
	if ekSHA256 == "" {
		return nil
	}
	ce := &ClaimError{Serial: serial, What: "ek"}
	err := s.pool.QueryRow(ctx, "SELECT serial, station, updated FROM units WHERE ek_sha256 = $1 AND serial <> $2",
		ekSHA256, serial).Scan(&ce.HeldBy, &ce.Station, &ce.Since)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil
	}
	if err != nil {
		return classify(s.where, "check EK of "+serial, err)
	}
	ce.Since = ce.Since.UTC()
	return fmt.Errorf("central: %w", ce)
}

// AddBatchJobs records the serials of a distributed batch (idempotent: serials already there keep their state).
func (s *Store) AddBatchJobs(ctx context.Context, batchID string, serials []string) error {
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		// Every worker adds the same list at start: one at a time, so their inserts never wait on each other.
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext($1))", "batch:"+batchID); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `INSERT INTO batch_jobs (batch_id, serial, pos)
			SELECT $1, v.serial, v.pos FROM unnest($2::text[]) WITH ORDINALITY AS v(serial, pos)
			ON CONFLICT (batch_id, serial) DO NOTHING`, batchID, serials)
		return err
	})
	if err != nil {
		return classify(s.where, "add batch "+batchID, err)
	}
	return nil
}

// TakeBatchJob hands worker the next unit of the batch no live worker holds (FOR UPDATE SKIP LOCKED): pending, or
// taken by a worker whose lease expired. ok is false when none is left.
func (s *Store) TakeBatchJob(ctx context.Context, batchID, worker string, lease time.Duration) (serial string, ok bool, err error) {
	err = s.pool.QueryRow(ctx, `WITH next AS (
			SELECT serial FROM batch_jobs
			WHERE batch_id = $1 AND (status = 'pending' OR (status = 'taken' AND lease_until < statement_timestamp()))
			ORDER BY pos LIMIT 1 FOR UPDATE SKIP LOCKED)
		UPDATE batch_jobs AS b SET status = 'taken', worker = $2, lease_until = statement_timestamp() + $3::interval,
			attempts = attempts + 1, updated = statement_timestamp()
		FROM next WHERE b.batch_id = $1 AND b.serial = next.serial
		RETURNING b.serial`, batchID, worker, lease).Scan(&serial)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, classify(s.where, "take from batch "+batchID, err)
	}
	return serial, true, nil
}

// RenewBatchJob extends worker's lease on a unit it holds (a long unit outlives a short lease); ErrClaimed when the
// lease was lost to another worker.
func (s *Store) RenewBatchJob(ctx context.Context, batchID, serial, worker string, lease time.Duration) error {
	tag, err := s.pool.Exec(ctx, `UPDATE batch_jobs SET lease_until = statement_timestamp() + $4::interval
		WHERE batch_id = $1 AND serial = $2 AND worker = $3 AND status = 'taken'`, batchID, serial, worker, lease)
	if err != nil {
		return classify(s.where, "renew "+serial, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("central: renew %s of batch %s: worker %s no longer holds it: %w", serial, batchID, worker, ErrClaimed)
	}
	return nil
}

// FinishBatchJob records the outcome (ok, failed, skipped) of worker's unit.
func (s *Store) FinishBatchJob(ctx context.Context, batchID, serial, worker, status string) error {
	switch status {
	case "ok", "failed", "skipped":
	default:
		return fmt.Errorf("central: finish %s: status %q is not ok, failed or skipped", serial, status)
	}
	var now, held string
	err := s.pool.QueryRow(ctx, `WITH done AS (
			UPDATE batch_jobs SET status = $4, lease_until = NULL, updated = statement_timestamp()
			WHERE batch_id = $1 AND serial = $2 AND worker = $3 AND status = 'taken' RETURNING status, worker)
		SELECT status, worker FROM done
		UNION ALL SELECT status, worker FROM batch_jobs WHERE batch_id = $1 AND serial = $2 AND NOT EXISTS (SELECT 1 FROM done)`,
		batchID, serial, worker, status).Scan(&now, &held)
	if errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("central: finish %s: not in batch %s: %w", serial, batchID, ErrNotFound)
	}
	if err != nil {
		return classify(s.where, "finish "+serial, err)
	}
	if held != worker || now != status {
		return fmt.Errorf("central: finish %s of batch %s: worker %s no longer holds it (%s by %s): %w",
			serial, batchID, worker, now, held, ErrClaimed)
	}
	return nil
}

// BatchProgress counts the units of a batch by status (pending, taken, ok, failed, skipped).
func (s *Store) BatchProgress(ctx context.Context, batchID string) (map[string]int, error) {
	rows, err := s.pool.Query(ctx, "SELECT status, count(*) FROM batch_jobs WHERE batch_id = $1 GROUP BY status", batchID)
	if err != nil {
		return nil, classify(s.where, "batch progress", err)
	}
	out := map[string]int{}
	var st string
	var n int
	if _, err := pgx.ForEachRow(rows, []any{&st, &n}, func() error { out[st] = n; return nil }); err != nil {
		return nil, classify(s.where, "batch progress", err)
	}
	return out, nil
}

// BatchRemaining is how many units of the batch are not finished (pending, or taken by a worker).
func (s *Store) BatchRemaining(ctx context.Context, batchID string) (int, error) {
	prog, err := s.BatchProgress(ctx, batchID)
	if err != nil {
		return 0, err
	}
	return prog["pending"] + prog["taken"], nil
}
