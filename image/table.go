package image

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"strings"
	"time"

	"github.com/diskfs/go-diskfs/partition/gpt"
	"github.com/diskfs/go-diskfs/partition/mbr"
)

// The partition-table reader: pure code over an io.ReaderAt (no file, no lock, no overlay), so that FuzzReadTable can
// feed it anything. Open runs it on the image. go-diskfs parses the MBR and the GPT entries; gptHeaderOK first checks
// the GPT header go-diskfs would trust, and ReadTable checks every partition it returns against the image's size.

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

func (s sizeInfo) Name() string           { return "image" }
func (s sizeInfo) Size() int64            { return int64(s) }
func (s sizeInfo) Mode() fs.FileMode      { return 0o600 }
func (s sizeInfo) ModTime() (t time.Time) { return t }
func (s sizeInfo) IsDir() bool            { return false }
func (s sizeInfo) Sys() any               { return nil }
