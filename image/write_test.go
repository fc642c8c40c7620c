package image

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os/exec"
	"strings"
	"testing"

	"provision/image/golden"
	"provision/internal/testutil"
)

// extFeatures returns the block size and feature list dumpe2fs reports for an ext partition.
func extFeatures(tb testing.TB, img string, p Partition) (blockSize string, features []string) {
	tb.Helper()
	out, err := exec.Command("dumpe2fs", "-h", fmt.Sprintf("%s?offset=%d", img, p.Start)).Output()
	if err != nil {
		tb.Fatalf("dumpe2fs: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		k, v, _ := strings.Cut(line, ":")
		switch strings.TrimSpace(k) {
		case "Block size":
			blockSize = strings.TrimSpace(v)
		case "Filesystem features":
			features = strings.Fields(v)
		}
	}
	return blockSize, features
}

func TestWriteAndReadBack(t *testing.T) {
	tests := []struct {
		name      string
		o         golden.Options
		blockSize string   // ext block size the image must have
		features  []string // ext features the image must have
		bootFS    string   // "FAT32" ... as the boot sector says
	}{
		{"mbr ext4 4k fat32", golden.Options{Table: "mbr", BlockSize: 4096}, "4096", []string{"metadata_csum", "64bit", "flex_bg", "extent"}, "FAT32"},
		{"gpt ext4 1k fat32", golden.Options{Table: "gpt", BlockSize: 1024}, "1024", []string{"metadata_csum", "64bit", "flex_bg", "extent"}, "FAT32"},
		{"gpt ext4 htree", golden.Options{Table: "gpt", ManyFiles: 3000}, "", []string{"dir_index", "metadata_csum"}, "FAT32"},
		{"mbr ext3 fat16", golden.Options{Table: "mbr", ExtType: "ext3", BootFAT: 16}, "", []string{"has_journal"}, "FAT16"},
		{"gpt ext2 fat12", golden.Options{Table: "gpt", ExtType: "ext2", BootFAT: 12, BootMiB: 8}, "", nil, "FAT12"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := buildGolden(t, tt.o)
			ctx := context.Background()
			im := open(t, img)
			if im.TableType() != tt.o.Table {
				t.Fatalf("table %q, want %q", im.TableType(), tt.o.Table)
			}
			boot, rootA, rootB, data := sel(t, im, "1"), sel(t, im, "label=rootfsa"), sel(t, im, "3"), sel(t, im, "label=data")
			if boot.FS != "vfat" || boot.Label != "BOOT" || rootA.FS != tt.o.ExtType && !(tt.o.ExtType == "" && rootA.FS == "ext4") {
				t.Fatalf("partitions: %+v", im.Partitions())
			}
			bs, feats := extFeatures(t, img, rootA)
			if tt.blockSize != "" && bs != tt.blockSize {
				t.Fatalf("block size %s, want %s", bs, tt.blockSize)
			}
			for _, f := range tt.features {
				if !strings.Contains(" "+strings.Join(feats, " ")+" ", " "+f+" ") {
					t.Fatalf("feature %s missing: %v", f, feats)
				}
			}
			var bpb [512]byte
			im.ov.ReadAt(bpb[:], boot.Start)
			if !bytes.Contains(bpb[:90], []byte(tt.bootFS)) {
				t.Fatalf("boot partition is not %s", tt.bootFS)
			}
			key := bytes.Repeat([]byte("KEY"), 700) // more than one 1 KiB block
			big := bytes.Repeat([]byte("0123456789abcdef"), 4096)
			writes := []Write{
				{Partition: data, Path: "/mender/mender-cert-private.pem", Data: key, Mode: 0o600},
				{Partition: data, Path: "/mender/mender-cert.pem", Data: []byte("CERT\n"), Mode: 0o644},
				{Partition: data, Path: "/big.bin", Data: big, Mode: 0o640, UID: 0, GID: 4},
				{Partition: rootA, Path: "/etc/new/dir/tree/x.conf", Data: []byte("{}\n"), Mode: 0o644, UID: 1000, GID: 100},
				{Partition: rootA, Path: "/etc/high-ids", Data: []byte("x"), Mode: 0o400, UID: 100000, GID: 70000},
				{Partition: rootB, Path: "/etc/mender/mender.conf", Data: []byte(`{"a":1}`), Mode: 0o600},
				{Partition: rootB, Path: "/etc/empty", Data: nil, Mode: 0o644},
				{Partition: boot, Path: "/provision/serial.txt", Data: []byte("SN-1\n"), Mode: 0o644},
				{Partition: boot, Path: "/A Long Name For FAT.conf", Data: key, Mode: 0o644},
				{Partition: boot, Path: "/empty.txt", Data: nil, Mode: 0o644},
			}
			if tt.o.ManyFiles > 0 {
				for i := range 50 {
					writes = append(writes, Write{Partition: rootA, Path: fmt.Sprintf("/etc/many/zz-added-%03d.conf", i), Data: []byte("y\n"), Mode: 0o644})
				}
			}
			if err := im.Apply(ctx, writes); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			fsck(t, img)
			checkWrites(t, img, writes)
			// Re-injecting replaces cleanly: a smaller and a larger file.
			again := []Write{
				{Partition: data, Path: "/mender/mender-cert-private.pem", Data: []byte("NEW"), Mode: 0o600},
				{Partition: data, Path: "/mender/mender-cert.pem", Data: big, Mode: 0o644},
				{Partition: boot, Path: "/provision/serial.txt", Data: []byte("SN-2\n"), Mode: 0o644},
				{Partition: boot, Path: "/a long name for fat.conf", Data: []byte("short"), Mode: 0o644},
				{Partition: boot, Path: "/empty.txt", Data: key, Mode: 0o644},
			}
			im = open(t, img)
			if err := im.Apply(ctx, again); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			fsck(t, img)
			checkWrites(t, img, again)
			if got, err := readFile(t, img, "2", "/etc/hostname"); err != nil || string(got) != "golden\n" {
				t.Errorf("untouched file: %q %v", got, err)
			}
			for _, s := range []string{"1", "4"} {
				if _, err := readFile(t, img, s, "/nope/missing"); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("partition %s missing file: %v, want fs.ErrNotExist", s, err)
				}
			}
		})
	}
}

