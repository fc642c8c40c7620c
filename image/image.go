// Package image edits a unit's disk image in place: a raw image file or a block device, MBR or GPT, ext2/3/4 through
// e2fsprogs' libext2fs and FAT16/32 through go-diskfs.
//
// Every edit goes through a transactional overlay (see overlay.go): nothing reaches the image until Close (or Commit),
// and then all of it or none of it does, across a kill or power loss. Apply checks every target before anything is
// written and reads every file back afterwards.
package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/diskfs/go-diskfs/partition/gpt"
	"github.com/diskfs/go-diskfs/partition/mbr"
	"golang.org/x/sys/unix"
)

var (
	// ErrNotDiskImage: no MBR or GPT (random bytes, an empty or tiny file).
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
	// ErrLocked: another process has the image open for writing.
	ErrLocked = errors.New("image is in use by another process")
	// ErrVerify: a file read back differs from what was written.
	ErrVerify = errors.New("read-back mismatch")
)

// Partition is one entry of the partition table, with what was found in it.
type Partition struct {
	Number int    // 1-based, as in the table
	Name   string // GPT partition name
	Label  string // file system label
	Type   string // GPT type GUID (lowercase) or MBR type as two hex digits
	FS     string // "ext4", "ext3", "ext2", "vfat" or ""
	Start  int64  // bytes from the start of the image
	Size   int64  // bytes
}

// FileInfo describes a file in a partition. FAT has no modes or owners: Stat reports 0644 (0755 for directories), root.
type FileInfo struct {
	Mode     fs.FileMode
	UID, GID int
	Size     int64
}

