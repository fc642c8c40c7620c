package inventory

import (
	"context"
	"crypto/ed25519"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
)

// refusal is a writer's refusal to extend a log that does not match its head: the audit log does not verify, and for
// the station that is a damaged inventory (exit 4), not a failed unit.
type refusal struct{ err error }

func (r refusal) Error() string   { return r.err.Error() }
func (r refusal) Unwrap() []error { return []error{r.err, ErrDamaged} }

// VerifyOptions configure VerifyFile.
type VerifyOptions struct {
	// HeadPath is audit.head. Required.
	HeadPath string
	// Pub is the station audit public key; nil for a station made before audit keys (its head is unsigned, which is
	// reported as a problem: nothing stops a rewritten chain with a recomputed head).
	Pub ed25519.PublicKey
	// StateRule checks the units table against the log (nil: DefaultStateRule).
	StateRule StateRule
}

// VerifyFile verifies the audit log of the inventory at path without writing anything: the database is opened
// read-only (its WAL and shared-memory files are not written either), no migration runs, and the head lock is taken
// shared only if its file exists. See VerifyAudit for what is checked.
func VerifyFile(ctx context.Context, path string, opt VerifyOptions) (AuditReport, error) {
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return AuditReport{}, fmt.Errorf("inventory: open %s: %w", path, ErrNotFound)
		}
		return AuditReport{}, fmt.Errorf("inventory: open %s: %w", path, err)
	}
	unlock, err := lockHead(opt.HeadPath, false)
	if err != nil {
		return AuditReport{}, err
	}
	defer unlock()
	q := url.Values{}
	q.Set("mode", "ro")
	q.Add("_pragma", "busy_timeout(5000)")
	switch {
	case exists(path + "-shm"):
		// SQLite reads the WAL index without writing the shared-memory file (it would otherwise write read marks).
		q.Set("readonly_shm", "1")
	case !exists(path+"-wal") || size(path+"-wal") == 0:
		// Everything is in the database file (a cleanly closed WAL database): read it as is, creating no -wal/-shm.
		q.Set("immutable", "1")
	}
	dsn := (&url.URL{Scheme: "file", OmitHost: true, Path: path, RawQuery: q.Encode()}).String()
	sdb, err := sql.Open("sqlite", dsn)
	if err != nil {
		return AuditReport{}, fmt.Errorf("inventory: open %s: %w", path, err)
	}
	defer sdb.Close()
	tx, err := sdb.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return AuditReport{}, fmt.Errorf("inventory: open %s: %w", path, classify(err))
	}
	defer tx.Rollback()
	var tables int
	if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('events', 'units', 'certificates')").Scan(&tables); err != nil {
		return AuditReport{}, fmt.Errorf("inventory: open %s: %w", path, classify(err))
	}
	if tables != 3 {
		return AuditReport{}, fmt.Errorf("inventory: open %s: no inventory tables: %w", path, ErrDamaged)
	}
	return verifyAudit(ctx, tx, readHeadFile(opt.HeadPath), opt.Pub, opt.StateRule, false)
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

func size(p string) int64 {
	st, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return st.Size()
}

// VerifyAudit recomputes the whole chain, checks it against the signed audit.head and checks the units and certificates
// tables against the log. It returns an error wrapping ErrAudit when anything does not verify: an edited entry (hash
// mismatch), a removed or reordered entry (sequence gap or broken link), a removed tail or an appended entry (the log
// is neither the signed head nor the signed pending head), a missing, truncated, unsigned or foreign-signed head, a
// unit whose state is not what its events say, a certificate without its issuing event, an event naming an unknown
// certificate or unit.
func (db *DB) VerifyAudit(ctx context.Context) (AuditReport, error) {
	var f headFile
	if db.headPath != "" {
		unlock, err := lockHead(db.headPath, false)
		if err != nil {
			return AuditReport{}, err
		}
		defer unlock()
		f = readHeadFile(db.headPath)
	}
	return verifyAudit(ctx, db.db, f, db.audit.pub, db.stateRule, false)
}

