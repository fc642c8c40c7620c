package image

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// pageSize is the overlay's granularity: changes are held, journaled and written as whole 4 KiB pages of the image.
const pageSize = 4096

// overlay is a transactional view of the image: reads see pending writes, writes stay in memory until commit, and
// a write that leaves a page as it was is dropped (libext2fs rewrites unchanged bitmaps and descriptors; go-diskfs
// rewrites whole FATs), so only changed pages are journaled and written.
//
// commit is all or nothing across a kill or power loss:
//  1. the original of every changed page goes to the undo journal, which is fsynced (and its directory);
//  2. the new pages are written in place and the image is fsynced;
//  3. the journal is removed (and its directory fsynced).
//
// Open finds a journal left by a crash: a complete one means step 2 may be half done, so its originals are written
// back (rollback); an incomplete one means step 2 never started (it starts only after the journal is synced), so it is
// dropped. Either way the image is as it was before the edit.
//
// The journal belongs to the real image, not to the name it was opened by: symbolic links are resolved (the journal
// of a file lies beside the file itself; with a journal directory, it is named after the resolved path, and a block
// device's after its major:minor numbers, "dev-8-16.provision-undo"), and a file with several hard links is refused
// for writing (its journal would not be found through the other names). Open also looks for a journal under the
// name earlier versions used (the path as given, unresolved). A complete journal is replayed only onto
// the image it was written for, as that edit left it: the same file (inode; a file system's device number can change
// across a reboot, so it is recorded but not compared) or device (major:minor), the same size, the same first page
// when the edit did not change it, and every 512-byte sector of every journaled page holding either its original or
// what the edit wrote (a crash can leave each sector either way, never anything else). Anything else means the
// image was changed or replaced after the interrupted edit, and replaying would undo later work: the journal is
// renamed aside ("<journal>.stale-<UTC time>", never deleted) and Open fails with ErrUndoJournal, naming it. A
// rollback of the writer's own failed commit (it holds the lock throughout) skips these checks.
//
// Journal format 3 (big endian; "PROVUNDO3\n"): header = magic (10), time written (8, Unix seconds), identity kind
// (4: 1 file, 2 block device), device (8: st_dev of a file, st_rdev of a device), inode (8: 0 for a device), image
// size (8), page size (4), record count (4), CRC-32C of the image's first page as it was (the partition table, with
// the disk's identifier), CRC-32C of those 58 bytes;
// each record = page index (8), length (4), CRC of the original (4), CRCs of the new content of each of the page's
// eight 512-byte sectors (8 x 4; 0 past the length), CRC of these 48 bytes (4), then the original bytes;
// trailer = "COMMIT\0\0", record count (4), CRC of everything before the trailer.
// Format 2 ("PROVUNDO2\n", written by earlier versions) is still read: header = magic, image size (8), page size (4),
// record count (4), first-page CRC (4), CRC (4); records = page index (8), length (4), CRC of the original (4), CRC of
// the whole new page (4), CRC (4), original bytes; it carries no identity, and its pages must be whole.
type overlay struct {
	mu      sync.Mutex
	f       *os.File
	size    int64
	ident   identity
	journal string
	dirty   map[int64][]byte // page index -> new content
	hook    func(stage string) error
	broken  error // a commit failed after the image was touched: no more commits through this handle
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

const (
	journalMagic   = "PROVUNDO3\n"
	journalMagicV2 = "PROVUNDO2\n"
	journalHeader  = len(journalMagic) + 52
	journalRecord3 = 52
	journalHeader2 = len(journalMagicV2) + 24
	journalRecord2 = 24
	sectorsPerPage = pageSize / sector
)

// ErrUndoJournal: an undo journal was found that does not belong to the image as its interrupted edit left it (the
// image was edited, replaced or resized since). The journal is not replayed; it is renamed aside and the error
// names it: remove it by hand once the image is known to be good.
var ErrUndoJournal = errors.New("undo journal does not match the image")

// identity is what an undo journal is keyed to: a file or a block device.
type identity struct {
	kind uint32 // identFile or identDevice; 0: unknown (a format 2 journal)
	dev  uint64 // st_dev of a file, st_rdev of a block device
	ino  uint64 // st_ino of a file, 0 for a device
}

const (
	identFile   = 1
	identDevice = 2
)

func identityOf(st *unix.Stat_t) identity {
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return identity{kind: identDevice, dev: uint64(st.Rdev)}
	}
	return identity{kind: identFile, dev: uint64(st.Dev), ino: uint64(st.Ino)}
}

