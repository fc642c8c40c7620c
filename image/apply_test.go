package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"provision/image/golden"
	"provision/internal/testutil"
)

// patch writes b at off of the file at p.
func patch(tb testing.TB, p string, off int64, b []byte) {
	tb.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		tb.Fatal(err)
	}
}

// patchSuper changes an ext superblock through fn and fixes its metadata_csum checksum, so that only the change
// itself is what is wrong with the file system.
func patchSuper(tb testing.TB, img string, p Partition, fn func(sb []byte)) {
	tb.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	sb := make([]byte, 1024)
	if _, err := f.ReadAt(sb, p.Start+1024); err != nil {
		tb.Fatal(err)
	}
	fn(sb)
	if binary.LittleEndian.Uint32(sb[100:104])&0x400 != 0 { // metadata_csum
		binary.LittleEndian.PutUint32(sb[1020:], ^crc32.Checksum(sb[:1020], crcTable))
	}
	if _, err := f.WriteAt(sb, p.Start+1024); err != nil {
		tb.Fatal(err)
	}
}

func copyImage(tb testing.TB, src string, fn func(img string, parts []Partition)) string {
	tb.Helper()
	dst := filepath.Join(tb.TempDir(), filepath.Base(src))
	copyRange(tb, src, dst, 0, -1)
	if fn != nil {
		fn(dst, partitions(tb, src))
	}
	return dst
}

