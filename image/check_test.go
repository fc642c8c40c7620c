package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"provision/image/golden"
	"provision/internal/testutil"
)

// Check finds, without writing, what would make Apply refuse; what it passes, Apply writes.
func TestCheck(t *testing.T) {
	ctx := context.Background()
	small := golden.Options{BootMiB: 33, RootfsMiB: 24, DataMiB: 16}
	img := buildGolden(t, small)
	fullOpts := small
	fullOpts.FillData = true
	full := buildGolden(t, fullOpts)
	random := filepath.Join(t.TempDir(), "random.img")
	rb := make([]byte, 1<<20)
	rand.Read(rb)
	os.WriteFile(random, rb, 0o600)
	unclean := copyImage(t, img, func(p string, ps []Partition) {
		patchSuper(t, p, ps[3], func(sb []byte) { binary.LittleEndian.PutUint16(sb[58:], 0) })
	})
	noFS := copyImage(t, img, func(p string, ps []Partition) { patch(t, p, ps[2].Start+1024, make([]byte, 4096)) })

	good := []Planned{
		{Select: "label=data", Path: "/mender/mender-cert-private.pem", Size: 2048, Mode: 0o600},
		{Select: "label=data", Path: "/mender/new/dir/cert.pem", Size: 3000},
		{Select: "2", Path: "/etc/mender/mender.conf", Size: 400, MustExist: true},
		{Select: "3", Path: "/etc/mender/mender.conf", Size: 400, MustExist: true},
		{Select: "1", Path: "/provision/ca.crt", Size: 1500},
	}
	var manyFiles []Planned
	for i := range 6000 { // a 16 MiB ext4 has 4096 inodes
		manyFiles = append(manyFiles, Planned{Select: "4", Path: fmt.Sprintf("/many/f%d", i)})
	}
	tests := []struct {
		name string
		img  string
		plan []Planned
		want error
		msg  string
	}{
		{"good plan", img, good, nil, ""},
		{"random bytes", random, good, ErrNotDiskImage, ""},
		{"missing partition", img, []Planned{{Select: "7", Path: "/x", Size: 1}}, ErrNoPartition, ""},
		{"full partition", full, []Planned{{Select: "2", Path: "/x", Size: 1}, {Select: "4", Path: "/mender/key.pem", Size: 64 << 10}}, ErrNoSpace, "KiB"},
		{"too many files", img, manyFiles, ErrNoSpace, "inodes"},
		{"unclean file system", unclean, good, ErrFSErrors, "not cleanly unmounted"},
		{"no file system", noFS, good, ErrUnsupportedFS, ""},
		{"merge target missing", img, []Planned{{Select: "4", Path: "/etc/mender/mender.conf", Size: 10, MustExist: true}}, fs.ErrNotExist, "missing"},
		{"directory", img, []Planned{{Select: "4", Path: "/mender", Size: 10}}, nil, "is a directory"},
		{"parent is a symbolic link", img, []Planned{{Select: "2", Path: "/var/lib/mender/key.pem", Size: 10}}, nil, "symbolic link"},
		{"parent is a file", img, []Planned{{Select: "2", Path: "/etc/hostname/x", Size: 10}}, nil, "not a directory"},
		{"same file twice", img, []Planned{{Select: "1", Path: "/A.TXT", Size: 1}, {Select: "1", Path: "/a.txt", Size: 1}}, nil, "twice"},
		{"relative path", img, []Planned{{Select: "4", Path: "mender/x", Size: 1}}, nil, "not absolute"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := testutil.FileSum(t, tt.img)
			err := Check(ctx, tt.img, tt.plan)
			if tt.want == nil && tt.msg == "" {
				if err != nil {
					t.Fatalf("got %v", err)
				}
			} else if err == nil || tt.want != nil && !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("got %v, want %v containing %q", err, tt.want, tt.msg)
			}
			if err != nil && strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			if testutil.FileSum(t, tt.img) != before {
				t.Fatal("Check changed the image")
			}
		})
	}

	t.Run("apply what passed", func(t *testing.T) {
		im := open(t, img)
		defer im.Close()
		var writes []Write
		for _, pl := range good {
			w := Write{Partition: sel(t, im, pl.Select), Path: pl.Path, Data: bytes.Repeat([]byte("x"), int(pl.Size)), Mode: 0o644}
			if pl.MustExist {
				w.Data = []byte("{}\n")
			}
			writes = append(writes, w)
		}
		if err := im.Apply(ctx, writes); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("locked", func(t *testing.T) {
		im := open(t, img)
		defer im.Close()
		if err := Check(ctx, img, good); !errors.Is(err, ErrLocked) {
			t.Fatalf("got %v, want ErrLocked", err)
		}
	})
}
