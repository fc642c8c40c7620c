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
	"time"
	"unicode/utf16"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/filesystem/fat12"
	"github.com/diskfs/go-diskfs/filesystem/fat16"
	"github.com/diskfs/go-diskfs/filesystem/fat32"
)

// FAT file systems are read and written by go-diskfs through the overlay (so FAT edits are journaled and crash safe
// like ext4 ones). go-diskfs leaves a few things wrong, which Close puts right before the edit is committed:
//   - the FAT32 FSInfo free-cluster count and next-free hint (fsck.vfat reports a wrong free count);
//   - Remove does not free the removed file's clusters, and an empty file keeps one cluster: Close frees the
//     clusters that this session's changes left allocated but unreachable (clusters that were lost before are left
//     alone), and gives empty files written in the session no cluster;
//   - the ".." entry of a directory directly under the root must point at cluster 0, not the root's cluster.

type timeT = time.Time

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

// stat finds p the way FAT names match: regardless of case. (go-diskfs' own Stat wants io/fs-style relative paths
// and compares case-sensitively.)
func (f *fatFS) stat(p string) (fs.FileInfo, error) {
	rel := strings.TrimPrefix(p, "/")
	entries, err := f.impl.ReadDir(path.Dir(rel))
	if err != nil {
		return nil, fs.ErrNotExist
	}
	base := path.Base(rel)
	for _, e := range entries {
		if strings.EqualFold(e.Name(), base) {
			return e.Info()
		}
	}
	return nil, fs.ErrNotExist
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

// begin records, before the session's first change, what Close must not touch.
func (f *fatFS) begin(op, p string) error {
	if err := f.usable(op, p); err != nil {
		return err
	}
	if !f.rw {
		return f.errorf("%s %s: opened read-only", op, p)
	}
	if f.lostBefore != nil {
		return nil
	}
	t, err := f.l.readTable(f.ov)
	if err != nil {
		return f.errorf("%w", err)
	}
	w, err := f.walk(t)
	if err != nil {
		return f.errorf("%w", err)
	}
	f.lostBefore = w.lost(t)
	f.emptied = map[string]bool{}
	return nil
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

// Close puts right what go-diskfs leaves wrong (see the top of this file) and releases the file system.
func (f *fatFS) Close() error {
	if f.closed {
		return nil
	}
	f.closed = true
	if f.failed != nil {
		return f.errorf("changes dropped, an earlier change failed: %w", f.failed)
	}
	if f.lostBefore == nil {
		return nil // nothing changed
	}
	t, err := f.l.readTable(f.ov)
	if err != nil {
		return f.errorf("%w", err)
	}
	w, err := f.walk(t)
	if err != nil {
		return f.errorf("%w", err)
	}
	// Empty files written in this session own no cluster.
	for _, e := range w.entries {
		if !e.dir && e.size == 0 && e.cluster != 0 && f.emptied[strings.ToLower(e.path)] {
			if _, err := f.ov.WriteAt(make([]byte, 2), e.off+20); err != nil {
				return f.errorf("%w", err)
			}
			if _, err := f.ov.WriteAt(make([]byte, 2), e.off+26); err != nil {
				return f.errorf("%w", err)
			}
		}
	}
	if w, err = f.walk(t); err != nil {
		return f.errorf("%w", err)
	}
	// Free what this session left allocated but unreachable.
	var changed []uint32
	for cl, lost := range w.lost(t) {
		if lost && !f.lostBefore[cl] {
			t.set(uint32(cl), 0)
			changed = append(changed, uint32(cl))
		}
	}
	if err := t.write(f.ov, changed); err != nil {
		return f.errorf("%w", err)
	}
	for _, off := range w.badDotDot {
		if _, err := f.ov.WriteAt(make([]byte, 2), off+20); err != nil {
			return f.errorf("%w", err)
		}
		if _, err := f.ov.WriteAt(make([]byte, 2), off+26); err != nil {
			return f.errorf("%w", err)
		}
	}
	if f.l.bits == 32 {
		if err := f.l.writeFSInfo(f.ov, t); err != nil {
			return f.errorf("%w", err)
		}
	}
	return nil
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

// fatTable is the first FAT copy in memory.
type fatTable struct {
	l fatLayout
	b []byte
}

func (l fatLayout) readTable(r io.ReaderAt) (*fatTable, error) {
	b := make([]byte, l.sectorsPerFAT*l.bytesPerSector)
	if _, err := r.ReadAt(b, l.fatStart(0)); err != nil {
		return nil, fmt.Errorf("read FAT: %w", err)
	}
	return &fatTable{l: l, b: b}, nil
}

// entryRange is where cluster cl's entry lives in the FAT.
func (t *fatTable) entryRange(cl uint32) (off, n int) {
	switch t.l.bits {
	case 12:
		return int(cl) * 3 / 2, 2
	case 16:
		return int(cl) * 2, 2
	}
	return int(cl) * 4, 4
}

func (t *fatTable) get(cl uint32) uint32 {
	off, _ := t.entryRange(cl)
	switch t.l.bits {
	case 12:
		v := uint32(binary.LittleEndian.Uint16(t.b[off:]))
		if cl&1 == 1 {
			return v >> 4
		}
		return v & 0xfff
	case 16:
		return uint32(binary.LittleEndian.Uint16(t.b[off:]))
	}
	return binary.LittleEndian.Uint32(t.b[off:]) & 0x0fffffff
}

func (t *fatTable) set(cl, v uint32) {
	off, _ := t.entryRange(cl)
	switch t.l.bits {
	case 12:
		old := binary.LittleEndian.Uint16(t.b[off:])
		if cl&1 == 1 {
			old = old&0x000f | uint16(v&0xfff)<<4
		} else {
			old = old&0xf000 | uint16(v&0xfff)
		}
		binary.LittleEndian.PutUint16(t.b[off:], old)
	case 16:
		binary.LittleEndian.PutUint16(t.b[off:], uint16(v))
	default:
		old := binary.LittleEndian.Uint32(t.b[off:])
		binary.LittleEndian.PutUint32(t.b[off:], old&0xf0000000|v&0x0fffffff)
	}
}

// write copies the entries of the changed clusters into every FAT copy.
func (t *fatTable) write(w io.WriterAt, changed []uint32) error {
	for _, cl := range changed {
		off, n := t.entryRange(cl)
		for c := range t.l.numFATs {
			if _, err := w.WriteAt(t.b[off:off+n], t.l.fatStart(c)+int64(off)); err != nil {
				return fmt.Errorf("write FAT: %w", err)
			}
		}
	}
	return nil
}

// free counts free clusters and finds the first one (0xffffffff: none).
func (t *fatTable) free() (n int64, first uint32) {
	first = 0xffffffff
	for cl := uint32(2); int64(cl) <= t.l.clusters+1; cl++ {
		if t.get(cl) == 0 {
			n++
			if first == 0xffffffff {
				first = cl
			}
		}
	}
	return n, first
}

// chain follows a cluster chain; a loop, a free or out-of-range link is an error.
func (t *fatTable) chain(first uint32, seen []bool) ([]uint32, error) {
	var out []uint32
	for cl := first; ; {
		if !t.l.valid(cl) {
			return nil, fmt.Errorf("cluster chain from %d links to invalid cluster %d (check it with fsck.vfat): %w", first, cl, ErrFSErrors)
		}
		if seen[cl] {
			return nil, fmt.Errorf("cluster %d is used twice (check it with fsck.vfat): %w", cl, ErrFSErrors)
		}
		seen[cl] = true
		out = append(out, cl)
		next := t.get(cl)
		if next > t.l.badMark() {
			return out, nil
		}
		if next < 2 || next == t.l.badMark() {
			return nil, fmt.Errorf("cluster chain from %d is broken at %d (check it with fsck.vfat): %w", first, cl, ErrFSErrors)
		}
		cl = next
	}
}

func (l fatLayout) writeFSInfo(w interface {
	io.ReaderAt
	io.WriterAt
}, t *fatTable) error {
	free, next := t.free()
	var v [8]byte
	binary.LittleEndian.PutUint32(v[0:4], uint32(free))
	binary.LittleEndian.PutUint32(v[4:8], next)
	sectors := []int64{l.fsInfo}
	if l.backup != 0 && l.backup != 0xffff {
		sectors = append(sectors, l.backup+l.fsInfo)
	}
	for _, s := range sectors {
		if s == 0 || s >= l.reserved {
			continue
		}
		off := l.start + s*l.bytesPerSector
		sec := make([]byte, sector)
		if _, err := w.ReadAt(sec, off); err != nil {
			return fmt.Errorf("read FSInfo: %w", err)
		}
		if string(sec[0:4]) != "RRaA" || string(sec[484:488]) != "rrAa" {
			continue
		}
		if _, err := w.WriteAt(v[:], off+488); err != nil {
			return fmt.Errorf("write FSInfo: %w", err)
		}
	}
	return nil
}

// fatEntry is a file or directory found by walk.
type fatEntry struct {
	path    string
	dir     bool
	cluster uint32
	size    uint32
	off     int64 // the 32-byte short entry's offset in the image
}

type fatWalk struct {
	entries   []fatEntry
	used      []bool  // clusters reachable from the root
	badDotDot []int64 // ".." entries of the root's subdirectories that do not point at cluster 0
}

// lost lists clusters allocated in t but not reachable (bad clusters aside).
func (w *fatWalk) lost(t *fatTable) []bool {
	lost := make([]bool, len(w.used))
	for cl := uint32(2); int64(cl) <= t.l.clusters+1; cl++ {
		if v := t.get(cl); v != 0 && v != t.l.badMark() && !w.used[cl] {
			lost[cl] = true
		}
	}
	return lost
}

// walk lists every file and directory and marks the clusters they use.
func (f *fatFS) walk(t *fatTable) (*fatWalk, error) {
	w := &fatWalk{used: make([]bool, f.l.clusters+2)}
	type dir struct {
		path    string
		cluster uint32 // 0: the FAT12/16 root region
		depth   int
	}
	root := dir{path: "/", cluster: f.l.rootCluster}
	queue := []dir{root}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		if d.depth > 64 || len(w.entries) > 1<<20 {
			return nil, fmt.Errorf("directory tree too deep or too large (check it with fsck.vfat): %w", ErrFSErrors)
		}
		var regions [][2]int64 // offset, length
		if d.cluster == 0 {
			regions = append(regions, [2]int64{f.l.rootDirStart(), f.l.rootEntries * 32})
		} else {
			cls, err := t.chain(d.cluster, w.used)
			if err != nil {
				return nil, fmt.Errorf("directory %s: %w", d.path, err)
			}
			for _, cl := range cls {
				regions = append(regions, [2]int64{f.l.clusterOffset(cl), f.l.clusterBytes()})
			}
		}
		var lfn []uint16
		var lfnSum byte
		lfnOK := false
	scan:
		for _, rg := range regions {
			buf := make([]byte, rg[1])
			if _, err := f.ov.ReadAt(buf, rg[0]); err != nil {
				return nil, fmt.Errorf("read directory %s: %w", d.path, err)
			}
			for i := 0; i+32 <= len(buf); i += 32 {
				e := buf[i : i+32]
				switch {
				case e[0] == 0:
					break scan
				case e[0] == 0xe5:
					lfnOK = false
					continue
				case e[11]&0x3f == 0x0f: // a long-name piece; they come last piece first
					seq := int(e[0] & 0x1f)
					if e[0]&0x40 != 0 {
						lfn, lfnSum, lfnOK = make([]uint16, 13*seq), e[13], seq > 0
					}
					if !lfnOK || seq == 0 || 13*seq > len(lfn) || e[13] != lfnSum {
						lfnOK = false
						continue
					}
					piece := lfn[13*(seq-1):]
					for k, o := range []int{1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30} {
						piece[k] = binary.LittleEndian.Uint16(e[o:])
					}
					continue
				case e[11]&0x08 != 0: // volume label
					lfnOK = false
					continue
				}
				name := shortName(e)
				if lfnOK && lfnChecksum(e[0:11]) == lfnSum {
					if n := decodeLFN(lfn); n != "" {
						name = n
					}
				}
				lfnOK = false
				cl := uint32(binary.LittleEndian.Uint16(e[20:22]))<<16 | uint32(binary.LittleEndian.Uint16(e[26:28]))
				if f.l.bits != 32 {
					cl &= 0xffff
				}
				if name == "." || name == ".." {
					if name == ".." && d.path != "/" && path.Dir(d.path) == "/" && cl != 0 {
						w.badDotDot = append(w.badDotDot, rg[0]+int64(i))
					}
					continue
				}
				ent := fatEntry{path: path.Join(d.path, name), dir: e[11]&0x10 != 0, cluster: cl,
					size: binary.LittleEndian.Uint32(e[28:32]), off: rg[0] + int64(i)}
				w.entries = append(w.entries, ent)
				switch {
				case ent.dir && cl != 0:
					queue = append(queue, dir{path: ent.path, cluster: cl, depth: d.depth + 1})
				case cl != 0:
					if _, err := t.chain(cl, w.used); err != nil {
						return nil, fmt.Errorf("file %s: %w", ent.path, err)
					}
				}
			}
		}
	}
	return w, nil
}

// shortName renders an 8.3 entry name, with the lowercase flags Windows NT sets.
func shortName(e []byte) string {
	base, ext := strings.TrimRight(string(e[0:8]), " "), strings.TrimRight(string(e[8:11]), " ")
	if e[0] == 0x05 {
		base = "\xe5" + base[1:]
	}
	if e[12]&0x08 != 0 {
		base = strings.ToLower(base)
	}
	if e[12]&0x10 != 0 {
		ext = strings.ToLower(ext)
	}
	if ext == "" {
		return base
	}
	return base + "." + ext
}

func decodeLFN(u []uint16) string {
	for i, c := range u {
		if c == 0 || c == 0xffff {
			u = u[:i]
			break
		}
	}
	return string(utf16.Decode(u))
}

func lfnChecksum(name []byte) byte {
	var sum byte
	for _, c := range name {
		sum = (sum&1)<<7 + sum>>1 + c
	}
	return sum
}
