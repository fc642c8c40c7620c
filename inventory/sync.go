package inventory

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// What forwarding to a central store needs of the inventory: the audit log in order after a point, the rows of the
// units those events touch, and a durable cursor saying how far the store has acknowledged.

// SyncCursor is how far the audit log has been forwarded to the store called name: the last acknowledged event.
type SyncCursor struct {
	Seq    int64
	Hash   string
	Synced time.Time // zero: never
}

// SyncCursor reads the cursor (zero when nothing was ever forwarded).
func (db *DB) SyncCursor(ctx context.Context, name string) (SyncCursor, error) {
	var c SyncCursor
	var t string
	err := db.db.QueryRowContext(ctx, "SELECT seq, hash, synced_at FROM sync_state WHERE name = ?", name).Scan(&c.Seq, &c.Hash, &t)
	if errors.Is(err, sql.ErrNoRows) {
		return SyncCursor{}, nil
	}
	if err != nil {
		return SyncCursor{}, fmt.Errorf("inventory: sync cursor: %w", classify(err))
	}
	c.Synced = parseTime(t)
	return c, nil
}

// SetSyncCursor records, synced, that the store called name holds the log up to seq (whose hash is hash). It writes no
// audit entry: the cursor is bookkeeping, and the store itself checks the chain it receives.
func (db *DB) SetSyncCursor(ctx context.Context, name string, seq int64, hash string) error {
	_, err := db.db.ExecContext(ctx, `INSERT INTO sync_state (name, seq, hash, synced_at) VALUES (?,?,?,?)
		ON CONFLICT(name) DO UPDATE SET seq=excluded.seq, hash=excluded.hash, synced_at=excluded.synced_at`,
		name, seq, hash, fmtTime(time.Now()))
	if err != nil {
		return fmt.Errorf("inventory: set sync cursor: %w", classify(err))
	}
	return nil
}

// EventsAfter returns up to limit audit entries with seq > after, oldest first.
func (db *DB) EventsAfter(ctx context.Context, after int64, limit int) ([]Event, error) {
	return db.queryEvents(ctx, "SELECT "+eventColumns+" FROM events WHERE seq > ? ORDER BY seq LIMIT ?", after, limit)
}

// LastSeq is the seq of the newest audit entry (0 for an empty log).
func (db *DB) LastSeq(ctx context.Context) (int64, error) {
	var n sql.NullInt64
	if err := db.db.QueryRowContext(ctx, "SELECT max(seq) FROM events").Scan(&n); err != nil {
		return 0, fmt.Errorf("inventory: last entry: %w", classify(err))
	}
	return n.Int64, nil
}

// Attestations lists every attest run of the unit, oldest first.
func (db *DB) Attestations(ctx context.Context, serial string) ([]Attestation, error) {
	rows, err := db.db.QueryContext(ctx, "SELECT "+attestColumns+" FROM attestations WHERE serial = ? ORDER BY id", serial)
	if err != nil {
		return nil, fmt.Errorf("inventory: attestations of %q: %w", serial, classify(err))
	}
	defer rows.Close()
	var out []Attestation
	for rows.Next() {
		a, err := scanAttestation(rows)
		if err != nil {
			return nil, fmt.Errorf("inventory: attestations of %q: %w", serial, classify(err))
		}
		out = append(out, a)
	}
	return out, classify(rows.Err())
}
