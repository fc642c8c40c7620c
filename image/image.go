package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

var (
	// ErrNotDiskImage: no MBR or GPT (random bytes, an empty or tiny file, a bare file system).
	ErrNotDiskImage = errors.New("not a disk image (no MBR or GPT partition table)")
	// ErrDamagedTable: the partition table is damaged or truncated.
	ErrDamagedTable = errors.New("partition table damaged or truncated")
	// ErrNoPartition: the selector matched nothing.
	ErrNoPartition = errors.New("no such partition")
	// ErrUnsupportedFS: not ext2/3/4 or FAT12/16/32.
	ErrUnsupportedFS = errors.New("unsupported file system")
	// ErrFSErrors: the file system is not clean, records errors, or its journal needs recovery.
	ErrFSErrors = errors.New("file system has errors")
	// ErrNoSpace: not enough free blocks or inodes for the planned writes.
	ErrNoSpace = errors.New("not enough free space")
	// ErrLocked: another process has the image open (or, for a block device, it is mounted).
	ErrLocked = errors.New("image is in use by another process")
	// ErrVerify: a file read back differs from what was written.
	ErrVerify = errors.New("read-back mismatch")
)

// Partition is one entry of the partition table, with what was found in it.
type Partition struct {
	Number int    // 1-based, as in the table
	Name   string // GPT partition name
	Label  string // file system label
	Type   string // GPT type GUID (lowercase) or MBR type as two lowercase hex digits
	FS     string // "ext4", "ext3", "ext2", "vfat" or ""
	Start  int64  // bytes from the start of the image
	Size   int64  // bytes
}

// FileInfo describes a file in a partition. FAT has no modes or owners: Stat reports 0644 (directories 0755) and
// root (0:0) there, so a mode or owner check does not apply to FAT.
type FileInfo struct {
	Mode     fs.FileMode // permission bits, plus fs.ModeDir for a directory
	UID, GID int
	Size     int64
}

// FS is a file system inside the image. Paths are absolute and clean ("/mender/mender-cert.pem").
//
// Changes are held in the image's pending edit until Close, which commits them (crash safe, all or nothing). If a
// write or remove fails, Close drops the pending edit and reports it. Several partitions changed as one edit, with
// the checks before and the read-back after, are what Apply is for; use one writing FS handle at a time otherwise.
type FS interface {
	ReadFile(path string) ([]byte, error) // errors.Is(err, fs.ErrNotExist) when missing
	Stat(path string) (FileInfo, error)   // errors.Is(err, fs.ErrNotExist) when missing
	// WriteFile creates or replaces path with data, mode and owner, creating missing parent directories (0755,
	// root). FAT ignores mode and owner.
	WriteFile(path string, data []byte, mode fs.FileMode, uid, gid int) error
	Remove(path string) error // a file; errors.Is(err, fs.ErrNotExist) when missing
	// Free is the free space (bytes, including ext4's root-reserved blocks) and free inodes (FAT: a large number).
	Free() (bytes int64, inodes int64, err error)
	// Close writes the file system's metadata (nothing when it was only read), commits the edit and releases it.
	Close() error
}

// Image is an open disk image.
type Image struct {
	path     string
	f        *os.File
	ov       *overlay
	table    string
	parts    []Partition
	readOnly bool
	closed   bool
}

type openOptions struct {
	readOnly   bool
	journalDir string
	hook       func(string) error
}

// OpenOption configures Open.
type OpenOption func(*openOptions)

// ReadOnly opens for reading under a shared lock. An interrupted edit is still rolled back first (which needs write
// access for that moment).
func ReadOnly() OpenOption { return func(o *openOptions) { o.readOnly = true } }

// WithJournalDir keeps the undo journal in dir (see JournalPath). Default: beside a regular image file, symbolic links
// resolved ("<image>.provision-undo"); a block device needs a directory on persistent storage (not /dev). Use the
// same directory for every open of an image, whichever path reaches it.
func WithJournalDir(dir string) OpenOption { return func(o *openOptions) { o.journalDir = dir } }

// withCommitHook runs fn at each stage of a commit (tests: kill the writer at many points).
func withCommitHook(fn func(string) error) OpenOption { return func(o *openOptions) { o.hook = fn } }

