// Package image edits a unit's disk image in place: a raw image file or a block device, MBR or GPT (512-byte
// sectors), ext2/3/4 through e2fsprogs' libext2fs and FAT12/16/32 through go-diskfs.
//
// Safety. Open takes an exclusive lock (a shared one for ReadOnly; a block device opened for writing also gets
// O_EXCL, which the kernel refuses while it is mounted) and refuses what is not a partitioned disk image or whose table
// is damaged or truncated. FS refuses a file system with errors (ext: superblock not clean, errors recorded, journal
// needing recovery, bad checksums; FAT: dirty bits set, FAT copies differing). Apply checks every write and every
// target, including free blocks and inodes, before anything is written; Check runs the same checks on a planned edit
// without writing (a pre-flight before the data exists).
//
// Crash safety. Every edit goes through a transactional overlay (overlay.go; its journal: journal.go): nothing reaches
// the image before a commit (Apply, Commit, Close), and then all of it or none of it does, across a kill or power loss:
// the original of every changed 4 KiB page is written to an undo journal and synced first ("<image>.provision-undo"
// beside the real file, symbolic links resolved, or in a directory given with WithJournalDir, where a block device's is
// named by its major:minor numbers), and Open rolls back an edit a crash interrupted. A journal is replayed only onto
// the image it was written for, as the interrupted edit left it; one the image has changed since is renamed aside, not
// replayed (ErrUndoJournal). Apply reads every file back before the commit and again from the image after the pages are
// written, rolling back on a mismatch. Only changed pages are written, so the cost of an edit does not grow with the
// image.
//
// FAT keeps no modes or owners: WriteFile ignores them and Stat reports 0644 (directories 0755), root. Symbolic links
// are not followed when writing: a parent directory that is a link is refused (on a device it may point into another
// partition), and a link at the path itself is replaced.
//
// An Image is not safe for concurrent use by several goroutines.
package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path"
	"strconv"
	"strings"
	"syscall"

	"github.com/diskfs/go-diskfs/partition/gpt"
	"github.com/diskfs/go-diskfs/partition/mbr"
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

// readerAt adapts an io.ReaderAt for go-diskfs, which wants a file.
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
	case io.SeekCurrent:
		off += r.pos
	case io.SeekEnd:
		off += r.n
	default:
		return r.pos, fmt.Errorf("seek: bad whence %d", whence)
	}
	if off < 0 {
		return r.pos, fmt.Errorf("seek: negative position %d", off)
	}
	r.pos = off
	return off, nil
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

const sector = 512