// identify returns the identity of an open image and its number of hard links.
func identify(f *os.File) (identity, uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return identity{}, 0, err
	}
	return identityOf(&st), uint64(st.Nlink), nil
}

// same: the device number of a file is not compared (see overlay).
func (i identity) same(o identity) bool {
	if i.kind != o.kind {
		return false
	}
	if i.kind == identDevice {
		return i.dev == o.dev
	}
	return i.ino == o.ino
}

func (i identity) String() string {
	switch i.kind {
	case identDevice:
		return fmt.Sprintf("block device %d:%d", unix.Major(i.dev), unix.Minor(i.dev))
	case identFile:
		return fmt.Sprintf("file inode %d", i.ino)
	}
	return "an unknown image"
}

// readPage reads page idx of the image as it is on disk (zero-filled past the end).
func (o *overlay) readPage(idx int64) ([]byte, error) {
	buf := make([]byte, pageSize)
	n, err := o.f.ReadAt(buf, idx*pageSize)
	if err != nil && !(errors.Is(err, io.EOF) && idx*pageSize+int64(n) >= o.size) {
		return nil, err
	}
	return buf, nil
}

// pageLen is how many bytes of page idx lie inside the image.
func (o *overlay) pageLen(idx int64) int {
	return int(min(pageSize, o.size-idx*pageSize))
}

// ReadAt reads the image as it will be after commit.
func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	if off >= o.size {
		return 0, io.EOF
	}
	want := len(p)
	if off+int64(len(p)) > o.size {
		p = p[:o.size-off]
	}
	if len(o.dirty) == 0 {
		n, err := o.f.ReadAt(p, off)
		if err == nil && n < want {
			err = io.EOF
		}
		return n, err
	}
	done := 0
	for done < len(p) {
		abs := off + int64(done)
		idx, in := abs/pageSize, int(abs%pageSize)
		n := min(pageSize-in, len(p)-done)
		if pg, ok := o.dirty[idx]; ok {
			copy(p[done:done+n], pg[in:in+n])
		} else if _, err := o.f.ReadAt(p[done:done+n], abs); err != nil && !errors.Is(err, io.EOF) {
			return done, err
		}
		done += n
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

// WriteAt records a write; nothing reaches the image before commit.
func (o *overlay) WriteAt(p []byte, off int64) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if off < 0 || off+int64(len(p)) > o.size {
		return 0, fmt.Errorf("write of %d bytes at %d outside the image (%d bytes)", len(p), off, o.size)
	}
	if o.dirty == nil {
		o.dirty = map[int64][]byte{}
	}
	done := 0
	for done < len(p) {
		abs := off + int64(done)
		idx, in := abs/pageSize, int(abs%pageSize)
		n := min(pageSize-in, len(p)-done)
		chunk := p[done : done+n]
		if pg, ok := o.dirty[idx]; ok {
			copy(pg[in:in+n], chunk)
		} else {
			pg, err := o.readPage(idx)
			if err != nil {
				return done, err
			}
			if !bytes.Equal(pg[in:in+n], chunk) {
				copy(pg[in:in+n], chunk)
				o.dirty[idx] = pg
			}
		}
		done += n
	}
	return done, nil
}

// pending is the number of changed pages.
func (o *overlay) pending() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.dirty)
}

