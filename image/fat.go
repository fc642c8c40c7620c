package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/fat12"
	"github.com/diskfs/go-diskfs/filesystem/fat16"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

// FAT file systems are read and written by go-diskfs through the overlay (so FAT edits are journaled and crash safe
// like ext4 ones): this file holds the file system handle, its reads and writes, and the layout read from the boot
// sector. go-diskfs leaves a few things wrong, which Close puts right before the edit is committed: fat_repair.go.

// ovBackend lets go-diskfs read and write the image through the overlay.
type ovBackend struct {
	readerAt
	ov *overlay
}

func newBackend(ov *overlay) *ovBackend {
	return &ovBackend{readerAt: readerAt{r: ov, n: ov.size}, ov: ov}
}

var _ backend.Storage = (*ovBackend)(nil)

func (b *ovBackend) WriteAt(p []byte, off int64) (int, error) { return b.ov.WriteAt(p, off) }
func (b *ovBackend) Path() string                             { return "" }
func (b *ovBackend) Sys() (*os.File, error)                   { return nil, backend.ErrNotSuitable }
func (b *ovBackend) Writable() (backend.WritableFile, error)  { return b, nil }

// fatImpl is what package image uses of go-diskfs' FAT file systems.
type fatImpl interface {
	OpenFile(p string, flag int) (filesystem.File, error)
	Mkdir(p string) error
	Remove(p string) error
	ReadDir(p string) ([]fs.DirEntry, error)
}

// fatFS is a FAT12/16/32 file system. FAT keeps no modes or owners.
type fatFS struct {
	impl   fatImpl
	ov     *overlay
	l      fatLayout
	rw     bool
	closed bool
	where  string
	// Set at the first change: clusters allocated but unreachable before it (left alone), and paths written empty.
	lostBefore []bool
	emptied    map[string]bool
	failed     error // a change failed part way: Close drops the changes
}

func openFAT(ov *overlay, p Partition, rw bool, where string) (*fatFS, error) {
	l, err := readFATLayout(ov, p)
	if err != nil {
		return nil, fmt.Errorf("%s: fat: %v: %w", where, err, ErrUnsupportedFS)
	}
	if err := l.check(ov); err != nil {
		return nil, fmt.Errorf("%s: fat: %w", where, err)
	}
	b := newBackend(ov)
	var impl fatImpl
	switch l.bits {
	case 32:
		impl, err = fat32.Read(b, p.Size, p.Start, sector)
	case 16:
		impl, err = fat16.Read(b, p.Size, p.Start, sector)
	default:
		impl, err = fat12.Read(b, p.Size, p.Start, sector)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: fat: %v: %w", where, err, ErrUnsupportedFS)
	}
	return &fatFS{impl: impl, ov: ov, l: l, rw: rw, where: where}, nil
}

func (f *fatFS) errorf(format string, args ...any) error {
	return fmt.Errorf("%s: fat: "+format, append([]any{f.where}, args...)...)
}

func (f *fatFS) usable(op, p string) error {
	if err := checkPath(p); err != nil {
		return f.errorf("%s: %w", op, err)
	}
	if f.closed {
		return f.errorf("%s %s: file system closed", op, p)
	}
	return nil
}

func (f *fatFS) ReadFile(p string) ([]byte, error) {
	info, err := f.Stat(p)
	if err != nil {
		return nil, err
	}
	if info.Mode.IsDir() {
		return nil, f.errorf("read %s: is a directory", p)
	}
	// Not go-diskfs' ReadFile: it fails on an empty file (cluster 0, as it should be), and its File.Read returns
	// bytes past the end of the file when a read starts inside a cluster. One read of exactly the file's size from
	// the start is right.
	b := make([]byte, info.Size)
	if info.Size == 0 {
		return b, nil
	}
	fh, err := f.impl.OpenFile(p, os.O_RDONLY)
	if err != nil {
		return nil, f.errorf("read %s: %w", p, err)
	}
	defer fh.Close()
	if _, err := io.ReadFull(fh, b); err != nil {
		return nil, f.errorf("read %s: %w", p, err)
	}
	return b, nil
}

// Stat reports 0644 for files, 0755 for directories, owner root: FAT keeps no modes or owners.
func (f *fatFS) Stat(p string) (FileInfo, error) {
	if err := f.usable("stat", p); err != nil {
		return FileInfo{}, err
	}
	st, err := f.stat(p)
	if err != nil {
		return FileInfo{}, f.errorf("stat %s: %w", p, fs.ErrNotExist)
	}
	if st.IsDir() {
		return FileInfo{Mode: fs.ModeDir | 0o755}, nil
	}
	return FileInfo{Mode: 0o644, Size: st.Size()}, nil
}

