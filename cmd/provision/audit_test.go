package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "modernc.org/sqlite"
)

// auditStation is a station with two enrolled units and a verifying log.
func auditStation(t *testing.T) (dir, st string) {
	t.Helper()
	dir = t.TempDir()
	st = filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "audit")
	mustCLI(t, st, "enroll", "--serial", "AU-0001", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
	mustCLI(t, st, "enroll", "--serial", "AU-0002", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
	mustCLI(t, st, "audit", "verify")
	return dir, st
}

func sqlExec(t *testing.T, st string, queries ...string) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(st, "inventory.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range queries {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// rewriteChain edits entry 3 and recomputes every hash after it, as an attacker with the database file would; it
// returns the new head (count and last hash).
func rewriteChain(t *testing.T, st string) (int, string) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(st, "inventory.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("UPDATE events SET outcome = 'failed', detail = 'forged' WHERE seq = 3"); err != nil {
		t.Fatal(err)
	}
	// The entry's fields, in the order and under the names of the chain's fixed JSON encoding.
	cols := []string{"seq", "time", "serial", "step", "outcome", "detail", "ms", "operator", "station", "cert_sha256"}
	rows, err := db.Query("SELECT " + strings.Join(cols, ", ") + " FROM events ORDER BY seq")
	if err != nil {
		t.Fatal(err)
	}
	var evs [][]any
	for rows.Next() {
		vals, ptrs := make([]any, len(cols)), make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			t.Fatal(err)
		}
		evs = append(evs, vals)
	}
	rows.Close()
	prev := strings.Repeat("0", 64)
	for _, vals := range evs {
		fields, sep := "", "{"
		for i, c := range cols {
			k, _ := json.Marshal(c)
			v, _ := json.Marshal(vals[i])
			fields, sep = fields+sep+string(k)+":"+string(v), ","
		}
		h := sha256.Sum256([]byte(prev + "\n" + fields + "}"))
		hash := hex.EncodeToString(h[:])
		if _, err := db.Exec("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", prev, hash, vals[0]); err != nil {
			t.Fatal(err)
		}
		prev = hash
	}
	return len(evs), prev
}

func wantAuditFails(t *testing.T, st, reason string) {
	t.Helper()
	out, errs, code := cli(t, st, "audit", "verify")
	if code != 1 || !strings.Contains(out, "✗") || !strings.Contains(out, reason) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
		t.Fatalf("want exit 1 naming %q; exit %d\n%s%s", reason, code, out, errs)
	}
}

// provision audit verify exits 1 on an edited, removed (also at the end) or reordered entry, a rewritten chain with a
// recomputed head (unsigned or signed with another key), a removed or truncated head, and units or certificates rows
// changed without the log.
func TestAuditVerifyCLI(t *testing.T) {
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	tamper := []struct {
		name   string
		do     func(t *testing.T, st string)
		reason string
	}{
		{"edited", func(t *testing.T, st string) { sqlExec(t, st, "UPDATE events SET detail = 'forged' WHERE seq = 3") }, "edited"},
		{"removed", func(t *testing.T, st string) { sqlExec(t, st, "DELETE FROM events WHERE seq = 2") }, "removed"},
		{"removed tail", func(t *testing.T, st string) {
			sqlExec(t, st, "DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)")
		}, "tail removed"},
		{"reordered", func(t *testing.T, st string) {
			sqlExec(t, st, "UPDATE events SET seq = 1000 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
				"UPDATE events SET seq = 3 WHERE seq = 1000")
		}, "reordered"},
		{"rewritten chain, recomputed unsigned head", func(t *testing.T, st string) {
			n, h := rewriteChain(t, st)
			os.WriteFile(filepath.Join(st, "audit.head"), fmt.Appendf(nil, "provision-audit-head v1 %d %s\n", n, h), 0o644)
		}, "unsigned"},
		{"rewritten chain, head re-signed with another key", func(t *testing.T, st string) {
			n, h := rewriteChain(t, st)
			pub := otherKey.Public().(ed25519.PublicKey)
			id := sha256.Sum256(pub)
			body := fmt.Sprintf("provision-audit-head v2\nhead %d %s\nkey %x\n", n, h, id)
			sig := ed25519.Sign(otherKey, []byte(body))
			os.WriteFile(filepath.Join(st, "audit.head"), []byte(body+"sig "+base64.StdEncoding.EncodeToString(sig)+"\n"), 0o644)
		}, "another key"},
		{"rewritten chain, head kept", func(t *testing.T, st string) { rewriteChain(t, st) }, "rewritten"},
		{"head removed", func(t *testing.T, st string) { os.Remove(filepath.Join(st, "audit.head")) }, "missing"},
		{"head truncated", func(t *testing.T, st string) {
			p := filepath.Join(st, "audit.head")
			b, _ := os.ReadFile(p)
			os.WriteFile(p, b[:len(b)/2], 0o644)
		}, "unreadable"},
		{"head emptied", func(t *testing.T, st string) { os.Truncate(filepath.Join(st, "audit.head"), 0) }, "unreadable"},
		{"unit state edited", func(t *testing.T, st string) {
			sqlExec(t, st, "UPDATE units SET state = 'shippable' WHERE serial = 'AU-0001'")
		}, "AU-0001 is shippable"},
		{"certificate inserted", func(t *testing.T, st string) {
			sqlExec(t, st, "UPDATE certificates SET status = 'superseded' WHERE unit = 'AU-0002'",
				"INSERT INTO certificates (serial, unit, sha256, not_before, not_after, status, issued_at) VALUES ('abcd', 'AU-0002', '"+
					strings.Repeat("ab", 32)+"', '', '', 'active', '')")
		}, "no issuing entry"},
	}
	for _, tt := range tamper {
		t.Run(tt.name, func(t *testing.T) {
			_, st := auditStation(t)
			tt.do(t, st)
			wantAuditFails(t, st, tt.reason)
			// Nothing was repaired: it still fails.
			wantAuditFails(t, st, tt.reason)
		})
	}
}

