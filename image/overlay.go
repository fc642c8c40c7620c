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
	"sort"
	"sync"
)

// pageSize is the overlay's granularity: every write is held as whole 4 KiB pages of the image.
const pageSize = 4096

// overlay is a transactional view of the image: reads see pending writes, writes stay in memory until commit.
// commit is all or nothing across a kill or power loss:
//  1. the original of every changed page is written to the undo journal, which is fsynced (with its directory);
//  2. the new pages are written in place and the image is fsynced;
//  3. the journal is removed (and the directory fsynced).
//
// A journal found at open that is complete means step 2 may be half done: its originals are written back (rollback).
// An incomplete journal means step 2 never started: it is discarded. Either way the image is as before the edit.
type overlay struct {
	mu      sync.Mutex
	f       *os.File
	size    int64
	journal string
	dirty   map[int64][]byte // page index -> new content
	hook    func(stage string) error
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

const journalMagic = "PROVUNDO1\n"

func (o *overlay) page(idx int64) ([]byte, error) {
	if p, ok := o.dirty[idx]; ok {
		return p, nil
	}
	buf := make([]byte, pageSize)
	off := idx * pageSize
	n, err := o.f.ReadAt(buf, off)
	if err != nil && !(errors.Is(err, io.EOF) && off+int64(n) >= o.size) {
		return nil, err
	}
	return buf, nil
}

// ReadAt reads the image as it will be after commit.
func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if off < 0 || off >= o.size {
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
		return 0, fmt.Errorf("write of %d bytes at %d beyond the end of the image (%d bytes)", len(p), off, o.size)
	}
	if o.dirty == nil {
		o.dirty = map[int64][]byte{}
	}
	done := 0
	for done < len(p) {
		abs := off + int64(done)
		idx, in := abs/pageSize, int(abs%pageSize)
		n := min(pageSize-in, len(p)-done)
		pg, err := o.page(idx)
		if err != nil {
			return done, err
		}
		if _, ok := o.dirty[idx]; !ok {
			pg = append([]byte(nil), pg...)
		}
		copy(pg[in:in+n], p[done:done+n])
		o.dirty[idx] = pg
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

// commit makes the pending writes durable, all or nothing (see overlay).
func (o *overlay) commit() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.dirty) == 0 {
		return nil
	}
	idxs := make([]int64, 0, len(o.dirty))
	for i := range o.dirty {
		idxs = append(idxs, i)
	}
	sort.Slice(idxs, func(a, b int) bool { return idxs[a] < idxs[b] })
	// 1. the originals, durably.
	jf, err := os.OpenFile(o.journal, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("undo journal: %w", err)
	}
	w := bufio.NewWriter(jf)
	var hdr [8]byte
	w.WriteString(journalMagic)
	binary.BigEndian.PutUint64(hdr[:], uint64(o.size))
	w.Write(hdr[:])
	orig := make([]byte, pageSize)
	for _, idx := range idxs {
		clear(orig)
		n, rerr := o.f.ReadAt(orig, idx*pageSize)
		if rerr != nil && !errors.Is(rerr, io.EOF) {
			jf.Close()
			return fmt.Errorf("undo journal: read original: %w", rerr)
		}
		var rec [16]byte
		binary.BigEndian.PutUint64(rec[0:8], uint64(idx))
		binary.BigEndian.PutUint32(rec[8:12], uint32(n))
		binary.BigEndian.PutUint32(rec[12:16], crc32.Checksum(orig[:n], crcTable))
		w.Write(rec[:])
		w.Write(orig[:n])
		if err := o.stage("journal-record"); err != nil {
			jf.Close()
			return err
		}
	}
	var trailer [12]byte
	copy(trailer[0:8], "COMMIT\x00\x00")
	binary.BigEndian.PutUint32(trailer[8:12], uint32(len(idxs)))
	w.Write(trailer[:])
	if err := w.Flush(); err != nil {
		jf.Close()
		return fmt.Errorf("undo journal: %w", err)
	}
	if err := jf.Sync(); err != nil {
		jf.Close()
		return fmt.Errorf("undo journal: %w", err)
	}
	jf.Close()
	if err := syncDir(filepath.Dir(o.journal)); err != nil {
		return fmt.Errorf("undo journal: %w", err)
	}
	if err := o.stage("journal-synced"); err != nil {
		return err
	}
	// 2. the new content in place.
	for _, idx := range idxs {
		pg := o.dirty[idx]
		off := idx * pageSize
		if off+pageSize > o.size {
			pg = pg[:o.size-off]
		}
		if _, err := o.f.WriteAt(pg, off); err != nil {
			return fmt.Errorf("write image: %w", err)
		}
		if err := o.stage("page-written"); err != nil {
			return err
		}
	}
	if err := o.f.Sync(); err != nil {
		return fmt.Errorf("sync image: %w", err)
	}
	if err := o.stage("image-synced"); err != nil {
		return err
	}
	// 3. done: the journal goes.
	if err := os.Remove(o.journal); err != nil {
		return fmt.Errorf("undo journal: %w", err)
	}
	if err := syncDir(filepath.Dir(o.journal)); err != nil {
		return fmt.Errorf("undo journal: %w", err)
	}
	o.dirty = nil
	return nil
}

// recoverJournal rolls back an interrupted commit. It reports whether it wrote anything.
func recoverJournal(f *os.File, size int64, journal string) (bool, error) {
	data, err := os.ReadFile(journal)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("undo journal %s: %w", journal, err)
	}
	type rec struct {
		idx  int64
		data []byte
	}
	var recs []rec
	complete := false
	r := bytes.NewReader(data)
	magic := make([]byte, len(journalMagic))
	var hdr [8]byte
	if _, err := io.ReadFull(r, magic); err == nil && string(magic) == journalMagic {
		if _, err := io.ReadFull(r, hdr[:]); err == nil && int64(binary.BigEndian.Uint64(hdr[:])) == size {
			for {
				var h [16]byte
				if _, err := io.ReadFull(r, h[:12]); err != nil {
					break
				}
				if string(h[0:8]) == "COMMIT\x00\x00" {
					complete = int(binary.BigEndian.Uint32(h[8:12])) == len(recs)
					break
				}
				if _, err := io.ReadFull(r, h[12:16]); err != nil {
					break
				}
				n := binary.BigEndian.Uint32(h[8:12])
				if n > pageSize {
					break
				}
				buf := make([]byte, n)
				if _, err := io.ReadFull(r, buf); err != nil || crc32.Checksum(buf, crcTable) != binary.BigEndian.Uint32(h[12:16]) {
					break
				}
				recs = append(recs, rec{int64(binary.BigEndian.Uint64(h[0:8])), buf})
			}
		}
	}
	if complete {
		for _, rc := range recs {
			if _, err := f.WriteAt(rc.data, rc.idx*pageSize); err != nil {
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
	return complete, syncDir(filepath.Dir(journal))
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
		return 0, fmt.Errorf("write of %d bytes at %d beyond the end of the partition (%d bytes)", len(p), off, s.size)
	}
	return s.o.WriteAt(p, s.base+off)
}
