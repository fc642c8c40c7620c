package inventory

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"provision/internal/fsutil"
)

// genesis is the previous hash of the first audit entry.
const genesis = "0000000000000000000000000000000000000000000000000000000000000000"

// chainHash is the hash of an entry: SHA-256 over the previous hash and the entry's fields in a fixed JSON encoding.
func chainHash(e Event) string {
	fields, _ := json.Marshal(struct {
		Seq        int64  `json:"seq"`
		Time       string `json:"time"`
		Serial     string `json:"serial"`
		Step       string `json:"step"`
		Outcome    string `json:"outcome"`
		Detail     string `json:"detail"`
		MS         int64  `json:"ms"`
		Operator   string `json:"operator"`
		Station    string `json:"station"`
		CertSHA256 string `json:"cert_sha256"`
	}{e.Seq, fmtTime(e.Time), e.Serial, e.Step, e.Outcome, e.Detail, e.MS, e.Operator, e.Station, e.CertSHA256})
	h := sha256.New()
	h.Write([]byte(e.PrevHash))
	h.Write([]byte{'\n'})
	h.Write(fields)
	return hex.EncodeToString(h.Sum(nil))
}

// Append adds an entry to the audit log, chained to the last one. Time defaults to now.
func (tx *Tx) Append(e Event) error {
	var lastSeq int64
	prev := genesis
	err := tx.tx.QueryRowContext(tx.ctx, "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").Scan(&lastSeq, &prev)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("inventory: audit append: %w", classify(err))
	}
	if !tx.audit.started {
		tx.audit.started, tx.audit.before = true, Head{Count: lastSeq, Hash: prev}
	}
	if e.Time.IsZero() {
		e.Time = time.Now()
	}
	e.Time = e.Time.UTC().Round(time.Microsecond)
	e.Seq, e.PrevHash = lastSeq+1, prev
	e.Hash = chainHash(e)
	_, err = tx.tx.ExecContext(tx.ctx, `INSERT INTO events (seq, time, serial, step, outcome, detail, ms, operator, station,
		cert_sha256, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)`, e.Seq, fmtTime(e.Time), e.Serial, e.Step, e.Outcome,
		e.Detail, e.MS, e.Operator, e.Station, e.CertSHA256, e.PrevHash, e.Hash)
	if err != nil {
		return fmt.Errorf("inventory: audit append: %w", classify(err))
	}
	tx.appended = true
	return nil
}

const eventColumns = "seq, time, serial, step, outcome, detail, ms, operator, station, cert_sha256, prev_hash, hash"

func scanEvents(rows *sql.Rows) ([]Event, error) {
	defer rows.Close()
	var out []Event
	for rows.Next() {
		var e Event
		var t string
		if err := rows.Scan(&e.Seq, &t, &e.Serial, &e.Step, &e.Outcome, &e.Detail, &e.MS, &e.Operator, &e.Station,
			&e.CertSHA256, &e.PrevHash, &e.Hash); err != nil {
			return nil, classify(err)
		}
		e.Time = parseTime(t)
		out = append(out, e)
	}
	return out, classify(rows.Err())
}

// Events returns the unit's audit entries, oldest first; an empty serial returns every entry.
func (db *DB) Events(ctx context.Context, serial string) ([]Event, error) {
	query, args := "SELECT "+eventColumns+" FROM events", []any{}
	if serial != "" {
		query += " WHERE serial = ?"
		args = append(args, serial)
	}
	return db.queryEvents(ctx, query+" ORDER BY seq", args...)
}

// queryEvents runs a SELECT of eventColumns and scans the entries.
func (db *DB) queryEvents(ctx context.Context, query string, args ...any) ([]Event, error) {
	rows, err := db.db.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("inventory: events: %w", classify(err))
	}
	events, err := scanEvents(rows)
	if err != nil {
		return nil, fmt.Errorf("inventory: events: %w", err)
	}
	return events, nil
}

// Head is the audit log's head: how many entries and the hash of the last one.
type Head struct {
	Count int64
	Hash  string
}

func (h Head) String() string { return fmt.Sprintf("provision-audit-head v1 %d %s\n", h.Count, h.Hash) }

// ParseHead reads the audit.head format.
func ParseHead(b []byte) (Head, error) {
	f := strings.Fields(string(b))
	if len(f) != 4 || f[0] != "provision-audit-head" || f[1] != "v1" {
		return Head{}, errors.New("not an audit head (want \"provision-audit-head v1 COUNT HASH\")")
	}
	n, err := strconv.ParseInt(f[2], 10, 64)
	if err != nil || n < 0 {
		return Head{}, fmt.Errorf("bad entry count %q", f[2])
	}
	if _, err := hex.DecodeString(f[3]); err != nil || len(f[3]) != 64 {
		return Head{}, fmt.Errorf("bad hash %q", f[3])
	}
	return Head{Count: n, Hash: f[3]}, nil
}

// refreshHead is the unsigned (v1) head of a station made before audit keys, moved forward after a commit or on open,
// as such stations always did. With an audit key it does nothing: the signed head is written around each commit
// (sealHead, settleHead). It never writes a head for a non-empty log that has none, and never moves one back.
func (db *DB) refreshHead(ctx context.Context) error {
	if db.headPath == "" || db.audit.priv != nil {
		return nil
	}
	cur, err := txHead(ctx, db.db)
	if err != nil {
		return fmt.Errorf("audit head: %w", err)
	}
	f := readHeadFile(db.headPath)
	switch {
	case f.v2 != nil, f.v3 != nil, f.err != nil:
		return nil // signed, or damaged: verify reports it; never overwritten here
	case f.missing && cur.Count > 0:
		return nil // tampering or damage: never rebuilt
	case f.v1 != nil && f.v1.Count >= cur.Count:
		return nil
	}
	// Not synced: a head that lags the log after a power loss is moved forward on the next write.
	if err := fsutil.WriteFileAtomic(db.headPath, []byte(cur.String()), 0o644); err != nil {
		return fmt.Errorf("audit head: %w", err)
	}
	return nil
}

// afterCommit runs after a commit that appended events: it settles the signed head, or moves an unsigned one forward.
func (db *DB) afterCommit(ctx context.Context, tx *Tx) error {
	if tx.audit.sealed != nil {
		db.settleHead(tx)
		return nil
	}
	return db.refreshHead(ctx)
}

// AuditProblem is one finding of VerifyAudit.
type AuditProblem struct {
	Seq    int64 // 0 when the problem is with the head
	Reason string
}

// AuditReport is the result of VerifyAudit.
type AuditReport struct {
	Entries     int64
	Head        Head  // as recorded in audit.head (zero when not configured)
	Pending     *Head // the signed pending head, when the last write committed and stopped before settling it
	KeyID       string
	Unsigned    bool // a station made before audit keys: the head is not signed
	Interrupted bool // the last write committed but its process stopped before settling the head (not tampering)
	Problems    []AuditProblem
}