// checkWrites compares every write with what the real tools (debugfs, mtype) and our own reader see.
func checkWrites(t *testing.T, img string, writes []Write) {
	t.Helper()
	for _, w := range writes {
		if w.Partition.FS == "vfat" {
			if got, err := mtype(t, img, w.Partition, w.Path); err != nil || !bytes.Equal(got, w.Data) {
				t.Errorf("mtype %s: %d bytes, %v", w.Path, len(got), err)
			}
		} else {
			meta, content := debugfsStat(t, img, w.Partition, w.Path)
			want := fmt.Sprintf("%04o %d %d", w.Mode, w.UID, w.GID)
			if meta != want || !bytes.Equal(content, w.Data) {
				t.Errorf("debugfs %s: %s (want %s), %d bytes (want %d)", w.Path, meta, want, len(content), len(w.Data))
			}
		}
		got, err := readFile(t, img, fmt.Sprint(w.Partition.Number), w.Path)
		if err != nil || !bytes.Equal(got, w.Data) {
			t.Errorf("ReadFile %s: %d bytes, %v", w.Path, len(got), err)
		}
	}
}

// Direct FS use: create, replace, remove, and the errors callers branch on; e2fsck after every step.
func TestExt4Operations(t *testing.T) {
	for _, o := range []golden.Options{{BlockSize: 1024}, {ExtType: "ext2", BlockSize: 1024}} {
		t.Run(o.ExtType+"1k", func(t *testing.T) { testFSOperations(t, o, "2") })
	}
}

func TestFATOperations(t *testing.T) {
	for _, o := range []golden.Options{{BootFAT: 32}, {BootFAT: 16}, {BootFAT: 12, BootMiB: 8}} {
		t.Run(fmt.Sprintf("fat%d", o.BootFAT), func(t *testing.T) { testFSOperations(t, o, "1") })
	}
}