// discard drops every pending write.
func (o *overlay) discard() {
	o.mu.Lock()
	o.dirty = nil
	o.mu.Unlock()
}

func (o *overlay) stage(name string) error {
	if o.hook != nil {
		return o.hook(name)
	}
	return nil
}

// commit makes the pending writes durable, all or nothing (see overlay). verify (if not nil) runs after the new
// pages are written and synced, while the journal still exists, reading the image itself (the pages written are
// dropped from the page cache first, so that a block device is read back from the device): if it fails, the edit is
// rolled back. On any failure the pending writes are dropped and the image is rolled back to its state before the
// edit (or, if even that fails, left for Open to roll back).
func (o *overlay) commit(verify func() error) error {
	o.mu.Lock()
	locked := true
	defer func() {
		o.dirty = nil
		if locked {
			o.mu.Unlock()
		}
	}()
	if o.broken != nil {
		return o.broken
	}
	if len(o.dirty) == 0 {
		return nil
	}
	idxs := make([]int64, 0, len(o.dirty))
	for i := range o.dirty {
		idxs = append(idxs, i)
	}
	slices.Sort(idxs)
	// 1. the originals, durably.
	if err := o.writeJournal(idxs); err != nil {
		os.Remove(o.journal) // incomplete: the image is untouched
		return fmt.Errorf("undo journal: %w", err)
	}
	if err := o.stage("journal-synced"); err != nil {
		return o.fail(err)
	}
	// 2. the new content in place.
	for _, idx := range idxs {
		if _, err := o.f.WriteAt(o.dirty[idx][:o.pageLen(idx)], idx*pageSize); err != nil {
			return o.fail(fmt.Errorf("write image: %w", err))
		}
		if err := o.stage("page-written"); err != nil {
			return o.fail(err)
		}
	}
	if err := o.f.Sync(); err != nil {
		return o.fail(fmt.Errorf("sync image: %w", err))
	}
	if err := o.stage("image-synced"); err != nil {
		return o.fail(err)
	}
	if verify != nil {
		o.dirty = nil
		dropCached(o.f, idxs)
		o.mu.Unlock() // verify reads through the overlay
		err := verify()
		o.mu.Lock()
		if err != nil {
			return o.fail(err)
		}
	}
	// 3. done: the journal goes.
	if err := os.Remove(o.journal); err != nil {
		return o.fail(fmt.Errorf("remove undo journal: %w", err))
	}
	if err := syncDir(filepath.Dir(o.journal)); err != nil {
		return fmt.Errorf("the edit is complete, but syncing the removal of its undo journal failed: %w", err)
	}
	return o.stage("journal-removed")
}

// dropCached asks the kernel to forget the (clean, synced) cached pages at idxs, so that reading them goes to the
// device. Best effort.
func dropCached(f *os.File, idxs []int64) {
	for i := 0; i < len(idxs); {
		j := i + 1
		for j < len(idxs) && idxs[j] == idxs[j-1]+1 {
			j++
		}
		unix.Fadvise(int(f.Fd()), idxs[i]*pageSize, int64(j-i)*pageSize, unix.FADV_DONTNEED)
		i = j
	}
}

// fail handles an error after the image may have been touched: roll back now from the journal; if that fails too,
// the journal stays for the next Open, and this handle refuses further commits.
func (o *overlay) fail(err error) error {
	if _, rerr := recoverJournal(o.f, o.size, o.ident, o.journal, true); rerr != nil {
		o.broken = fmt.Errorf("%w (rolling back failed as well: %v; the next open rolls back)", err, rerr)
		return o.broken
	}
	return fmt.Errorf("%w (the edit was rolled back)", err)
}

