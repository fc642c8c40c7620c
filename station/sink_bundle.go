package station

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"provision/inventory"
	"provision/station/ca"
	"provision/tpm"
)

// bundleSink delivers a unit's identity as an enroll bundle, OutDir/<serial>/ (device.crt, chain.crt, ca.crt and the
// key file), swapped in atomically. Enroll syncs a group's bundles at once and records them afterwards.
type bundleSink struct{ out string }

func (b *bundleSink) preflight(ctx context.Context, r *run) error { return nil }

func (b *bundleSink) deliver(ctx context.Context, r *run) (string, error) {
	if r.keyPEM == nil || r.res.Certificate == nil {
		return "", errors.New("no key file or certificate to write")
	}
	dir, err := writeBundle(b.out, r, r.s.CA)
	if err != nil {
		return "", err
	}
	r.bundle = dir
	return dir, nil
}

// check: a bundle is checked by whoever installs it; enroll's table has no verify step.
func (b *bundleSink) check(ctx context.Context, r *run) (string, error) {
	return "", errors.New("bundles are not verified by the station")
}

// reload: an enroll never resumes from a bundle (the key is not kept); it starts over.
func (b *bundleSink) reload(ctx context.Context, r *run) bool { return false }

// refuse refuses a unit whose active certificate was delivered (its bundle written: certified with a "bundle ok"
// entry last; or imaged and later), unless reprovisioning. A unit that is new, keyed or failed, or certified by a run
// interrupted before its bundle was durable, is enrolled again (a new key; the undelivered certificate is superseded).
func (b *bundleSink) refuse(ctx context.Context, r *run, unit inventory.Unit) error {
	switch unit.State {
	case inventory.StateNew, inventory.StateKeyed, inventory.StateFailed:
		return nil
	}
	cert, err := r.s.Inv.ActiveCertificate(ctx, unit.Serial)
	if errors.Is(err, inventory.ErrNotFound) || r.req.Reprovision {
		return nil
	}
	if err != nil {
		return err
	}
	if unit.State == inventory.StateCertified {
		evs, err := r.s.Inv.Events(ctx, unit.Serial)
		if err != nil {
			return err
		}
		if n := len(evs); n == 0 || evs[n-1].Step != string(StepBundle) || evs[n-1].Outcome != "ok" || evs[n-1].CertSHA256 != cert.SHA256 {
			return nil // never delivered: start over
		}
	}
	return fmt.Errorf("unit %s is %s and holds active certificate %s (expires %s): use --reprovision to replace it: %w",
		unit.Serial, unit.State, cert.Serial, cert.NotAfter.Format(time.DateOnly), ErrRefused)
}

const tempPrefix = ".provision-tmp-"

// writeBundle writes OutDir/<serial>/ through a temp directory and an atomic swap, so no half bundle ever carries the
// final name. The caller syncs the file system afterwards.
func writeBundle(outDir string, r *run, c *ca.CA) (string, error) {
	final := filepath.Join(outDir, r.req.Serial)
	tmp, err := os.MkdirTemp(outDir, tempPrefix+r.req.Serial+"-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) // after a swap it holds the old bundle
	files := []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{BundleCert, ca.EncodeCerts(r.res.Certificate), 0o644},
		{BundleChain, ca.EncodeCerts(c.Chain()...), 0o644},
		{BundleRoot, ca.EncodeCerts(c.Root), 0o644},
		{r.keyFile, r.keyPEM, 0o600},
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(tmp, f.name), f.data, f.mode); err != nil {
			return "", err
		}
	}
	dirMode := os.FileMode(0o755)
	if r.keyKind == tpm.KindSoft {
		dirMode = 0o700 // it holds a plain private key
	}
	if err := os.Chmod(tmp, dirMode); err != nil {
		return "", err
	}
	if err := installDir(tmp, final); err != nil {
		return "", fmt.Errorf("bundle: %w", err)
	}
	return final, nil
}

// installDir puts a directory written under a temporary name in place as final: exchanged atomically with an existing
// final (the old one is left under the temporary name, for the caller to remove), or renamed when there is none.
func installDir(tmp, final string) error {
	err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, final, unix.RENAME_EXCHANGE)
	if errors.Is(err, unix.ENOENT) {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		return fmt.Errorf("install %s: %w", final, err)
	}
	return nil
}

func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// removeStaleTemps deletes temp bundle directories that an interrupted run left (they may hold a software key).
func removeStaleTemps(outDir string) {
	entries, err := os.ReadDir(outDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), tempPrefix) {
			os.RemoveAll(filepath.Join(outDir, e.Name()))
		}
	}
}
