// Package golden builds sample golden disk images without root: a Mender-style layout (boot FAT32, rootfs A and B ext4,
// data ext4) with an MBR or GPT partition table, written sparsely with sfdisk, mke2fs -E offset and mkfs.fat --offset.
// Tests, the demo and the benchmarks use it.
package golden

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

const mib = 1 << 20

// fillerStep is how much FillData shrinks its filler per try.
const fillerStep = 64 << 10

// Options shape a golden image. Zero values take the defaults.
type Options struct {
	Table      string // "mbr" (default) or "gpt"
	BootMiB    int    // default 64 (FAT32 with 512-byte clusters needs 33 MiB or more)
	BootFAT    int    // the boot partition's FAT: 32 (default), 16 or 12 (FAT12 needs a small BootMiB, e.g. 8)
	ExtType    string // "ext4" (default, Debian's defaults: metadata_csum, 64bit, flex_bg, ...), "ext3" or "ext2"
	RootfsMiB  int    // each of A and B; default 64
	DataMiB    int    // default 32
	BlockSize  int    // ext4 block size: 1024 or 4096; default mke2fs's choice
	ManyFiles  int    // files in rootfs A's /etc/many (a large htree directory)
	FillData   bool   // fill the data partition to the last few blocks
	FillRootfs int    // MiB of incompressible data in each root file system (/usr/lib/payload.bin), as a real OS has
	MenderConf string // rootfs /etc/mender/mender.conf; default a typical one
}

// DefaultMenderConf is the mender.conf both root file systems get.
const DefaultMenderConf = `{
  "ServerURL": "https://hosted.mender.io/",
  "TenantToken": "dummy",
  "UpdatePollIntervalSeconds": 1800,
  "InventoryPollIntervalSeconds": 28800,
  "RetryPollIntervalSeconds": 300
}
`

// Tools lists the programs Build runs.
var Tools = []string{"sfdisk", "mke2fs", "mkfs.fat", "mcopy"}

// Build writes a golden image to path (replacing it), sparse: unused space takes no room on disk.
func Build(ctx context.Context, path string, o Options) error {
	if err := build(ctx, path, o); err != nil {
		return fmt.Errorf("golden: build %s: %w", path, err)
	}
	return nil
}