// writeJournal is step 1 of commit: the originals, durably.
func (o *overlay) writeJournal(idxs []int64) error {
	jf, err := os.OpenFile(o.journal, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer jf.Close()
	sum := crc32.New(crcTable)
	bw := bufio.NewWriterSize(jf, 1<<16)
	w := io.MultiWriter(bw, sum)
	first, err := o.readPage(0)
	if err != nil {
		return fmt.Errorf("read first page: %w", err)
	}
	hdr := make([]byte, 0, journalHeader)
	hdr = append(hdr, journalMagic...)
	hdr = binary.BigEndian.AppendUint64(hdr, uint64(time.Now().Unix()))
	hdr = binary.BigEndian.AppendUint32(hdr, o.ident.kind)
	hdr = binary.BigEndian.AppendUint64(hdr, o.ident.dev)
	hdr = binary.BigEndian.AppendUint64(hdr, o.ident.ino)
	hdr = binary.BigEndian.AppendUint64(hdr, uint64(o.size))
	hdr = binary.BigEndian.AppendUint32(hdr, pageSize)
	hdr = binary.BigEndian.AppendUint32(hdr, uint32(len(idxs)))
	hdr = binary.BigEndian.AppendUint32(hdr, crc32.Checksum(first[:o.pageLen(0)], crcTable))
	hdr = binary.BigEndian.AppendUint32(hdr, crc32.Checksum(hdr, crcTable))
	w.Write(hdr)
	for _, idx := range idxs {
		orig, err := o.readPage(idx)
		if err != nil {
			return fmt.Errorf("read original: %w", err)
		}
		n := o.pageLen(idx)
		rec := make([]byte, 0, journalRecord3)
		rec = binary.BigEndian.AppendUint64(rec, uint64(idx))
		rec = binary.BigEndian.AppendUint32(rec, uint32(n))
		rec = binary.BigEndian.AppendUint32(rec, crc32.Checksum(orig[:n], crcTable))
		for s := range sectorsPerPage {
			var c uint32
			if lo := s * sector; lo < n {
				c = crc32.Checksum(o.dirty[idx][lo:min(lo+sector, n)], crcTable)
			}
			rec = binary.BigEndian.AppendUint32(rec, c)
		}
		rec = binary.BigEndian.AppendUint32(rec, crc32.Checksum(rec, crcTable))
		w.Write(rec)
		w.Write(orig[:n])
		if err := o.stage("journal-record"); err != nil {
			return err
		}
	}
	trailer := []byte("COMMIT\x00\x00")
	trailer = binary.BigEndian.AppendUint32(trailer, uint32(len(idxs)))
	trailer = binary.BigEndian.AppendUint32(trailer, sum.Sum32())
	bw.Write(trailer)
	if err := bw.Flush(); err != nil {
		return err
	}
	if err := jf.Sync(); err != nil {
		return err
	}
	return syncDir(filepath.Dir(o.journal))
}

type journalRecord struct {
	idx        int64
	origCRC    uint32
	newCRC     uint32                 // format 2: of the whole new page
	newSectors [sectorsPerPage]uint32 // format 3: of each 512-byte sector of the new page
	orig       []byte
}

// undoJournal is a parsed, complete journal.
type undoJournal struct {
	version int
	written time.Time // format 3
	ident   identity  // format 3
	size    int64
	first   uint32
	recs    []journalRecord
}

// parseJournal returns a complete journal, or ok=false for an incomplete, torn or unknown one.
func parseJournal(data []byte) (j undoJournal, ok bool) {
	var hl, rl int
	switch {
	case bytes.HasPrefix(data, []byte(journalMagic)):
		j.version, hl, rl = 3, journalHeader, journalRecord3
	case bytes.HasPrefix(data, []byte(journalMagicV2)):
		j.version, hl, rl = 2, journalHeader2, journalRecord2
	default:
		return j, false
	}
	if len(data) < hl+16 {
		return j, false
	}
	hdr := data[:hl]
	if crc32.Checksum(hdr[:hl-4], crcTable) != binary.BigEndian.Uint32(hdr[hl-4:]) {
		return j, false
	}
	h := hdr[len(journalMagic):]
	if j.version == 3 {
		j.written = time.Unix(int64(binary.BigEndian.Uint64(h[0:8])), 0).UTC()
		j.ident = identity{kind: binary.BigEndian.Uint32(h[8:12]), dev: binary.BigEndian.Uint64(h[12:20]), ino: binary.BigEndian.Uint64(h[20:28])}
		h = h[28:]
	}
	j.size = int64(binary.BigEndian.Uint64(h[0:8]))
	if binary.BigEndian.Uint32(h[8:12]) != pageSize {
		return j, false
	}
	count := binary.BigEndian.Uint32(h[12:16])
	j.first = binary.BigEndian.Uint32(h[16:20])
	trailer := data[len(data)-16:]
	body := data[:len(data)-16]
	if string(trailer[:8]) != "COMMIT\x00\x00" || binary.BigEndian.Uint32(trailer[8:12]) != count ||
		crc32.Checksum(body, crcTable) != binary.BigEndian.Uint32(trailer[12:16]) {
		return j, false
	}
	rest := body[hl:]
	for len(rest) >= rl {
		rec := rest[:rl]
		if crc32.Checksum(rec[:rl-4], crcTable) != binary.BigEndian.Uint32(rec[rl-4:rl]) {
			return j, false
		}
		n := int(binary.BigEndian.Uint32(rec[8:12]))
		if n > pageSize || len(rest) < rl+n {
			return j, false
		}
		r := journalRecord{
			idx:     int64(binary.BigEndian.Uint64(rec[0:8])),
			origCRC: binary.BigEndian.Uint32(rec[12:16]),
			orig:    rest[rl : rl+n],
		}
		if j.version == 2 {
			r.newCRC = binary.BigEndian.Uint32(rec[16:20])
		} else {
			for s := range sectorsPerPage {
				r.newSectors[s] = binary.BigEndian.Uint32(rec[16+4*s:])
			}
		}
		if crc32.Checksum(r.orig, crcTable) != r.origCRC || r.idx < 0 || r.idx*pageSize+int64(n) > j.size {
			return j, false
		}
		j.recs = append(j.recs, r)
		rest = rest[rl+n:]
	}
	if len(rest) != 0 || len(j.recs) != int(count) {
		return j, false
	}
	return j, true
}

// matches reports whether cur, the image's current content of r's page, is what a crash during the edit can have
// left: each sector (format 2: the whole page) either the original or the new content.
func (j *undoJournal) matches(r journalRecord, cur []byte) bool {
	if j.version == 2 {
		c := crc32.Checksum(cur, crcTable)
		return c == r.origCRC || c == r.newCRC
	}
	for s := 0; s*sector < len(cur); s++ {
		lo, hi := s*sector, min((s+1)*sector, len(cur))
		if !bytes.Equal(cur[lo:hi], r.orig[lo:hi]) && crc32.Checksum(cur[lo:hi], crcTable) != r.newSectors[s] {
			return false
		}
	}
	return true
}

// stale says why the journal cannot be replayed onto the image f (size bytes, identity id), or "" when it can.
func (j *undoJournal) stale(f *os.File, size int64, id identity) (string, error) {
	if j.ident.kind != 0 && !j.ident.same(id) {
		return fmt.Sprintf("was written for %s, the image is %s", j.ident, id), nil
	}
	if j.size != size {
		return fmt.Sprintf("was written for an image of %d bytes, this one has %d", j.size, size), nil
	}
	if len(j.recs) == 0 || j.recs[0].idx != 0 { // the first page was not part of the edit: it must be as it was
		page := make([]byte, min(pageSize, size))
		if _, err := f.ReadAt(page, 0); err != nil {
			return "", fmt.Errorf("read image: %w", err)
		}
		if crc32.Checksum(page, crcTable) != j.first {
			return "was written for another partition table", nil
		}
	}
	changed, firstAt := 0, int64(-1)
	cur := make([]byte, pageSize)
	for _, r := range j.recs {
		n, err := f.ReadAt(cur[:len(r.orig)], r.idx*pageSize)
		if err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("read image: %w", err)
		}
		if n != len(r.orig) || !j.matches(r, cur[:n]) {
			if changed++; firstAt < 0 {
				firstAt = r.idx * pageSize
			}
		}
	}
	if changed > 0 {
		return fmt.Sprintf("does not fit: %d of its %d pages (the first at byte %d) hold neither what they held before its edit nor what the edit wrote",
			changed, len(j.recs), firstAt), nil
	}
	return "", nil
}

