package station

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// ErrOutsideStation: station.yaml names a file outside the station directory (an absolute path, "..", or a symlink
// that leaves it), or a CA key.
var ErrOutsideStation = errors.New("outside the station directory")

// StationFile resolves a file that station.yaml names (server_ca, endpoint_ca, template:, tpm_roots) to a path inside
// the station directory. A name that is absolute, climbs out with "..", resolves through a symlink to somewhere outside,
// or names one of the station's CA keys is refused with ErrOutsideStation and ErrConfig: a profile must never be able to
// pull the station's secrets or the host's files into an image.
func (l Layout) StationFile(field, name string) (string, error) {
	fail := func(why string) (string, error) {
		return "", fmt.Errorf("%s %q: %s: files named in station.yaml must be relative paths inside the station directory %s: %w: %w",
			field, name, why, l.Dir, ErrOutsideStation, ErrConfig)
	}
	if name == "" {
		return fail("empty")
	}
	if filepath.IsAbs(name) {
		return fail("absolute path")
	}
	clean := filepath.Clean(name)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return fail("climbs out with ..")
	}
	dir, err := filepath.EvalSymlinks(l.Dir)
	if err != nil {
		dir = filepath.Clean(l.Dir)
	}
	p := filepath.Join(dir, clean)
	if real, err := filepath.EvalSymlinks(p); err == nil {
		rel, err := filepath.Rel(dir, real)
		if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
			return fail("a symlink that leaves the station directory")
		}
		p = real
	}
	for _, secret := range []string{l.IssuingKey(), l.RootKey(), l.AuditKey()} {
		s, err := filepath.EvalSymlinks(secret)
		if err != nil {
			s = secret
		}
		if p == s || p == filepath.Clean(secret) {
			return fail("a CA or audit key is never a source")
		}
	}
	return p, nil
}