// WriteFile creates or replaces p; mode and owner do not apply to FAT.
func (f *fatFS) WriteFile(p string, data []byte, mode fs.FileMode, uid, gid int) error {
	if err := f.begin("write", p); err != nil {
		return err
	}
	if int64(len(data)) > 1<<32-1 {
		return f.errorf("write %s: %d bytes is too large for FAT", p, len(data))
	}
	if st, err := f.stat(p); err == nil {
		if st.IsDir() {
			return f.errorf("write %s: is a directory", p)
		}
		// Replace by remove and create: go-diskfs cannot write into an empty file (cluster 0). The old clusters,
		// which its Remove leaves allocated, are freed by Close.
		if err := f.impl.Remove(p); err != nil {
			return f.fail(f.errorf("replace %s: %w", p, err))
		}
	}
	if dir := path.Dir(p); dir != "/" {
		if st, err := f.stat(dir); err == nil && !st.IsDir() {
			return f.errorf("write %s: %s is not a directory", p, dir)
		}
		if err := f.impl.Mkdir(dir); err != nil {
			return f.fail(f.errorf("mkdir %s: %w", dir, err))
		}
	}
	fh, err := f.impl.OpenFile(p, os.O_CREATE|os.O_RDWR)
	if err != nil {
		return f.fail(f.errorf("create %s: %w", p, err))
	}
	if len(data) > 0 {
		_, err = fh.Write(data)
	}
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		if strings.Contains(err.Error(), "no space left") {
			err = fmt.Errorf("%w: %w", err, ErrNoSpace)
		}
		return f.fail(f.errorf("write %s: %w", p, err))
	}
	f.emptied[strings.ToLower(p)] = len(data) == 0
	return nil
}

// Remove removes a file (not a directory).
func (f *fatFS) Remove(p string) error {
	if err := f.begin("remove", p); err != nil {
		return err
	}
	st, err := f.stat(p)
	if err != nil {
		return f.errorf("remove %s: %w", p, fs.ErrNotExist)
	}
	if st.IsDir() {
		return f.errorf("remove %s: is a directory", p)
	}
	if err := f.impl.Remove(p); err != nil {
		return f.fail(f.errorf("remove %s: %w", p, err))
	}
	delete(f.emptied, strings.ToLower(p))
	return nil
}

// Free reports free bytes (free clusters) and, FAT having no inodes, a large inode count.
func (f *fatFS) Free() (int64, int64, error) {
	if f.closed {
		return 0, 0, f.errorf("free: file system closed")
	}
	t, err := f.l.readTable(f.ov)
	if err != nil {
		return 0, 0, f.errorf("%w", err)
	}
	free, _ := t.free()
	return free * f.l.clusterBytes(), 1 << 30, nil
}

// need: clusters for the data (at least one, as go-diskfs allocates), one for a directory that may grow, two per
// missing parent directory (its own and its parent's growth). A file it replaces gives its clusters back only at
// Close, so they do not count.
func (f *fatFS) need(p string, size int64, newDirs map[string]bool) (int64, int64, error) {
	cb := f.l.clusterBytes()
	n := max(1, (size+cb-1)/cb) + 1
	if st, err := f.stat(p); err == nil && st.IsDir() {
		return 0, 0, f.errorf("write %s: is a directory", p)
	}
	n += 2 * int64(missingDirs(p, newDirs, func(dir string) bool { _, err := f.stat(dir); return err == nil }))
	return n * cb, 0, nil
}

func (f *fatFS) discard() { f.closed = true }

func (f *fatFS) fail(err error) error {
	f.failed = err
	return err
}

// fatLayout is what we need of the boot sector, with offsets absolute in the image.
type fatLayout struct {
	bits              int // 12, 16 or 32
	bytesPerSector    int64
	sectorsPerCluster int64
	reserved, numFATs int64
	sectorsPerFAT     int64
	rootEntries       int64
	rootCluster       uint32
	fsInfo, backup    int64
	start             int64
	clusters          int64 // data clusters: valid numbers are 2 .. clusters+1
}

