package inventory

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

type keyedDB struct {
	*DB
	dir, head string
	key       ed25519.PrivateKey
}

func openKeyed(tb testing.TB) *keyedDB {
	tb.Helper()
	dir := tb.TempDir()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	k := &keyedDB{dir: dir, head: filepath.Join(dir, "audit.head"), key: key}
	db, err := Open(context.Background(), filepath.Join(dir, "inventory.db"), Create(), WithAuditHead(k.head), WithAuditKey(key))
	if err != nil {
		tb.Fatal(err)
	}
	if err := db.InitHead(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	k.DB = db
	return k
}

func (k *keyedDB) reopen(tb testing.TB) *DB {
	tb.Helper()
	db, err := Open(context.Background(), filepath.Join(k.dir, "inventory.db"), WithAuditHead(k.head), WithAuditKey(k.key))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return db
}

func (k *keyedDB) verifyFile() (AuditReport, error) {
	return VerifyFile(context.Background(), filepath.Join(k.dir, "inventory.db"), VerifyOptions{HeadPath: k.head, Pub: k.key.Public().(ed25519.PublicKey)})
}

// provisionUnit records what `enroll` records for a unit: key, sign (with its certificate), bundle.
func provisionUnit(tb testing.TB, db *DB, serial string) {
	tb.Helper()
	if err := recordUnit(db, serial); err != nil {
		tb.Fatal(err)
	}
}

func recordUnit(db *DB, serial string) error {
	ctx := context.Background()
	sum := sha256.Sum256([]byte(serial))
	sha := hex.EncodeToString(sum[:])
	err := db.Update(ctx, func(tx *Tx) error {
		if err := tx.PutUnit(Unit{Serial: serial, State: StateKeyed}); err != nil {
			return err
		}
		if err := tx.AddCertificate(Certificate{Serial: "c" + serial, Unit: serial, SHA256: sha}); err != nil {
			return err
		}
		if err := tx.Append(Event{Serial: serial, Step: "key", Outcome: "ok"}); err != nil {
			return err
		}
		return tx.Append(Event{Serial: serial, Step: "sign", Outcome: "ok", CertSHA256: sha})
	})
	if err != nil {
		return err
	}
	return db.Update(ctx, func(tx *Tx) error {
		if err := tx.PutUnit(Unit{Serial: serial, State: StateCertified}); err != nil {
			return err
		}
		return tx.Append(Event{Serial: serial, Step: "bundle", Outcome: "ok", CertSHA256: sha})
	})
}

func wantProblem(t *testing.T, rep AuditReport, err error, substr string) {
	t.Helper()
	if !errors.Is(err, ErrAudit) {
		t.Fatalf("got %v, want ErrAudit", err)
	}
	for _, p := range rep.Problems {
		if strings.Contains(p.Reason, substr) {
			return
		}
	}
	t.Fatalf("no problem mentions %q: %+v", substr, rep.Problems)
}

func TestAuditSignedVerifies(t *testing.T) {
	k := openKeyed(t)
	for i := range 3 {
		provisionUnit(t, k.DB, fmt.Sprintf("U%d", i))
	}
	for name, verify := range map[string]func() (AuditReport, error){"db": func() (AuditReport, error) { return k.VerifyAudit(context.Background()) }, "file": k.verifyFile} {
		rep, err := verify()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if rep.Entries != 9 || rep.Head.Count != 9 || rep.Pending != nil || rep.KeyID != KeyID(k.key.Public().(ed25519.PublicKey)) {
			t.Fatalf("%s: report %+v", name, rep)
		}
	}
	b, _ := os.ReadFile(k.head)
	if len(b) != slotsSize {
		t.Fatalf("head is %d bytes, want %d (v3)", len(b), slotsSize)
	}
	f := parseSlotFile(b)
	v, err := f.view(k.key.Public().(ed25519.PublicKey))
	if err != nil || v.damaged || v.cur.Head.Count != 9 || v.cur.Pending != nil {
		t.Fatalf("head %q: %+v %v", b, v, err)
	}
	for i, s := range f.slots {
		if string(s.marshal()) != string(b[i*slotSize:(i+1)*slotSize]) {
			t.Fatalf("slot %d does not round-trip", i)
		}
	}
}

// Every way of rewriting the log or its tables without the audit key is found.
func TestAuditDetectsTampering(t *testing.T) {
	rehashAll := func(tb testing.TB, db *sql.DB) Head {
		rows, err := db.Query("SELECT " + eventColumns + " FROM events ORDER BY seq")
		if err != nil {
			tb.Fatal(err)
		}
		events, err := scanEvents(rows)
		if err != nil {
			tb.Fatal(err)
		}
		prev := genesis
		for i, e := range events {
			e.Seq, e.PrevHash = int64(i+1), prev
			e.Hash = chainHash(e)
			mustExec(tb, db, "UPDATE events SET seq = ?, prev_hash = ?, hash = ? WHERE seq = ?", e.Seq, e.PrevHash, e.Hash, events[i].Seq)
			prev = e.Hash
		}
		return Head{Count: int64(len(events)), Hash: prev}
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	tests := []struct {
		name   string
		tamper func(tb testing.TB, db *sql.DB, k *keyedDB)
		want   string
	}{
		{"edited detail", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE events SET detail = 'forged' WHERE seq = 2")
		}, "edited"},
		{"removed middle", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "DELETE FROM events WHERE seq = 2")
		}, "removed or reordered"},
		{"removed tail", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "DELETE FROM events WHERE seq = 6")
		}, "tail removed"},
		{"reordered", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE events SET seq = 100 WHERE seq = 2")
			mustExec(tb, db, "UPDATE events SET seq = 2 WHERE seq = 3")
			mustExec(tb, db, "UPDATE events SET seq = 3 WHERE seq = 100")
		}, "removed or reordered"},
		{"rewritten chain, unsigned head", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE events SET outcome = 'failed' WHERE seq = 3")
			h := rehashAll(tb, db)
			os.WriteFile(k.head, []byte(h.String()), 0o644)
		}, "unsigned"},
		{"rewritten chain, head signed with another key", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE events SET detail = 'forged' WHERE seq = 3")
			h := rehashAll(tb, db)
			os.WriteFile(k.head, signHead(SignedHead{Head: h}, otherKey).Marshal(), 0o644)
		}, "another key"},
		{"rewritten chain, old signed head kept", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE events SET detail = 'forged' WHERE seq = 3")
			rehashAll(tb, db)
		}, "rewritten"},
		{"entry appended without the key", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			var prev string
			db.QueryRow("SELECT hash FROM events WHERE seq = 6").Scan(&prev)
			e := Event{Seq: 7, Serial: "U0", Step: "interrupted", Outcome: "interrupted", PrevHash: prev}
			e.Hash = chainHash(e)
			mustExec(tb, db, "INSERT INTO events (seq, time, serial, step, outcome, prev_hash, hash) VALUES (7, '', 'U0', 'interrupted', 'interrupted', ?, ?)", prev, e.Hash)
		}, "not covered"},
		{"entry appended to a log whose head is empty", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			os.WriteFile(k.head, signHead(SignedHead{Head: Head{Hash: genesis}}, k.key).Marshal(), 0o644)
		}, "not covered"},
		{"head removed", func(tb testing.TB, db *sql.DB, k *keyedDB) { os.Remove(k.head) }, "missing"},
		{"head truncated", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			b, _ := os.ReadFile(k.head)
			os.WriteFile(k.head, b[:len(b)/2], 0o644)
		}, "unreadable"},
		{"head emptied", func(tb testing.TB, db *sql.DB, k *keyedDB) { os.WriteFile(k.head, nil, 0o644) }, "unreadable"},
		{"unit state edited", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE units SET state = 'shippable' WHERE serial = 'U1'")
		}, "record changed without the log"},
		{"unit inserted", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "INSERT INTO units (serial, state, created_at, updated_at) VALUES ('U9', 'shippable', '', '')")
		}, "inserted without the log"},
		{"unit removed", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "PRAGMA foreign_keys = OFF")
			mustExec(tb, db, "DELETE FROM units WHERE serial = 'U1'")
		}, "record removed"},
		{"certificate inserted", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE certificates SET status = 'superseded' WHERE unit = 'U1'")
			mustExec(tb, db, "INSERT INTO certificates (serial, unit, sha256, not_before, not_after, status, issued_at) VALUES ('ff', 'U1', ?, '', '', 'active', '')", strings.Repeat("ab", 32))
		}, "no issuing entry"},
		{"certificate fingerprint changed", func(tb testing.TB, db *sql.DB, k *keyedDB) {
			mustExec(tb, db, "UPDATE certificates SET sha256 = ? WHERE unit = 'U0'", strings.Repeat("cd", 32))
		}, "no issuing entry"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := openKeyed(t)
			provisionUnit(t, k.DB, "U0")
			provisionUnit(t, k.DB, "U1")
			if _, err := k.VerifyAudit(context.Background()); err != nil {
				t.Fatal(err)
			}
			tt.tamper(t, k.db, k)
			rep, err := k.VerifyAudit(context.Background())
			wantProblem(t, rep, err, tt.want)
			rep, err = k.verifyFile()
			wantProblem(t, rep, err, tt.want)
		})
	}
}

