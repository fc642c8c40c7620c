package image

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"provision/internal/testutil"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// staleJournals lists the journals kept aside next to journal.
func staleJournals(tb testing.TB, journal string) []string {
	tb.Helper()
	m, err := filepath.Glob(journal + ".stale-*")
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// interrupted leaves the image as a writer killed after the image was synced, before the journal was removed,
// leaves it (edit version 1 on the image, its journal complete), opening the image through path.
func interrupted(t *testing.T, path string, opts ...string) {
	t.Helper()
	runCrashChild(t, path, 0, append([]string{"PROVISION_CRASH_STAGE=image-synced"}, opts...)...)
}

// applyVersion writes edit version v through path and closes the image.
func applyVersion(t *testing.T, path string, v int, opts ...OpenOption) {
	t.Helper()
	im := open(t, path, opts...)
	if err := im.Apply(context.Background(), crashWrites(im, v)); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
}

// The undo journal belongs to the real image: a symbolic link and the real path share it, and a journal is never
// replayed over an image changed since it was written.
func TestJournalIdentity(t *testing.T) {
	img, pristine := crashImage(t)
	link := filepath.Join(t.TempDir(), "unit.img")
	if err := os.Symlink(img, link); err != nil {
		t.Fatal(err)
	}
	linkDir := filepath.Join(t.TempDir(), "by-id")
	if err := os.Symlink(filepath.Dir(img), linkDir); err != nil {
		t.Fatal(err)
	}
	viaDir := filepath.Join(linkDir, filepath.Base(img))
	journal := JournalPath(img, "")

	t.Run("one journal name", func(t *testing.T) {
		dir := t.TempDir()
		for _, p := range []string{link, viaDir} {
			if got := JournalPath(p, ""); got != journal {
				t.Errorf("JournalPath(%s) = %s, want %s", p, got, journal)
			}
			if got, want := JournalPath(p, dir), JournalPath(img, dir); got != want {
				t.Errorf("JournalPath(%s, dir) = %s, want %s", p, got, want)
			}
		}
	})

	t.Run("interrupted through a link, rolled back through the real path", func(t *testing.T) {
		copyRange(t, pristine, img, 0, -1)
		interrupted(t, link)
		if _, err := os.Stat(journal); err != nil {
			t.Fatalf("no journal beside the real image: %v", err)
		}
		open(t, img).Close()
		if testutil.FileSum(t, img) != testutil.FileSum(t, pristine) {
			t.Fatal("not rolled back")
		}
	})

	t.Run("a later edit through another path survives", func(t *testing.T) {
		copyRange(t, pristine, img, 0, -1)
		interrupted(t, link)
		applyVersion(t, img, 2)
		if v := afterCrash(t, link); v != 2 { // opens through the link: must not replay anything
			t.Fatalf("version %d after the later edit, want 2", v)
		}
		if v := afterCrash(t, viaDir); v != 2 {
			t.Fatalf("version %d, want 2", v)
		}
	})

	t.Run("journal an earlier version left under the link's name", func(t *testing.T) {
		legacy := link + ".provision-undo"
		copyRange(t, pristine, img, 0, -1)
		interrupted(t, img)
		os.Rename(journal, legacy)
		open(t, link).Close()
		if testutil.FileSum(t, img) != testutil.FileSum(t, pristine) {
			t.Fatal("not rolled back")
		}
		if _, err := os.Stat(legacy); err == nil {
			t.Fatal("journal left behind")
		}
		// The bug this replaces: an edit through the real path did not see it, and it was replayed over that edit.
		interrupted(t, img)
		os.Rename(journal, legacy)
		applyVersion(t, img, 2)
		if _, err := Open(context.Background(), link); !errors.Is(err, ErrUndoJournal) {
			t.Fatalf("got %v, want ErrUndoJournal", err)
		}
		if kept := staleJournals(t, legacy); len(kept) != 1 {
			t.Fatalf("kept aside: %v", kept)
		}
		if v := afterCrash(t, link); v != 2 {
			t.Fatalf("version %d, want 2", v)
		}
	})

	t.Run("stale journal is kept aside, not replayed", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			change func(t *testing.T)
		}{
			{"image edited behind the journal's back", func(t *testing.T) {
				os.Rename(journal, journal+".hidden")
				applyVersion(t, img, 3)
				os.Rename(journal+".hidden", journal)
			}},
			{"one sector changed", func(t *testing.T) {
				data, err := os.ReadFile(journal)
				if err != nil {
					t.Fatal(err)
				}
				j, ok := parseJournal(data)
				if !ok || len(j.recs) < 3 {
					t.Fatal("journal not complete")
				}
				r := j.recs[len(j.recs)/2]
				cur := make([]byte, 512)
				f := mustOpenFile(t, img)
				f.ReadAt(cur, r.idx*pageSize+512)
				for i := range cur {
					cur[i] ^= 0x5a
				}
				patch(t, img, r.idx*pageSize+512, cur)
			}},
			{"image replaced by a copy", func(t *testing.T) {
				tmp := img + ".tmp"
				copyRange(t, img, tmp, 0, -1)
				if err := os.Rename(tmp, img); err != nil {
					t.Fatal(err)
				}
			}},
		} {
			t.Run(tc.name, func(t *testing.T) {
				copyRange(t, pristine, img, 0, -1)
				for _, s := range staleJournals(t, journal) {
					os.Remove(s)
				}
				interrupted(t, img)
				tc.change(t)
				before := testutil.FileSum(t, img)
				_, err := Open(context.Background(), link)
				if !errors.Is(err, ErrUndoJournal) {
					t.Fatalf("got %v, want ErrUndoJournal", err)
				}
				t.Log(err)
				kept := staleJournals(t, journal)
				if len(kept) != 1 {
					t.Fatalf("journals kept aside: %v", kept)
				}
				if !strings.Contains(err.Error(), kept[0]) || strings.Contains(err.Error(), "\n") {
					t.Fatalf("error does not name the kept journal %s in one line: %v", kept[0], err)
				}
				if testutil.FileSum(t, img) != before {
					t.Fatal("the stale journal was replayed")
				}
				if _, err := os.Stat(journal); err == nil {
					t.Fatal("the journal is still in place")
				}
				open(t, link).Close() // the journal kept aside does not block the image
				if testutil.FileSum(t, img) != before {
					t.Fatal("image changed on the next open")
				}
			})
		}
	})

	t.Run("hard links are refused for writing", func(t *testing.T) {
		copyRange(t, pristine, img, 0, -1)
		hard := filepath.Join(filepath.Dir(img), "hard.img")
		if err := os.Link(img, hard); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(hard)
		if _, err := Open(context.Background(), hard); err == nil || !strings.Contains(err.Error(), "hard link") {
			t.Fatalf("got %v, want a refusal naming the hard links", err)
		}
		open(t, hard, ReadOnly()).Close()
	})
}

