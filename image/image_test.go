package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"provision/image/golden"

	"provision/simulator"
)

func buildGolden(tb testing.TB, o golden.Options) string {
	tb.Helper()
	simulator.RequireTool(tb, append(golden.Tools, "e2fsck", "fsck.vfat", "debugfs", "mtype")...)
	p := filepath.Join(tb.TempDir(), "golden.img")
	if err := golden.Build(context.Background(), p, o); err != nil {
		tb.Fatal(err)
	}
	return p
}

func sha(tb testing.TB, p string) [32]byte {
	tb.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		tb.Fatal(err)
	}
	return sha256.Sum256(b)
}

// fsck checks every file system of the image with the real tools.
func fsck(tb testing.TB, img string) {
	tb.Helper()
	im, err := Open(context.Background(), img, ReadOnly())
	if err != nil {
		tb.Fatal(err)
	}
	parts := im.Partitions()
	im.Close()
	for _, p := range parts {
		var cmd *exec.Cmd
		switch p.FS {
		case "ext2", "ext3", "ext4":
			cmd = exec.Command("e2fsck", "-fn", fmt.Sprintf("%s?offset=%d", img, p.Start))
		case "vfat":
			part := filepath.Join(tb.TempDir(), "fat.img")
			copyRange(tb, img, part, p.Start, p.Size)
			cmd = exec.Command("fsck.vfat", "-n", part)
		default:
			continue
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			tb.Fatalf("partition %d (%s) not clean: %v\n%s", p.Number, p.FS, err, out)
		}
	}
}

func copyRange(tb testing.TB, src, dst string, off, n int64) {
	tb.Helper()
	f, err := os.Open(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if n < 0 {
		st, _ := f.Stat()
		n = st.Size() - off
	}
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, off); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(dst, buf, 0o600); err != nil {
		tb.Fatal(err)
	}
}

// debugfsStat returns "mode uid gid" and the content of a file as debugfs sees them.
func debugfsStat(tb testing.TB, img string, p Partition, file string) (string, []byte) {
	tb.Helper()
	dev := fmt.Sprintf("%s?offset=%d", img, p.Start)
	out, err := exec.Command("debugfs", "-R", "stat "+file, dev).Output()
	if err != nil {
		tb.Fatalf("debugfs stat: %v", err)
	}
	var mode, uid, gid string
	for _, f := range strings.Fields(string(out)) {
		_ = f
	}
	s := string(out)
	if i := strings.Index(s, "Mode:"); i >= 0 {
		mode = strings.Fields(s[i+5:])[0]
	}
	if i := strings.Index(s, "User:"); i >= 0 {
		uid = strings.Fields(s[i+5:])[0]
	}
	if i := strings.Index(s, "Group:"); i >= 0 {
		gid = strings.Fields(s[i+6:])[0]
	}
	data, err := exec.Command("debugfs", "-R", "cat "+file, dev).Output()
	if err != nil {
		tb.Fatalf("debugfs cat: %v", err)
	}
	return mode + " " + uid + " " + gid, data
}

