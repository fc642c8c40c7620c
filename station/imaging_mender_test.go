package station

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"provision/image/golden"
	"provision/internal/testutil"
	"provision/station/profile"
)

// The real Mender client (Debian's mender-client 3.4, on this machine's Debian 12 userland: OpenSSL 3.0,
// tpm2-openssl 1.1.1) authenticates with the TPM key exactly as the mender profile set it up in a Debian 12 image:
// the unit is provisioned end to end on swtpm into an image whose package database says tpm2-openssl 1.1.1-1, the
// files the profile wrote are read back from the image (mender.conf, the OpenSSL configuration, the systemd drop-in's
// environment, the certificate and TSS2 key file), and `mender bootstrap` runs with them against a loopback HTTPS
// server playing the Mender server's authentication endpoint, which checks X-MEN-Signature over the body with the
// device public key (and asks for the client certificate, as Mender's mTLS ambassador does). swtpm sits behind
// tpm2-abrmd on a private session bus: the drop-in's TCTI names the system bus (a device's tpm2-abrmd), which is
// the only thing the test swaps.
//
// The newer form (tpm_openssl: provider) fails on this userland as the issue reports: "failed to finalize
// signature", while the same TCTI is used.
func TestMenderClientSignsWithTPMKey(t *testing.T) {
	testutil.RequireTool(t, append([]string{"mender", "swtpm", "tpm2-abrmd", "dbus-daemon", "dbus-send", "unshare", "mount"}, golden.Tools...)...)
	s := newStation(t)
	sw := testutil.StartSwtpm(t)
	d := openDevice(t, sw.URI)
	img := goldenWithDpkg(t, map[int]string{2: dpkgFixture(t, "debian12"), 3: dpkgFixture(t, "debian12")})
	const serial = "MEN-0001"
	res, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: serial, Image: img, Operator: "t"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d.Close() // swtpm serves one connection at a time: tpm2-abrmd takes it over
	checks, err := s.VerifyImage(context.Background(), img, serial, VerifyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const line = "TPM OpenSSL configuration: tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status → provider-abrmd"
	if c := checkNamed(checks, "TPM OpenSSL configuration"); c == nil || c.Name != line {
		t.Fatalf("verify line %+v, want %q", c, line)
	}

	// The device's files, as the profile wrote them, under a private root.
	root := t.TempDir()
	extract := func(part int, inFS, device string) string {
		p := filepath.Join(root, device)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(readPart(t, img, part, inFS)), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	extract(4, "/mender/mender-cert.pem", "/data/mender/mender-cert.pem")
	extract(4, "/mender/mender-cert-private.pem", "/data/mender/mender-cert-private.pem")
	extract(2, "/etc/mender/openssl-tpm2.cnf", "/etc/mender/openssl-tpm2.cnf")
	env := systemdEnvironment(t, readPart(t, img, 2, "/etc/systemd/system/mender-client.service.d/10-tpm2.conf"))
	if env["OPENSSL_CONF"] != "/etc/mender/openssl-tpm2.cnf" || env["TPM2OPENSSL_TCTI"] != "tabrmd:bus_type=system" {
		t.Fatalf("drop-in environment %v", env)
	}
	var conf map[string]any
	if err := json.Unmarshal([]byte(readPart(t, img, 2, "/etc/mender/mender.conf")), &conf); err != nil {
		t.Fatal(err)
	}
	hc := conf["HttpsClient"].(map[string]any)
	for _, k := range []string{"Certificate", "Key"} {
		hc[k] = filepath.Join(root, hc[k].(string))
	}

	srv := newMenderAuthServer(t, s, res.Certificate)
	conf["ServerURL"], conf["ServerCertificate"] = srv.URL, srv.caFile
	confFile := filepath.Join(root, "etc/mender/mender.conf")
	b, _ := json.Marshal(conf)
	os.WriteFile(confFile, b, 0o600)

	abrmd := sw.StartABRMD(t)
	tcti := ""
	for _, kv := range abrmd {
		if v, ok := strings.CutPrefix(kv, "TPM2OPENSSL_TCTI="); ok {
			tcti = v
		}
	}
	runEnv := append(abrmd, "OPENSSL_CONF="+filepath.Join(root, env["OPENSSL_CONF"]),
		"TPM2OPENSSL_TCTI="+strings.Replace(env["TPM2OPENSSL_TCTI"], "tabrmd:bus_type=system", tcti, 1))

	out, err := runMenderBootstrap(t, confFile, serial, runEnv)
	if err != nil || !strings.Contains(out, "successfully received new authorization data") {
		t.Fatalf("mender bootstrap with the provider-abrmd form: %v\n%s", err, out)
	}
	if got := srv.verified(); got != 1 {
		t.Fatalf("server verified %d signed auth requests, want 1; failures: %v\nmender:\n%s", got, srv.failures(), out)
	}

	// The newer form on this Debian 12 userland: the client cannot finalize its signature.
	if v := hostTPM2OpenSSL(t); v == "" || !strings.HasPrefix(v, "1.1") {
		t.Logf("host tpm2-openssl %q: not the Debian 12 stack, the provider form is not expected to fail", v)
		return
	}
	prof, err := s.Config.ResolveProfile("mender")
	if err != nil {
		t.Fatal(err)
	}
	forced := *prof
	forced.TPMOpenSSL = profile.OpenSSLProvider
	plan, err := forced.Plan("mender", s.Layout, profile.Material{Serial: serial, KeyKind: "tpm"})
	if err != nil {
		t.Fatal(err)
	}
	newer := filepath.Join(root, "etc/mender/openssl-tpm2-provider.cnf")
	os.WriteFile(newer, findFile(plan, "/etc/mender/openssl-tpm2.cnf").Data, 0o644)
	runEnv[len(runEnv)-2] = "OPENSSL_CONF=" + newer
	out, err = runMenderBootstrap(t, confFile, serial, runEnv)
	if !strings.Contains(out, "failed to finalize signature") {
		t.Fatalf("mender bootstrap with the provider form on tpm2-openssl 1.1: %v, want \"failed to finalize signature\"\n%s", err, out)
	}
	if got := srv.verified(); got != 1 {
		t.Fatalf("server verified %d signed auth requests after the provider form, want still 1", got)
	}
}

// systemdEnvironment reads the Environment= lines of a systemd unit or drop-in.
func systemdEnvironment(tb testing.TB, unit string) map[string]string {
	tb.Helper()
	env := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(unit))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Environment="); ok {
			k, val, _ := strings.Cut(v, "=")
			env[k] = val
		}
	}
	return env
}

