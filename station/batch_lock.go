package station

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrOutDirBusy: another batch is using the output directory.
var ErrOutDirBusy = errors.New("in use by another batch")

// OutDirBusyError names the batch that holds an output directory.
type OutDirBusyError struct {
	Dir    string
	Holder string // "pid N on HOST since TIME", as the holder wrote it; empty when unreadable
}

func (e *OutDirBusyError) Error() string {
	holder := e.Holder
	if holder == "" {
		holder = "its lock file is held"
	}
	return fmt.Sprintf("output directory %s is %v (%s): wait for that batch to finish or use another output directory",
		e.Dir, ErrOutDirBusy, holder)
}

func (e *OutDirBusyError) Unwrap() error { return ErrOutDirBusy }

// OutDirLockName is the lock file a batch holds in its output directory.
const OutDirLockName = ".batch.lock"

// OutDirLock is a batch's hold on its output directory.
type OutDirLock struct{ f *os.File }

// LockOutDir takes the output directory for one batch: an exclusive flock on dir/.batch.lock, which the kernel
// releases when the holder exits, however it exits. A second batch gets an *OutDirBusyError naming the holder.
func LockOutDir(dir string) (*OutDirLock, error) {
	p := filepath.Join(dir, OutDirLockName)
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("output directory lock %s: %w", p, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			b, _ := io.ReadAll(io.LimitReader(f, 256))
			return nil, &OutDirBusyError{Dir: dir, Holder: strings.TrimSpace(string(b))}
		}
		return nil, fmt.Errorf("output directory lock %s: %w", p, err)
	}
	host, _ := os.Hostname()
	who := fmt.Sprintf("pid %d on %s since %s\n", os.Getpid(), host, time.Now().UTC().Format(time.RFC3339))
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(who), 0) // who holds it, for the message of a batch that finds it busy
	}
	return &OutDirLock{f: f}, nil
}

// Release lets the next batch use the directory. The lock file stays (removing it would race a batch opening it).
func (l *OutDirLock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.f.Truncate(0)
	err := l.f.Close() // closing the last descriptor releases the flock
	l.f = nil
	return err
}