// A writer never extends (and so never launders) a log that does not match its signed head: it refuses, nothing is
// committed and the head is not rebuilt.
func TestAuditWriterRefusesTamperedLog(t *testing.T) {
	for name, tamper := range map[string]func(k *keyedDB){
		"head removed": func(k *keyedDB) { os.Remove(k.head) },
		"tail removed": func(k *keyedDB) { mustExec(t, k.db, "DELETE FROM events WHERE seq = 3") },
		"head unsigned": func(k *keyedDB) {
			os.WriteFile(k.head, []byte(Head{Count: 3, Hash: mustEventHash(t, k.DB, 3)}.String()), 0o644)
		},
	} {
		t.Run(name, func(t *testing.T) {
			k := openKeyed(t)
			provisionUnit(t, k.DB, "U0")
			tamper(k)
			before, _ := os.ReadFile(k.head)
			err := k.Update(context.Background(), func(tx *Tx) error {
				return tx.Append(Event{Serial: "U0", Step: "verify", Outcome: "ok"})
			})
			if !errors.Is(err, ErrAudit) || !errors.Is(err, ErrDamaged) {
				t.Fatalf("got %v, want ErrAudit and ErrDamaged", err)
			}
			after, _ := os.ReadFile(k.head)
			if string(before) != string(after) {
				t.Fatalf("head rewritten: %q → %q", before, after)
			}
			var n int
			k.db.QueryRow("SELECT count(*) FROM events WHERE step = 'verify'").Scan(&n)
			if n != 0 {
				t.Fatal("the refused write was committed")
			}
		})
	}
}