// Open opens an image file or block device under an exclusive lock (shared for ReadOnly), rolls back an edit a crash
// interrupted (refusing, with ErrUndoJournal, a journal the image has changed since: see overlay.go), and reads the
// partition table. It writes nothing else. A file with several hard links is refused for writing.
func Open(ctx context.Context, path string, opts ...OpenOption) (*Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var o openOptions
	for _, opt := range opts {
		opt(&o)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	mode := st.Mode()
	isDev := mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0
	if !mode.IsRegular() && !isDev {
		return nil, fmt.Errorf("image %s: not a regular file or block device: %w", path, ErrNotDiskImage)
	}
	if isDev && o.journalDir == "" {
		return nil, fmt.Errorf("image %s: a block device needs a journal directory on persistent storage (WithJournalDir)", path)
	}
	real := resolvePath(path)
	f, err := openLocked(path, isDev, !o.readOnly)
	if err != nil {
		return nil, err
	}
	ident, nlink, err := identify(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: stat: %w", path, err)
	}
	if !isDev && nlink > 1 && !o.readOnly {
		f.Close()
		return nil, fmt.Errorf("image %s: the file has %d hard links, and an interrupted edit could not be rolled back through the other names: edit a copy (cp) or remove the other links", path, nlink)
	}
	journal := journalPathFor(real, ident, o.journalDir)
	// Checked under the lock: a writer that held it may have died mid-commit. Earlier versions named the journal
	// after the path as given: such a journal is rolled back too (after the same checks).
	var found []string
	for _, j := range []string{journal, legacyJournalPath(path, o.journalDir)} {
		if _, err := os.Stat(j); err == nil && (len(found) == 0 || found[0] != j) {
			found = append(found, j)
		}
	}
	if len(found) > 0 {
		if o.readOnly {
			f.Close()
			if f, err = openLocked(path, isDev, true); err != nil {
				return nil, fmt.Errorf("%w (an interrupted edit must be rolled back first)", err)
			}
			if ident, _, err = identify(f); err != nil {
				f.Close()
				return nil, fmt.Errorf("image %s: stat: %w", path, err)
			}
		}
		size, err := f.Seek(0, io.SeekEnd)
		for _, j := range found {
			if err == nil {
				_, err = recoverJournal(f, size, ident, j, false)
			}
		}
		if err == nil && o.readOnly {
			err = syscall.Flock(int(f.Fd()), syscall.LOCK_SH|syscall.LOCK_NB)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("image %s: %w", path, err)
		}
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: size: %w", path, err)
	}
	im := &Image{path: path, f: f, readOnly: o.readOnly, ov: &overlay{f: f, size: size, ident: ident, journal: journal, hook: o.hook}}
	if im.table, im.parts, err = ReadTable(im.ov, size); err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	return im, nil
}

// openLocked opens path and takes the lock: exclusive for writing, shared for reading. A block device opened for
// writing also gets O_EXCL, which the kernel refuses while it is mounted.
func openLocked(path string, isDev, write bool) (*os.File, error) {
	flag, lock := os.O_RDONLY, syscall.LOCK_SH
	if write {
		flag, lock = os.O_RDWR, syscall.LOCK_EX
		if isDev {
			flag |= syscall.O_EXCL
		}
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return nil, fmt.Errorf("image %s: mounted or opened exclusively elsewhere: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), lock|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("image %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("image %s: lock: %w", path, err)
	}
	return f, nil
}

// Path is the image's path.
func (im *Image) Path() string { return im.path }

// Partitions lists the partition table's entries in order.
func (im *Image) Partitions() []Partition { return append([]Partition(nil), im.parts...) }

// TableType is "mbr" or "gpt".
func (im *Image) TableType() string { return im.table }

// FS opens the file system in partition p and checks it for errors (ErrFSErrors): ext2/3/4 through libext2fs, FAT
// through go-diskfs. On a read-only Image the file system is read-only.
func (im *Image) FS(ctx context.Context, p Partition) (FS, error) {
	fsys, err := im.openFS(ctx, p, !im.readOnly)
	if err != nil || im.readOnly {
		return fsys, err
	}
	return committing{fsys, im}, nil
}

// committing is a file system handed out by Image.FS: its Close commits.
type committing struct {
	FS
	im *Image
}

func (c committing) Close() error {
	if err := c.FS.Close(); err != nil {
		c.im.ov.discard()
		return err
	}
	return c.im.Commit()
}

func (im *Image) openFS(ctx context.Context, p Partition, rw bool) (FS, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if im.closed {
		return nil, fmt.Errorf("image %s: closed", im.path)
	}
	p, err := im.own(p)
	if err != nil {
		return nil, err
	}
	where := fmt.Sprintf("image %s partition %d", im.path, p.Number)
	switch p.FS {
	case "ext2", "ext3", "ext4":
		e, err := openExt4(&section{o: im.ov, base: p.Start, size: p.Size}, rw, where)
		if err != nil {
			return nil, err // not a typed nil in the interface
		}
		return e, nil
	case "vfat":
		f, err := openFAT(im.ov, p, rw, where)
		if err != nil {
			return nil, err
		}
		return f, nil
	}
	return nil, fmt.Errorf("%s: no ext2/3/4 or FAT file system found: %w", where, ErrUnsupportedFS)
}

// discardFS releases a file system without writing its metadata.
func discardFS(f FS) {
	if c, ok := f.(committing); ok {
		f = c.FS
	}
	switch f := f.(type) {
	case *ext4FS:
		f.discard()
	case *fatFS:
		f.discard()
	}
}

// Commit makes the pending edit durable (all or nothing, synced). On failure the edit is rolled back.
func (im *Image) Commit() error {
	if im.readOnly || im.closed {
		return nil
	}
	if err := im.ov.commit(nil); err != nil {
		return fmt.Errorf("image %s: commit: %w", im.path, err)
	}
	return nil
}

// Sync flushes the image to stable storage (Commit already has, for what it wrote).
func (im *Image) Sync() error {
	if im.readOnly || im.closed {
		return nil
	}
	if err := im.f.Sync(); err != nil {
		return fmt.Errorf("image %s: sync: %w", im.path, err)
	}
	return nil
}

// Close commits any pending edit and releases the image and its lock. Idempotent.
func (im *Image) Close() error {
	if im.closed {
		return nil
	}
	err := im.Commit()
	im.closed = true
	if cerr := im.f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("image %s: close: %w", im.path, cerr)
	}
	return err
}

// Discard drops the pending edit and releases the image and its lock.
func (im *Image) Discard() error {
	if im.closed {
		return nil
	}
	im.closed = true
	im.ov.discard()
	return im.f.Close()
}
