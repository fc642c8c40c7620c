package station

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"provision/internal/fsutil"
	"provision/inventory"
)

// Modes of what a batch writes: the images hold the units' keys (software keys in the clear).
const (
	OutDirMode = 0o700
	ImageMode  = 0o600
)

// PrepareOutDir creates the batch output directory 0700, or makes an existing one 0700 when group or others could
// enter it; was is its mode before when it changed (0 when it did not).
func PrepareOutDir(dir string) (was fs.FileMode, err error) {
	if err := os.MkdirAll(dir, OutDirMode); err != nil {
		return 0, fmt.Errorf("output directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, fmt.Errorf("output directory: %w", err)
	}
	if !fi.IsDir() {
		return 0, fmt.Errorf("output directory %s is not a directory", dir)
	}
	if fi.Mode().Perm() == OutDirMode {
		return 0, nil
	}
	if err := os.Chmod(dir, OutDirMode); err != nil {
		return 0, fmt.Errorf("output directory %s is %04o and cannot be made private (it will hold device keys): %w", dir, fi.Mode().Perm(), err)
	}
	return fi.Mode().Perm(), nil
}

// privateImage makes a regular image file 0600 when it is more open (an image from an earlier version, or a --targets
// image): it holds, or is about to hold, a device key. Block devices are left as the system set them.
func privateImage(p string) error {
	fi, err := os.Stat(p)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&^ImageMode == 0 {
		return nil
	}
	if err := os.Chmod(p, ImageMode); err != nil {
		return fmt.Errorf("image %s is %04o and cannot be made private (it holds a device key): %w", p, fi.Mode().Perm(), err)
	}
	return nil
}

// publish renames a finished image to its final name, durably. Provision already synced the image's content.
func publish(partial, final string) error {
	if err := os.Rename(partial, final); err != nil {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(final))
}

// CloneImage copies src to a new file dst, mode 0600 whatever src's mode (the copy will hold a device key): a reflink
// where the file system shares blocks (btrfs, XFS), otherwise a sparse copy of only the data regions (SEEK_DATA /
// SEEK_HOLE, copy_file_range), never reading or writing the holes. Cancelling ctx stops the copy and removes dst.
func CloneImage(ctx context.Context, src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", src)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, ImageMode)
	if err != nil {
		return err
	}
	err = out.Chmod(ImageMode) // whatever the umask
	if err == nil {
		err = cloneInto(ctx, in, out, st.Size())
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

func cloneInto(ctx context.Context, in, out *os.File, size int64) error {
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	ifd, ofd := int(in.Fd()), int(out.Fd())
	var off int64
	for off < size {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		src, dst := data, data
		for src < hole {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := unix.CopyFileRange(ifd, &src, ofd, &dst, int(min(hole-src, 64<<20)), 0)
			if err != nil {
				return fmt.Errorf("copy_file_range: %w", err)
			}
			if n == 0 {
				return io.ErrUnexpectedEOF
			}
		}
		off = hole
	}
	return nil
}

// ImageSHA256 is the SHA-256 of a whole image file, lowercase hex.
func ImageSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// RemoveStalePartials deletes <serial>.img.partial files of units that are not shippable: images an interrupted run
// left unfinished (they are rebuilt from the golden image). Call it only while holding the directory's lock.
func (s *Station) RemoveStalePartials(ctx context.Context, outDir string) {
	entries, err := os.ReadDir(outDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if e.Type()&fs.ModeType != 0 || !strings.HasSuffix(name, ".img.partial") {
			continue
		}
		serial := name[:len(name)-len(".img.partial")]
		if u, err := s.Inv.Unit(ctx, serial); err == nil && u.State == inventory.StateShippable {
			continue
		}
		os.Remove(filepath.Join(outDir, name))
	}
}
