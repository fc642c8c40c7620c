package image

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"
)

// Planned is one file an edit is going to write, for Check: the pre-flight that finds what would make Apply refuse,
// before the data (a key, a certificate) exists.
type Planned struct {
	Select string // the partition, as Image.Select takes it: "2", "name=rootfs", "label=data", "type=…"
	Path   string // absolute and clean, as Write.Path
	// Size is the bytes the file will hold (an upper bound is fine). For a file that MustExist, it is what the
	// file may grow by: its current size is added.
	Size int64
	// MustExist: the edit rewrites a file that is already there (a JSON merge target); Check fails with
	// fs.ErrNotExist when it is missing.
	MustExist bool
	Mode      fs.FileMode // informational: FAT keeps no modes, so Check does not use it
}

// Check opens the image at path read-only (a shared lock; an interrupted edit is rolled back first, as Open always
// does) and checks, writing nothing, everything Apply checks before it writes: a partitioned disk image with an
// intact table (ErrNotDiskImage, ErrDamagedTable), each selector matching exactly one partition (ErrNoPartition),
// each target file system supported (ErrUnsupportedFS) and clean (ErrFSErrors), every path absolute and clean, not
// a directory, under no parent that is a file or a symbolic link, no file planned twice, every MustExist file
// present (fs.ErrNotExist), and enough free blocks and inodes in each partition for all its files together
// (ErrNoSpace). opts are Open's (WithJournalDir for a block device). A nil error means Apply with files of at most
// these sizes will not refuse the image (barring a change to the image in between).
func Check(ctx context.Context, path string, planned []Planned, opts ...OpenOption) error {
	im, err := Open(ctx, path, append(append([]OpenOption(nil), opts...), ReadOnly())...)
	if err != nil {
		return err
	}
	defer im.Close()
	return im.Check(ctx, planned)
}

// Check runs Check's checks on an open Image (read-only or not); it writes nothing.
func (im *Image) Check(ctx context.Context, planned []Planned) error {
	if im.closed {
		return fmt.Errorf("image %s: closed", im.path)
	}
	targets, err := groupEdit(im, planned, func(pl Planned) (editFile, error) {
		p, err := im.Select(pl.Select)
		return editFile{p, pl.Path, pl.Size}, err
	})
	if err != nil {
		return err
	}
	for _, t := range targets {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := im.checkTarget(ctx, t.part, t.files); err != nil {
			return err
		}
	}
	return nil
}

// editTarget is one partition an edit writes to, with its files in the order given.
type editTarget[T any] struct {
	part  Partition
	files []T
}

// editFile is what groupEdit needs to know of one file of an edit.
type editFile struct {
	part Partition // the image's own record of the file's partition
	path string
	size int64
}

// groupEdit checks the files of one edit (Apply's writes, Check's plan) and groups them by partition: partitions in
// the order first named, files in the order given. resolve finds a file's partition and fails for one the image does
// not have; then every path must be absolute and clean, no size negative, and no file named twice in one partition
// (FAT names regardless of case).
func groupEdit[T any](im *Image, files []T, resolve func(T) (editFile, error)) ([]*editTarget[T], error) {
	var targets []*editTarget[T]
	byNumber := map[int]*editTarget[T]{}
	seen := map[string]bool{}
	for _, file := range files {
		f, err := resolve(file)
		if err != nil {
			return nil, err
		}
		p := f.part
		if err := checkPath(f.path); err != nil {
			return nil, fmt.Errorf("image %s partition %d: %w", im.path, p.Number, err)
		}
		if f.size < 0 {
			return nil, fmt.Errorf("image %s partition %d: %s: negative size %d", im.path, p.Number, f.path, f.size)
		}
		key := strconv.Itoa(p.Number) + ":" + f.path
		if p.FS == "vfat" {
			key = strings.ToLower(key) // FAT names are case-insensitive
		}
		if seen[key] {
			return nil, fmt.Errorf("image %s partition %d: %s is written twice in one edit", im.path, p.Number, f.path)
		}
		seen[key] = true
		t := byNumber[p.Number]
		if t == nil {
			t = &editTarget[T]{part: p}
			byNumber[p.Number] = t
			targets = append(targets, t)
		}
		t.files = append(t.files, file)
	}
	return targets, nil
}

// checkPath accepts absolute, clean paths below the root.
func checkPath(p string) error {
	if !strings.HasPrefix(p, "/") || path.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q is not absolute and clean", p)
	}
	return nil
}

func (im *Image) checkTarget(ctx context.Context, p Partition, planned []Planned) error {
	fsys, err := im.openFS(ctx, p, false)
	if err != nil {
		return err
	}
	defer discardFS(fsys)
	where := fmt.Sprintf("image %s partition %d", im.path, p.Number)
	files := make([]plannedFile, 0, len(planned))
	for _, pl := range planned {
		if err := checkParents(fsys, pl.Path, where); err != nil {
			return err
		}
		size := pl.Size
		info, err := fsys.Stat(pl.Path)
		switch {
		case err == nil && info.Mode.IsDir():
			return fmt.Errorf("%s: %s is a directory", where, pl.Path)
		case err == nil && pl.MustExist:
			if !info.Mode.IsRegular() {
				return fmt.Errorf("%s: %s is not a regular file (%s); the edit rewrites it", where, pl.Path, info.Mode.Type())
			}
			size += info.Size
		case errors.Is(err, fs.ErrNotExist) && pl.MustExist:
			return fmt.Errorf("%s: %s is missing; the edit rewrites it (is this the right image and partition?): %w", where, pl.Path, fs.ErrNotExist)
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return err
		}
		files = append(files, plannedFile{pl.Path, size})
	}
	return checkSpace(fsys, files, where)
}

// checkParents refuses a path whose existing parents include a file or a symbolic link (WriteFile would: a link
// may point into another partition of the device).
func checkParents(fsys FS, p, where string) error {
	var dirs []string
	for dir := path.Dir(p); dir != "/"; dir = path.Dir(dir) {
		dirs = append(dirs, dir)
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		info, err := fsys.Stat(dirs[i])
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil // this and what is below it will be created
		case err != nil:
			return err
		case info.Mode&fs.ModeSymlink != 0:
			return fmt.Errorf("%s: %s: %s is a symbolic link; write to the file system it points to instead", where, p, dirs[i])
		case !info.Mode.IsDir():
			return fmt.Errorf("%s: %s: %s is not a directory", where, p, dirs[i])
		}
	}
	return nil
}
