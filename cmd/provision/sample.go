package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"provision/image/golden"
)

func newSampleImageCmd(g *globals) *cobra.Command {
	var o golden.Options
	c := &cobra.Command{
		Use:   "sample-image PATH [--table mbr|gpt]",
		Short: "Write a sample golden image (Mender layout: boot FAT32, rootfs A/B ext4, data ext4) to try the station on",
		Long: `sample-image writes a sparse Mender-style disk image without root: partition 1 boot (FAT32, label BOOT),
2 and 3 rootfs A and B (ext4, labels rootfsa/rootfsb, each with /etc/mender/mender.conf), 4 data (ext4, label data).
Needs sfdisk, mke2fs, mkfs.fat and mcopy (make deps installs them).`,
		Annotations: map[string]string{noStation: "writes an image, needs no station"},
		Args: func(c *cobra.Command, args []string) error {
			if len(args) != 1 {
				return usagef("sample-image: give the output path")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.Table != "mbr" && o.Table != "gpt" {
				return usagef("sample-image: --table %q: use mbr or gpt", o.Table)
			}
			if err := golden.Build(cmd.Context(), args[0], o); err != nil {
				return fmt.Errorf("sample-image: %w", err)
			}
			fmt.Fprintf(g.stdout, "%s: %s table, boot FAT32 %d MiB, rootfs A/B ext4 %d MiB, data ext4 %d MiB (sparse)\n",
				args[0], o.Table, max(o.BootMiB, 64), max(o.RootfsMiB, 64), max(o.DataMiB, 32))
			return nil
		},
	}
	c.Flags().StringVar(&o.Table, "table", "mbr", "partition table: mbr or gpt")
	c.Flags().IntVar(&o.RootfsMiB, "rootfs-mib", 0, "size of each root file system (default 64)")
	c.Flags().IntVar(&o.DataMiB, "data-mib", 0, "size of the data partition (default 32)")
	c.Flags().IntVar(&o.FillRootfs, "fill-mib", 0, "MiB of data in each root file system, as a real OS image has (grows them to fit)")
	return c
}
