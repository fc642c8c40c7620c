package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Mosquitto is a mosquitto broker on loopback doing mTLS: require_certificate, use_identity_as_username, TLS 1.3.
type Mosquitto struct {
	Port int
	Log  string // its log file: connections show the client certificate's CN as the user name
}

// StartMosquitto starts a broker with the given server certificate chain and key files, trusting cafile for clients.
// It stops at test cleanup. mosquitto is required under CI.
func StartMosquitto(tb testing.TB, certFile, keyFile, cafile string) *Mosquitto {
	tb.Helper()
	RequireTool(tb, "mosquitto")
	dir := tb.TempDir()
	port, err := freePortPair()
	if err != nil {
		tb.Fatal(err)
	}
	m := &Mosquitto{Port: port, Log: filepath.Join(dir, "mosquitto.log")}
	conf := fmt.Sprintf("per_listener_settings true\nlistener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"+
		"require_certificate true\nuse_identity_as_username true\nallow_anonymous false\ntls_version tlsv1.3\n"+
		"log_dest file %s\nlog_type all\nconnection_messages true\n", port, cafile, certFile, keyFile, m.Log)
	if os.Geteuid() == 0 {
		conf = "user root\n" + conf // as root it would drop privileges and lose the key files
	}
	cf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o600); err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command("mosquitto", "-c", cf)
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	if !listening(port, 200) {
		tb.Fatalf("mosquitto did not start: %s", m.LogText())
	}
	return m
}

// LogText is the broker's log so far.
func (m *Mosquitto) LogText() string {
	b, _ := os.ReadFile(m.Log)
	return string(b)
}