// A write on a station whose head is missing is refused (exit 4), and the head is not rebuilt.
func TestAuditHeadNeverRebuilt(t *testing.T) {
	dir, st := auditStation(t)
	os.Remove(filepath.Join(st, "audit.head"))
	_, errs, code := cli(t, st, "enroll", "--serial", "AU-0003", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
	if code != 4 || !strings.Contains(errs, "audit head") {
		t.Fatalf("enroll over a removed head: exit %d %s", code, errs)
	}
	if _, err := os.Stat(filepath.Join(st, "audit.head")); err == nil {
		t.Fatal("audit.head was rebuilt")
	}
	wantAuditFails(t, st, "missing")
}

// audit verify writes nothing: every file in the station keeps its bytes and modification time, and none appears.
func TestAuditVerifyWritesNothing(t *testing.T) {
	_, st := auditStation(t)
	type state struct {
		data  string
		mtime time.Time
		mode  os.FileMode
	}
	snapshot := func() map[string]state {
		m := map[string]state{}
		filepath.Walk(st, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				t.Fatal(err)
			}
			s := state{mtime: fi.ModTime(), mode: fi.Mode()}
			if !fi.IsDir() {
				b, _ := os.ReadFile(p)
				s.data = string(b)
			}
			m[p] = s
			return nil
		})
		return m
	}
	for _, closed := range []bool{false, true} {
		if closed {
			// A cleanly closed database (no -wal/-shm files) too.
			sqlExec(t, st, "PRAGMA wal_checkpoint(TRUNCATE)")
			for _, f := range []string{"inventory.db-wal", "inventory.db-shm"} {
				os.Remove(filepath.Join(st, f))
			}
		}
		before := snapshot()
		time.Sleep(20 * time.Millisecond) // mtimes have nanosecond resolution here; make any write show
		out := mustCLI(t, st, "audit", "verify")
		if !strings.Contains(out, "✓ audit log verifies: 8 entries") {
			t.Fatalf("closed=%v: %s", closed, out)
		}
		after := snapshot()
		for p, s := range before {
			if a, ok := after[p]; !ok || a != s {
				t.Errorf("closed=%v: %s changed by audit verify", closed, p)
			}
		}
		for p := range after {
			if _, ok := before[p]; !ok {
				t.Errorf("closed=%v: %s created by audit verify", closed, p)
			}
		}
	}
}

// A station made before audit keys: verify says the head is unsigned and how to fix it; adopt-key checks and signs it.
func TestAuditAdoptKeyCLI(t *testing.T) {
	dir, st := auditStation(t)
	// Make it look like an older station: no audit key, an unsigned (v1) head.
	n, h := 0, ""
	db, err := sql.Open("sqlite", "file:"+filepath.Join(st, "inventory.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").Scan(&n, &h); err != nil {
		t.Fatal(err)
	}
	db.Close()
	os.Remove(filepath.Join(st, "ca", "audit.key"))
	os.Remove(filepath.Join(st, "ca", "audit.pub"))
	os.WriteFile(filepath.Join(st, "audit.head"), fmt.Appendf(nil, "provision-audit-head v1 %d %s\n", n, h), 0o644)
	// Older stations keep working.
	mustCLI(t, st, "enroll", "--serial", "AU-0003", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
	wantAuditFails(t, st, "provision audit adopt-key")
	out := mustCLI(t, st, "audit", "adopt-key")
	if !strings.Contains(out, "head signed") {
		t.Fatal(out)
	}
	if fi, err := os.Stat(filepath.Join(st, "ca", "audit.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("audit.key: %v %v", fi, err)
	}
	mustCLI(t, st, "audit", "verify")
	mustCLI(t, st, "enroll", "--serial", "AU-0004", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
	mustCLI(t, st, "audit", "verify")
	if _, _, code := cli(t, st, "audit", "adopt-key"); code != 1 {
		t.Fatalf("second adopt-key: exit %d", code)
	}
}
