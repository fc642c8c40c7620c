// Package fsutil holds the few file-system operations whose durability the station relies on: atomic replacement of a
// file, and fsync of a file, a directory, a set of bundle directories or a whole file system. Every fsync in the
// project goes through here.
package fsutil

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
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
	return SyncPath(dir)
}

// SyncPath fsyncs the file or directory at p.
func SyncPath(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// SyncFS makes everything written on the file system that holds dir durable with one syncfs(2). A file system that
// cannot say (EINVAL) is left as it is.
func SyncFS(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil && !errors.Is(err, fs.ErrInvalid) {
		return err
	}
	return nil
}

// SyncDirs makes the directories dirs (each holding files only) and their parent durable: a few by fsyncing each
// file, each directory and the parent (cheaper than flushing the whole file system, which may hold other programs'
// dirty data); more than four with one syncfs(2) of the parent's file system.
func SyncDirs(parent string, dirs []string) error {
	if len(dirs) > 4 {
		return SyncFS(parent)
	}
	for _, d := range dirs {
		entries, err := os.ReadDir(d)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := SyncPath(filepath.Join(d, e.Name())); err != nil {
				return err
			}
		}
		if err := SyncPath(d); err != nil {
			return err
		}
	}
	return SyncPath(parent)
}