// recoverJournal rolls back an interrupted commit and removes the journal. It reports whether it wrote anything.
// Unless trusted (the writer rolling back its own commit), a complete journal is first checked against the image
// (undoJournal.stale): a journal that does not fit is renamed aside, not replayed, and ErrUndoJournal returned.
func recoverJournal(f *os.File, size int64, id identity, journal string, trusted bool) (bool, error) {
	data, err := os.ReadFile(journal)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("undo journal %s: %w", journal, err)
	}
	j, complete := parseJournal(data)
	if complete {
		if !trusted {
			why, err := j.stale(f, size, id)
			if err != nil {
				return false, fmt.Errorf("undo journal %s: %w", journal, err)
			}
			if why != "" {
				return false, keepAside(journal, &j, why)
			}
		}
		for _, r := range j.recs {
			if _, err := f.WriteAt(r.orig, r.idx*pageSize); err != nil {
				return false, fmt.Errorf("roll back interrupted edit: %w", err)
			}
		}
		if err := f.Sync(); err != nil {
			return false, fmt.Errorf("roll back interrupted edit: %w", err)
		}
	}
	if err := os.Remove(journal); err != nil {
		return false, fmt.Errorf("undo journal: %w", err)
	}
	if err := syncDir(filepath.Dir(journal)); err != nil {
		return false, fmt.Errorf("undo journal: %w", err)
	}
	return complete, nil
}

