package inventory

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

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
