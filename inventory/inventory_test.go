package inventory

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func openTest(tb testing.TB) (*DB, string) {
	tb.Helper()
	dir := tb.TempDir()
	db, err := Open(context.Background(), filepath.Join(dir, "inventory.db"), Create(), WithAuditHead(filepath.Join(dir, "audit.head")))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { db.Close() })
	return db, dir
}

func TestOpenMissingWithoutCreate(t *testing.T) {
	_, err := Open(context.Background(), filepath.Join(t.TempDir(), "nope.db"))
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

func TestOpenDamaged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "inventory.db")
	junk := make([]byte, 8192)
	for i := range junk {
		junk[i] = byte(i * 7)
	}
	if err := os.WriteFile(p, junk, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), p)
	if !errors.Is(err, ErrDamaged) {
		t.Fatalf("got %v, want ErrDamaged", err)
	}
}

func TestReopenKeepsData(t *testing.T) {
	ctx := context.Background()
	db, dir := openTest(t)
	if err := db.Update(ctx, func(tx *Tx) error { return tx.PutUnit(Unit{Serial: "A1", State: StateKeyed}) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	db2, err := Open(ctx, filepath.Join(dir, "inventory.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db2.Close()
	u, err := db2.Unit(ctx, "A1")
	if err != nil || u.State != StateKeyed {
		t.Fatalf("got %+v, %v", u, err)
	}
}

func TestUnitStateConstraint(t *testing.T) {
	db, _ := openTest(t)
	err := db.Update(context.Background(), func(tx *Tx) error { return tx.PutUnit(Unit{Serial: "A1", State: "bogus"}) })
	if err == nil {
		t.Fatal("a state outside the contract was stored")
	}
}

func TestCertificatesOneActive(t *testing.T) {
	ctx := context.Background()
	db, _ := openTest(t)
	add := func(serial, sha string) error {
		return db.Update(ctx, func(tx *Tx) error {
			if err := tx.PutUnit(Unit{Serial: "U1", State: StateCertified}); err != nil {
				return err
			}
			return tx.AddCertificate(Certificate{Serial: serial, Unit: "U1", SHA256: sha, NotAfter: time.Now().Add(time.Hour)})
		})
	}
	for i, c := range []struct{ serial, sha string }{{"01", "aa"}, {"02", "bb"}, {"03", "cc"}} {
		if err := add(c.serial, c.sha); err != nil {
			t.Fatalf("add %d: %v", i, err)
		}
	}
	certs, err := db.Certificates(ctx, "U1")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{CertSuperseded, CertSuperseded, CertActive}
	for i, c := range certs {
		if c.Status != want[i] {
			t.Errorf("certificate %s: status %s, want %s", c.Serial, c.Status, want[i])
		}
	}
	act, err := db.ActiveCertificate(ctx, "U1")
	if err != nil || act.Serial != "03" {
		t.Fatalf("active = %+v, %v", act, err)
	}
	if err := add("03", "dd"); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("duplicate certificate serial: got %v, want ErrDuplicate", err)
	}
	// The database itself refuses a second active certificate.
	_, err = db.db.ExecContext(ctx, "UPDATE certificates SET status = 'active' WHERE serial = '01'")
	if err == nil {
		t.Fatal("a second active certificate was accepted by the schema")
	}
}

func appendN(tb testing.TB, db *DB, n int) {
	tb.Helper()
	for i := 0; i < n; i++ {
		err := db.Update(context.Background(), func(tx *Tx) error {
			return tx.Append(Event{Serial: "U1", Step: "key", Outcome: "ok", Detail: "created", MS: int64(i), Station: "st1"})
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
}

func TestLockedInventory(t *testing.T) {
	ctx := context.Background()
	db, dir := openTest(t)
	// Hold a write lock from a second connection longer than the busy timeout would allow is slow; instead take the lock
	// and use a short-timeout connection.
	other, err := sql.Open("sqlite", "file:"+filepath.Join(dir, "inventory.db")+"?_pragma=busy_timeout(50)&_txlock=immediate")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	tx, err := db.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, "INSERT INTO units (serial, state, created_at, updated_at) VALUES ('L', 'new', '', '')"); err != nil {
		t.Fatal(err)
	}
	otx, err := other.BeginTx(ctx, nil)
	if err == nil {
		otx.Rollback()
	}
	if !errors.Is(classify(err), ErrLocked) {
		t.Fatalf("got %v, want ErrLocked", classify(err))
	}
}

func FuzzParseHead(f *testing.F) {
	f.Add([]byte(Head{Count: 3, Hash: genesis}.String()))
	f.Add([]byte("provision-audit-head v1 -1 00"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHead(b)
		if err != nil {
			return
		}
		h2, err := ParseHead([]byte(h.String()))
		if err != nil || h2 != h {
			t.Fatalf("round trip: %+v -> %+v, %v", h, h2, err)
		}
	})
}

func mustExec(tb testing.TB, db *sql.DB, q string, args ...any) {
	tb.Helper()
	if _, err := db.Exec(q, args...); err != nil {
		tb.Fatal(err)
	}
}

func mustEventHash(tb testing.TB, db *DB, seq int64) string {
	tb.Helper()
	var h string
	if err := db.db.QueryRow("SELECT hash FROM events WHERE seq = ?", seq).Scan(&h); err != nil {
		tb.Fatal(err)
	}
	return h
}

func BenchmarkUpdate(b *testing.B) {
	db, _ := openTest(b)
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		err := db.Update(ctx, func(tx *Tx) error {
			if err := tx.PutUnit(Unit{Serial: "B", State: StateCertified}); err != nil {
				return err
			}
			return tx.Append(Event{Serial: "B", Step: "sign", Outcome: "ok"})
		})
		if err != nil {
			b.Fatal(err)
		}
	}
}

// An inventory file that exists but holds no inventory (0 bytes: a botched copy, a full disk, a stray touch) is damage,
// never a new empty inventory: only init creates one. The file must be left as it was.
func TestOpenEmptyFileIsDamage(t *testing.T) {
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"zero bytes", nil},
		{"sqlite without schema", nil}, // filled below: a valid SQLite file that holds no inventory
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "inventory.db")
			if tc.name == "sqlite without schema" {
				// An empty SQLite database: no tables, user_version 0.
				if err := os.WriteFile(p, emptySQLite(t), 0o644); err != nil {
					t.Fatal(err)
				}
			} else if err := os.WriteFile(p, tc.data, 0o644); err != nil {
				t.Fatal(err)
			}
			before, _ := os.ReadFile(p)
			_, err := Open(context.Background(), p)
			if !errors.Is(err, ErrDamaged) {
				t.Fatalf("got %v, want ErrDamaged", err)
			}
			after, _ := os.ReadFile(p)
			if string(before) != string(after) {
				t.Errorf("Open changed the damaged file (%d -> %d bytes)", len(before), len(after))
			}
		})
	}
}

// emptySQLite is a valid SQLite database file with no tables.
func emptySQLite(t *testing.T) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "empty.db")
	db, err := sql.Open("sqlite", "file:"+p+"?mode=rwc")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("PRAGMA journal_mode=DELETE; CREATE TABLE t(x); DROP TABLE t"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
