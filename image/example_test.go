package image_test

import (
	"context"
	"fmt"
	"log"

	"provision/image"
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
