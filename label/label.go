// Package label owns the unit's label: its QR payload (P1/<serial>/<certificate sha256>), the label rendered as ZPL for
// thermal printers and as PNG for any printer, and the printers a label goes to (a file, lpr, raw TCP 9100). It imports
// no other provision package: the caller reads the serial and the certificate fingerprint from the inventory.
package label

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Prefix starts every label payload: version 1 of the payload. The TUI never takes a scan that starts with it for a
// serial.
const Prefix = "P1/"

// MaxSerialLen bounds a serial on a label (the station's own limit).
const MaxSerialLen = 128

// ErrPayload marks a scanned value that is not a well-formed label payload.
var ErrPayload = errors.New("not a label code")

// Label is what one unit's label shows.
type Label struct {
	Serial     string
	CertSHA256 string    // the unit's active certificate, lowercase hex SHA-256 of its DER
	Date       time.Time // printed as YYYY-MM-DD in its own location
	Station    string    // optional: the station that made the unit
	Title      string    // optional: a product name above the serial
}

// Format is a label's encoding.
type Format string

// The formats.
const (
	ZPL Format = "zpl" // Zebra Programming Language, for thermal printers (2"×1" at 203 dpi)
	PNG Format = "png" // an image for any printer (2"×1" at 300 dpi)
)

// ParseFormat checks a format name.
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case ZPL, PNG:
		return f, nil
	}
	return "", fmt.Errorf("label: format %q: use zpl or png", s)
}

// Payload is the QR code's content: P1/<serial>/<certificate sha256>.
func Payload(serial, sha string) string { return Prefix + serial + "/" + sha }

// ParsePayload splits a scanned payload. It is strict: the P1/ prefix, a serial (non-empty, at most MaxSerialLen
// bytes of UTF-8, no '/', '\', space or control character), and a SHA-256 as 64 lowercase hex digits.
func ParsePayload(s string) (serial, sha string, err error) {
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return "", "", fmt.Errorf("%q does not start with %s: %w", s, Prefix, ErrPayload)
	}
	i := strings.LastIndexByte(rest, '/')
	if i < 0 {
		return "", "", fmt.Errorf("%q has no certificate fingerprint: %w", s, ErrPayload)
	}
	serial, sha = rest[:i], rest[i+1:]
	if reason := badSerial(serial); reason != "" {
		return "", "", fmt.Errorf("%q: serial %s: %w", s, reason, ErrPayload)
	}
	if !isSHA256(sha) {
		return "", "", fmt.Errorf("%q: the certificate fingerprint is not 64 lowercase hex digits: %w", s, ErrPayload)
	}
	return serial, sha, nil
}

// Validate checks that the label can be printed and scanned back.
func (l Label) Validate() error {
	if reason := badSerial(l.Serial); reason != "" {
		return fmt.Errorf("label: serial %q %s", l.Serial, reason)
	}
	if !isSHA256(l.CertSHA256) {
		return fmt.Errorf("label: certificate fingerprint %q is not 64 lowercase hex digits", l.CertSHA256)
	}
	for _, s := range []string{l.Station, l.Title} {
		if !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl) {
			return fmt.Errorf("label: %q: not printable text", s)
		}
	}
	return nil
}

// Payload is the label's QR content.
func (l Label) Payload() string { return Payload(l.Serial, l.CertSHA256) }

// Render encodes the label in format f.
func (l Label) Render(f Format) ([]byte, error) {
	if err := l.Validate(); err != nil {
		return nil, err
	}
	switch f {
	case ZPL:
		return l.zpl(), nil
	case PNG:
		return l.png()
	}
	return nil, fmt.Errorf("label: format %q: use zpl or png", f)
}

func (l Label) date() string {
	if l.Date.IsZero() {
		return ""
	}
	return l.Date.Format("2006-01-02")
}

// badSerial is the station's serial safety rule (station.unsafeSerial) as far as a label needs it; a leaf package
// cannot import station, so it is restated here.
func badSerial(s string) string {
	switch {
	case s == "":
		return "is empty"
	case len(s) > MaxSerialLen:
		return fmt.Sprintf("is longer than %d bytes", MaxSerialLen)
	case !utf8.ValidString(s):
		return "is not valid UTF-8"
	}
	for _, c := range s {
		if c == '/' || c == '\\' || unicode.IsSpace(c) || unicode.IsControl(c) || c == utf8.RuneError {
			return fmt.Sprintf("contains %q", c)
		}
	}
	return ""
}

func isSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}
