package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"testing"
	"unicode/utf16"
)

// Synthetic tables, built here so the reader's tests and the fuzz seeds need no tools.

type synthPart struct {
	start, sectors uint32
	mbrType        byte
	name           string
	content        string // "ext4", "fat32" or "": a minimal superblock / boot sector at the start
}

const synthSize = 4 << 20

func synthDisk(gptTable bool, parts []synthPart) []byte {
	b := make([]byte, synthSize)
	b[510], b[511] = 0x55, 0xaa
	if !gptTable {
		for i, p := range parts {
			e := b[446+16*i:]
			e[4] = p.mbrType
			binary.LittleEndian.PutUint32(e[8:], p.start)
			binary.LittleEndian.PutUint32(e[12:], p.sectors)
		}
	} else {
		e := b[446:]
		e[4] = 0xee
		binary.LittleEndian.PutUint32(e[8:], 1)
		binary.LittleEndian.PutUint32(e[12:], synthSize/512-1)
		last := uint64(synthSize/512 - 1)
		entries := make([]byte, 128*128)
		for i, p := range parts {
			en := entries[128*i:]
			copy(en[0:16], []byte{0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4}) // Linux data
			en[16] = byte(i + 1)                                                                                                   // unique GUID
			binary.LittleEndian.PutUint64(en[32:], uint64(p.start))
			binary.LittleEndian.PutUint64(en[40:], uint64(p.start+p.sectors-1))
			for k, c := range utf16.Encode([]rune(p.name)) {
				binary.LittleEndian.PutUint16(en[56+2*k:], c)
			}
		}
		header := func(self, alt, entriesLBA uint64) []byte {
			h := make([]byte, 92)
			copy(h, "EFI PART")
			binary.LittleEndian.PutUint32(h[8:], 0x00010000)
			binary.LittleEndian.PutUint32(h[12:], 92)
			binary.LittleEndian.PutUint64(h[24:], self)
			binary.LittleEndian.PutUint64(h[32:], alt)
			binary.LittleEndian.PutUint64(h[40:], 34)
			binary.LittleEndian.PutUint64(h[48:], last-33)
			h[56] = 0x42 // disk GUID
			binary.LittleEndian.PutUint64(h[72:], entriesLBA)
			binary.LittleEndian.PutUint32(h[80:], 128)
			binary.LittleEndian.PutUint32(h[84:], 128)
			binary.LittleEndian.PutUint32(h[88:], crc32.ChecksumIEEE(entries))
			binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h))
			return h
		}
		copy(b[512:], header(1, last, 2))
		copy(b[1024:], entries)
		copy(b[(last-32)*512:], entries)
		copy(b[last*512:], header(last, 1, last-32))
	}
	for _, p := range parts {
		off := int(p.start) * 512
		switch p.content {
		case "ext4":
			sb := b[off+1024:]
			binary.LittleEndian.PutUint16(sb[56:], 0xef53)
			binary.LittleEndian.PutUint32(sb[96:], 0x2c2) // filetype, extents, 64bit, flex_bg
			copy(sb[120:], p.name)
		case "fat32":
			bs := b[off:]
			bs[0], bs[510], bs[511] = 0xeb, 0x55, 0xaa
			copy(bs[71:82], "BOOT       ")
			copy(bs[82:87], "FAT32")
		}
	}
	return b
}

var synthParts = []synthPart{
	{start: 2048, sectors: 2048, mbrType: 0x0c, name: "boot", content: "fat32"},
	{start: 4096, sectors: 2048, mbrType: 0x83, name: "rootfsa", content: "ext4"},
	{start: 6144, sectors: 1024, mbrType: 0x83, name: "data"},
}

func TestReadTable(t *testing.T) {
	overlap := append([]synthPart(nil), synthParts...)
	overlap[2].start = 5000
	beyond := append([]synthPart(nil), synthParts...)
	beyond[2].sectors = 4000
	tests := []struct {
		name  string
		disk  []byte
		table string
		want  error
	}{
		{"mbr", synthDisk(false, synthParts), "mbr", nil},
		{"gpt", synthDisk(true, synthParts), "gpt", nil},
		{"mbr overlap", synthDisk(false, overlap), "", ErrDamagedTable},
		{"gpt overlap", synthDisk(true, overlap), "", ErrDamagedTable},
		{"mbr beyond end", synthDisk(false, beyond), "", ErrDamagedTable},
		{"gpt beyond end", synthDisk(true, beyond), "", ErrDamagedTable},
		{"mbr empty", synthDisk(false, nil), "", ErrDamagedTable},
		{"zeros", make([]byte, synthSize), "", ErrNotDiskImage},
		{"tiny", []byte{0x55, 0xaa}, "", ErrNotDiskImage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			table, parts, err := ReadTable(bytes.NewReader(tt.disk), int64(len(tt.disk)))
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("got %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil || table != tt.table || len(parts) != 3 {
				t.Fatalf("got %s %+v %v", table, parts, err)
			}
			want := []Partition{
				{Number: 1, Label: "BOOT", FS: "vfat", Start: 2048 * 512, Size: 2048 * 512},
				{Number: 2, Label: "rootfsa", FS: "ext4", Start: 4096 * 512, Size: 2048 * 512},
				{Number: 3, Start: 6144 * 512, Size: 1024 * 512},
			}
			for i := range want {
				got := parts[i]
				if table == "gpt" {
					want[i].Name = synthParts[i].name
					want[i].Type = "0fc63daf-8483-4772-8e79-3d69d8477de4"
				} else {
					want[i].Type = []string{"0c", "83", "83"}[i]
				}
				if got != want[i] {
					t.Errorf("partition %d: got %+v, want %+v", i+1, got, want[i])
				}
			}
		})
	}
}

// FuzzReadTable feeds the partition-table reader (and the file system probes behind it) damaged tables.
func FuzzReadTable(f *testing.F) {
	f.Add(synthDisk(false, synthParts)[:8192])
	f.Add(synthDisk(true, synthParts)[:24576])
	f.Add(make([]byte, 2048))
	for _, gptTable := range []bool{false, true} {
		d := synthDisk(gptTable, synthParts)
		f.Add(append(d[:17408:17408], d[synthSize-17408:]...)) // tables only: the partitions lie beyond the end
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < 1024 {
			return
		}
		// Grow small inputs sparsely, so that partitions can lie inside the image and be probed.
		disk := make([]byte, 4<<20)
		copy(disk, b[:len(b)/2])
		copy(disk[len(disk)-len(b)/2:], b[len(b)/2:])
		for _, img := range [][]byte{b, disk} {
			table, parts, err := ReadTable(bytes.NewReader(img), int64(len(img)))
			if err != nil {
				if !errors.Is(err, ErrNotDiskImage) && !errors.Is(err, ErrDamagedTable) {
					t.Fatalf("error without a sentinel: %v", err)
				}
				continue
			}
			if table != "mbr" && table != "gpt" || len(parts) == 0 {
				t.Fatalf("table %q, %d partitions", table, len(parts))
			}
			for i, p := range parts {
				if p.Start < 512 || p.Size <= 0 || p.Start+p.Size > int64(len(img)) {
					t.Fatalf("partition outside the image accepted: %+v", p)
				}
				for _, q := range parts[:i] {
					if p.Start < q.Start+q.Size && q.Start < p.Start+p.Size {
						t.Fatalf("overlapping partitions accepted: %+v %+v", p, q)
					}
				}
			}
		}
	})
}
