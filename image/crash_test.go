package image

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"provision/image/golden"
	"provision/internal/testutil"
)

// The crash child: PROVISION_CRASH_CHILD=<image> and either PROVISION_CRASH_AT=<n> (SIGKILL itself at the n-th
// commit stage), PROVISION_CRASH_STAGE=<name> (at the first stage of that name) or PROVISION_CRASH_LOOP=1 (edit in a
// loop until the parent kills it); PROVISION_CRASH_JOURNAL_DIR=<dir> opens WithJournalDir(dir).
func crashChild() {
	img := os.Getenv("PROVISION_CRASH_CHILD")
	at, _ := strconv.Atoi(os.Getenv("PROVISION_CRASH_AT"))
	stageName := os.Getenv("PROVISION_CRASH_STAGE")
	n := 0
	hook := func(stage string) error {
		n++
		if n == at || stage == stageName {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {}
		}
		return nil
	}
	ctx := context.Background()
	for version := 1; ; version++ {
		opts := []OpenOption{withCommitHook(hook)}
		if dir := os.Getenv("PROVISION_CRASH_JOURNAL_DIR"); dir != "" {
			opts = append(opts, WithJournalDir(dir))
		}
		im, err := Open(ctx, img, opts...)
		if err != nil {
			panic(err)
		}
		if err := im.Apply(ctx, crashWrites(im, version)); err != nil {
			panic(err)
		}
		if err := im.Close(); err != nil {
			panic(err)
		}
		if os.Getenv("PROVISION_CRASH_LOOP") == "" {
			return
		}
	}
}

// crashWrites is one edit over two file systems (ext4 and FAT); every file of version v starts with "V<v>:".
func crashWrites(im *Image, version int) []Write {
	data, _ := im.Select("4")
	boot, _ := im.Select("1")
	tag := fmt.Sprintf("V%d:", version)
	return []Write{
		{Partition: data, Path: "/mender/key.pem", Data: append([]byte(tag), bytes.Repeat([]byte("KEY "), 3000+version%7*500)...), Mode: 0o600},
		{Partition: data, Path: "/mender/new/cert.pem", Data: []byte(tag + "cert"), Mode: 0o644},
		{Partition: boot, Path: "/key.txt", Data: append([]byte(tag), bytes.Repeat([]byte("B"), 700*(version%3))...), Mode: 0o644},
	}
}

// runCrashChild runs the child with env, killing it after killAfter (0: never); it reports whether it was killed.
func runCrashChild(t *testing.T, img string, killAfter time.Duration, env ...string) bool {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashSafety$")
	cmd.Env = append(os.Environ(), append(env, "PROVISION_CRASH_CHILD="+img)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if killAfter > 0 {
		timer := time.AfterFunc(killAfter, func() { cmd.Process.Kill() })
		defer timer.Stop()
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true
		}
	}
	if err != nil {
		t.Fatalf("crash child: %v\n%s", err, out.String())
	}
	return false
}

// afterCrash opens the image (which rolls back), checks every file system with the real tools, and returns the
// version all files agree on (0: the files from before any edit).
func afterCrash(t *testing.T, img string) int {
	t.Helper()
	im := open(t, img)
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(JournalPath(img, "")); err == nil {
		t.Fatal("the undo journal survived a reopen")
	}
	fsck(t, img)
	im = open(t, img, ReadOnly())
	defer im.Close()
	version := -1
	for _, w := range crashWrites(im, 0) {
		fsys, err := im.FS(context.Background(), w.Partition)
		if err != nil {
			t.Fatal(err)
		}
		got, err := fsys.ReadFile(w.Path)
		fsys.Close()
		v := 0
		switch {
		case errors.Is(err, os.ErrNotExist) && w.Path == "/mender/new/cert.pem":
		case err != nil:
			t.Fatalf("%s: %v", w.Path, err)
		case bytes.HasPrefix(got, []byte("OLD")):
		default:
			tag, _, ok := bytes.Cut(got, []byte(":"))
			if v, err = strconv.Atoi(strings.TrimPrefix(string(tag), "V")); !ok || err != nil {
				t.Fatalf("%s: torn content %.40q", w.Path, got)
			}
			want := crashWrites(im, v)
			for _, cw := range want {
				if cw.Path == w.Path && !bytes.Equal(cw.Data, got) {
					t.Fatalf("%s: version %d torn (%d bytes, want %d)", w.Path, v, len(got), len(cw.Data))
				}
			}
		}
		if version >= 0 && v != version {
			t.Fatalf("files of different edits: version %d and %d (%s)", version, v, w.Path)
		}
		version = v
	}
	return version
}

