package handshake

import (
	"fmt"
	"net"
	"net/url"
)

// Forms says in words which endpoints Test takes.
const Forms = "use tls://host:port, mqtts://host:port or https://host[:port]/path"

// Endpoint is a handshake endpoint taken apart.
type Endpoint struct {
	URL    *url.URL
	Scheme string // "tls", "mqtts" or "https"
	Host   string // the host name or address (no brackets)
	Port   string // never empty: https defaults to 443
}

// Addr is host:port, to dial.
func (e Endpoint) Addr() string { return net.JoinHostPort(e.Host, e.Port) }

// EndpointError is an endpoint ParseEndpoint refuses. It wraps ErrBadEndpoint.
type EndpointError struct {
	Endpoint string
	Problem  string // what is wrong, e.g. `scheme "ftp"`; empty when it is not a URL with a host
	noPort   bool   // Problem is the missing port: "endpoint X has no port"
}

func (e *EndpointError) Error() string {
	switch {
	case e.Problem == "":
		return fmt.Sprintf("endpoint %q: %s", e.Endpoint, Forms)
	case e.noPort:
		return fmt.Sprintf("endpoint %q has %s: %s", e.Endpoint, e.Problem, Forms)
	}
	return fmt.Sprintf("endpoint %q: %s: %s", e.Endpoint, e.Problem, Forms)
}

func (e *EndpointError) Unwrap() error { return ErrBadEndpoint }

// ParseEndpoint checks an endpoint as Test takes it: a URL of one of the Forms with a host, and a port where the
// scheme has no default (https: 443) and within range. Its errors are *EndpointError.
func ParseEndpoint(s string) (Endpoint, error) {
	bad := func(problem string) (Endpoint, error) {
		return Endpoint{}, &EndpointError{Endpoint: s, Problem: problem}
	}
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Hostname() == "" {
		return bad("")
	}
	e := Endpoint{URL: u, Scheme: u.Scheme, Host: u.Hostname(), Port: u.Port()}
	switch u.Scheme {
	case "tls", "mqtts":
		if e.Port == "" {
			return Endpoint{}, &EndpointError{Endpoint: s, Problem: "no port (mqtts brokers listen on 8883)", noPort: true}
		}
	case "https":
		if e.Port == "" {
			e.Port = "443"
		}
	default:
		return bad(fmt.Sprintf("scheme %q", u.Scheme))
	}
	if _, err := net.LookupPort("tcp", e.Port); err != nil {
		return bad(fmt.Sprintf("port %q", e.Port))
	}
	return e, nil
}