func testFSOperations(t *testing.T, o golden.Options, part string) {
	img := buildGolden(t, o)
	big := bytes.Repeat([]byte("big file content "), 3000) // ~50 KiB: indirect blocks on ext2, many clusters on FAT
	check := func(file string, want []byte) {
		t.Helper()
		got, err := readFile(t, img, part, file)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: %d bytes (want %d), %v", file, len(got), len(want), err)
		}
	}
	var freeBefore int64
	steps := []struct {
		name string
		do   func(FS) error
		then func()
	}{
		{"free before", func(f FS) error { var err error; freeBefore, _, err = f.Free(); return err }, nil},
		{"create nested", func(f FS) error { return f.WriteFile("/a/b/c/file.bin", big, 0o640, 0, 0) },
			func() { check("/a/b/c/file.bin", big) }},
		{"replace smaller", func(f FS) error { return f.WriteFile("/a/b/c/file.bin", []byte("small"), 0o600, 0, 0) },
			func() { check("/a/b/c/file.bin", []byte("small")) }},
		{"empty file", func(f FS) error { return f.WriteFile("/a/empty", nil, 0o644, 0, 0) },
			func() { check("/a/empty", nil) }},
		{"replace larger", func(f FS) error { return f.WriteFile("/a/b/c/file.bin", big, 0o600, 0, 0) },
			func() { check("/a/b/c/file.bin", big) }},
		{"empty fills", func(f FS) error { return f.WriteFile("/a/empty", big[:5000], 0o644, 0, 0) },
			func() { check("/a/empty", big[:5000]) }},
		{"fills empties", func(f FS) error { return f.WriteFile("/a/empty", nil, 0o644, 0, 0) },
			func() { check("/a/empty", nil) }},
		{"remove", func(f FS) error {
			if err := f.Remove("/a/b/c/file.bin"); err != nil {
				return err
			}
			return f.Remove("/a/empty")
		}, func() {
			if _, err := readFile(t, img, part, "/a/b/c/file.bin"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("removed file: %v", err)
			}
		}},
		{"free after", func(f FS) error {
			free, _, err := f.Free()
			if err == nil && free != freeBefore {
				// The directories stay; everything else is given back.
				if diff := freeBefore - free; diff < 0 || diff > 8*4096 {
					return fmt.Errorf("free space before %d, after %d", freeBefore, free)
				}
			}
			return err
		}, nil},
		{"several in one session", func(f FS) error {
			for i := range 20 {
				if err := f.WriteFile(fmt.Sprintf("/multi/f%02d.txt", i), big[:i*500], 0o644, 0, 0); err != nil {
					return err
				}
			}
			return f.Remove("/multi/f03.txt")
		}, func() { check("/multi/f19.txt", big[:19*500]) }},
	}
	for _, s := range steps {
		if err := edit(t, img, part, s.do); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if s.then != nil {
			s.then()
		}
	}
	// Errors callers branch on; none of them changes the image.
	before := testutil.FileSum(t, img)
	im := open(t, img)
	defer im.Discard()
	fsys, err := im.FS(context.Background(), sel(t, im, part))
	if err != nil {
		t.Fatal(err)
	}
	if err := fsys.Remove("/not/there"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("remove missing: %v", err)
	}
	if _, err := fsys.Stat("/not/there"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("stat missing: %v", err)
	}
	if err := fsys.WriteFile("/a/b", []byte("x"), 0o644, 0, 0); err == nil {
		t.Error("writing over a directory succeeded")
	}
	if err := fsys.WriteFile("/multi/f01.txt/x", []byte("x"), 0o644, 0, 0); err == nil {
		t.Error("writing below a file succeeded")
	}
	if err := fsys.WriteFile("relative", []byte("x"), 0o644, 0, 0); err == nil {
		t.Error("relative path accepted")
	}
	if info, err := fsys.Stat("/a/b"); err != nil || !info.Mode.IsDir() {
		t.Errorf("stat dir: %+v %v", info, err)
	}
	if _, err := fsys.ReadFile("/a/b"); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("reading a directory: %v", err)
	}
	if part == "2" {
		// Mender's rootfs links /var/lib/mender to /data/mender, another partition on the device.
		if info, err := fsys.Stat("/var/lib/mender"); err != nil || info.Mode&fs.ModeSymlink == 0 {
			t.Errorf("stat symlink: %+v %v", info, err)
		}
		if _, err := fsys.ReadFile("/var/lib/mender"); err == nil || errors.Is(err, fs.ErrNotExist) {
			t.Errorf("reading a symlink: %v", err)
		}
		if err := fsys.WriteFile("/var/lib/mender/x", []byte("x"), 0o644, 0, 0); err == nil || !strings.Contains(err.Error(), "symbolic link") {
			t.Errorf("writing through a symlink: %v", err)
		}
	}
	fsys.Close()
	im.Discard()
	if testutil.FileSum(t, img) != before {
		t.Fatal("failed operations changed the image")
	}
}