func crashImage(t *testing.T) (img, pristine string) {
	t.Helper()
	img = buildGolden(t, golden.Options{Table: "gpt", BootMiB: 33, RootfsMiB: 8, DataMiB: 8})
	im := open(t, img)
	old := func(p Partition, path string) Write {
		return Write{Partition: p, Path: path, Data: []byte("OLD CONTENT\n"), Mode: 0o600}
	}
	if err := im.Apply(context.Background(), []Write{old(sel(t, im, "4"), "/mender/key.pem"), old(sel(t, im, "1"), "/key.txt")}); err != nil {
		t.Fatal(err)
	}
	im.Close()
	pristine = img + ".pristine"
	copyRange(t, img, pristine, 0, -1)
	return img, pristine
}

// The writer is killed at every stage of a commit, and at random moments of a run of edits: afterwards the image
// opens (rolling back), every file system is clean, and the files are all from one edit, whole.
func TestCrashSafety(t *testing.T) {
	if os.Getenv("PROVISION_CRASH_CHILD") != "" {
		crashChild()
		return
	}
	img, pristine := crashImage(t)
	t.Run("every stage", func(t *testing.T) {
		outcomes := map[int]int{}
		stage := 1
		for ; ; stage++ {
			copyRange(t, pristine, img, 0, -1)
			killed := runCrashChild(t, img, 0, "PROVISION_CRASH_AT="+strconv.Itoa(stage))
			v := afterCrash(t, img)
			if !killed {
				if v != 1 {
					t.Fatalf("the edit finished but version %d is there", v)
				}
				break
			}
			outcomes[v]++
		}
		if outcomes[0] == 0 || outcomes[1] == 0 {
			t.Fatalf("outcomes %v: the test did not cover both rollback and completion", outcomes)
		}
		t.Logf("killed at %d stages: %d rolled back, %d complete", stage-1, outcomes[0], outcomes[1])
	})
	t.Run("random moments", func(t *testing.T) {
		copyRange(t, pristine, img, 0, -1)
		rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
		last := 0
		for range 6 {
			if !runCrashChild(t, img, time.Duration(20+rng.IntN(400))*time.Millisecond, "PROVISION_CRASH_LOOP=1") {
				t.Fatal("the looping child exited")
			}
			last = afterCrash(t, img)
		}
		t.Logf("last version found: %d", last)
	})
}

