package inventory

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
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
	rows, err := db.db.QueryContext(ctx, query+" ORDER BY seq", args...)
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

func (db *DB) dbHead(ctx context.Context) (Head, error) {
	h := Head{Hash: genesis}
	err := db.db.QueryRowContext(ctx, "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").Scan(&h.Count, &h.Hash)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return Head{}, classify(err)
	}
	return h, nil
}

// refreshHead moves audit.head forward to the database's last entry. It never moves it back: a head ahead of the database
// means entries were removed, which VerifyAudit reports.
func (db *DB) refreshHead(ctx context.Context) error {
	if db.headPath == "" {
		return nil
	}
	cur, err := db.dbHead(ctx)
	if err != nil {
		return fmt.Errorf("audit head: %w", err)
	}
	if b, err := os.ReadFile(db.headPath); err == nil {
		if old, err := ParseHead(b); err == nil && old.Count >= cur.Count {
			return nil
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("audit head: %w", err)
	}
	// Not synced: a head that lags the log after a power loss is moved forward on the next open; only a head ahead of
	// the log means entries were removed.
	if err := fsutil.WriteFileAtomic(db.headPath, []byte(cur.String()), 0o644); err != nil {
		return fmt.Errorf("audit head: %w", err)
	}
	return nil
}

// AuditProblem is one finding of VerifyAudit.
type AuditProblem struct {
	Seq    int64 // 0 when the problem is with the head
	Reason string
}

// AuditReport is the result of VerifyAudit.
type AuditReport struct {
	Entries  int64
	Head     Head // as recorded in audit.head (zero when not configured)
	Problems []AuditProblem
}

// VerifyAudit recomputes the whole chain and compares it with audit.head. It returns an error wrapping ErrAudit when anything
// does not verify: an edited entry (hash mismatch), a removed or reordered entry (sequence gap or broken link), or a removed
// tail (the head counts more entries than the database holds, or its hash differs from the entry it names).
func (db *DB) VerifyAudit(ctx context.Context) (AuditReport, error) {
	var rep AuditReport
	events, err := db.Events(ctx, "")
	if err != nil {
		return rep, err
	}
	prev, bySeq := genesis, make(map[int64]string, len(events))
	for i, e := range events {
		want := int64(i + 1)
		switch {
		case e.Seq != want:
			rep.Problems = append(rep.Problems, AuditProblem{e.Seq, fmt.Sprintf("entry %d found where entry %d belongs (removed or reordered)", e.Seq, want)})
		case e.PrevHash != prev:
			rep.Problems = append(rep.Problems, AuditProblem{e.Seq, "does not link to the entry before it (removed or reordered)"})
		case chainHash(e) != e.Hash:
			rep.Problems = append(rep.Problems, AuditProblem{e.Seq, "content does not match its hash (edited)"})
		}
		prev = e.Hash
		bySeq[e.Seq] = e.Hash
	}
	rep.Entries = int64(len(events))
	if db.headPath != "" {
		b, err := os.ReadFile(db.headPath)
		switch {
		case errors.Is(err, fs.ErrNotExist) && len(events) == 0:
		case err != nil:
			rep.Problems = append(rep.Problems, AuditProblem{0, "audit head unreadable: " + err.Error()})
		default:
			h, err := ParseHead(b)
			rep.Head = h
			switch {
			case err != nil:
				rep.Problems = append(rep.Problems, AuditProblem{0, "audit head: " + err.Error()})
			case h.Count > rep.Entries:
				rep.Problems = append(rep.Problems, AuditProblem{0, fmt.Sprintf("audit head records %d entries but the log holds %d (tail removed)", h.Count, rep.Entries)})
			case h.Count > 0 && bySeq[h.Count] != h.Hash:
				rep.Problems = append(rep.Problems, AuditProblem{0, fmt.Sprintf("audit head hash differs from entry %d", h.Count)})
			}
		}
	}
	if len(rep.Problems) > 0 {
		return rep, fmt.Errorf("inventory: %d problem(s), first at entry %d: %s: %w", len(rep.Problems), rep.Problems[0].Seq, rep.Problems[0].Reason, ErrAudit)
	}
	return rep, nil
}