// hostTPM2OpenSSL is this machine's tpm2-openssl version from its own package database.
func hostTPM2OpenSSL(tb testing.TB) string {
	b, err := os.ReadFile(profile.DpkgStatus)
	if err != nil {
		return ""
	}
	v, _ := profile.InstalledVersion(b, "tpm2-openssl")
	return v
}

// runMenderBootstrap runs `mender bootstrap` once, forced, with its own data directory. The identity script the
// client needs lives at a fixed path (/usr/share/mender/identity/mender-device-identity): it is bind-mounted there in
// a private mount namespace, so the host is not changed.
func runMenderBootstrap(tb testing.TB, confFile, serial string, env []string) (string, error) {
	tb.Helper()
	dir := tb.TempDir()
	id := filepath.Join(dir, "identity")
	os.MkdirAll(id, 0o755)
	os.WriteFile(filepath.Join(id, "mender-device-identity"), []byte("#!/bin/sh\necho serial="+serial+"\n"), 0o755)
	data := filepath.Join(dir, "data")
	os.MkdirAll(data, 0o700)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "-m", "sh", "-c",
		`mount --bind "$1" /usr/share/mender/identity && exec mender -c "$2" -d "$3" --no-syslog -F bootstrap`, "sh", id, confFile, data)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OPENSSL_CONF=") && !strings.HasPrefix(kv, "TPM2OPENSSL_TCTI=") && !strings.HasPrefix(kv, "DBUS_SESSION_BUS_ADDRESS=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// menderAuthServer plays the Mender server's device authentication endpoint on loopback over TLS 1.3, asking for
// the client certificate (chained to the station CA) and checking each auth request's signature.
type menderAuthServer struct {
	*httptest.Server
	caFile string
	mu     sync.Mutex
	ok     int
	errs   []string
}

func newMenderAuthServer(tb testing.TB, s *Station, unitCert *x509.Certificate) *menderAuthServer {
	tb.Helper()
	m := &menderAuthServer{}
	m.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/api/devices/v1/authentication/auth_requests" {
			w.WriteHeader(http.StatusNoContent)
			return
		}
		body, _ := io.ReadAll(r.Body)
		if err := checkMenderAuth(r, body, unitCert); err != nil {
			m.mu.Lock()
			m.errs = append(m.errs, err.Error())
			m.mu.Unlock()
			http.Error(w, `{"error":"`+err.Error()+`"}`, http.StatusUnauthorized)
			return
		}
		m.mu.Lock()
		m.ok++
		m.mu.Unlock()
		w.Header().Set("Content-Type", "application/jwt")
		io.WriteString(w, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ0ZXN0In0.")
	}))
	clientCAs := x509.NewCertPool()
	clientCAs.AddCert(s.CA.Root)
	caPEM, cert := testutil.LoopbackServerCert(tb)
	m.TLS = &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: clientCAs}
	m.Config.ErrorLog = nil
	m.StartTLS()
	tb.Cleanup(m.Close)
	m.caFile = filepath.Join(tb.TempDir(), "server-ca.crt")
	os.WriteFile(m.caFile, caPEM, 0o644)
	return m
}

func (m *menderAuthServer) verified() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ok
}

func (m *menderAuthServer) failures() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.errs...)
}

// checkMenderAuth checks an auth request as the Mender server does: X-MEN-Signature is the device key's signature
// over the body, the body's pubkey is the device key; here the key must also be the unit's certificate key, the TLS
// client certificate the unit's, and the identity the unit's serial.
func checkMenderAuth(r *http.Request, body []byte, unitCert *x509.Certificate) error {
	var req struct {
		IDData string `json:"id_data"`
		PubKey string `json:"pubkey"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return fmt.Errorf("body: %v", err)
	}
	blk, _ := pem.Decode([]byte(req.PubKey))
	if blk == nil {
		return fmt.Errorf("pubkey is not PEM")
	}
	pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return fmt.Errorf("pubkey: %v", err)
	}
	if !publicEqual(pub, unitCert.PublicKey) {
		return fmt.Errorf("pubkey is not the unit's certificate key")
	}
	sig, err := base64.StdEncoding.DecodeString(r.Header.Get("X-MEN-Signature"))
	if err != nil {
		return fmt.Errorf("X-MEN-Signature: %v", err)
	}
	sum := sha256.Sum256(body)
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || !ecdsa.VerifyASN1(ec, sum[:], sig) {
		return fmt.Errorf("X-MEN-Signature does not verify with the device key")
	}
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 || !r.TLS.PeerCertificates[0].Equal(unitCert) {
		return fmt.Errorf("TLS client certificate is not the unit's")
	}
	if !strings.Contains(req.IDData, unitCert.URIs[0].Opaque[len("dev:serial:"):]) {
		return fmt.Errorf("id_data %q does not name the serial", req.IDData)
	}
	return nil
}
