package handshake

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"provision/internal/testutil"
)

// A server that verifies our certificate and then closes the connection cleanly has accepted it: in TLS 1.3 a
// rejection is an alert, and a close without one is no complaint.
func TestServerClosesAfterHandshake(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	c := client(t, ca, testutil.ECKey(), "device-1")
	sk := testutil.ECKey()
	cert := tls.Certificate{Certificate: [][]byte{ca.Issue(t, sk.Public(), "server", true, "127.0.0.1").Raw, ca.Issuing.Raw}, PrivateKey: sk}
	// close_notify after a good handshake; the alert after a failed one
	closeAfter := func(c *tls.Conn) { c.Handshake() }
	ep := tlsServer(t, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()}, closeAfter)
	res, err := Test(context.Background(), ep, ca.Pool(), c)
	if err != nil {
		t.Fatalf("a server that accepted and closed: %v", err)
	}
	if !strings.Contains(res.Detail, "closed the connection without complaint") {
		t.Fatalf("detail %q", res.Detail)
	}
	// A server that resets the connection after the handshake, without an alert: counted as a rejection.
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	go func() {
		for {
			conn, err := raw.Accept()
			if err != nil {
				return
			}
			tc := tls.Server(conn, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()})
			tc.Handshake()
			conn.(*net.TCPConn).SetLinger(0) // RST, no close_notify
			conn.Close()
		}
	}()
	_, err = Test(context.Background(), "tls://"+raw.Addr().String(), ca.Pool(), c)
	wantReason(t, err, ErrClientRejected)
	if !strings.Contains(err.Error(), "reset the connection") {
		t.Errorf("reset: %v", err)
	}
	// The same server trusting another CA sends an alert: a rejection.
	ep = tlsServer(t, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: testutil.NewCA(t, "other").Pool()}, closeAfter)
	_, err = Test(context.Background(), ep, ca.Pool(), c)
	wantReason(t, err, ErrClientRejected)
}

// A name that does not resolve is a DNS problem, not cabling.
func TestUnresolvableHost(t *testing.T) {
	ca := testutil.NewCA(t, "station")
	c := client(t, ca, testutil.ECKey(), "device-1")
	for _, ep := range []string{"tls://no-such-host.invalid:8883", "mqtts://no-such-host.invalid:8883", "https://no-such-host.invalid/"} {
		_, err := Test(context.Background(), ep, ca.Pool(), c, WithTimeout(5*time.Second))
		wantReason(t, err, ErrNameNotResolved)
		if !strings.Contains(err.Error(), "cannot resolve host no-such-host.invalid") ||
			!strings.Contains(err.Error(), "(check the endpoint's host name or the station's DNS)") {
			t.Errorf("%s: %v", ep, err)
		}
		if strings.Contains(err.Error(), "cabling") {
			t.Errorf("%s: a DNS failure blamed on cabling: %v", ep, err)
		}
	}
}