func TestRefusalsLeaveImageUntouched(t *testing.T) {
	ctx := context.Background()
	small := golden.Options{BootMiB: 33, RootfsMiB: 24, DataMiB: 16} // hashed twice per case: keep it small
	img := buildGolden(t, small)
	gptSmall := small
	gptSmall.Table = "gpt"
	gptImg := buildGolden(t, gptSmall)
	fullSmall := small
	fullSmall.FillData = true
	full := buildGolden(t, fullSmall)
	dir := t.TempDir()
	random := filepath.Join(dir, "random.img")
	rb := make([]byte, 4<<20)
	rand.Read(rb)
	os.WriteFile(random, rb, 0o600)
	empty := filepath.Join(dir, "empty.img")
	os.WriteFile(empty, nil, 0o600)
	parts := partitions(t, img)
	cut := parts[2].Start + parts[2].Size/2 // through partition 3
	trunc := filepath.Join(dir, "truncated.img")
	copyRange(t, img, trunc, 0, cut)
	gptTrunc := filepath.Join(dir, "gpt-truncated.img")
	copyRange(t, gptImg, gptTrunc, 0, cut)
	bareExt := filepath.Join(dir, "bare-ext4.img")
	copyRange(t, img, bareExt, parts[1].Start, parts[1].Size)
	bareFAT := filepath.Join(dir, "bare-fat.img")
	copyRange(t, img, bareFAT, parts[0].Start, parts[0].Size)
	gptBadHeader := copyImage(t, gptImg, func(p string, _ []Partition) { patch(t, p, 512+40, []byte{0xff}) })
	gptBadEntries := copyImage(t, gptImg, func(p string, _ []Partition) { patch(t, p, 1024+60, []byte{0xff}) })
	mbrBadEntry := copyImage(t, img, func(p string, _ []Partition) { patch(t, p, 446+16, []byte{0x33}) })
	noFS := copyImage(t, img, func(p string, ps []Partition) { patch(t, p, ps[2].Start+1024, make([]byte, 4096)) })
	shrunk := copyImage(t, img, func(p string, ps []Partition) { // partition 4 entry: half its sectors
		var n [4]byte
		binary.LittleEndian.PutUint32(n[:], uint32(ps[3].Size/512/2))
		patch(t, p, 446+3*16+12, n[:])
	})
	unclean := copyImage(t, img, func(p string, ps []Partition) {
		patchSuper(t, p, ps[1], func(sb []byte) { binary.LittleEndian.PutUint16(sb[58:], 0) }) // s_state: not clean
	})
	errorsFS := copyImage(t, img, func(p string, ps []Partition) {
		patchSuper(t, p, ps[3], func(sb []byte) { binary.LittleEndian.PutUint16(sb[58:], 3) }) // valid | error
	})
	recovery := copyImage(t, img, func(p string, ps []Partition) {
		patchSuper(t, p, ps[3], func(sb []byte) { sb[96] |= 0x4 }) // needs_recovery
	})
	badCsum := copyImage(t, img, func(p string, ps []Partition) { patch(t, p, ps[3].Start+1024+1020, []byte{1, 2, 3, 4}) })
	fatDirty := copyImage(t, img, func(p string, ps []Partition) {
		l, err := readFATLayout(mustOpenFile(t, p), ps[0])
		if err != nil {
			t.Fatal(err)
		}
		for c := range l.numFATs {
			patch(t, p, l.fatStart(c)+7, []byte{0x07}) // FAT[1]: clean-shutdown bit cleared
		}
	})
	fatMismatch := copyImage(t, img, func(p string, ps []Partition) {
		l, err := readFATLayout(mustOpenFile(t, p), ps[0])
		if err != nil {
			t.Fatal(err)
		}
		patch(t, p, l.fatStart(1)+4000, []byte{0x42})
	})
	otherOpts := gptSmall
	otherOpts.RootfsMiB = 30 // the default minimum is 24
	other := buildGolden(t, otherOpts)

	write := func(p Partition, size int) []Write {
		return []Write{{Partition: p, Path: "/mender/key.pem", Data: bytes.Repeat([]byte{1}, size), Mode: 0o600}}
	}
	applyTo := func(sels ...string) func(im *Image) error {
		return func(im *Image) error {
			var ws []Write
			for _, s := range sels {
				p, err := im.Select(s)
				if err != nil {
					return err
				}
				ws = append(ws, write(p, 64<<10)...)
			}
			return im.Apply(ctx, ws)
		}
	}
	tests := []struct {
		name string
		img  string
		do   func(im *Image) error // nil: Open must fail
		want error
		msg  string // in the error
	}{
		{"empty file", empty, nil, ErrNotDiskImage, ""},
		{"random bytes", random, nil, ErrNotDiskImage, ""},
		{"bare ext4 file system", bareExt, nil, ErrNotDiskImage, "bare ext4"},
		{"bare FAT file system", bareFAT, nil, ErrNotDiskImage, "bare vfat"},
		{"truncated mbr", trunc, nil, ErrDamagedTable, "beyond the end"},
		{"truncated gpt", gptTrunc, nil, ErrDamagedTable, ""},
		{"gpt header crc", gptBadHeader, nil, ErrDamagedTable, "backup header is intact"},
		{"gpt entries crc", gptBadEntries, nil, ErrDamagedTable, "entries are damaged"},
		{"mbr bad entry", mbrBadEntry, nil, ErrDamagedTable, ""},
		{"missing partition", img, func(im *Image) error { _, err := im.Select("7"); return err }, ErrNoPartition, ""},
		{"missing label", img, func(im *Image) error { _, err := im.Select("label=nope"); return err }, ErrNoPartition, ""},
		{"partition of another image", img, func(im *Image) error {
			o := open(t, other, ReadOnly())
			p := sel(t, o, "3")
			o.Close()
			return im.Apply(ctx, write(p, 10))
		}, ErrNoPartition, "not in this image"},
		{"no file system", noFS, applyTo("2", "3"), ErrUnsupportedFS, ""},
		{"full data partition", full, applyTo("2", "1", "4"), ErrNoSpace, ""}, // the writes that fit must not land either
		{"unclean ext4", unclean, applyTo("4", "2"), ErrFSErrors, "not cleanly unmounted"},
		{"ext4 with recorded errors", errorsFS, applyTo("2", "4"), ErrFSErrors, "recorded errors"},
		{"ext4 journal needs recovery", recovery, applyTo("2", "4"), ErrFSErrors, "needs recovery"},
		{"ext4 superblock checksum", badCsum, applyTo("2", "4"), ErrFSErrors, ""},
		{"ext4 larger than its partition", shrunk, applyTo("2", "4"), ErrFSErrors, "larger than its partition"},
		{"fat not cleanly unmounted", fatDirty, applyTo("2", "1"), ErrFSErrors, "cleanly unmounted"},
		{"fat copies differ", fatMismatch, applyTo("2", "1"), ErrFSErrors, "differ"},
		{"same file twice", img, func(im *Image) error {
			p := sel(t, im, "4")
			return im.Apply(ctx, append(write(p, 10), write(p, 20)...))
		}, nil, "twice"},
		{"relative path", img, func(im *Image) error {
			return im.Apply(ctx, []Write{{Partition: sel(t, im, "4"), Path: "mender/x", Data: []byte("x")}})
		}, nil, "not absolute"},
		{"cancelled", img, func(im *Image) error {
			c, cancel := context.WithCancel(ctx)
			cancel()
			return im.Apply(c, write(sel(t, im, "4"), 10))
		}, context.Canceled, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := testutil.FileSum(t, tt.img)
			im, err := Open(ctx, tt.img)
			if tt.do == nil && err == nil {
				im.Close()
				t.Fatal("Open succeeded")
			}
			if err == nil {
				err = tt.do(im)
				if cerr := im.Close(); cerr != nil {
					t.Fatal(cerr)
				}
			}
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("got %v, want %v containing %q", err, tt.want, tt.msg)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			if testutil.FileSum(t, tt.img) != before {
				t.Fatal("image changed")
			}
			if _, err := os.Stat(JournalPath(tt.img, "")); err == nil {
				t.Fatal("undo journal left behind")
			}
		})
	}
}

func mustOpenFile(tb testing.TB, p string) *os.File {
	tb.Helper()
	f, err := os.Open(p)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	return f
}