func open(tb testing.TB, img string, opts ...OpenOption) *Image {
	tb.Helper()
	im, err := Open(context.Background(), img, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	return im
}

func sel(tb testing.TB, im *Image, s string) Partition {
	tb.Helper()
	p, err := im.Select(s)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func TestWriteAndReadBack(t *testing.T) {
	tests := []struct {
		name string
		o    golden.Options
	}{
		{"mbr 4k", golden.Options{Table: "mbr", BlockSize: 4096}},
		{"gpt 1k", golden.Options{Table: "gpt", BlockSize: 1024}},
		{"gpt htree", golden.Options{Table: "gpt", ManyFiles: 3000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := buildGolden(t, tt.o)
			ctx := context.Background()
			key := bytes.Repeat([]byte("KEY"), 700) // > one 1 KiB block
			im := open(t, img)
			boot, rootA, rootB, data := sel(t, im, "1"), sel(t, im, "label=rootfsa"), sel(t, im, "3"), sel(t, im, "label=data")
			if tt.o.Table == "gpt" {
				if p := sel(t, im, "name=rootfsb"); p.Number != 3 {
					t.Fatalf("name=rootfsb is partition %d", p.Number)
				}
			}
			writes := []Write{
				{Partition: data, Path: "/mender/mender-cert-private.pem", Data: key, Mode: 0o600},
				{Partition: data, Path: "/mender/mender-cert.pem", Data: []byte("CERT\n"), Mode: 0o644},
				{Partition: rootA, Path: "/etc/new/dir/tree/x.conf", Data: []byte("{}\n"), Mode: 0o644, UID: 1000, GID: 100},
				{Partition: rootB, Path: "/etc/mender/mender.conf", Data: []byte(`{"a":1}`), Mode: 0o600},
				{Partition: boot, Path: "/provision/serial.txt", Data: []byte("SN-1\n"), Mode: 0o644},
			}
			if tt.o.ManyFiles > 0 {
				writes = append(writes, Write{Partition: rootA, Path: "/etc/many/zz-added.conf", Data: []byte("y\n"), Mode: 0o644})
			}
			if err := im.Apply(ctx, writes); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			fsck(t, img)
			for _, w := range writes {
				if w.Partition.FS == "vfat" {
					out, err := exec.Command("mtype", "-i", fmt.Sprintf("%s@@%d", img, w.Partition.Start), "::"+w.Path).Output()
					if err != nil || !bytes.Equal(out, w.Data) {
						t.Errorf("mtype %s: %q %v", w.Path, out, err)
					}
					continue
				}
				meta, content := debugfsStat(t, img, w.Partition, w.Path)
				want := fmt.Sprintf("%04o %d %d", w.Mode, w.UID, w.GID)
				if meta != want || !bytes.Equal(content, w.Data) {
					t.Errorf("debugfs %s: %s (want %s), %d bytes", w.Path, meta, want, len(content))
				}
			}
			// Re-injecting replaces cleanly, and our own reader agrees.
			im = open(t, img)
			if err := im.Apply(ctx, []Write{{Partition: data, Path: "/mender/mender-cert-private.pem", Data: []byte("NEW"), Mode: 0o600},
				{Partition: boot, Path: "/provision/serial.txt", Data: []byte("SN-2\n"), Mode: 0o644}}); err != nil {
				t.Fatal(err)
			}
			im.Close()
			fsck(t, img)
			im = open(t, img, ReadOnly())
			defer im.Close()
			for _, c := range []struct {
				p    Partition
				path string
				want string
			}{{data, "/mender/mender-cert-private.pem", "NEW"}, {boot, "/provision/serial.txt", "SN-2\n"}, {rootA, "/etc/hostname", "golden\n"}} {
				fsys, err := im.FS(ctx, c.p)
				if err != nil {
					t.Fatal(err)
				}
				got, err := fsys.ReadFile(c.path)
				closeFS(fsys)
				if err != nil || string(got) != c.want {
					t.Errorf("read %s: %q %v", c.path, got, err)
				}
			}
			fsys, _ := im.FS(ctx, data)
			if _, err := fsys.ReadFile("/nope"); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("missing file: %v", err)
			}
			closeFS(fsys)
		})
	}
}

func TestRefusalsLeaveImageUntouched(t *testing.T) {
	ctx := context.Background()
	img := buildGolden(t, golden.Options{})
	full := buildGolden(t, golden.Options{DataMiB: 16, FillData: true})
	dir := t.TempDir()
	trunc := filepath.Join(dir, "truncated.img")
	copyRange(t, img, trunc, 0, 150<<20) // cut through partition 3
	random := filepath.Join(dir, "random.img")
	rb := make([]byte, 4<<20)
	rand.Read(rb)
	os.WriteFile(random, rb, 0o600)
	empty := filepath.Join(dir, "empty.img")
	os.WriteFile(empty, nil, 0o600)
	dirty := filepath.Join(dir, "dirty.img")
	copyRange(t, img, dirty, 0, -1)
	{ // mark rootfs A's superblock as not clean (s_state at offset 58)
		f, _ := os.OpenFile(dirty, os.O_RDWR, 0)
		im, _ := Open(ctx, img, ReadOnly())
		p, _ := im.Select("2")
		im.Close()
		f.WriteAt([]byte{0, 0}, p.Start+1024+58)
		f.Close()
	}
	write := func(p Partition) []Write {
		return []Write{{Partition: p, Path: "/mender/key.pem", Data: bytes.Repeat([]byte{1}, 64<<10), Mode: 0o600}}
	}
	tests := []struct {
		name string
		img  string
		do   func(im *Image) error
		want error
	}{
		{"truncated", trunc, nil, ErrDamagedTable},
		{"random bytes", random, nil, ErrNotDiskImage},
		{"empty file", empty, nil, ErrNotDiskImage},
		{"missing partition", img, func(im *Image) error { _, err := im.Select("7"); return err }, ErrNoPartition},
		{"missing label", img, func(im *Image) error { _, err := im.Select("label=nope"); return err }, ErrNoPartition},
		{"full data partition", full, func(im *Image) error {
			boot, _ := im.Select("2")
			data, _ := im.Select("4")
			// A write that fits goes first: it must not land either.
			return im.Apply(ctx, append(write(boot), write(data)...))
		}, ErrNoSpace},
		{"unclean file system", dirty, func(im *Image) error { return im.Apply(ctx, write(sel(t, im, "2"))) }, ErrFSErrors},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := sha(t, tt.img)
			im, err := Open(ctx, tt.img)
			if err == nil {
				err = tt.do(im)
				im.Close()
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			if sha(t, tt.img) != before {
				t.Fatal("image changed")
			}
		})
	}
}