// ReadTable parses the partition table of a whole image held in r (size bytes) and probes each partition's file
// system: the check Open runs, without a file. Only 512-byte logical sectors are supported.
func ReadTable(r io.ReaderAt, size int64) (table string, parts []Partition, err error) {
	if size < 2*sector {
		return "", nil, fmt.Errorf("%w: %d bytes", ErrNotDiskImage, size)
	}
	mbrSec := make([]byte, sector)
	if _, err := r.ReadAt(mbrSec, 0); err != nil {
		return "", nil, fmt.Errorf("%w: read sector 0: %v", ErrNotDiskImage, err)
	}
	if mbrSec[510] != 0x55 || mbrSec[511] != 0xaa {
		if fsType, _ := probeFS(r, 0, size); fsType != "" {
			return "", nil, fmt.Errorf("%w: a bare %s file system, not a partitioned disk image", ErrNotDiskImage, fsType)
		}
		return "", nil, ErrNotDiskImage
	}
	protective := false
	for i := range 4 {
		if mbrSec[446+16*i+4] == 0xee {
			protective = true
		}
	}
	if protective {
		table = "gpt"
		parts, err = readGPT(r, size)
	} else {
		table = "mbr"
		parts, err = readMBR(r, size)
		if err != nil || len(parts) == 0 {
			// A FAT file system's boot sector also ends in 55 AA.
			if fsType, _ := probeFS(r, 0, size); fsType != "" {
				return "", nil, fmt.Errorf("%w: a bare %s file system, not a partitioned disk image", ErrNotDiskImage, fsType)
			}
		}
	}
	if err != nil {
		return table, nil, err
	}
	if len(parts) == 0 {
		return table, nil, fmt.Errorf("%w: %s table without partitions", ErrDamagedTable, table)
	}
	for i, p := range parts {
		if p.Start < sector || p.Size <= 0 || p.Start > size || p.Size > size-p.Start {
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

func readMBR(r io.ReaderAt, size int64) ([]Partition, error) {
	t, err := mbr.Read(&readerAt{r: r, n: size}, sector, sector)
	if err != nil {
		return nil, fmt.Errorf("%w: MBR: %v", ErrDamagedTable, err)
	}
	var parts []Partition
	for i, p := range t.Partitions {
		if p == nil || p.Type == mbr.Empty {
			continue
		}
		if p.Size == 0 {
			return nil, fmt.Errorf("%w: MBR partition %d has type %02x and no sectors", ErrDamagedTable, i+1, byte(p.Type))
		}
		if p.Type == 0x05 || p.Type == 0x0f || p.Type == 0x85 {
			continue // an extended container: its logical partitions are not supported
		}
		parts = append(parts, Partition{Number: i + 1, Type: fmt.Sprintf("%02x", byte(p.Type)),
			Start: int64(p.Start) * sector, Size: int64(p.Size) * sector})
	}
	return parts, nil
}

// gptHeaderOK checks a GPT header sector (signature, size, CRC, entry geometry) before go-diskfs reads it: it trusts
// the entry count and size it finds, which a damaged header could make huge or zero.
func gptHeaderOK(h []byte, lba uint64, size int64) error {
	if string(h[0:8]) != "EFI PART" {
		return errors.New("no GPT signature")
	}
	hsize := binary.LittleEndian.Uint32(h[12:16])
	if hsize < 92 || hsize > sector {
		return fmt.Errorf("bad header size %d", hsize)
	}
	hdr := append([]byte(nil), h[:hsize]...)
	want := binary.LittleEndian.Uint32(hdr[16:20])
	clear(hdr[16:20])
	if crc32.ChecksumIEEE(hdr) != want {
		return errors.New("header CRC mismatch")
	}
	if binary.LittleEndian.Uint64(h[24:32]) != lba {
		return fmt.Errorf("header says it is at LBA %d, found at %d", binary.LittleEndian.Uint64(h[24:32]), lba)
	}
	first := binary.LittleEndian.Uint64(h[72:80])
	count := binary.LittleEndian.Uint32(h[80:84])
	esize := binary.LittleEndian.Uint32(h[84:88])
	if esize != 128 || count == 0 || count > 1024 { // go-diskfs reads 128-byte entries only
		return fmt.Errorf("bad partition entry geometry (%d entries of %d bytes)", count, esize)
	}
	if first < 2 || first > uint64(size/sector) || int64(count)*int64(esize) > size-int64(first)*sector {
		return fmt.Errorf("partition entries at LBA %d lie beyond the end of the image", first)
	}
	return nil
}

func readGPT(r io.ReaderAt, size int64) ([]Partition, error) {
	h := make([]byte, sector)
	if _, err := r.ReadAt(h, sector); err != nil {
		return nil, fmt.Errorf("%w: GPT header: %v", ErrDamagedTable, err)
	}
	if err := gptHeaderOK(h, 1, size); err != nil {
		backup := "the backup at the end of the image is missing too: truncated?"
		last := uint64(size/sector) - 1
		if _, rerr := r.ReadAt(h, int64(last)*sector); rerr == nil && gptHeaderOK(h, last, size) == nil {
			backup = "the backup header is intact: repair with sgdisk -e or gdisk"
		}
		return nil, fmt.Errorf("%w: primary GPT header: %v (%s)", ErrDamagedTable, err, backup)
	}
	t, err := gpt.Read(&readerAt{r: r, n: size}, sector, sector)
	if err != nil {
		return nil, fmt.Errorf("%w: GPT: %v", ErrDamagedTable, err)
	}
	if t.RecoveredFromBackup {
		return nil, fmt.Errorf("%w: the primary GPT partition entries are damaged (the backup is intact: repair with sgdisk -e or gdisk)", ErrDamagedTable)
	}
	var parts []Partition
	for i, p := range t.Partitions {
		if p == nil || p.Type == gpt.Unused {
			continue
		}
		if p.End < p.Start {
			return nil, fmt.Errorf("%w: GPT partition %d ends (LBA %d) before it starts (LBA %d)", ErrDamagedTable, p.Index, p.End, p.Start)
		}
		n := p.Index
		if n == 0 {
			n = i + 1
		}
		if p.End >= uint64(size/sector) {
			return nil, fmt.Errorf("%w: GPT partition %d lies beyond the end of the image (%d bytes): truncated?", ErrDamagedTable, n, size)
		}
		start, end := int64(p.Start)*sector, (int64(p.End)+1)*sector
		parts = append(parts, Partition{Number: n, Name: p.Name, Type: strings.ToLower(string(p.Type)), Start: start, Size: end - start})
	}
	return parts, nil
}

// probeFS recognises ext2/3/4 (superblock magic) and FAT (boot sector) and reads the label.
func probeFS(r io.ReaderAt, start, size int64) (fsType, label string) {
	if size >= 2048 {
		sb := make([]byte, 1024)
		if _, err := r.ReadAt(sb, start+1024); err == nil && binary.LittleEndian.Uint16(sb[56:58]) == 0xef53 {
			compat, incompat := binary.LittleEndian.Uint32(sb[92:96]), binary.LittleEndian.Uint32(sb[96:100])
			fsType = "ext2"
			switch {
			case incompat&^0x6 != 0: // anything beyond filetype and needs_recovery: extents, 64bit, flex_bg, ...
				fsType = "ext4"
			case compat&0x4 != 0: // has_journal
				fsType = "ext3"
			}
			return fsType, strings.TrimRight(string(sb[120:136]), "\x00")
		}
	}
	if size < sector {
		return "", ""
	}
	bs := make([]byte, sector)
	if _, err := r.ReadAt(bs, start); err != nil || bs[510] != 0x55 || bs[511] != 0xaa || (bs[0] != 0xeb && bs[0] != 0xe9) {
		return "", ""
	}
	if string(bs[82:87]) == "FAT32" && binary.LittleEndian.Uint16(bs[22:24]) == 0 {
		return "vfat", fatLabel(bs[71:82])
	}
	if t := string(bs[54:59]); (t == "FAT16" || t == "FAT12" || t == "FAT  ") && binary.LittleEndian.Uint16(bs[22:24]) != 0 {
		return "vfat", fatLabel(bs[43:54])
	}
	return "", ""
}

func fatLabel(b []byte) string {
	l := strings.TrimRight(string(b), " \x00")
	if l == "NO NAME" {
		return ""
	}
	return l
}

// Select resolves a selector: "2" (partition number), "name=rootfs" (GPT name), "label=data" (file system label;
// FAT labels match regardless of case) or "type=<GPT type GUID or MBR type in hex>". A selector matching several
// partitions is an error.
func (im *Image) Select(sel string) (Partition, error) {
	k, v, hasEq := strings.Cut(strings.TrimSpace(sel), "=")
	if !hasEq {
		v = k
		k = "number"
	}
	var match []Partition
	for _, p := range im.parts {
		ok := false
		switch k {
		case "number":
			n, err := strconv.Atoi(v)
			ok = err == nil && p.Number == n
		case "name":
			ok = p.Name != "" && p.Name == v
		case "label":
			ok = p.Label != "" && (p.Label == v || p.FS == "vfat" && strings.EqualFold(p.Label, v))
		case "type":
			ok = sameType(p.Type, v)
		default:
			return Partition{}, fmt.Errorf("image %s: selector %q: want a number, name=, label= or type=: %w", im.path, sel, ErrNoPartition)
		}
		if ok {
			match = append(match, p)
		}
	}
	switch len(match) {
	case 0:
		return Partition{}, fmt.Errorf("image %s: %w: %q (%s table; %s)", im.path, ErrNoPartition, sel, im.table, im.describe())
	case 1:
		return match[0], nil
	}
	return Partition{}, fmt.Errorf("image %s: %w: %q matches %d partitions, be more specific", im.path, ErrNoPartition, sel, len(match))
}

// sameType compares partition types: GUIDs regardless of case, MBR types as hex numbers ("c", "0c", "0x0C").
func sameType(have, want string) bool {
	if strings.EqualFold(have, want) {
		return true
	}
	if len(have) != 2 {
		return false
	}
	a, err1 := strconv.ParseUint(have, 16, 8)
	b, err2 := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(want), "0x"), 16, 8)
	return err1 == nil && err2 == nil && a == b
}

func (im *Image) describe() string {
	var s []string
	for _, p := range im.parts {
		d := strconv.Itoa(p.Number)
		if p.Name != "" {
			d += " name=" + p.Name
		}
		if p.FS != "" {
			d += " " + p.FS
		}
		if p.Label != "" {
			d += " label=" + p.Label
		}
		s = append(s, d)
	}
	return "partitions: " + strings.Join(s, ", ")
}

// own returns the image's own record of p, refusing a Partition that is not from this image's table.
func (im *Image) own(p Partition) (Partition, error) {
	for _, q := range im.parts {
		if q.Number == p.Number {
			if q.Start != p.Start || q.Size != p.Size {
				break
			}
			return q, nil
		}
	}
	return Partition{}, fmt.Errorf("image %s: %w: partition %d (%d bytes at %d) is not in this image's table", im.path, ErrNoPartition, p.Number, p.Size, p.Start)
}

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
	type target struct {
		part   Partition
		fsys   FS
		writes []Write
	}
	var targets []*target
	byNumber := map[int]*target{}
	defer func() {
		for _, t := range targets {
			if t.fsys != nil {
				discardFS(t.fsys)
			}
		}
		if err != nil {
			im.ov.discard()
		}
	}()
	seen := map[string]bool{}
	for _, w := range writes {
		p, err := im.own(w.Partition)
		if err != nil {
			return err
		}
		if err := checkPath(w.Path); err != nil {
			return fmt.Errorf("image %s partition %d: %w", im.path, p.Number, err)
		}
		key := strconv.Itoa(p.Number) + ":" + w.Path
		if p.FS == "vfat" {
			key = strings.ToLower(key) // FAT names are case-insensitive
		}
		if seen[key] {
			return fmt.Errorf("image %s partition %d: %s is written twice in one edit", im.path, p.Number, w.Path)
		}
		seen[key] = true
		w.Partition = p
		t := byNumber[p.Number]
		if t == nil {
			t = &target{part: p}
			byNumber[p.Number] = t
			targets = append(targets, t)
		}
		t.writes = append(t.writes, w)
	}
	for _, t := range targets {
		if t.fsys, err = im.openFS(ctx, t.part, true); err != nil {
			return err
		}
	}
	// Every target has room, before the first byte is written.
	for _, t := range targets {
		where := fmt.Sprintf("image %s partition %d", im.path, t.part.Number)
		files := make([]plannedFile, len(t.writes))
		for i, w := range t.writes {
			files[i] = plannedFile{w.Path, int64(len(w.Data))}
			if err := checkParents(t.fsys, w.Path, where); err != nil {
				return err
			}
		}
		if err := checkSpace(t.fsys, files, where); err != nil {
			return err
		}
	}
	for _, t := range targets {
		for _, w := range t.writes {
			if err := ctx.Err(); err != nil {
				return err
			}
			if err := t.fsys.WriteFile(w.Path, w.Data, w.Mode, w.UID, w.GID); err != nil {
				return err
			}
		}
		err := t.fsys.Close()
		t.fsys = nil
		if err != nil {
			return err
		}
	}
	// Read back through fresh file system handles, as the device will: before the commit from the pending edit, and
	// after the new pages are written from the image itself (a mismatch then rolls the edit back).
	readBack := func() error {
		for _, t := range targets {
			if err := im.readBack(ctx, t.part, t.writes); err != nil {
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

// checkPath accepts absolute, clean paths below the root.
func checkPath(p string) error {
	if !strings.HasPrefix(p, "/") || path.Clean(p) != p || p == "/" || strings.ContainsRune(p, 0) {
		return fmt.Errorf("path %q is not absolute and clean", p)
	}
	return nil
}

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
