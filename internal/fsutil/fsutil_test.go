package fsutil

import (
	"os"
	"path/filepath"
	"testing"
)

func TestSync(t *testing.T) {
	dir := t.TempDir()
	var dirs []string
	for i := range 6 {
		d := filepath.Join(dir, string(rune('a'+i)))
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := WriteFileAtomic(filepath.Join(d, "f"), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		dirs = append(dirs, d)
	}
	for _, tt := range []struct {
		name string
		fn   func() error
	}{
		{"SyncPath file", func() error { return SyncPath(filepath.Join(dirs[0], "f")) }},
		{"SyncDir", func() error { return SyncDir(dir) }},
		{"SyncFS", func() error { return SyncFS(dir) }},
		{"SyncDirs few", func() error { return SyncDirs(dir, dirs[:2]) }},
		{"SyncDirs many", func() error { return SyncDirs(dir, dirs) }},
	} {
		if err := tt.fn(); err != nil {
			t.Errorf("%s: %v", tt.name, err)
		}
	}
	missing := filepath.Join(dir, "missing")
	for _, tt := range []struct {
		name string
		fn   func() error
	}{
		{"SyncPath", func() error { return SyncPath(missing) }},
		{"SyncFS", func() error { return SyncFS(missing) }},
		{"SyncDirs", func() error { return SyncDirs(dir, []string{missing}) }},
	} {
		if err := tt.fn(); !os.IsNotExist(err) {
			t.Errorf("%s of a missing path: got %v, want not exist", tt.name, err)
		}
	}
}
