package image_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"

	"provision/image"
	"provision/image/golden"
)

// Write a unit's certificate and key into the data partition and a setting into both root file systems of an A/B
// image, as one crash-safe edit: everything is checked before the first byte is written, read back afterwards, and
// either all of it lands or none of it does.
func ExampleImage_Apply() {
	ctx := context.Background()
	im, err := image.Open(ctx, "unit.img")
	if err != nil {
		log.Fatal(err) // errors.Is(err, image.ErrLocked), image.ErrDamagedTable, ...
	}
	defer im.Close()
	data, err := im.Select("label=data")
	if err != nil {
		log.Fatal(err)
	}
	writes := []image.Write{
		{Partition: data, Path: "/mender/mender-cert.pem", Data: []byte("-----BEGIN CERTIFICATE-----\n..."), Mode: 0o644},
		{Partition: data, Path: "/mender/mender-cert-private.pem", Data: []byte("-----BEGIN PRIVATE KEY-----\n..."), Mode: 0o600},
	}
	for _, sel := range []string{"2", "3"} {
		root, err := im.Select(sel)
		if err != nil {
			log.Fatal(err)
		}
		writes = append(writes, image.Write{Partition: root, Path: "/etc/serial", Data: []byte("SN-0001\n"), Mode: 0o644})
	}
	if err := im.Apply(ctx, writes); err != nil {
		log.Fatal(err) // image.ErrNoSpace, image.ErrFSErrors, image.ErrVerify, ...
	}
}

// Read a file without changing anything (a shared lock: other readers may read at the same time).
func ExampleImage_FS() {
	ctx := context.Background()
	im, err := image.Open(ctx, "unit.img", image.ReadOnly())
	if err != nil {
		log.Fatal(err)
	}
	defer im.Close()
	root, err := im.Select("label=rootfsa")
	if err != nil {
		log.Fatal(err)
	}
	fsys, err := im.FS(ctx, root)
	if err != nil {
		log.Fatal(err)
	}
	defer fsys.Close()
	conf, err := fsys.ReadFile("/etc/mender/mender.conf")
	if err != nil {
		log.Fatal(err) // errors.Is(err, fs.ErrNotExist) when missing
	}
	info, err := fsys.Stat("/etc/mender/mender.conf")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%d bytes, mode %v, owner %d:%d\n", len(conf), info.Mode, info.UID, info.GID)
}

// Check a planned edit before its data exists (a pre-flight: before a key or certificate is made), writing nothing.
func ExampleCheck() {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "unit.img")
	if err := golden.Build(ctx, img, golden.Options{BootMiB: 33, RootfsMiB: 24, DataMiB: 16}); err != nil {
		log.Fatal(err)
	}
	plan := []image.Planned{
		{Select: "label=data", Path: "/mender/mender-cert.pem", Size: 4096},
		{Select: "label=data", Path: "/mender/mender-cert-private.pem", Size: 4096},
		{Select: "2", Path: "/etc/mender/mender.conf", Size: 512, MustExist: true}, // a JSON merge: grows by up to 512 bytes
		{Select: "3", Path: "/etc/mender/mender.conf", Size: 512, MustExist: true},
	}
	fmt.Println(image.Check(ctx, img, plan))
	err = image.Check(ctx, img, []image.Planned{{Select: "label=data", Path: "/payload.bin", Size: 1 << 30}})
	fmt.Println(errors.Is(err, image.ErrNoSpace))
	err = image.Check(ctx, img, []image.Planned{{Select: "label=data", Path: "/etc/app.json", Size: 10, MustExist: true}})
	fmt.Println(errors.Is(err, fs.ErrNotExist))
	err = image.Check(ctx, img, []image.Planned{{Select: "label=cache", Path: "/x", Size: 1}})
	fmt.Println(errors.Is(err, image.ErrNoPartition))
	// Output:
	// <nil>
	// true
	// true
	// true
}