// keepAside renames a journal that does not fit its image to "<journal>.stale-<UTC time>" and returns the error
// that says so.
func keepAside(journal string, j *undoJournal, why string) error {
	kept := journal + ".stale-" + time.Now().UTC().Format("20060102T150405Z")
	for i := 1; ; i++ {
		if _, err := os.Lstat(kept); errors.Is(err, fs.ErrNotExist) {
			break
		}
		kept = fmt.Sprintf("%s.stale-%s-%d", journal, time.Now().UTC().Format("20060102T150405Z"), i)
	}
	written := ""
	if !j.written.IsZero() {
		written = " (written " + j.written.Format(time.RFC3339) + ")"
	}
	if err := os.Rename(journal, kept); err != nil {
		return fmt.Errorf("undo journal %s%s %s: not replayed, and keeping it aside failed (%v): check the image, then remove the journal by hand: %w",
			journal, written, why, err, ErrUndoJournal)
	}
	syncDir(filepath.Dir(journal))
	return fmt.Errorf("undo journal %s%s %s: the image was changed or replaced after that edit was interrupted, so the journal was not replayed and is kept as %s; check the image (provision verify, e2fsck -fn, fsck.vfat -n) and delete %s once the image is known good: %w",
		journal, written, why, kept, filepath.Base(kept), ErrUndoJournal)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// section is a partition's window onto the overlay.
type section struct {
	o    *overlay
	base int64
	size int64
}

func (s *section) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= s.size {
		return 0, io.EOF
	}
	if off+int64(len(p)) > s.size {
		n, err := s.o.ReadAt(p[:s.size-off], s.base+off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	return s.o.ReadAt(p, s.base+off)
}

func (s *section) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("write of %d bytes at %d outside the partition (%d bytes)", len(p), off, s.size)
	}
	return s.o.WriteAt(p, s.base+off)
}
