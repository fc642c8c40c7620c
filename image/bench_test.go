package image

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"provision/image/golden"
)

// benchSizes are sparse golden images of about 0.7 and 4 GiB; the 4 GiB one should cost no more than 1.5 times as
// much per injection (edits touch only changed pages, whatever the image size).
var benchSizes = []struct {
	name               string
	boot, rootfs, data int // MiB
}{
	{name: "0.7GiB", boot: 64, rootfs: 256, data: 128},
	{name: "4GiB", boot: 64, rootfs: 1800, data: 512},
}

// BenchmarkInject is one unit's identity: open, write three files over two partitions (with every check and the
// read-back), commit, close.
func BenchmarkInject(b *testing.B) {
	for _, size := range benchSizes {
		b.Run(size.name, func(b *testing.B) {
			img := buildGolden(b, golden.Options{BootMiB: size.boot, RootfsMiB: size.rootfs, DataMiB: size.data})
			ctx := context.Background()
			cert := bytes.Repeat([]byte("C"), 1400)
			n := 0
			for b.Loop() {
				n++
				im, err := Open(ctx, img)
				if err != nil {
					b.Fatal(err)
				}
				data, rootA := sel(b, im, "4"), sel(b, im, "2")
				cert[0] = byte(n) // a new identity every time
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

// BenchmarkWriteFile is the cost of one more file in an open ext4 file system (no commit).
func BenchmarkWriteFile(b *testing.B) {
	img := buildGolden(b, golden.Options{RootfsMiB: 256, DataMiB: 128})
	im := open(b, img)
	defer im.Discard()
	fsys, err := im.FS(context.Background(), sel(b, im, "4"))
	if err != nil {
		b.Fatal(err)
	}
	defer discardFS(fsys)
	data := bytes.Repeat([]byte("k"), 1700)
	i := 0
	for b.Loop() {
		i++
		if err := fsys.WriteFile(fmt.Sprintf("/mender/f%d.pem", i%64), data, 0o600, 0, 0); err != nil {
			b.Fatal(err)
		}
	}
}