// The crash windows: a pending head with the commit not done (or rolled back), and a commit whose head was not settled,
// both verify; the next write carries on from either.
func TestAuditCrashWindows(t *testing.T) {
	ctx := context.Background()
	k := openKeyed(t)
	provisionUnit(t, k.DB, "U0")
	settled := Head{Count: 3, Hash: mustEventHash(t, k.DB, 3)}

	// 1. Pending head written, then the process died before the commit.
	os.WriteFile(k.head, signHead(SignedHead{Head: settled, Pending: &Head{Count: 4, Hash: strings.Repeat("ee", 32)}}, k.key).Marshal(), 0o644)
	if rep, err := k.verifyFile(); err != nil || rep.Interrupted {
		t.Fatalf("pending, not committed: %+v %v", rep, err)
	}
	provisionUnit(t, k.reopen(t), "U1")
	if _, err := k.verifyFile(); err != nil {
		t.Fatal(err)
	}

	// 2. Committed, then the process died before settling the head.
	prev := Head{Count: 6, Hash: mustEventHash(t, k.DB, 6)}
	if err := k.Update(ctx, func(tx *Tx) error {
		if err := tx.PutUnit(Unit{Serial: "U1", State: StateFailed}); err != nil {
			return err
		}
		return tx.Append(Event{Serial: "U1", Step: "verify", Outcome: "failed"})
	}); err != nil {
		t.Fatal(err)
	}
	now := Head{Count: 7, Hash: mustEventHash(t, k.DB, 7)}
	os.WriteFile(k.head, signHead(SignedHead{Head: prev, Pending: &now}, k.key).Marshal(), 0o644)
	rep, err := k.verifyFile()
	if err != nil || !rep.Interrupted {
		t.Fatalf("committed, not settled: %+v %v", rep, err)
	}
	provisionUnit(t, k.reopen(t), "U2")
	if rep, err := k.verifyFile(); err != nil || rep.Interrupted || rep.Head.Count != 10 {
		t.Fatalf("after the next write: %+v %v", rep, err)
	}

	// 3. A rolled-back write leaves a pending head the log never reached: still verifies.
	boom := errors.New("boom")
	err = k.Update(ctx, func(tx *Tx) error {
		tx.Append(Event{Serial: "U2", Step: "verify", Outcome: "ok"})
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if _, err := k.verifyFile(); err != nil {
		t.Fatal(err)
	}
}

// Writers in several connections at once keep the head exact.
func TestAuditConcurrentWriters(t *testing.T) {
	k := openKeyed(t)
	dbs := []*DB{k.DB, k.reopen(t), k.reopen(t)}
	var wg sync.WaitGroup
	for i, db := range dbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 5 {
				if err := recordUnit(db, fmt.Sprintf("W%d-%d", i, j)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	rep, err := k.verifyFile()
	if err != nil || rep.Entries != 45 || rep.Head.Count != 45 || rep.Pending != nil {
		t.Fatalf("%+v %v", rep, err)
	}
}

// A station made before audit keys: its unsigned head is reported; AdoptKey checks the log and signs it from then on.
func TestAuditLegacyAdoptKey(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	head := filepath.Join(dir, "audit.head")
	db, err := Open(ctx, filepath.Join(dir, "inventory.db"), Create(), WithAuditHead(head))
	if err != nil {
		t.Fatal(err)
	}
	provisionUnit(t, db, "U0")
	b, _ := os.ReadFile(head)
	if h, err := ParseHead(b); err != nil || h.Count != 3 {
		t.Fatalf("legacy head %q: %v", b, err)
	}
	rep, err := db.VerifyAudit(ctx)
	wantProblem(t, rep, err, "adopt-key")
	if !rep.Unsigned {
		t.Fatal("not reported as unsigned")
	}
	db.Close()

	_, key, _ := ed25519.GenerateKey(rand.Reader)
	db, err = Open(ctx, filepath.Join(dir, "inventory.db"), WithAuditHead(head), WithAuditKey(key))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.AdoptKey(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := db.AdoptKey(ctx); !errors.Is(err, ErrAudit) {
		t.Fatalf("second adopt: %v", err)
	}
	provisionUnit(t, db, "U1")
	pub := key.Public().(ed25519.PublicKey)
	if _, err := VerifyFile(ctx, filepath.Join(dir, "inventory.db"), VerifyOptions{HeadPath: head, Pub: pub}); err != nil {
		t.Fatal(err)
	}
	// Without the key, a writer refuses to touch the signed head.
	db2, err := Open(ctx, filepath.Join(dir, "inventory.db"), WithAuditHead(head))
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	err = db2.Update(ctx, func(tx *Tx) error { return tx.Append(Event{Serial: "U1", Step: "x", Outcome: "ok"}) })
	if !errors.Is(err, ErrAudit) {
		t.Fatalf("keyless writer over a signed head: %v", err)
	}
}

func FuzzParseSignedHead(f *testing.F) {
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	f.Add(signHead(SignedHead{Head: Head{Count: 3, Hash: genesis}}, key).Marshal())
	f.Add(signHead(SignedHead{Head: Head{Count: 3, Hash: genesis}, Pending: &Head{Count: 4, Hash: genesis}}, key).Marshal())
	f.Add([]byte("provision-audit-head v2\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseSignedHead(b)
		if err != nil {
			return
		}
		if string(h.Marshal()) != string(b) {
			t.Fatalf("not canonical: %q vs %q", b, h.Marshal())
		}
	})
}

// VerifyFile on a file that is not an inventory (empty, or not SQLite) is a damaged inventory, not a pass.
func TestVerifyFileDamaged(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{"empty": "", "text": "not a database at all, just some text that is long enough"} {
		p := filepath.Join(dir, name+".db")
		os.WriteFile(p, []byte(data), 0o644)
		if _, err := VerifyFile(context.Background(), p, VerifyOptions{HeadPath: filepath.Join(dir, "audit.head")}); !errors.Is(err, ErrDamaged) {
			t.Fatalf("%s: got %v, want ErrDamaged", name, err)
		}
		if _, err := os.Stat(p + "-wal"); err == nil {
			t.Fatalf("%s: verify created a WAL", name)
		}
	}
}
