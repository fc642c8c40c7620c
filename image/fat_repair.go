package image

import (
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"path"
	"strings"
	"unicode/utf16"
)

// The repairs of what go-diskfs leaves wrong on a FAT file system (fat.go reads and writes it through go-diskfs).
// Close puts these right before the edit is committed:
//   - the FAT32 FSInfo free-cluster count and next-free hint (fsck.vfat reports a wrong free count);
//   - Remove does not free the removed file's clusters, and an empty file keeps one cluster: Close frees the
//     clusters that this session's changes left allocated but unreachable (clusters that were lost before are left
//     alone), and gives empty files written in the session no cluster;
//   - the ".." entry of a directory directly under the root must point at cluster 0, not the root's cluster.
//
// And go-diskfs compares names case-sensitively, where FAT names match regardless of case: stat looks them up.
//
// The repairs work on the first FAT copy read into memory (fatTable) and on a walk of the whole directory tree
// (fatWalk): begin records what was lost before the session's first change, Close frees what the session left lost
// and writes the changed entries into every FAT copy, then the FSInfo sector.

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
	t, w, err := f.scan()
	if err != nil {
		return err
	}
	f.lostBefore = w.lost(t)
	f.emptied = map[string]bool{}
	return nil
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
	t, w, err := f.scan()
	if err != nil {
		return err
	}
	// Empty files written in this session own no cluster.
	for _, e := range w.entries {
		if !e.dir && e.size == 0 && e.cluster != 0 && f.emptied[strings.ToLower(e.path)] {
			if err := f.clearCluster(e.off); err != nil {
				return err
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
		if err := f.clearCluster(off); err != nil {
			return err
		}
	}
	if f.l.bits == 32 {
		if err := f.l.writeFSInfo(f.ov, t); err != nil {
			return f.errorf("%w", err)
		}
	}
	return nil
}

// scan reads the first FAT copy and walks the directory tree.
func (f *fatFS) scan() (*fatTable, *fatWalk, error) {
	t, err := f.l.readTable(f.ov)
	if err != nil {
		return nil, nil, f.errorf("%w", err)
	}
	w, err := f.walk(t)
	if err != nil {
		return nil, nil, f.errorf("%w", err)
	}
	return t, w, nil
}

// clearCluster zeroes the first-cluster fields (high word at 20, low word at 26) of the 32-byte directory entry at
// off.
func (f *fatFS) clearCluster(off int64) error {
	for _, field := range []int64{20, 26} {
		if _, err := f.ov.WriteAt(make([]byte, 2), off+field); err != nil {
			return f.errorf("%w", err)
		}
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