// FS is a file system inside the image. Paths are absolute inside the file system ("/mender/mender-cert.pem").
type FS interface {
	ReadFile(path string) ([]byte, error) // errors.Is(err, fs.ErrNotExist) when missing
	Stat(path string) (FileInfo, error)
	// WriteFile creates or replaces path with data, mode and owner, creating parent directories (0755, root).
	WriteFile(path string, data []byte, mode fs.FileMode, uid, gid int) error
	Remove(path string) error
	Free() (bytes int64, inodes int64, err error)
	Close() error // writes the file system's metadata into the pending edit
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

// ReadOnly opens for reading: a shared lock, and no writes (an interrupted edit is still rolled back first).
func ReadOnly() OpenOption { return func(o *openOptions) { o.readOnly = true } }

// WithJournalDir keeps the undo journal in dir. Default: next to a regular image file; for a block device the
// directory must be given (it must be on persistent storage, not /dev).
func WithJournalDir(dir string) OpenOption { return func(o *openOptions) { o.journalDir = dir } }

// withCommitHook runs fn at each stage of a commit (tests: kill the writer at many points).
func withCommitHook(fn func(string) error) OpenOption { return func(o *openOptions) { o.hook = fn } }

// JournalPath is where the undo journal of an image lives.
func JournalPath(imagePath, journalDir string) string {
	abs, _ := filepath.Abs(imagePath)
	if journalDir == "" {
		return abs + ".provision-undo"
	}
	name := strings.NewReplacer("/", "_").Replace(strings.TrimPrefix(abs, "/"))
	return filepath.Join(journalDir, name+".provision-undo")
}

// Open opens an image file or block device under an exclusive lock (shared for ReadOnly), rolls back an edit a crash
// interrupted, and reads the partition table. It writes nothing else.
func Open(ctx context.Context, path string, opts ...OpenOption) (*Image, error) {
	var o openOptions
	for _, opt := range opts {
		opt(&o)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	isDev := st.Mode()&fs.ModeDevice != 0
	if !st.Mode().IsRegular() && !isDev {
		return nil, fmt.Errorf("image %s: not a regular file or block device: %w", path, ErrNotDiskImage)
	}
	if isDev && o.journalDir == "" {
		return nil, fmt.Errorf("image %s: a block device needs a journal directory on persistent storage", path)
	}
	journal := JournalPath(path, o.journalDir)
	_, jerr := os.Stat(journal)
	needRecovery := jerr == nil
	flag := os.O_RDWR
	if o.readOnly && !needRecovery {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	lock := unix.LOCK_EX
	if flag == os.O_RDONLY {
		lock = unix.LOCK_SH
	}
	if err := unix.Flock(int(f.Fd()), lock|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("image %s: %w", path, ErrLocked)
		}
		return nil, fmt.Errorf("image %s: lock: %w", path, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: size: %w", path, err)
	}
	if needRecovery {
		if _, err := recoverJournal(f, size, journal); err != nil {
			f.Close()
			return nil, fmt.Errorf("image %s: %w", path, err)
		}
	}
	im := &Image{path: path, f: f, readOnly: o.readOnly, ov: &overlay{f: f, size: size, journal: journal, hook: o.hook}}
	if err := im.readTable(); err != nil {
		f.Close()
		return nil, fmt.Errorf("image %s: %w", path, err)
	}
	return im, nil
}

// Path is the image's path.
func (im *Image) Path() string { return im.path }

// Partitions lists the partition table's entries in order.
func (im *Image) Partitions() []Partition { return append([]Partition(nil), im.parts...) }

// TableType is "mbr" or "gpt".
func (im *Image) TableType() string { return im.table }

// readerAt adapts the overlay for go-diskfs' partition readers.
type readerAt struct {
	r   io.ReaderAt
	pos int64
	n   int64
}

func (r *readerAt) Read(p []byte) (int, error) {
	n, err := r.r.ReadAt(p, r.pos)
	r.pos += int64(n)
	return n, err
}
func (r *readerAt) ReadAt(p []byte, off int64) (int, error) { return r.r.ReadAt(p, off) }
func (r *readerAt) Seek(off int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
		r.pos = off
	case io.SeekCurrent:
		r.pos += off
	case io.SeekEnd:
		r.pos = r.n + off
	}
	return r.pos, nil
}
func (r *readerAt) Close() error               { return nil }
func (r *readerAt) Stat() (fs.FileInfo, error) { return sizeInfo(r.n), nil }

type sizeInfo int64

func (s sizeInfo) Name() string       { return "image" }
func (s sizeInfo) Size() int64        { return int64(s) }
func (s sizeInfo) Mode() fs.FileMode  { return 0o600 }
func (s sizeInfo) ModTime() (t timeT) { return t }
func (s sizeInfo) IsDir() bool        { return false }
func (s sizeInfo) Sys() any           { return nil }

// ReadTable parses the partition table of a whole image held in r (size bytes): the check Open runs, without a file.
func ReadTable(r io.ReaderAt, size int64) (table string, parts []Partition, err error) {
	if size < 1024 {
		return "", nil, ErrNotDiskImage
	}
	var mbrSig [2]byte
	if _, err := r.ReadAt(mbrSig[:], 510); err != nil {
		return "", nil, ErrNotDiskImage
	}
	if mbrSig != [2]byte{0x55, 0xaa} {
		return "", nil, ErrNotDiskImage
	}
	ra := &readerAt{r: r, n: size}
	// A protective MBR (type 0xEE) means GPT.
	var first [16]byte
	r.ReadAt(first[:], 446)
	if first[4] == 0xee {
		t, err := gpt.Read(ra, 512, 512)
		if err != nil {
			return "gpt", nil, fmt.Errorf("%w: GPT: %v", ErrDamagedTable, err)
		}
		if t.RecoveredFromBackup {
			return "gpt", nil, fmt.Errorf("%w: primary GPT header is damaged (the backup is intact: repair with sgdisk -e or gdisk)", ErrDamagedTable)
		}
		for i, p := range t.Partitions {
			if p == nil || p.Type == gpt.Unused {
				continue
			}
			start, end := int64(p.Start)*512, (int64(p.End)+1)*512
			parts = append(parts, Partition{Number: i + 1, Name: p.Name, Type: strings.ToLower(string(p.Type)), Start: start, Size: end - start})
		}
		table = "gpt"
	} else {
		t, err := mbr.Read(ra, 512, 512)
		if err != nil {
			return "mbr", nil, fmt.Errorf("%w: MBR: %v", ErrDamagedTable, err)
		}
		for i, p := range t.Partitions {
			if p == nil || p.Type == mbr.Empty || p.Size == 0 {
				continue
			}
			if p.Type == 0x05 || p.Type == 0x0f || p.Type == 0x85 {
				continue // extended container: its logical partitions are not supported
			}
			parts = append(parts, Partition{Number: i + 1, Type: fmt.Sprintf("%02x", byte(p.Type)), Start: int64(p.Start) * 512, Size: int64(p.Size) * 512})
		}
		table = "mbr"
	}
	if len(parts) == 0 {
		return table, nil, fmt.Errorf("%w: no partitions", ErrDamagedTable)
	}
	for i, p := range parts {
		if p.Start < 512 || p.Size <= 0 || p.Start+p.Size > size {
			return table, nil, fmt.Errorf("%w: partition %d (%d bytes at %d) lies beyond the end of the image (%d bytes): truncated?",
				ErrDamagedTable, p.Number, p.Size, p.Start, size)
		}
		for _, q := range parts[:i] {
			if p.Start < q.Start+q.Size && q.Start < p.Start+p.Size {
				return table, nil, fmt.Errorf("%w: partitions %d and %d overlap", ErrDamagedTable, q.Number, p.Number)
			}
		}
		parts[i].FS, parts[i].Label = probeFS(r, p.Start, p.Size)
	}
	return table, parts, nil
}

func (im *Image) readTable() error {
	t, parts, err := ReadTable(im.ov, im.ov.size)
	if err != nil {
		return err
	}
	im.table, im.parts = t, parts
	return nil
}

// probeFS recognises ext2/3/4 (superblock magic) and FAT (boot sector) and reads the label.
func probeFS(r io.ReaderAt, start, size int64) (fsType, label string) {
	sb := make([]byte, 1024)
	if size >= 2048 {
		if _, err := r.ReadAt(sb, start+1024); err == nil && binary.LittleEndian.Uint16(sb[56:58]) == 0xef53 {
			compat, incompat := binary.LittleEndian.Uint32(sb[92:96]), binary.LittleEndian.Uint32(sb[96:100])
			fsType = "ext2"
			switch {
			case incompat&(0x40|0x80|0x200) != 0: // extents, 64bit, flex_bg
				fsType = "ext4"
			case compat&0x4 != 0: // has_journal
				fsType = "ext3"
			}
			return fsType, strings.TrimRight(string(sb[120:136]), "\x00")
		}
	}
	bs := make([]byte, 512)
	if _, err := r.ReadAt(bs, start); err != nil || bs[510] != 0x55 || bs[511] != 0xaa {
		return "", ""
	}
	if string(bs[82:87]) == "FAT32" {
		return "vfat", strings.TrimSpace(string(bs[71:82]))
	}
	if string(bs[54:59]) == "FAT16" || string(bs[54:59]) == "FAT12" {
		return "vfat", strings.TrimSpace(string(bs[43:54]))
	}
	return "", ""
}

// Select resolves a selector: "2" (partition number), "name=rootfs" (GPT name), "label=data" (file system label) or
// "type=<GPT type GUID or MBR type hex>". A selector matching several partitions is an error.
func (im *Image) Select(sel string) (Partition, error) {
	k, v, hasEq := strings.Cut(sel, "=")
	var match []Partition
	for _, p := range im.parts {
		switch {
		case !hasEq:
			if n, err := strconv.Atoi(sel); err == nil && p.Number == n {
				match = append(match, p)
			}
		case k == "name" && p.Name == v, k == "label" && p.Label == v, k == "type" && strings.EqualFold(p.Type, v):
			match = append(match, p)
		}
	}
	switch len(match) {
	case 0:
		return Partition{}, fmt.Errorf("%w: %q in %s (%s table with %s)", ErrNoPartition, sel, im.path, im.table, im.describe())
	case 1:
		return match[0], nil
	}
	return Partition{}, fmt.Errorf("%w: %q matches %d partitions in %s: be more specific", ErrNoPartition, sel, len(match), im.path)
}

func (im *Image) describe() string {
	var s []string
	for _, p := range im.parts {
		d := strconv.Itoa(p.Number)
		if p.FS != "" {
			d += " " + p.FS
		}
		if p.Label != "" {
			d += " label=" + p.Label
		}
		s = append(s, d)
	}
	return "partitions " + strings.Join(s, ", ")
}

// FS opens the file system in partition p (checked for errors; see ErrFSErrors).
func (im *Image) FS(ctx context.Context, p Partition) (FS, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	where := fmt.Sprintf("%s partition %d", im.path, p.Number)
	sec := &section{o: im.ov, base: p.Start, size: p.Size}
	switch p.FS {
	case "ext2", "ext3", "ext4":
		return openExt4(sec, !im.readOnly, where)
	case "vfat":
		return openFAT(im.ov, p, !im.readOnly, where)
	}
	return nil, fmt.Errorf("%s: no ext2/3/4 or FAT file system found: %w", where, ErrUnsupportedFS)
}

// Write is one file to write by Apply.
type Write struct {
	Partition Partition
	Path      string
	Data      []byte
	Mode      fs.FileMode
	UID, GID  int
}

// Apply writes files across partitions as one edit: it opens every target file system and checks it (errors, free
// blocks and inodes for all its writes) before writing anything; then writes, reads every file back and compares, and
// commits the edit (all or nothing, synced). On any error nothing reaches the image.
func (im *Image) Apply(ctx context.Context, writes []Write) error {
	if im.readOnly {
		return fmt.Errorf("image %s: opened read-only", im.path)
	}
	type target struct {
		fsys   FS
		writes []Write
	}
	targets := map[int]*target{}
	var order []int
	defer func() {
		for _, t := range targets {
			if t.fsys != nil {
				if e, ok := t.fsys.(*ext4FS); ok {
					e.discard()
				}
			}
		}
	}()
	for _, w := range writes {
		t, ok := targets[w.Partition.Number]
		if !ok {
			fsys, err := im.FS(ctx, w.Partition)
			if err != nil {
				im.ov.discard()
				return err
			}
			t = &target{fsys: fsys}
			targets[w.Partition.Number] = t
			order = append(order, w.Partition.Number)
		}
		t.writes = append(t.writes, w)
	}
	// Every target has room, before the first byte is written.
	for _, n := range order {
		t := targets[n]
		if err := checkSpace(t.fsys, t.writes, fmt.Sprintf("%s partition %d", im.path, n)); err != nil {
			im.ov.discard()
			return err
		}
	}
	for _, n := range order {
		t := targets[n]
		for _, w := range t.writes {
			if err := ctx.Err(); err != nil {
				im.ov.discard()
				return err
			}
			if err := t.fsys.WriteFile(w.Path, w.Data, w.Mode, w.UID, w.GID); err != nil {
				im.ov.discard()
				return err
			}
		}
		err := t.fsys.Close()
		t.fsys = nil
		if err != nil {
			im.ov.discard()
			return err
		}
	}
	// Read back through fresh file system handles, as the device will.
	for _, n := range order {
		t := targets[n]
		fsys, err := im.fsReadOnly(ctx, t.writes[0].Partition)
		if err != nil {
			im.ov.discard()
			return fmt.Errorf("read back: %w", err)
		}
		for _, w := range t.writes {
			got, err := fsys.ReadFile(w.Path)
			if err == nil && !bytes.Equal(got, w.Data) {
				err = fmt.Errorf("%s partition %d %s: %w", im.path, n, w.Path, ErrVerify)
			}
			if err == nil && w.Partition.FS != "vfat" {
				var info FileInfo
				info, err = fsys.Stat(w.Path)
				if err == nil && (info.Mode.Perm() != w.Mode.Perm() || info.UID != w.UID || info.GID != w.GID) {
					err = fmt.Errorf("%s partition %d %s: mode/owner %o %d:%d: %w", im.path, n, w.Path, info.Mode.Perm(), info.UID, info.GID, ErrVerify)
				}
			}
			if err != nil {
				closeFS(fsys)
				im.ov.discard()
				return err
			}
		}
		closeFS(fsys)
	}
	return im.Commit()
}

func closeFS(f FS) {
	if e, ok := f.(*ext4FS); ok {
		e.discard()
		return
	}
	f.Close()
}

// fsReadOnly opens a partition's file system for reading through the overlay (pending writes included).
func (im *Image) fsReadOnly(ctx context.Context, p Partition) (FS, error) {
	ro := *im
	ro.readOnly = true
	return ro.FS(ctx, p)
}

// checkSpace: blocks for every file (rounded up, plus one for extents and one for a directory that may grow) and an
// inode each, plus a block and inode for each directory that may be created; files that are replaced give theirs back.
func checkSpace(fsys FS, writes []Write, where string) error {
	freeBytes, freeInodes, err := fsys.Free()
	if err != nil {
		return err
	}
	bs := int64(4096)
	if e, ok := fsys.(*ext4FS); ok {
		bs = int64(e.blockSize())
	} else if f, ok := fsys.(*fatFS); ok {
		bs = f.clusterSize()
	}
	var needBytes, needInodes int64
	for _, w := range writes {
		needBytes += (int64(len(w.Data))+bs-1)/bs*bs + 2*bs
		needInodes++
		if info, err := fsys.Stat(w.Path); err == nil {
			needBytes -= (info.Size + bs - 1) / bs * bs
			needInodes--
		} else {
			needBytes += 4 * bs // parent directories that may not exist yet
			needInodes += 4
		}
	}
	if needBytes > freeBytes {
		return fmt.Errorf("%s: needs %d KiB, %d KiB free: %w", where, needBytes/1024, freeBytes/1024, ErrNoSpace)
	}
	if _, ok := fsys.(*ext4FS); ok && needInodes > freeInodes {
		return fmt.Errorf("%s: needs %d inodes, %d free: %w", where, needInodes, freeInodes, ErrNoSpace)
	}
	return nil
}

// Commit makes the pending edit durable (all or nothing). Close commits too.
func (im *Image) Commit() error {
	if im.readOnly {
		return nil
	}
	if err := im.ov.commit(); err != nil {
		return fmt.Errorf("image %s: %w", im.path, err)
	}
	return nil
}

// Sync flushes the image to stable storage (Commit already does for what it wrote).
func (im *Image) Sync() error {
	if im.readOnly {
		return nil
	}
	return im.f.Sync()
}

// Close commits any pending edit and releases the image. Idempotent.
func (im *Image) Close() error {
	if im.closed {
		return nil
	}
	im.closed = true
	err := im.Commit()
	if cerr := im.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Discard drops the pending edit and releases the image.
func (im *Image) Discard() error {
	if im.closed {
		return nil
	}
	im.closed = true
	im.ov.discard()
	return im.f.Close()
}