func TestExclusiveLock(t *testing.T) {
	img := buildGolden(t, golden.Options{})
	im := open(t, img)
	defer im.Close()
	if _, err := Open(context.Background(), img); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want ErrLocked", err)
	}
	if _, err := Open(context.Background(), img, ReadOnly()); !errors.Is(err, ErrLocked) {
		t.Fatalf("reader during a write: %v, want ErrLocked", err)
	}
}

// The writer is killed at every stage of a commit: afterwards the image opens (rolling back), every file system is
// clean, and the file is entirely old or entirely new.
func TestCrashSafety(t *testing.T) {
	if os.Getenv("PROVISION_CRASH_CHILD") != "" {
		crashChild()
		return
	}
	img := buildGolden(t, golden.Options{Table: "gpt"})
	ctx := context.Background()
	old := []byte("OLD CONTENT\n")
	im := open(t, img)
	if err := im.Apply(ctx, []Write{{Partition: sel(t, im, "4"), Path: "/mender/key.pem", Data: old, Mode: 0o600},
		{Partition: sel(t, im, "1"), Path: "/key.txt", Data: old, Mode: 0o644}}); err != nil {
		t.Fatal(err)
	}
	im.Close()
	pristine := filepath.Join(t.TempDir(), "pristine.img")
	copyRange(t, img, pristine, 0, -1)
	rolledBack, completed := 0, 0
	for stage := 1; ; stage++ {
		copyRange(t, pristine, img, 0, -1)
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashSafety$")
		cmd.Env = append(os.Environ(), "PROVISION_CRASH_CHILD="+img, "PROVISION_CRASH_AT="+strconv.Itoa(stage))
		out, err := cmd.CombinedOutput()
		killed := false
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
				killed = true
			}
		}
		if err != nil && !killed {
			t.Fatalf("child at stage %d: %v\n%s", stage, err, out)
		}
		// Next open rolls back (or finds nothing to do).
		im := open(t, img)
		im.Close()
		fsck(t, img)
		im = open(t, img, ReadOnly())
		for _, c := range []struct{ sel, path string }{{"4", "/mender/key.pem"}, {"1", "/key.txt"}} {
			fsys, err := im.FS(ctx, sel(t, im, c.sel))
			if err != nil {
				t.Fatal(err)
			}
			got, err := fsys.ReadFile(c.path)
			closeFS(fsys)
			switch {
			case err != nil:
				t.Fatalf("stage %d: %v", stage, err)
			case bytes.Equal(got, old):
				if !killed {
					t.Fatalf("stage %d: finished but the old content is there", stage)
				}
				rolledBack++
			case bytes.HasPrefix(got, []byte("NEW")):
				completed++
			default:
				t.Fatalf("stage %d: torn content %q", stage, got)
			}
		}
		im.Close()
		if !killed {
			break // the child got through every stage
		}
	}
	if rolledBack == 0 || completed == 0 {
		t.Fatalf("rolled back %d, completed %d: the test did not cover both outcomes", rolledBack, completed)
	}
	t.Logf("killed at %d points: %d rolled back, %d completed", rolledBack/2, rolledBack, completed)
}