func TestUndoJournal(t *testing.T) {
	img, pristine := crashImage(t)
	journal := JournalPath(img, "")
	// A journal left by a writer killed after the image was synced, before the journal was removed.
	runCrashChild(t, img, 0, "PROVISION_CRASH_STAGE=image-synced")
	full, err := os.ReadFile(journal)
	if err != nil {
		t.Fatalf("no journal after the kill: %v", err)
	}
	edited := img + ".edited"
	copyRange(t, img, edited, 0, -1)
	want := testutil.FileSum(t, pristine)

	t.Run("complete journal rolls back", func(t *testing.T) {
		copyRange(t, edited, img, 0, -1)
		os.WriteFile(journal, full, 0o600)
		im := open(t, img, ReadOnly()) // a reader rolls back too
		im.Close()
		if testutil.FileSum(t, img) != want {
			t.Fatal("not rolled back")
		}
	})
	t.Run("torn journal is dropped", func(t *testing.T) {
		// The image is written only after the journal is complete and synced: a torn one comes with an untouched image.
		for _, n := range []int{0, 10, 40, len(full) / 2, len(full) - 17, len(full) - 1} {
			copyRange(t, pristine, img, 0, -1)
			torn := append([]byte(nil), full[:n]...)
			os.WriteFile(journal, torn, 0o600)
			im := open(t, img)
			im.Close()
			if testutil.FileSum(t, img) != want {
				t.Fatalf("journal cut at %d: image changed", n)
			}
			if _, err := os.Stat(journal); err == nil {
				t.Fatalf("journal cut at %d: not removed", n)
			}
		}
		corrupt := append([]byte(nil), full...)
		corrupt[len(corrupt)/2] ^= 1
		os.WriteFile(journal, corrupt, 0o600)
		open(t, img).Close()
		if testutil.FileSum(t, img) != want {
			t.Fatal("corrupt journal: image changed")
		}
	})
	t.Run("journal of another image is refused", func(t *testing.T) {
		other := buildGolden(t, golden.Options{Table: "gpt", BootMiB: 33, RootfsMiB: 8, DataMiB: 8})
		copyRange(t, other, img, 0, -1)
		before := testutil.FileSum(t, img)
		os.WriteFile(journal, full, 0o600)
		if _, err := Open(context.Background(), img); !errors.Is(err, ErrUndoJournal) {
			t.Fatalf("got %v, want ErrUndoJournal", err)
		}
		if testutil.FileSum(t, img) != before {
			t.Fatal("image changed")
		}
		kept := staleJournals(t, journal)
		if len(kept) != 1 {
			t.Fatalf("the journal was not kept aside: %v", kept)
		}
		os.Remove(kept[0])
	})
	t.Run("format 2 journal still rolls back", func(t *testing.T) {
		copyRange(t, edited, img, 0, -1)
		j, ok := parseJournal(full)
		if !ok {
			t.Fatal("journal not complete")
		}
		os.WriteFile(journal, journalV2(t, j, img), 0o600)
		open(t, img).Close()
		if testutil.FileSum(t, img) != want {
			t.Fatal("not rolled back")
		}
	})
}

