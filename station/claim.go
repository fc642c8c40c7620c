package station

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// claimDir holds one lock file per unit being provisioned on this station.
func (l Layout) claimDir() string { return filepath.Join(l.Dir, "claims") }

// claimUnit makes this run the only one on serial across every process of this station: a second run (another tui,
// unit or batch process, or another goroutine of this one) is refused with ErrRefused naming the holder. The claim is
// an flock(2) on <station>/claims/<serial>.lock, so the kernel releases it when its holder dies: a killed run's claim
// is taken over by the next run, with nothing to clean up. release removes the file and drops the lock.
func (s *Station) claimUnit(serial, operator string) (release func(), err error) {
	dir := s.Layout.claimDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("claim %s: %w", serial, err)
	}
	path := filepath.Join(dir, serial+".lock")
	for attempt := 0; attempt < 5; attempt++ {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("claim %s: %w", serial, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			holder, _ := os.ReadFile(path)
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				return nil, fmt.Errorf("%s is being provisioned by %s: wait for that run to finish, or stop it: %w",
					serial, describeHolder(holder), ErrRefused)
			}
			return nil, fmt.Errorf("claim %s: %w", serial, err)
		}
		// The holder before us may have removed the file between our open and our lock: then we hold a lock on a
		// name nobody else will open. Only a lock on the file the path names now counts.
		var held, named unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) != nil || unix.Stat(path, &named) != nil || held.Ino != named.Ino || held.Dev != named.Dev {
			f.Close()
			continue
		}
		host, _ := os.Hostname()
		info := fmt.Sprintf("pid %d on %s (operator %s, since %s)", os.Getpid(), host, operator, time.Now().Format("15:04:05"))
		f.Truncate(0)
		f.WriteAt([]byte(info), 0)
		return func() {
			os.Remove(path)
			f.Close()
		}, nil
	}
	return nil, fmt.Errorf("claim %s: the lock file keeps changing under %s: %w", serial, dir, syscall.EAGAIN)
}

func describeHolder(b []byte) string {
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "another run"
	}
	return s
}