func crashChild() {
	img := os.Getenv("PROVISION_CRASH_CHILD")
	at, _ := strconv.Atoi(os.Getenv("PROVISION_CRASH_AT"))
	n := 0
	hook := func(stage string) error {
		n++
		if n == at {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
		return nil
	}
	ctx := context.Background()
	im, err := Open(ctx, img, withCommitHook(hook))
	if err != nil {
		panic(err)
	}
	data, _ := im.Select("4")
	boot, _ := im.Select("1")
	err = im.Apply(ctx, []Write{{Partition: data, Path: "/mender/key.pem", Data: bytes.Repeat([]byte("NEW KEY "), 3000), Mode: 0o600},
		{Partition: boot, Path: "/key.txt", Data: []byte("NEW\n"), Mode: 0o644}})
	if err != nil {
		panic(err)
	}
	im.Close()
}

func FuzzReadTable(f *testing.F) {
	// Seeds: the first MiB of real MBR and GPT images, and corruptions of them.
	simulator.RequireTool(f, golden.Tools...)
	for _, tb := range []string{"mbr", "gpt"} {
		p := filepath.Join(f.TempDir(), tb+".img")
		if err := golden.Build(context.Background(), p, golden.Options{Table: tb, BootMiB: 33, RootfsMiB: 4, DataMiB: 4}); err != nil {
			f.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		f.Add(b[:64<<10])
	}
	f.Add(make([]byte, 2048))
	f.Fuzz(func(t *testing.T, b []byte) {
		table, parts, err := ReadTable(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			return
		}
		if table != "mbr" && table != "gpt" {
			t.Fatalf("table %q", table)
		}
		for _, p := range parts {
			if p.Start < 512 || p.Size <= 0 || p.Start+p.Size > int64(len(b)) {
				t.Fatalf("partition outside the image accepted: %+v", p)
			}
		}
	})
}

// BenchmarkInject writes a unit's identity (three files over two partitions) into sparse images of 0.7 and 4 GiB.
func BenchmarkInject(b *testing.B) {
	for _, size := range []struct {
		name              string
		root, data, bootM int
	}{{"0.7GiB", 256, 128, 64}, {"4GiB", 1800, 512, 64}} {
		b.Run(size.name, func(b *testing.B) {
			img := buildGolden(b, golden.Options{BootMiB: size.bootM, RootfsMiB: size.root, DataMiB: size.data})
			ctx := context.Background()
			cert := bytes.Repeat([]byte("C"), 1400)
			for b.Loop() {
				im, err := Open(ctx, img)
				if err != nil {
					b.Fatal(err)
				}
				data, rootA := sel(b, im, "4"), sel(b, im, "2")
				err = im.Apply(ctx, []Write{{Partition: data, Path: "/mender/mender-cert.pem", Data: cert, Mode: 0o644},
					{Partition: data, Path: "/mender/mender-cert-private.pem", Data: cert[:400], Mode: 0o600},
					{Partition: rootA, Path: "/etc/mender/mender.conf", Data: cert[:300], Mode: 0o600}})
				if err != nil {
					b.Fatal(err)
				}
				if err := im.Close(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
