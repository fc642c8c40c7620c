package tpm

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
)

// URIForms names the TPM URI forms in words, for messages that say what to use instead.
const URIForms = "/dev/tpmrm0, mssim://HOST:PORT, sim or soft"

// Kinds of TPM URI.
const (
	URISoft   = "soft"   // the software fallback: no TPM
	URISim    = "sim"    // the in-process simulator (WithSimulator)
	URIMssim  = "mssim"  // a TPM speaking the TCP simulator protocol (swtpm, Microsoft's simulator, a forwarded TPM)
	URIDevice = "device" // a TPM character device (/dev/tpmrm0)
)

// URI is a TPM URI taken apart.
type URI struct {
	Kind string // one of the URI* kinds
	Addr string // mssim: HOST:PORT; device: the path; empty otherwise
}

// ParseURI checks s against the TPM URI grammar (docs/station.md), the one Open takes: soft, sim, mssim://HOST:PORT
// (PORT 1 to 65534: PORT+1 is the simulator's control port) or an absolute, clean device path. Errors wrap ErrBadURI.
func ParseURI(s string) (URI, error) {
	switch {
	case s == "soft":
		return URI{Kind: URISoft}, nil
	case s == "sim":
		return URI{Kind: URISim}, nil
	case strings.HasPrefix(s, "mssim://"):
		addr := strings.TrimPrefix(s, "mssim://")
		host, port, serr := net.SplitHostPort(addr)
		if p, perr := strconv.Atoi(port); serr != nil || perr != nil || host == "" || p <= 0 || p > 65534 {
			return URI{}, fmt.Errorf("tpm: %q: want mssim://HOST:PORT: %w", s, ErrBadURI)
		}
		return URI{Kind: URIMssim, Addr: addr}, nil
	case filepath.IsAbs(s) && filepath.Clean(s) == s:
		return URI{Kind: URIDevice, Addr: s}, nil
	}
	return URI{}, fmt.Errorf("tpm: %q: use %s: %w", s, URIForms, ErrBadURI)
}

// ValidURI reports whether s is a TPM URI (ParseURI takes it).
func ValidURI(s string) bool {
	_, err := ParseURI(s)
	return err == nil
}
