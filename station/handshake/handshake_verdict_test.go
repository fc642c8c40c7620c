package handshake

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"os"
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

// Tests against real servers: mosquitto and OpenSSL's s_server.

// serverFiles writes a server certificate for 127.0.0.1 from station with its issuing CA (srv.crt), its key (srv.key)
// and the station's chain (ca.crt) to dir.
func serverFiles(t *testing.T, station *testutil.CA, dir string) {
	t.Helper()
	sk := testutil.ECKey()
	testutil.WritePEM(t, filepath.Join(dir, "srv.crt"), station.Issue(t, sk.Public(), "server", true, "127.0.0.1"), station.Issuing)
	testutil.WritePEM(t, filepath.Join(dir, "srv.key"), sk)
	testutil.WritePEM(t, filepath.Join(dir, "ca.crt"), station.Root, station.Issuing)
}

// mosquittoBroker starts mosquitto with mTLS on a free loopback port, trusting trustCA's chain.
func mosquittoBroker(t *testing.T, serverCA *testutil.CA, trustCA *testutil.CA) (port int, logFile string) {
	t.Helper()
	dir := t.TempDir()
	sk := testutil.ECKey()
	testutil.WritePEM(t, filepath.Join(dir, "server.crt"), serverCA.Issue(t, sk.Public(), "broker", true, "127.0.0.1", "localhost"), serverCA.Issuing)
	testutil.WritePEM(t, filepath.Join(dir, "server.key"), sk)
	testutil.WritePEM(t, filepath.Join(dir, "ca.crt"), trustCA.Root, trustCA.Issuing)
	m := testutil.StartMosquitto(t, filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"), filepath.Join(dir, "ca.crt"))
	return m.Port, m.Log
}

func TestMosquitto(t *testing.T) {
	station := testutil.NewCA(t, "station")
	fleet := testutil.NewCA(t, "fleet") // signs the broker's certificate
	ctx := context.Background()
	c := client(t, station, testutil.ECKey(), "device-SN-42")
	c.ClientID = "SN-42"

	port, logFile := mosquittoBroker(t, fleet, station)
	ep := fmt.Sprintf("mqtts://127.0.0.1:%d", port)
	res, err := Test(ctx, ep, fleet.Pool(), c)
	if err != nil {
		t.Fatal(err)
	}
	if res.Detail != "CONNACK 0" || res.Protocol != "mqtt" {
		t.Fatalf("result %+v", res)
	}
	time.Sleep(100 * time.Millisecond)
	log, _ := os.ReadFile(logFile)
	if !strings.Contains(string(log), "device-SN-42") {
		t.Fatalf("broker log does not show the unit's CN:\n%s", log)
	}
	// The endpoint CA does not trust the broker: refused before our certificate is ever sent.
	before := strings.Count(string(log), "New client connected")
	_, err = Test(ctx, ep, station.Pool(), c)
	wantReason(t, err, ErrServerUntrusted)
	time.Sleep(100 * time.Millisecond)
	log, _ = os.ReadFile(logFile)
	if strings.Count(string(log), "New client connected") != before {
		t.Fatal("a client connection completed with an untrusted broker")
	}

	// A broker trusting another CA rejects the unit.
	port2, _ := mosquittoBroker(t, fleet, testutil.NewCA(t, "someone else"))
	_, err = Test(ctx, fmt.Sprintf("mqtts://127.0.0.1:%d", port2), fleet.Pool(), c)
	wantReason(t, err, ErrClientRejected)
}

func TestHTTPSWithOpenSSL(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	station := testutil.NewCA(t, "station")
	dir := t.TempDir()
	serverFiles(t, station, dir)
	start := func(verify bool) string {
		port := testutil.FreePort(t)
		args := []string{"s_server", "-accept", fmt.Sprint(port), "-cert", filepath.Join(dir, "srv.crt"), "-key", filepath.Join(dir, "srv.key"),
			"-tls1_3", "-www", "-CAfile", filepath.Join(dir, "ca.crt")}
		if verify {
			args = append(args, "-Verify", "1", "-verify_return_error")
		}
		cmd := exec.Command("openssl", args...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		testutil.WaitPort(t, port)
		return fmt.Sprintf("127.0.0.1:%d", port)
	}
	c := client(t, station, testutil.ECKey(), "device-1")
	addr := start(true)
	res, err := Test(context.Background(), "https://"+addr+"/", station.Pool(), c)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(res.Detail, "HTTP 200") {
		t.Fatalf("result %+v", res)
	}
	// The same server without -Verify does not ask for a client certificate: not mTLS.
	_, err = Test(context.Background(), "tls://"+start(false), station.Pool(), c)
	wantReason(t, err, ErrNoClientCertRequested)
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