// A block device's journal is named by the device (major and minor number), whatever path reaches it.
func TestJournalPathBlockDevice(t *testing.T) {
	var dev string
	for _, p := range []string{"/dev/loop0", "/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/mmcblk0"} {
		if st, err := os.Stat(p); err == nil && st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0 {
			dev = p
			break
		}
	}
	testutil.RequireFacility(t, dev != "", "no block device to name")
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "by-id-usb-Flash-0:0")
	if err := os.Symlink(dev, link); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	want := filepath.Join(dir, fmt.Sprintf("dev-%d-%d.provision-undo", unix.Major(uint64(st.Rdev)), unix.Minor(uint64(st.Rdev))))
	for _, p := range []string{dev, link} {
		if got := JournalPath(p, dir); got != want {
			t.Errorf("JournalPath(%s) = %s, want %s", p, got, want)
		}
	}
}

// attachLoop attaches img to a free loop device for the test (skipping, outside CI, where loop devices cannot be
// attached: not root, or a container without them).
func attachLoop(t *testing.T, img string) string {
	t.Helper()
	testutil.RequireTool(t, "losetup")
	testutil.RequireFacility(t, os.Geteuid() == 0, "attaching a loop device needs root")
	out, err := exec.Command("losetup", "-f", "--show", img).CombinedOutput()
	testutil.RequireFacility(t, err == nil, "cannot attach a loop device here: %v: %s", err, out)
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// A block device reached through another name (a /dev/disk/by-id link) finds the journal an interrupted edit
// through its /dev name left in the station's journal directory.
func TestJournalBlockDevice(t *testing.T) {
	img, pristine := crashImage(t)
	dev := attachLoop(t, img)
	link := filepath.Join(t.TempDir(), "usb-Generic_Flash_0123-0:0")
	if err := os.Symlink(dev, link); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	journal := JournalPath(link, dir)
	if journal != JournalPath(dev, dir) || !strings.HasPrefix(filepath.Base(journal), "dev-") {
		t.Fatalf("journal names %s and %s", journal, JournalPath(dev, dir))
	}
	runCrashChild(t, dev, 0, "PROVISION_CRASH_STAGE=image-synced", "PROVISION_CRASH_JOURNAL_DIR="+dir)
	if _, err := os.Stat(journal); err != nil {
		t.Fatalf("no journal for the device: %v", err)
	}
	open(t, link, WithJournalDir(dir)).Close()
	if testutil.FileSum(t, img) != testutil.FileSum(t, pristine) {
		t.Fatal("not rolled back through the other name")
	}
	if _, err := os.Stat(journal); err == nil {
		t.Fatal("journal left behind")
	}
	applyVersion(t, link, 2, WithJournalDir(dir))
	im := open(t, dev, WithJournalDir(dir), ReadOnly())
	got, err := func() ([]byte, error) {
		defer im.Close()
		fsys, err := im.FS(context.Background(), sel(t, im, "4"))
		if err != nil {
			return nil, err
		}
		defer fsys.Close()
		return fsys.ReadFile("/mender/new/cert.pem")
	}()
	if err != nil || string(got) != "V2:cert" {
		t.Fatalf("read back %q, %v", got, err)
	}
	fsck(t, img)
}