func build(ctx context.Context, path string, o Options) error {
	if o.Table == "" {
		o.Table = "mbr"
	}
	if o.BootMiB == 0 {
		o.BootMiB = 64
	}
	if o.RootfsMiB == 0 {
		o.RootfsMiB = 64
	}
	if min := o.FillRootfs + o.FillRootfs/8 + 24; o.RootfsMiB < min {
		o.RootfsMiB = min
	}
	if o.BootFAT == 0 {
		o.BootFAT = 32
	}
	if o.BootFAT != 12 && o.BootFAT != 16 && o.BootFAT != 32 {
		return fmt.Errorf("BootFAT %d: want 12, 16 or 32", o.BootFAT)
	}
	if o.ExtType == "" {
		o.ExtType = "ext4"
	}
	if o.ExtType != "ext2" && o.ExtType != "ext3" && o.ExtType != "ext4" {
		return fmt.Errorf("ExtType %q: want ext2, ext3 or ext4", o.ExtType)
	}
	if o.Table != "mbr" && o.Table != "gpt" {
		return fmt.Errorf("Table %q: want mbr or gpt", o.Table)
	}
	if o.DataMiB == 0 {
		o.DataMiB = 32
	}
	if o.MenderConf == "" {
		o.MenderConf = DefaultMenderConf
	}
	total := int64(1+o.BootMiB+2*o.RootfsMiB+o.DataMiB+1) * mib
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	err = f.Truncate(total)
	f.Close()
	if err != nil {
		return err
	}
	// Partition table.
	var script strings.Builder
	sizes := []int{o.BootMiB, o.RootfsMiB, o.RootfsMiB, o.DataMiB}
	names := []string{"boot", "rootfsa", "rootfsb", "data"}
	if o.Table == "gpt" {
		script.WriteString("label: gpt\nunit: sectors\n")
	} else {
		script.WriteString("label: dos\nunit: sectors\n")
	}
	start := int64(2048)
	for i, s := range sizes {
		typ := "83"
		if o.Table == "gpt" {
			typ = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
			if i == 0 {
				typ = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
			}
			fmt.Fprintf(&script, "start=%d, size=%d, type=%s, name=%q\n", start, int64(s)*mib/512, typ, names[i])
		} else {
			if i == 0 {
				typ = map[int]string{12: "1", 16: "e", 32: "c"}[o.BootFAT]
			}
			fmt.Fprintf(&script, "start=%d, size=%d, type=%s\n", start, int64(s)*mib/512, typ)
		}
		start += int64(s) * mib / 512
	}
	if err := run(ctx, strings.NewReader(script.String()), "sfdisk", "--no-reread", "--no-tell-kernel", "-q", path); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "golden-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	offsets := make([]int64, len(sizes))
	off := int64(2048 * 512)
	for i, s := range sizes {
		offsets[i] = off
		off += int64(s) * mib
	}
	// boot: FAT with a couple of files.
	fatArgs := []string{"-F", strconv.Itoa(o.BootFAT), "-n", "BOOT", "--offset", strconv.FormatInt(offsets[0]/512, 10)}
	if o.BootFAT == 32 {
		fatArgs = append(fatArgs, "-s", "1")
	}
	if err := run(ctx, nil, "mkfs.fat", append(fatArgs, path, strconv.Itoa(o.BootMiB*1024))...); err != nil {
		return err
	}
	cmdline := filepath.Join(tmp, "cmdline.txt")
	os.WriteFile(cmdline, []byte("console=serial0,115200 root=/dev/mmcblk0p2 rootwait\n"), 0o644)
	if err := run(ctx, nil, "mcopy", "-i", fmt.Sprintf("%s@@%d", path, offsets[0]), cmdline, "::/cmdline.txt"); err != nil {
		return err
	}
	// rootfs A and B, data: ext4 with Debian's default features.
	for i := 1; i < 4; i++ {
		dir := filepath.Join(tmp, names[i])
		if err := populate(dir, names[i], o, i == 1); err != nil {
			return err
		}
		args := []string{"-q", "-F", "-t", o.ExtType, "-L", names[i], "-E", fmt.Sprintf("offset=%d,root_owner=0:0", offsets[i]), "-d", dir}
		if o.BlockSize != 0 {
			args = append(args, "-b", strconv.Itoa(o.BlockSize))
		}
		args = append(args, path, fmt.Sprintf("%dk", sizes[i]*1024))
		err := run(ctx, nil, "mke2fs", args...)
		// A filled data partition: shrink the filler until it fits, leaving less room than any identity needs.
		for tries := 0; err != nil && names[i] == "data" && o.FillData && tries < 200; tries++ {
			filler := filepath.Join(dir, "filler.bin")
			st, serr := os.Stat(filler)
			if serr != nil || st.Size() < fillerStep {
				break
			}
			os.Truncate(filler, st.Size()-fillerStep)
			err = run(ctx, nil, "mke2fs", args...)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func populate(dir, name string, o Options, first bool) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	write := func(p string, data []byte, mode os.FileMode) error {
		p = filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		return os.WriteFile(p, data, mode)
	}
	switch name {
	case "rootfsa", "rootfsb":
		if err := write("etc/mender/mender.conf", []byte(o.MenderConf), 0o600); err != nil {
			return err
		}
		if err := write("etc/hostname", []byte("golden\n"), 0o644); err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Join(dir, "etc/certs"), 0o755); err != nil {
			return err
		}
		// As in Mender images: the rootfs points at the data partition, which the device mounts on /data.
		if err := os.MkdirAll(filepath.Join(dir, "var/lib"), 0o755); err != nil {
			return err
		}
		if err := os.Symlink("/data/mender", filepath.Join(dir, "var/lib/mender")); err != nil {
			return err
		}
		if o.FillRootfs > 0 {
			payload := make([]byte, o.FillRootfs*mib)
			rand.NewChaCha8([32]byte{byte(len(name))}).Read(payload)
			if err := write("usr/lib/payload.bin", payload, 0o644); err != nil {
				return err
			}
		}
		if first && o.ManyFiles > 0 {
			for i := 0; i < o.ManyFiles; i++ {
				if err := write(fmt.Sprintf("etc/many/entry-with-a-long-name-%06d.conf", i), []byte("x\n"), 0o644); err != nil {
					return err
				}
			}
		}
	case "data":
		if err := os.MkdirAll(filepath.Join(dir, "mender"), 0o755); err != nil {
			return err
		}
		if o.FillData {
			// Start near the partition size; Build shrinks it until mke2fs fits it (see fillerStep).
			fill := int64(o.DataMiB) * mib
			if err := write("filler.bin", bytes.Repeat([]byte{0xa5}, int(fill)), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func run(ctx context.Context, stdin *strings.Reader, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = stdin
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	return nil
}