// Reading through a read-write Image, and closing it, writes nothing.
func TestReadingChangesNothing(t *testing.T) {
	img := buildGolden(t, golden.Options{Table: "gpt"})
	before := testutil.FileSum(t, img)
	im := open(t, img)
	for _, p := range im.Partitions() {
		fsys, err := im.FS(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fsys.Stat("/nope"); err == nil {
			t.Fatal("stat of a missing file succeeded")
		}
		if _, _, err := fsys.Free(); err != nil {
			t.Fatal(err)
		}
		if err := fsys.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Apply(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if testutil.FileSum(t, img) != before {
		t.Fatal("image changed")
	}
}

func TestExclusiveLock(t *testing.T) {
	img := buildGolden(t, golden.Options{})
	ctx := context.Background()
	r1 := open(t, img, ReadOnly())
	r2 := open(t, img, ReadOnly()) // readers share
	if _, err := Open(ctx, img); !errors.Is(err, ErrLocked) {
		t.Fatalf("writer during a read: %v, want ErrLocked", err)
	}
	r1.Close()
	r2.Close()
	w := open(t, img)
	defer w.Close()
	if _, err := Open(ctx, img); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want ErrLocked", err)
	}
	if _, err := Open(ctx, img, ReadOnly()); !errors.Is(err, ErrLocked) {
		t.Fatalf("reader during a write: %v, want ErrLocked", err)
	}
}

func TestSelect(t *testing.T) {
	img := buildGolden(t, golden.Options{Table: "gpt"})
	mbrImg := buildGolden(t, golden.Options{Table: "mbr", BootFAT: 16})
	gim, mim := open(t, img, ReadOnly()), open(t, mbrImg, ReadOnly())
	defer gim.Close()
	defer mim.Close()
	tests := []struct {
		im   *Image
		sel  string
		want int // 0: ErrNoPartition
	}{
		{gim, "2", 2},
		{gim, " 4 ", 4},
		{gim, "name=rootfsb", 3},
		{gim, "label=data", 4},
		{gim, "label=boot", 1}, // FAT labels regardless of case
		{gim, "label=DATA", 0}, // ext labels exactly
		{gim, "type=c12a7328-f81f-11d2-ba4b-00a0c93ec93b", 1},
		{gim, "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B", 1},
		{gim, "type=0fc63daf-8483-4772-8e79-3d69d8477de4", 0}, // three partitions: ambiguous
		{gim, "5", 0},
		{gim, "name=", 0},
		{gim, "size=3", 0},
		{mim, "type=0e", 1},
		{mim, "type=e", 1},
		{mim, "type=0x0E", 1},
		{mim, "name=rootfsa", 0}, // MBR has no names
		{mim, "label=rootfsa", 2},
	}
	for _, tt := range tests {
		t.Run(tt.im.TableType()+" "+tt.sel, func(t *testing.T) {
			p, err := tt.im.Select(tt.sel)
			if tt.want == 0 {
				if !errors.Is(err, ErrNoPartition) {
					t.Fatalf("got %+v %v, want ErrNoPartition", p, err)
				}
				return
			}
			if err != nil || p.Number != tt.want {
				t.Fatalf("got %+v %v, want partition %d", p, err, tt.want)
			}
		})
	}
}

// FS.Close commits what the handle changed; a change that fails part way (here: the partition fills up) makes Close
// drop all the handle's changes, leaving the image as it was.
func TestFSCloseCommitsOrDrops(t *testing.T) {
	ctx := context.Background()
	for _, part := range []string{"1", "4"} {
		t.Run("partition "+part, func(t *testing.T) {
			img := buildGolden(t, golden.Options{BootMiB: 33, RootfsMiB: 24, DataMiB: 16})
			im := open(t, img)
			fsys, err := im.FS(ctx, sel(t, im, part))
			if err != nil {
				t.Fatal(err)
			}
			if err := fsys.WriteFile("/kept.txt", []byte("kept"), 0o644, 0, 0); err != nil {
				t.Fatal(err)
			}
			if err := fsys.Close(); err != nil {
				t.Fatal(err)
			}
			im.Discard() // nothing pending: Close committed
			if got, err := readFile(t, img, part, "/kept.txt"); err != nil || string(got) != "kept" {
				t.Fatalf("after FS.Close: %q %v", got, err)
			}
			fsck(t, img)

			before := testutil.FileSum(t, img)
			im = open(t, img)
			defer im.Close()
			fsys, err = im.FS(ctx, sel(t, im, part))
			if err != nil {
				t.Fatal(err)
			}
			if err := fsys.WriteFile("/dropped.txt", []byte("dropped"), 0o644, 0, 0); err != nil {
				t.Fatal(err)
			}
			free, _, _ := fsys.Free()
			if err := fsys.WriteFile("/too-big.bin", make([]byte, free+(1<<20)), 0o644, 0, 0); !errors.Is(err, ErrNoSpace) {
				t.Fatalf("overfilling: %v, want ErrNoSpace", err)
			}
			if err := fsys.Close(); err == nil || !strings.Contains(err.Error(), "dropped") {
				t.Fatalf("Close after a failed write: %v", err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if testutil.FileSum(t, img) != before {
				t.Fatal("image changed")
			}
		})
	}
}
