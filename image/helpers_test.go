package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"provision/image/golden"
	"provision/internal/testutil"
)

// checkTools are the programs the tests check images with.
var checkTools = []string{"e2fsck", "fsck.vfat", "debugfs", "dumpe2fs", "mtype"}

func buildGolden(tb testing.TB, o golden.Options) string {
	tb.Helper()
	return testutil.GoldenImage(tb, o, checkTools...)
}

func partitions(tb testing.TB, img string) []Partition {
	tb.Helper()
	im := open(tb, img, ReadOnly())
	defer im.Close()
	return im.Partitions()
}

// fsck checks every file system of the image with the real tools: e2fsck -fn and fsck.vfat -n.
func fsck(tb testing.TB, img string) {
	tb.Helper()
	for _, p := range partitions(tb, img) {
		if out, err := fsckPart(tb, img, p); err != nil {
			tb.Fatalf("partition %d (%s) not clean: %v\n%s", p.Number, p.FS, err, out)
		}
	}
}

func fsckPart(tb testing.TB, img string, p Partition) ([]byte, error) {
	tb.Helper()
	var cmd *exec.Cmd
	switch p.FS {
	case "ext2", "ext3", "ext4":
		cmd = exec.Command("e2fsck", "-fn", fmt.Sprintf("%s?offset=%d", img, p.Start))
	case "vfat":
		part := filepath.Join(tb.TempDir(), "fat.img")
		copyRange(tb, img, part, p.Start, p.Size)
		cmd = exec.Command("fsck.vfat", "-n", part)
	default:
		return nil, nil
	}
	return cmd.CombinedOutput()
}

// copyRange copies n bytes (n < 0: to the end) at off of src into a new file dst.
func copyRange(tb testing.TB, src, dst string, off, n int64) {
	tb.Helper()
	f, err := os.Open(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	if n < 0 {
		st, err := f.Stat()
		if err != nil {
			tb.Fatal(err)
		}
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

// debugfsStat returns "mode uid gid" (mode in octal, permission bits) and the content of a file as debugfs sees them.
func debugfsStat(tb testing.TB, img string, p Partition, file string) (string, []byte) {
	tb.Helper()
	dev := fmt.Sprintf("%s?offset=%d", img, p.Start)
	out, err := exec.Command("debugfs", "-R", "stat "+file, dev).Output()
	if err != nil {
		tb.Fatalf("debugfs stat %s: %v", file, err)
	}
	field := func(s, name string) string {
		if i := strings.Index(s, name); i >= 0 {
			if f := strings.Fields(s[i+len(name):]); len(f) > 0 {
				return f[0]
			}
		}
		return "?"
	}
	s := string(out)
	data, err := exec.Command("debugfs", "-R", "cat "+file, dev).Output()
	if err != nil {
		tb.Fatalf("debugfs cat %s: %v", file, err)
	}
	return field(s, "Mode:") + " " + field(s, "User:") + " " + field(s, "Group:"), data
}

// mtype returns a FAT file's content as mtools sees it.
func mtype(tb testing.TB, img string, p Partition, file string) ([]byte, error) {
	tb.Helper()
	return exec.Command("mtype", "-i", fmt.Sprintf("%s@@%d", img, p.Start), "::"+file).Output()
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

// readFile reads one file of a partition through a read-only Image.
func readFile(tb testing.TB, img, selector, file string) ([]byte, error) {
	tb.Helper()
	im := open(tb, img, ReadOnly())
	defer im.Close()
	fsys, err := im.FS(context.Background(), sel(tb, im, selector))
	if err != nil {
		tb.Fatal(err)
	}
	defer fsys.Close()
	return fsys.ReadFile(file)
}

// edit opens img, runs fn on the file system of one partition, closes both (committing) and checks every file
// system of the image with the real tools.
func edit(tb testing.TB, img, selector string, fn func(FS) error) error {
	tb.Helper()
	im := open(tb, img)
	fsys, err := im.FS(context.Background(), sel(tb, im, selector))
	if err != nil {
		im.Discard()
		return err
	}
	err = fn(fsys)
	if cerr := fsys.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		im.Discard()
		return err
	}
	if err := im.Close(); err != nil {
		return err
	}
	fsck(tb, img)
	return nil
}