// A commit that fails half way (here: the hook fails after some pages were written) rolls back at once.
func TestFailedCommitRollsBack(t *testing.T) {
	img, _ := crashImage(t)
	before := testutil.FileSum(t, img)
	n := 0
	im := open(t, img, withCommitHook(func(stage string) error {
		if stage == "page-written" {
			if n++; n == 3 {
				return errors.New("injected write failure")
			}
		}
		return nil
	}))
	err := im.Apply(context.Background(), crashWrites(im, 1))
	if err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("got %v", err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if testutil.FileSum(t, img) != before {
		t.Fatal("image changed")
	}
	if _, err := os.Stat(JournalPath(img, "")); err == nil {
		t.Fatal("journal left behind")
	}
	// The image works afterwards.
	im = open(t, img)
	if err := im.Apply(context.Background(), crashWrites(im, 2)); err != nil {
		t.Fatal(err)
	}
	im.Close()
	if v := afterCrash(t, img); v != 2 {
		t.Fatalf("version %d", v)
	}
}

// Media that does not keep what was written (simulated: a byte of the new file flips on the image after the write):
// the read-back from the image catches it and the edit is rolled back.
func TestBadMediaRollsBack(t *testing.T) {
	img, _ := crashImage(t)
	before := testutil.FileSum(t, img)
	journal := JournalPath(img, "")
	corrupt := func(stage string) error {
		if stage != "image-synced" {
			return nil
		}
		data, err := os.ReadFile(journal)
		if err != nil {
			return err
		}
		j, ok := parseJournal(data)
		recs := j.recs
		if !ok {
			return errors.New("journal not complete at image-synced")
		}
		f, err := os.OpenFile(img, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		page := make([]byte, pageSize)
		for _, r := range recs {
			f.ReadAt(page, r.idx*pageSize)
			if i := bytes.Index(page, []byte("V1:KEY KEY")); i >= 0 {
				_, err := f.WriteAt([]byte("X"), r.idx*pageSize+int64(i)+5)
				return err
			}
		}
		return errors.New("the new file's data is in no journaled page")
	}
	im := open(t, img, withCommitHook(corrupt))
	err := im.Apply(context.Background(), crashWrites(im, 1))
	if !errors.Is(err, ErrVerify) || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("got %v, want ErrVerify, rolled back", err)
	}
	im.Close()
	if testutil.FileSum(t, img) != before {
		t.Fatal("image changed")
	}
}

// WithJournalDir (what block devices need) keeps the journal there, and the next Open with the same directory rolls
// an interrupted edit back.
func TestJournalDir(t *testing.T) {
	img, _ := crashImage(t)
	before := testutil.FileSum(t, img)
	dir := t.TempDir()
	journal := JournalPath(img, dir)
	if !strings.HasPrefix(journal, dir+"/") || strings.Contains(strings.TrimPrefix(journal, dir+"/"), "/") {
		t.Fatalf("journal path %s not directly in %s", journal, dir)
	}
	stop := errors.New("stop before the journal goes")
	im := open(t, img, WithJournalDir(dir), withCommitHook(func(stage string) error {
		if stage == "image-synced" {
			if _, err := os.Stat(journal); err != nil {
				return err
			}
			if _, err := os.Stat(JournalPath(img, "")); err == nil {
				return errors.New("journal next to the image")
			}
			// Keep copies of the complete journal and the edited image: fail() below rolls back and removes it.
			data, _ := os.ReadFile(journal)
			os.WriteFile(journal+".copy", data, 0o600)
			copyRange(t, img, img+".edited", 0, -1)
			return stop
		}
		return nil
	}))
	if err := im.Apply(context.Background(), crashWrites(im, 1)); !errors.Is(err, stop) {
		t.Fatalf("got %v", err)
	}
	im.Close()
	if testutil.FileSum(t, img) != before {
		t.Fatal("not rolled back")
	}
	// Now as a crash leaves it: new pages on the image, the journal in the directory.
	copyRange(t, img+".edited", img, 0, -1)
	edited := testutil.FileSum(t, img)
	os.Rename(journal+".copy", journal)
	open(t, img).Close() // without the directory: the journal is not found, nothing happens
	if testutil.FileSum(t, img) != edited {
		t.Fatal("changed without its journal")
	}
	open(t, img, WithJournalDir(dir)).Close()
	if testutil.FileSum(t, img) != before {
		t.Fatal("not rolled back from the journal directory")
	}
}

// journalV2 writes j in the earlier format 2 (see overlay.go), with the new pages' CRCs taken from the image.
func journalV2(tb testing.TB, j undoJournal, img string) []byte {
	tb.Helper()
	f := mustOpenFile(tb, img)
	be := binary.BigEndian
	out := []byte(journalMagicV2)
	out = be.AppendUint64(out, uint64(j.size))
	out = be.AppendUint32(out, pageSize)
	out = be.AppendUint32(out, uint32(len(j.recs)))
	out = be.AppendUint32(out, j.first)
	out = be.AppendUint32(out, crc32.Checksum(out, crcTable))
	for _, r := range j.recs {
		cur := make([]byte, len(r.orig))
		if _, err := f.ReadAt(cur, r.idx*pageSize); err != nil {
			tb.Fatal(err)
		}
		rec := be.AppendUint64(nil, uint64(r.idx))
		rec = be.AppendUint32(rec, uint32(len(r.orig)))
		rec = be.AppendUint32(rec, r.origCRC)
		rec = be.AppendUint32(rec, crc32.Checksum(cur, crcTable))
		rec = be.AppendUint32(rec, crc32.Checksum(rec, crcTable))
		out = append(append(out, rec...), r.orig...)
	}
	sum := crc32.Checksum(out, crcTable)
	out = append(out, "COMMIT\x00\x00"...)
	out = be.AppendUint32(out, uint32(len(j.recs)))
	return be.AppendUint32(out, sum)
}
