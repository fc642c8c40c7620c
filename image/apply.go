package image

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
)

// Write is one file for Apply to write.
type Write struct {
	Partition Partition
	Path      string
	Data      []byte
	Mode      fs.FileMode
	UID, GID  int
}

// Apply writes files across partitions as one edit. Before anything is written it checks every write (partition of
// this image, clean absolute path, no path twice), opens every target file system and checks it for errors, and
// checks that every target has the blocks and inodes all its writes need. Then it writes, reads every file back
// through a fresh file system handle and compares content (and, except on FAT, mode and owner), and commits the edit:
// all or nothing, synced. On any error nothing reaches the image, and an edit still pending from direct FS use is
// dropped with it.
func (im *Image) Apply(ctx context.Context, writes []Write) (err error) {
	if im.readOnly {
		return fmt.Errorf("image %s: opened read-only", im.path)
	}
	if im.closed {
		return fmt.Errorf("image %s: closed", im.path)
	}
	var open []FS // the targets' file systems, until their metadata is written
	defer func() {
		for _, fsys := range open {
			if fsys != nil {
				discardFS(fsys)
			}
		}
		if err != nil {
			im.ov.discard()
		}
	}()
	targets, err := groupEdit(im, writes, func(w Write) (editFile, error) {
		p, err := im.own(w.Partition)
		return editFile{p, w.Path, int64(len(w.Data))}, err
	})
	if err != nil {
		return err
	}
	open = make([]FS, len(targets))
	for i, t := range targets {
		if open[i], err = im.openFS(ctx, t.part, true); err != nil {
			return err
		}
	}
	// Every target has room, before the first byte is written.
	for i, t := range targets {
		where := fmt.Sprintf("image %s partition %d", im.path, t.part.Number)
		files := make([]plannedFile, len(t.files))
		for j, w := range t.files {
			files[j] = plannedFile{w.Path, int64(len(w.Data))}
			if err := checkParents(open[i], w.Path, where); err != nil {
				return err
			}
		}
		if err := checkSpace(open[i], files, where); err != nil {
			return err
		}
	}
	for i, t := range targets {
		for _, w := range t.files {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := open[i].WriteFile(w.Path, w.Data, w.Mode, w.UID, w.GID); err != nil {
				return err
			}
		}
		err := open[i].Close()
		open[i] = nil
		if err != nil {
			return err
		}
	}
	// Read back through fresh file system handles, as the device will: before the commit from the pending edit, and
	// after the new pages are written from the image itself (a mismatch then rolls the edit back).
	readBack := func() error {
		for _, t := range targets {
			if err := im.readBack(ctx, t.part, t.files); err != nil {
				return err
			}
		}
		return nil
	}
	if err := readBack(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx) // the edit is on the image now: finish verifying it, or roll it back
	if err := im.ov.commit(readBack); err != nil {
		return fmt.Errorf("image %s: commit: %w", im.path, err)
	}
	return nil
}

func (im *Image) readBack(ctx context.Context, p Partition, writes []Write) error {
	fsys, err := im.openFS(ctx, p, false)
	if err != nil {
		return fmt.Errorf("read back: %w", err)
	}
	defer discardFS(fsys)
	for _, w := range writes {
		got, err := fsys.ReadFile(w.Path)
		if err != nil {
			return fmt.Errorf("read back: %w", err)
		}
		if !bytes.Equal(got, w.Data) {
			return fmt.Errorf("image %s partition %d: %s: %d bytes written, %d read back, content differs: %w", im.path, p.Number, w.Path, len(w.Data), len(got), ErrVerify)
		}
		if p.FS == "vfat" {
			continue
		}
		info, err := fsys.Stat(w.Path)
		if err != nil {
			return fmt.Errorf("read back: %w", err)
		}
		if info.Mode.Perm() != w.Mode.Perm() || info.UID != w.UID || info.GID != w.GID {
			return fmt.Errorf("image %s partition %d: %s: mode/owner %04o %d:%d, want %04o %d:%d: %w", im.path, p.Number, w.Path,
				info.Mode.Perm(), info.UID, info.GID, w.Mode.Perm(), w.UID, w.GID, ErrVerify)
		}
	}
	return nil
}