// verifyAudit is the check; legacy accepts an unsigned head (AdoptKey checks the log before signing it).
func verifyAudit(ctx context.Context, q queryer, f headFile, pub ed25519.PublicKey, rule StateRule, legacy bool) (AuditReport, error) {
	var rep AuditReport
	rows, err := q.QueryContext(ctx, "SELECT "+eventColumns+" FROM events ORDER BY seq")
	if err != nil {
		return rep, fmt.Errorf("inventory: events: %w", classify(err))
	}
	events, err := scanEvents(rows)
	if err != nil {
		return rep, fmt.Errorf("inventory: events: %w", err)
	}
	problem := func(seq int64, format string, args ...any) {
		rep.Problems = append(rep.Problems, AuditProblem{seq, fmt.Sprintf(format, args...)})
	}
	prev, bySeq := genesis, make(map[int64]string, len(events)+1)
	bySeq[0] = genesis
	for i, e := range events {
		want := int64(i + 1)
		switch {
		case e.Seq != want:
			problem(e.Seq, "entry %d found where entry %d belongs (removed or reordered)", e.Seq, want)
		case e.PrevHash != prev:
			problem(e.Seq, "does not link to the entry before it (removed or reordered)")
		case chainHash(e) != e.Hash:
			problem(e.Seq, "content does not match its hash (edited)")
		}
		prev = e.Hash
		bySeq[e.Seq] = e.Hash
	}
	rep.Entries = int64(len(events))
	last := Head{Hash: genesis}
	if n := len(events); n > 0 {
		last = Head{Count: events[n-1].Seq, Hash: events[n-1].Hash}
	}
	checkHead(&rep, f, pub, last, bySeq, legacy, problem)
	if err := checkTables(ctx, q, events, rule, problem); err != nil {
		return rep, err
	}
	if len(rep.Problems) > 0 {
		return rep, fmt.Errorf("inventory: %d problem(s), first at entry %d: %s: %w", len(rep.Problems), rep.Problems[0].Seq, rep.Problems[0].Reason, ErrAudit)
	}
	return rep, nil
}

func checkHead(rep *AuditReport, f headFile, pub ed25519.PublicKey, last Head, bySeq map[int64]string, legacy bool, problem func(int64, string, ...any)) {
	switch {
	case f.missing && pub == nil && last.Count == 0:
		return // a station made before audit keys that never wrote an entry
	case f.missing:
		problem(0, "audit head is missing while the log holds %d entries (tampering or damage: a head is written at init and never rebuilt)", last.Count)
		return
	case f.err != nil:
		problem(0, "audit head unreadable (tampering or damage): %v", f.err)
		return
	case f.v1 != nil:
		h := *f.v1
		rep.Head = h
		switch {
		case pub != nil:
			problem(0, "audit head is unsigned but this station has an audit key (ca/audit.pub): the head was replaced")
		case h.Count > last.Count:
			problem(0, "audit head records %d entries but the log holds %d (tail removed)", h.Count, last.Count)
		case h.Count > 0 && bySeq[h.Count] != h.Hash:
			problem(0, "audit head hash differs from entry %d", h.Count)
		case !legacy:
			rep.Unsigned = true
			problem(0, "audit head is unsigned (station made before audit keys): a rewritten log with a recomputed head would go unnoticed; check the log, then run `provision audit adopt-key` to sign it from now on")
		}
		return
	}
	var h SignedHead
	var damaged bool // v3: one slot does not verify
	switch {
	case f.v3 != nil:
		h = f.v3.slots[0].SignedHead
		if f.v3.errs[0] != nil {
			h = f.v3.slots[1].SignedHead
		}
	default:
		h = *f.v2
	}
	rep.Head, rep.Pending = h.Head, h.Pending
	rep.KeyID = h.KeyID
	if pub == nil {
		problem(0, "audit head is signed but the station has no audit public key (ca/audit.pub missing)")
		return
	}
	if f.v3 != nil {
		v, err := f.v3.view(pub)
		if err != nil {
			problem(0, "audit head %v", err)
			return
		}
		h, damaged = v.cur.SignedHead, v.damaged
		rep.Head, rep.Pending, rep.KeyID = h.Head, h.Pending, h.KeyID
	} else if err := h.Verify(pub); err != nil {
		problem(0, "audit head %v", err)
		return
	}
	switch {
	case damaged && h.Pending != nil && last == h.Head:
		problem(0, "a slot of the audit head does not verify (torn or damaged) and the log is the head before the last write (%d entries, not %d): entries removed or damage", last.Count, h.Pending.Count)
	case last == h.Head:
		rep.Pending = nil // the write was not committed (a crash or a rollback before the commit): nothing is missing
	case h.Pending != nil && last == *h.Pending:
		rep.Interrupted = true // committed; the process stopped before it settled the head
	case last.Count < h.Head.Count:
		problem(0, "audit head records %d entries but the log holds %d (tail removed)", h.Head.Count, last.Count)
	case last.Count > h.Head.Count && bySeq[h.Head.Count] == h.Head.Hash && (h.Pending == nil || last.Count > h.Pending.Count):
		problem(last.Count, "entries %d to %d are not covered by the signed audit head (appended without the station's audit key)", h.Head.Count+1, last.Count)
	default:
		problem(0, "the log's last entry (%d, %.16s…) is not the one the signed audit head names (%d, %.16s…): the log was rewritten", last.Count, last.Hash, h.Head.Count, h.Head.Hash)
	}
}
