package tpm

import (
	"errors"
	"net"
	"path/filepath"
	"testing"
)

func TestParseURI(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want URI
		ok   bool
	}{
		{"soft", URI{Kind: URISoft}, true},
		{"sim", URI{Kind: URISim}, true},
		{"mssim://127.0.0.1:2321", URI{Kind: URIMssim, Addr: "127.0.0.1:2321"}, true},
		{"mssim://[::1]:2321", URI{Kind: URIMssim, Addr: "[::1]:2321"}, true},
		{"mssim://tpm.line4:65534", URI{Kind: URIMssim, Addr: "tpm.line4:65534"}, true},
		{"/dev/tpmrm0", URI{Kind: URIDevice, Addr: "/dev/tpmrm0"}, true},
		{"mssim://h:65535", URI{}, false}, // its control port would be 65536
		{"mssim://h:0", URI{}, false},
		{"mssim://:1", URI{}, false},
		{"mssim://nohostport", URI{}, false},
		{"mssim://h:port", URI{}, false},
		{"/dev/../dev/tpmrm0", URI{}, false},
		{"/dev/tpmrm0/", URI{}, false},
		{"relative/path", URI{}, false},
		{"tcp://x", URI{}, false},
		{"SIM", URI{}, false},
		{"", URI{}, false},
	} {
		got, err := ParseURI(tt.in)
		if got != tt.want || (err == nil) != tt.ok {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v, ok %v", tt.in, got, err, tt.want, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrBadURI) {
			t.Errorf("ParseURI(%q): %v does not wrap ErrBadURI", tt.in, err)
		}
		if ValidURI(tt.in) != tt.ok {
			t.Errorf("ValidURI(%q) = %v, want %v", tt.in, !tt.ok, tt.ok)
		}
	}
}

func FuzzParseURI(f *testing.F) {
	for _, s := range []string{"soft", "sim", "mssim://127.0.0.1:2321", "/dev/tpmrm0", "mssim://h:65535", "/dev/../x", "tcp://x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			if !errors.Is(err, ErrBadURI) || u != (URI{}) {
				t.Fatalf("ParseURI(%q) = %+v, %v", s, u, err)
			}
			return
		}
		switch u.Kind {
		case URISoft, URISim:
			if u.Addr != "" || s != u.Kind {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		case URIMssim:
			if host, _, err := net.SplitHostPort(u.Addr); err != nil || host == "" || "mssim://"+u.Addr != s {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		case URIDevice:
			if !filepath.IsAbs(u.Addr) || filepath.Clean(u.Addr) != u.Addr || u.Addr != s {
				t.Fatalf("ParseURI(%q) = %+v", s, u)
			}
		default:
			t.Fatalf("ParseURI(%q): kind %q", s, u.Kind)
		}
	})
}
