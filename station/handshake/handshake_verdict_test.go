package handshake

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
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

func TestTLSWithOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	station := testutil.NewCA(t, "station")
	dir := t.TempDir()
	serverFiles(t, station, dir)
	other := testutil.NewCA(t, "someone else")
	testutil.WritePEM(t, filepath.Join(dir, "other.crt"), other.Root, other.Issuing)
	testutil.WritePEM(t, filepath.Join(dir, "issuing.crt"), station.Issuing) // sent by the server, whatever its -CAfile
	// start runs s_server for one connection, verifying client certificates against cafile. With closeAfter it ends the
	// connection cleanly (close_notify) once it has finished the handshake: its stdin, held open until then, reaches
	// EOF and -no_ign_eof makes that the end. Otherwise it stays silent.
	start := func(cafile string, closeAfter bool) string {
		port := testutil.FreePort(t)
		cmd := exec.Command("openssl", "s_server", "-accept", fmt.Sprint(port), "-cert", filepath.Join(dir, "srv.crt"),
			"-key", filepath.Join(dir, "srv.key"), "-cert_chain", filepath.Join(dir, "issuing.crt"), "-tls1_3", "-Verify", "1", "-verify_return_error",
			"-CAfile", filepath.Join(dir, cafile), "-naccept", "1", "-no_ign_eof")
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
		listening := make(chan struct{})
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				switch {
				case sc.Text() == "ACCEPT": // listening (a probe connection would use up -naccept 1)
					close(listening)
				case closeAfter && strings.HasPrefix(sc.Text(), "CIPHER is"): // printed once the handshake is done
					stdin.Close()
				}
			}
		}()
		select {
		case <-listening:
		case <-time.After(10 * time.Second):
			t.Fatal("openssl s_server did not start")
		}
		return fmt.Sprintf("tls://127.0.0.1:%d", port)
	}
	c := client(t, station, testutil.ECKey(), "device-1")
	res, err := Test(context.Background(), start("ca.crt", true), station.Pool(), c)
	if err != nil {
		t.Fatalf("s_server that verified us and closed: %v", err)
	}
	if !strings.Contains(res.Detail, "closed the connection without complaint") {
		t.Fatalf("detail %q", res.Detail)
	}
	res, err = Test(context.Background(), start("ca.crt", false), station.Pool(), c)
	if err != nil {
		t.Fatalf("s_server that verified us and waits: %v", err)
	}
	if !strings.Contains(res.Detail, "no alert") {
		t.Fatalf("detail %q", res.Detail)
	}
	for _, closeAfter := range []bool{true, false} {
		_, err = Test(context.Background(), start("other.crt", closeAfter), station.Pool(), c)
		wantReason(t, err, ErrClientRejected)
		if !strings.Contains(err.Error(), "alert") {
			t.Errorf("rejection without the server's alert: %v", err)
		}
	}
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