func readFATLayout(r io.ReaderAt, p Partition) (fatLayout, error) {
	bs := make([]byte, sector)
	if _, err := r.ReadAt(bs, p.Start); err != nil {
		return fatLayout{}, err
	}
	l := fatLayout{
		start:             p.Start,
		bytesPerSector:    int64(binary.LittleEndian.Uint16(bs[11:13])),
		sectorsPerCluster: int64(bs[13]),
		reserved:          int64(binary.LittleEndian.Uint16(bs[14:16])),
		numFATs:           int64(bs[16]),
		rootEntries:       int64(binary.LittleEndian.Uint16(bs[17:19])),
		sectorsPerFAT:     int64(binary.LittleEndian.Uint16(bs[22:24])),
	}
	total := int64(binary.LittleEndian.Uint16(bs[19:21]))
	if total == 0 {
		total = int64(binary.LittleEndian.Uint32(bs[32:36]))
	}
	fat32 := l.sectorsPerFAT == 0
	if fat32 {
		l.sectorsPerFAT = int64(binary.LittleEndian.Uint32(bs[36:40]))
		l.rootCluster = binary.LittleEndian.Uint32(bs[44:48])
		l.fsInfo = int64(binary.LittleEndian.Uint16(bs[48:50]))
		l.backup = int64(binary.LittleEndian.Uint16(bs[50:52]))
	}
	switch {
	case l.bytesPerSector != sector:
		return fatLayout{}, fmt.Errorf("%d-byte sectors are not supported", l.bytesPerSector)
	case l.sectorsPerCluster == 0 || l.sectorsPerCluster&(l.sectorsPerCluster-1) != 0 || l.reserved == 0 || l.sectorsPerFAT == 0 || total == 0:
		return fatLayout{}, errors.New("bad FAT boot sector")
	case l.numFATs != 2:
		return fatLayout{}, fmt.Errorf("%d FAT copies are not supported (only 2)", l.numFATs)
	case total*sector > p.Size:
		return fatLayout{}, fmt.Errorf("the file system (%d bytes) is larger than its partition (%d bytes)", total*sector, p.Size)
	case fat32 && l.rootEntries != 0:
		return fatLayout{}, errors.New("bad FAT32 boot sector")
	}
	rootSectors := (l.rootEntries*32 + sector - 1) / sector
	data := total - l.reserved - l.numFATs*l.sectorsPerFAT - rootSectors
	if data <= 0 {
		return fatLayout{}, errors.New("bad FAT boot sector: no data area")
	}
	l.clusters = data / l.sectorsPerCluster
	switch {
	case fat32:
		l.bits = 32
		if l.rootCluster < 2 || int64(l.rootCluster) > l.clusters+1 {
			return fatLayout{}, errors.New("bad FAT32 root cluster")
		}
	case l.clusters < 4085:
		l.bits = 12
	case l.clusters < 65525:
		l.bits = 16
	default:
		return fatLayout{}, errors.New("FAT16 boot sector with a FAT32 cluster count")
	}
	if l.sectorsPerFAT*sector*8 < (l.clusters+2)*int64(l.bits) {
		return fatLayout{}, errors.New("FAT too small for the cluster count")
	}
	return l, nil
}

func (l fatLayout) clusterBytes() int64 { return l.sectorsPerCluster * l.bytesPerSector }
func (l fatLayout) fatStart(n int64) int64 {
	return l.start + (l.reserved+n*l.sectorsPerFAT)*l.bytesPerSector
}
func (l fatLayout) rootDirStart() int64 { return l.fatStart(l.numFATs) }
func (l fatLayout) dataStart() int64 {
	return l.rootDirStart() + (l.rootEntries*32+l.bytesPerSector-1)/l.bytesPerSector*l.bytesPerSector
}
func (l fatLayout) clusterOffset(cl uint32) int64 {
	return l.dataStart() + int64(cl-2)*l.clusterBytes()
}
func (l fatLayout) valid(cl uint32) bool { return cl >= 2 && int64(cl) <= l.clusters+1 }

// badMark is the "bad cluster" value; values above it end a chain.
func (l fatLayout) badMark() uint32 {
	switch l.bits {
	case 12:
		return 0xff7
	case 16:
		return 0xfff7
	}
	return 0x0ffffff7
}

// check refuses a file system that is not clean: the FAT copies differ, or the FAT16/32 "clean shutdown" or "no I/O
// error" bit of FAT[1] is clear (the FAT counterpart of an unclean superblock).
func (l fatLayout) check(r io.ReaderAt) error {
	size := l.sectorsPerFAT * l.bytesPerSector
	a, b := make([]byte, size), make([]byte, size)
	if _, err := r.ReadAt(a, l.fatStart(0)); err != nil {
		return fmt.Errorf("read FAT: %w", err)
	}
	if _, err := r.ReadAt(b, l.fatStart(1)); err != nil {
		return fmt.Errorf("read FAT: %w", err)
	}
	if !bytes.Equal(a, b) {
		return fmt.Errorf("the two FAT copies differ (check it with fsck.vfat): %w", ErrFSErrors)
	}
	clean := true
	switch l.bits {
	case 32:
		v := binary.LittleEndian.Uint32(a[4:8])
		clean = v&0x08000000 != 0 && v&0x04000000 != 0
	case 16:
		v := binary.LittleEndian.Uint16(a[2:4])
		clean = v&0x8000 != 0 && v&0x4000 != 0
	}
	if !clean {
		return fmt.Errorf("the file system was not cleanly unmounted or recorded an I/O error (check it with fsck.vfat): %w", ErrFSErrors)
	}
	return nil
}
