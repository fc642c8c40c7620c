package image

import (
	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"strings"
	"testing"

	"provision/image/golden"
)

// libext2fs's error codes reach the user in the library's words (its com_err table is registered), never as
// "Unknown code ext2 N", with advice for the common ones.
func TestExt4ErrorsInWords(t *testing.T) {
	ctx := context.Background()
	img := buildGolden(t, golden.Options{Table: "gpt", ExtType: "ext2", BootMiB: 33, RootfsMiB: 24, DataMiB: 16})
	corrupt := copyImage(t, img, func(p string, ps []Partition) {
		patchSuper(t, p, ps[3], func(sb []byte) { binary.LittleEndian.PutUint32(sb[24:], 20) }) // s_log_block_size: 1 GiB blocks
	})
	tests := []struct {
		name string
		img  string
		do   func(im *Image) error
		want error
		msg  []string // all in the error
	}{
		{"missing file", img, func(im *Image) error {
			fsys, err := im.FS(ctx, sel(t, im, "4"))
			if err != nil {
				return err
			}
			defer fsys.Close()
			_, err = fsys.ReadFile("/no/such/file")
			return err
		}, fs.ErrNotExist, []string{"file not found"}},
		{"corrupt superblock", corrupt, func(im *Image) error {
			_, err := im.FS(ctx, sel(t, im, "4"))
			return err
		}, ErrFSErrors, []string{"superblock is corrupt", "e2fsck"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			im := open(t, tt.img, ReadOnly())
			defer im.Close()
			err := tt.do(im)
			if err == nil || !errors.Is(err, tt.want) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
			if strings.Contains(err.Error(), "Unknown code") {
				t.Fatalf("error code not in words: %v", err)
			}
			for _, m := range tt.msg {
				if !strings.Contains(strings.ToLower(err.Error()), m) {
					t.Fatalf("got %q, want it to contain %q", err, m)
				}
			}
		})
	}
}
