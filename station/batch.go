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
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"provision/inventory"
	"provision/tpm"
)

// BatchUnit is one unit of a batch: cloned from a golden image (Target empty) or personalised in place (Target set).
type BatchUnit struct {
	UnitRequest
	Target string // an existing per-unit image or block device (--targets)
}

// BatchOptions configure Batch.
type BatchOptions struct {
	Golden    string // cloned per unit to OutDir/<serial>.img
	OutDir    string
	Workers   int
	Profile   string
	Handshake HandshakeConfig // Station.HandshakeConfig, as unit and tui use it
	FailFast  bool
	Hash      bool // SHA-256 of every finished image (reads it whole)
	Operator  string
}

// BatchResult is one unit's outcome.
type BatchResult struct {
	Serial   string
	Status   string // "ok", "failed", "skipped"
	Image    string
	SHA256   string
	Result   Result
	Err      error
	Duration time.Duration
}

// Batch provisions units with a pool of workers, calling report as each finishes. A unit already shippable whose image
// is in place is skipped; a failed or interrupted one is resumed. A cloned image is written as <serial>.img.partial,
// synced, and renamed to <serial>.img only once the unit is shippable. The golden image is only ever read.
// Cancelling ctx stops taking new units; running ones stop between steps, resumable.
func (s *Station) Batch(ctx context.Context, dev *tpm.Device, units []BatchUnit, opt BatchOptions, report func(BatchResult)) []BatchResult {
	if opt.Workers < 1 {
		opt.Workers = 1
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make([]BatchResult, len(units))
	jobs := make(chan int)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < opt.Workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				r := s.batchUnit(ctx, dev, units[i], opt)
				mu.Lock()
				results[i] = r
				if report != nil {
					report(r)
				}
				mu.Unlock()
				if r.Status == "failed" && opt.FailFast {
					cancel()
				}
			}
		}()
	}
feed:
	for i := range units {
		select {
		case jobs <- i:
		case <-ctx.Done():
			for j := i; j < len(units); j++ {
				results[j] = BatchResult{Serial: units[j].Serial, Status: "skipped", Err: ctx.Err()}
			}
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	return results
}

func (s *Station) batchUnit(ctx context.Context, dev *tpm.Device, u BatchUnit, opt BatchOptions) BatchResult {
	start := time.Now()
	r := BatchResult{Serial: u.Serial}
	done := func(status string, err error) BatchResult {
		r.Status, r.Err, r.Duration = status, err, time.Since(start)
		if err == nil && opt.Hash && r.Image != "" {
			r.SHA256, r.Err = fileSHA256(r.Image)
			if r.Err != nil {
				r.Status = "failed"
			}
		}
		return r
	}
	if err := ctx.Err(); err != nil {
		return done("skipped", err)
	}
	unit, uerr := s.Inv.Unit(ctx, u.Serial)
	shippable := uerr == nil && unit.State == inventory.StateShippable
	if u.Target != "" {
		r.Image = u.Target
		if shippable {
			return done("skipped", nil)
		}
		res, err := s.Provision(ctx, dev, ProvisionRequest{Serial: u.Serial, Fields: u.Fields, Image: u.Target, Profile: opt.Profile,
			Handshake: opt.Handshake, Operator: opt.Operator}, nil)
		r.Result = res
		if err != nil {
			return done("failed", err)
		}
		return done("ok", nil)
	}
	final := filepath.Join(opt.OutDir, u.Serial+".img")
	partial := final + ".partial"
	r.Image = final
	if shippable {
		if _, err := os.Stat(final); err == nil {
			return done("skipped", nil)
		}
		// Shippable but not renamed: the run stopped between the two. The partial image passed; check it again, then
		// finish the rename.
		if _, err := os.Stat(partial); err == nil {
			if _, err := s.VerifyImage(ctx, partial, u.Serial, VerifyOptions{Profile: opt.Profile}); err == nil {
				return done("ok", publish(partial, final))
			}
		}
	}
	os.Remove(partial)
	if err := CloneImage(opt.Golden, partial); err != nil {
		os.Remove(partial)
		return done("failed", fmt.Errorf("clone %s: %w", opt.Golden, err))
	}
	res, err := s.Provision(ctx, dev, ProvisionRequest{Serial: u.Serial, Fields: u.Fields, Image: partial, Profile: opt.Profile,
		Handshake: opt.Handshake, Operator: opt.Operator, Reprovision: shippable}, nil)
	r.Result = res
	if err != nil {
		os.Remove(partial)
		return done("failed", err)
	}
	return done("ok", publish(partial, final))
}

// publish renames a finished image to its final name, durably. Provision already synced the image's content.
func publish(partial, final string) error {
	if err := os.Rename(partial, final); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(final))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// CloneImage copies src to a new file dst: a reflink where the file system shares blocks (btrfs, XFS), otherwise a
// sparse copy of only the data regions (SEEK_DATA/SEEK_HOLE, copy_file_range), never reading or writing the holes.
func CloneImage(src, dst string) error {
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
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return err
	}
	err = cloneInto(in, out, st.Size())
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return err
}

func cloneInto(in, out *os.File, size int64) error {
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
			n, err := unix.CopyFileRange(ifd, &src, ofd, &dst, int(min(hole-src, 1<<30)), 0)
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

func fileSHA256(p string) (string, error) {
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
// left unfinished (they are rebuilt from the golden image).
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
