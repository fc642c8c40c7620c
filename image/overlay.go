package image

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"provision/internal/fsutil"
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
// Where the journal lives, when it is replayed, and its format: journal.go.
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
	if err := fsutil.SyncDir(filepath.Dir(o.journal)); err != nil {
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
