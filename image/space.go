package image

import (
	"fmt"
	"path"
)

// The space check Apply and Check run before anything is written: what every planned file needs of each target file
// system (its need method: blocks or clusters, inodes, missing parent directories) against what is free.

// spaceUser is what checkSpace needs of a file system beyond FS.
type spaceUser interface {
	// need is the bytes and inodes writing data of this size to path takes, net of what the file it replaces frees.
	need(path string, size int64, newDirs map[string]bool) (bytes, inodes int64, err error)
}

// plannedFile is a file an edit writes: its path and size.
type plannedFile struct {
	path string
	size int64
}

// checkSpace adds up what all writes to one file system need and compares it with what is free.
func checkSpace(fsys FS, writes []plannedFile, where string) error {
	su, ok := fsys.(spaceUser)
	if !ok {
		return nil
	}
	freeBytes, freeInodes, err := fsys.Free()
	if err != nil {
		return err
	}
	var needBytes, needInodes int64
	newDirs := map[string]bool{}
	for _, w := range writes {
		b, i, err := su.need(w.path, w.size, newDirs)
		if err != nil {
			return err
		}
		needBytes += b
		needInodes += i
	}
	if needBytes > freeBytes {
		return fmt.Errorf("%s: the writes need %d KiB, %d KiB free: %w", where, (needBytes+1023)/1024, freeBytes/1024, ErrNoSpace)
	}
	if needInodes > freeInodes {
		return fmt.Errorf("%s: the writes need %d inodes, %d free: %w", where, needInodes, freeInodes, ErrNoSpace)
	}
	return nil
}

// missingDirs adds the parent directories of p that do not exist yet (and are not already counted) to newDirs and
// returns how many it added.
func missingDirs(p string, newDirs map[string]bool, exists func(dir string) bool) int {
	n := 0
	for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
		if newDirs[dir] {
			break
		}
		if exists(dir) {
			break
		}
		newDirs[dir] = true
		n++
	}
	return n
}
