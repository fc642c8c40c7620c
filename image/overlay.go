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
// Journal format (big endian): header = magic, image size (8), page size (4), record count (4), CRC-32C of the
// image's first page as it was (the partition table, with the disk's identifier; it tells this image from another of
// the same size), CRC-32C of those;
// each record = page index (8), length (4), CRC of the original (4), CRC of the new content (4), CRC of these 20
// bytes (4), then the original bytes; trailer = "COMMIT\0\0", record count (4), CRC of everything before the trailer.
type overlay struct {
	mu      sync.Mutex
	f       *os.File
	size    int64
	journal string
	dirty   map[int64][]byte // page index -> new content
	hook    func(stage string) error
	broken  error // a commit failed after the image was touched: no more commits through this handle
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

const (
	journalMagic  = "PROVUNDO2\n"
	journalHeader = len(journalMagic) + 24
)

// ErrUndoJournal: an undo journal was found that does not belong to the image (the image was replaced or resized
// after an interrupted edit). The journal is left in place; remove it by hand once the image is known to be good.
var ErrUndoJournal = errors.New("undo journal does not match the image")

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
	if _, rerr := recoverJournal(o.f, o.size, o.journal); rerr != nil {
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
		rec := make([]byte, 0, 24)
		rec = binary.BigEndian.AppendUint64(rec, uint64(idx))
		rec = binary.BigEndian.AppendUint32(rec, uint32(n))
		rec = binary.BigEndian.AppendUint32(rec, crc32.Checksum(orig[:n], crcTable))
		rec = binary.BigEndian.AppendUint32(rec, crc32.Checksum(o.dirty[idx][:n], crcTable))
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
	idx          int64
	origCRC, now uint32
	orig         []byte
}

// parseJournal returns the records of a complete journal, or ok=false for an incomplete or torn one.
func parseJournal(data []byte) (size int64, first uint32, recs []journalRecord, ok bool) {
	hl := journalHeader
	if len(data) < hl+16 || string(data[:len(journalMagic)]) != journalMagic {
		return 0, 0, nil, false
	}
	hdr := data[:hl]
	if crc32.Checksum(hdr[:hl-4], crcTable) != binary.BigEndian.Uint32(hdr[hl-4:]) {
		return 0, 0, nil, false
	}
	size = int64(binary.BigEndian.Uint64(hdr[len(journalMagic):]))
	if binary.BigEndian.Uint32(hdr[len(journalMagic)+8:]) != pageSize {
		return 0, 0, nil, false
	}
	count := binary.BigEndian.Uint32(hdr[len(journalMagic)+12:])
	first = binary.BigEndian.Uint32(hdr[len(journalMagic)+16:])
	trailer := data[len(data)-16:]
	body := data[:len(data)-16]
	if string(trailer[:8]) != "COMMIT\x00\x00" || binary.BigEndian.Uint32(trailer[8:12]) != count ||
		crc32.Checksum(body, crcTable) != binary.BigEndian.Uint32(trailer[12:16]) {
		return 0, 0, nil, false
	}
	rest := body[hl:]
	for len(rest) >= 24 {
		rec := rest[:24]
		if crc32.Checksum(rec[:20], crcTable) != binary.BigEndian.Uint32(rec[20:24]) {
			return 0, 0, nil, false
		}
		n := int(binary.BigEndian.Uint32(rec[8:12]))
		if n > pageSize || len(rest) < 24+n {
			return 0, 0, nil, false
		}
		r := journalRecord{
			idx:     int64(binary.BigEndian.Uint64(rec[0:8])),
			origCRC: binary.BigEndian.Uint32(rec[12:16]),
			now:     binary.BigEndian.Uint32(rec[16:20]),
			orig:    rest[24 : 24+n],
		}
		if crc32.Checksum(r.orig, crcTable) != r.origCRC || r.idx < 0 || r.idx*pageSize+int64(n) > size {
			return 0, 0, nil, false
		}
		recs = append(recs, r)
		rest = rest[24+n:]
	}
	if len(rest) != 0 || len(recs) != int(count) {
		return 0, 0, nil, false
	}
	return size, first, recs, true
}

// recoverJournal rolls back an interrupted commit. It reports whether it wrote anything. A complete journal whose
// pages are neither the originals nor the new content it recorded belongs to another image: ErrUndoJournal.
func recoverJournal(f *os.File, size int64, journal string) (bool, error) {
	data, err := os.ReadFile(journal)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("undo journal %s: %w", journal, err)
	}
	jsize, first, recs, complete := parseJournal(data)
	if complete {
		if jsize != size {
			return false, fmt.Errorf("undo journal %s was written for an image of %d bytes, this one has %d: %w", journal, jsize, size, ErrUndoJournal)
		}
		if len(recs) == 0 || recs[0].idx != 0 { // the first page was not part of the edit: it must be as it was
			page := make([]byte, min(pageSize, size))
			if _, err := f.ReadAt(page, 0); err != nil {
				return false, fmt.Errorf("undo journal: read image: %w", err)
			}
			if crc32.Checksum(page, crcTable) != first {
				return false, fmt.Errorf("undo journal %s: the image's partition table is not the one the journal was written for: %w", journal, ErrUndoJournal)
			}
		}
		// Pages that are neither old nor new: torn by the crash (a few at most) or a different image.
		foreign := 0
		cur := make([]byte, pageSize)
		for _, r := range recs {
			n, err := f.ReadAt(cur[:len(r.orig)], r.idx*pageSize)
			if err != nil && !errors.Is(err, io.EOF) {
				return false, fmt.Errorf("undo journal: read image: %w", err)
			}
			if c := crc32.Checksum(cur[:n], crcTable); n != len(r.orig) || (c != r.origCRC && c != r.now) {
				foreign++
			}
		}
		if foreign > 1 && foreign*2 > len(recs) {
			return false, fmt.Errorf("undo journal %s: %d of %d pages match neither the original nor the edit: %w", journal, foreign, len(recs), ErrUndoJournal)
		}
		for _, r := range recs {
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
