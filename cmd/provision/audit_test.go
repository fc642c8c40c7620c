package main

import (
	"database/sql"
	"path/filepath"
	"strings"
	"testing"

	_ "modernc.org/sqlite"
)

// provision audit verify exits 1 on an edited, removed (also at the end) or reordered entry.
func TestAuditVerifyCLI(t *testing.T) {
	tamper := []struct {
		name string
		sql  []string
		head bool // remove the tail and rewrite nothing else
	}{
		{"edited", []string{"UPDATE events SET detail = 'forged' WHERE seq = 3"}, false},
		{"removed", []string{"DELETE FROM events WHERE seq = 2"}, false},
		{"removed tail", []string{"DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)"}, true},
		{"reordered", []string{"UPDATE events SET seq = 1000 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
			"UPDATE events SET seq = 3 WHERE seq = 1000"}, false},
	}
	for _, tt := range tamper {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			st := filepath.Join(dir, "station")
			mustCLI(t, st, "init", "--id", "audit")
			mustCLI(t, st, "enroll", "--serial", "AU-0001", "--tpm", "soft", "--out", filepath.Join(dir, "b"))
			mustCLI(t, st, "audit", "verify")
			db, err := sql.Open("sqlite", "file:"+filepath.Join(st, "inventory.db"))
			if err != nil {
				t.Fatal(err)
			}
			for _, q := range tt.sql {
				if _, err := db.Exec(q); err != nil {
					t.Fatal(err)
				}
			}
			db.Close()
			out, errs, code := cli(t, st, "audit", "verify")
			if code != 1 || !strings.Contains(out, "✗") || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
				t.Fatalf("exit %d\n%s%s", code, out, errs)
			}
		})
	}
}
