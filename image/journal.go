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
	"time"

	"golang.org/x/sys/unix"

	"provision/internal/fsutil"
)

// The undo journal (see overlay for the commit protocol that writes it).
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

// JournalPath is where the undo journal of an image lives (see overlay.go): beside the real file (symbolic links
// resolved) as "<file>.provision-undo", or in journalDir: a file's named after its resolved path, a block device's
// after its major:minor numbers ("dev-8-16.provision-undo"), whatever path reaches it.
func JournalPath(imagePath, journalDir string) string {
	real := resolvePath(imagePath)
	var id identity
	var st unix.Stat_t
	if unix.Stat(real, &st) == nil {
		id = identityOf(&st)
	}
	return journalPathFor(real, id, journalDir)
}

// resolvePath is the absolute path of the image with every symbolic link resolved (as given, made absolute, when
// that fails).
func resolvePath(p string) string {
	if real, err := filepath.EvalSymlinks(p); err == nil {
		p = real
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// legacyJournalPath is where versions before journal format 3 kept the journal: named after the path as given.
func legacyJournalPath(imagePath, journalDir string) string {
	abs, err := filepath.Abs(imagePath)
	if err != nil {
		abs = imagePath
	}
	if journalDir == "" {
		return abs + ".provision-undo"
	}
	return filepath.Join(journalDir, fmt.Sprintf("%s-%08x.provision-undo", filepath.Base(abs), crc32.ChecksumIEEE([]byte(abs))))
}

func journalPathFor(real string, id identity, journalDir string) string {
	switch {
	case journalDir == "":
		return real + ".provision-undo"
	case id.kind == identDevice:
		return filepath.Join(journalDir, fmt.Sprintf("dev-%d-%d.provision-undo", unix.Major(id.dev), unix.Minor(id.dev)))
	}
	// The file's name, told apart from others of that name by a hash of its whole resolved path.
	return filepath.Join(journalDir, fmt.Sprintf("%s-%08x.provision-undo", filepath.Base(real), crc32.ChecksumIEEE([]byte(real))))
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
	return fsutil.SyncDir(filepath.Dir(o.journal))
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
	if err := fsutil.SyncDir(filepath.Dir(journal)); err != nil {
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
	fsutil.SyncDir(filepath.Dir(journal))
	return fmt.Errorf("undo journal %s%s %s: the image was changed or replaced after that edit was interrupted, so the journal was not replayed and is kept as %s; check the image (provision verify, e2fsck -fn, fsck.vfat -n) and delete %s once the image is known good: %w",
		journal, written, why, kept, filepath.Base(kept), ErrUndoJournal)
}
