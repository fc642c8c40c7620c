package station

import (
	"bytes"
	"fmt"
	"os"

	"provision/station/profile"
)

// CheckStationPath refuses, from the text alone, a file name in station.yaml that cannot be inside the station
// directory: an absolute path or one that climbs out with "..". For load-time checks of server_ca, endpoint_ca and
// template:; symlinks and CA keys are refused when the file is read (Layout.StationFile, readStationSource).
func CheckStationPath(field, name string) error {
	why := profile.OutsideDir(name)
	if why == "" {
		return nil
	}
	return fmt.Errorf("%s %q: %s: files named in station.yaml must be relative paths inside the station directory: %w: %w",
		field, name, why, ErrOutsideStation, ErrConfig)
}

// readStationSource reads a file that station.yaml names as a source for images (template:, server_ca): inside the
// station directory only (Layout.StationFile), never one of the station's keys, not even through a hard link, and
// never a file holding a private key (key files come only from from: key).
func readStationSource(l Layout, field, name string) ([]byte, error) {
	p, err := l.StationFile(field, name)
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %w", field, name, err, ErrConfig)
	}
	for _, secret := range []string{l.IssuingKey(), l.RootKey(), l.AuditKey()} {
		if ss, err := os.Stat(secret); err == nil && os.SameFile(st, ss) {
			return nil, fmt.Errorf("%s %q: a hard link to a CA or audit key: a key is never a source: %w: %w", field, name, ErrOutsideStation, ErrConfig)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %w", field, name, err, ErrConfig)
	}
	if bytes.Contains(b, []byte("PRIVATE KEY-----")) {
		return nil, fmt.Errorf("%s %s holds a private key: images get key files only from from: key: %w", field, name, ErrConfig)
	}
	return b, nil
}

// ReadTemplate reads a profile's template:<file> (profile.Templates): a source for images, inside the station
// directory only (readStationSource).
func (l Layout) ReadTemplate(name string) ([]byte, error) {
	return readStationSource(l, "template", name)
}
