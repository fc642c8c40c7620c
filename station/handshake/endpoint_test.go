package handshake

import (
	"errors"
	"strings"
	"testing"
)

func TestParseEndpoint(t *testing.T) {
	for _, tt := range []struct {
		in                       string
		scheme, host, port, addr string
		wantErr                  string // a part of the error; empty: accepted
	}{
		{in: "tls://127.0.0.1:8443", scheme: "tls", host: "127.0.0.1", port: "8443", addr: "127.0.0.1:8443"},
		{in: "mqtts://broker.example:8883", scheme: "mqtts", host: "broker.example", port: "8883", addr: "broker.example:8883"},
		{in: "https://api.example/enroll", scheme: "https", host: "api.example", port: "443", addr: "api.example:443"},
		{in: "https://[::1]:9443/x", scheme: "https", host: "::1", port: "9443", addr: "[::1]:9443"},
		{in: "mqtts://broker.example", wantErr: `endpoint "mqtts://broker.example" has no port (mqtts brokers listen on 8883): ` + Forms},
		{in: "tls://nohost", wantErr: "has no port"},
		{in: "ftp://x:1", wantErr: `endpoint "ftp://x:1": scheme "ftp": ` + Forms},
		{in: "tls://h:99999", wantErr: `endpoint "tls://h:99999": port "99999": ` + Forms},
		{in: "tls://h:port", wantErr: `endpoint "tls://h:port": ` + Forms},
		{in: "tls://:1", wantErr: `endpoint "tls://:1": ` + Forms},
		{in: "::", wantErr: Forms},
		{in: "", wantErr: Forms},
	} {
		e, err := ParseEndpoint(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.Is(err, ErrBadEndpoint) {
				t.Errorf("ParseEndpoint(%q) = %v, want an ErrBadEndpoint containing %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || e.Scheme != tt.scheme || e.Host != tt.host || e.Port != tt.port || e.Addr() != tt.addr || e.URL == nil {
			t.Errorf("ParseEndpoint(%q) = %+v (addr %s), %v; want %s %s %s", tt.in, e, e.Addr(), err, tt.scheme, tt.host, tt.port)
		}
	}
}

func FuzzParseEndpoint(f *testing.F) {
	for _, s := range []string{"tls://127.0.0.1:8443", "mqtts://broker:8883", "https://h/p", "mqtts://h", "ftp://x:1", "tls://:1", "::"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		e, err := ParseEndpoint(s)
		if err != nil {
			var ee *EndpointError
			if !errors.As(err, &ee) || !errors.Is(err, ErrBadEndpoint) || ee.Endpoint != s {
				t.Fatalf("ParseEndpoint(%q): %v", s, err)
			}
			return
		}
		if e.Host == "" || e.Port == "" || (e.Scheme != "tls" && e.Scheme != "mqtts" && e.Scheme != "https") {
			t.Fatalf("ParseEndpoint(%q) = %+v", s, e)
		}
	})
}
