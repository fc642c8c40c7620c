// Package fsutil holds the few file-system operations whose durability the station relies on.
package fsutil

import (
	"os"
	"path/filepath"
)

// WriteFileSync replaces path atomically and durably: a temp file in the same directory with the final mode, fsync,
// rename, fsync of the directory. A crash leaves either the old file or the new one, never a mix; the temp file is
// removed on every error path.
func WriteFileSync(path string, data []byte, mode os.FileMode) error {
	return writeFile(path, data, mode, true)
}

// WriteFileAtomic replaces path atomically (temp file and rename) without waiting for stable storage: after a power
// loss the old or the new content is there, never a mix.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	return writeFile(path, data, mode, false)
}

func writeFile(path string, data []byte, mode os.FileMode, durable bool) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	_, err = f.Write(data)
	if err == nil && durable {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	if !durable {
		return nil
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
