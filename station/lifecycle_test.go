package station

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/central"
	"provision/internal/testutil"
	"provision/inventory"
	"provision/station/ca"
	"provision/station/handshake"
)

func auditClean(t *testing.T, s *Station) {
	t.Helper()
	rep, err := VerifyAudit(context.Background(), s.Layout.Dir)
	if err != nil || len(rep.Problems) != 0 {
		t.Fatalf("audit verify: %v %+v", err, rep.Problems)
	}
}

// Revoke one enrolled unit, make the CRL, run mosquitto with the station's broker configuration (server certificate
// from the server root, client CA, crlfile): the revoked unit's handshake is refused, another unit connects; OpenSSL
// reads the CRL the same way.
func TestRevokeCRLMosquitto(t *testing.T) {
	testutil.RequireTool(t, "mosquitto")
	testutil.RequireTool(t, "openssl")
	ctx := context.Background()
	s := newStation(t)
	s.Config.CRL.URL = "http://127.0.0.1:8080/crl/test"
	d := openDevice(t, "soft")
	out := t.TempDir()
	bad, good := enrollOne(t, s, d, "SN-BAD", out, false), enrollOne(t, s, d, "SN-GOOD", out, false)
	if bad.Err != nil || good.Err != nil {
		t.Fatal(bad.Err, good.Err)
	}
	if cdp := bad.Certificate.CRLDistributionPoints; len(cdp) != 1 || cdp[0] != s.Config.CRL.URL {
		t.Fatalf("CRL distribution points %v", cdp)
	}
	revoked, err := s.Revoke(ctx, RevokeRequest{Unit: "SN-BAD", Reason: "keyCompromise", Operator: "t"})
	if err != nil || len(revoked) != 1 || revoked[0].Serial != CertSerial(bad.Certificate) {
		t.Fatalf("revoke: %+v, %v", revoked, err)
	}
	if _, err := s.Revoke(ctx, RevokeRequest{Unit: "SN-BAD", Reason: "keyCompromise"}); !errors.Is(err, ErrRefused) {
		t.Fatalf("second revoke: %v", err)
	}
	if _, err := s.Revoke(ctx, RevokeRequest{Unit: "SN-GOOD", Reason: "stolen"}); err == nil {
		t.Fatal("an unknown reason was taken")
	}
	der, num, err := s.CRL(ctx)
	if err != nil || num != 1 {
		t.Fatalf("crl: %d, %v", num, err)
	}
	rl, err := x509.ParseRevocationList(der)
	if err != nil || len(rl.RevokedCertificateEntries) != 1 || rl.RevokedCertificateEntries[0].SerialNumber.Cmp(bad.Certificate.SerialNumber) != 0 ||
		rl.RevokedCertificateEntries[0].ReasonCode != 1 || rl.NextUpdate.Sub(rl.ThisUpdate) != 24*time.Hour {
		t.Fatalf("CRL %+v, %v", rl, err)
	}
	if served, err := s.ServeCRL(ctx, "test"); err != nil || string(served) != string(der) {
		t.Fatalf("serve CRL: %v", err)
	}
	if _, err := s.ServeCRL(ctx, "other"); !errors.Is(err, inventory.ErrNotFound) || !errors.Is(err, central.ErrNotFound) {
		t.Fatalf("another station's CRL: %v", err)
	}
	crlPEM := s.Layout.CRLPEMFile()
	chk := func(serial string) (string, error) {
		b := filepath.Join(out, serial)
		o, err := exec.Command("openssl", "verify", "-crl_check", "-CRLfile", crlPEM, "-CAfile", filepath.Join(b, "ca.crt"),
			"-untrusted", filepath.Join(b, "chain.crt"), filepath.Join(b, "device.crt")).CombinedOutput()
		return string(o), err
	}
	if o, err := chk("SN-BAD"); err == nil || !strings.Contains(o, "revoked") {
		t.Fatalf("openssl verify -crl_check of the revoked unit: %v %s", err, o)
	}
	if o, err := chk("SN-GOOD"); err != nil {
		t.Fatalf("openssl verify -crl_check of the good unit: %v %s", err, o)
	}
	if o, err := exec.Command("openssl", "crl", "-in", crlPEM, "-noout", "-text").CombinedOutput(); err != nil ||
		!strings.Contains(string(o), "Key Compromise") || !strings.Contains(string(o), "CRL Number") {
		t.Fatalf("openssl crl -text: %v\n%s", err, o)
	}

	srvDir := filepath.Join(t.TempDir(), "broker")
	res, err := s.IssueServerCert(nil, []string{"localhost"}, []net.IP{net.ParseIP("127.0.0.1")}, srvDir)
	if err != nil || !res.RootCreated {
		t.Fatalf("server cert: %+v, %v", res, err)
	}
	if st, err := os.Stat(filepath.Join(srvDir, ServerKeyFile)); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("server.key: %v %v", st, err)
	}
	if st, err := os.Stat(s.Layout.ServerRootKey()); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("server-root.key: %v %v", st, err)
	}
	sca, created, err := s.ServerRoot(nil)
	if err != nil || created || sca.Root.Equal(s.CA.Root) || sca.Root.Equal(s.CA.Issuing) {
		t.Fatalf("server root: created %v, %v", created, err)
	}
	m := startBroker(t, s, srvDir)
	roots := x509.NewCertPool()
	roots.AddCert(sca.Root)
	connect := func(r EnrollResult) error {
		key, err := os.ReadFile(filepath.Join(r.Bundle, "device.key"))
		if err != nil {
			t.Fatal(err)
		}
		signer, err := ca.ParseKey(key, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, err = handshake.Test(ctx, fmt.Sprintf("mqtts://127.0.0.1:%d", m.port), roots,
			handshake.Client{Certificate: r.Certificate, Chain: []*x509.Certificate{s.CA.Issuing}, Key: signer, ClientID: r.Serial})
		return err
	}
	if err := connect(good); err != nil {
		t.Fatalf("the good unit: %v\n%s", err, m.log())
	}
	if err := connect(bad); err == nil || !strings.Contains(err.Error(), "rejected our certificate") {
		t.Fatalf("the revoked unit: %v\n%s", err, m.log())
	}
	// A unit provisioned with the server root as its trust anchor (server_ca, written into its image by the mqtt
	// profile) connects to the broker: the handshake step checks the broker exactly as the device will.
	s.Config.ServerCA = "ca/server-root.crt"
	hc, err := s.HandshakeConfig([]string{fmt.Sprintf("mqtts://localhost:%d", m.port)}, "")
	if err != nil {
		t.Fatal(err)
	}
	pr, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-MQTT", Image: goldenImage(t), Profile: "mqtt", Operator: "t", Handshake: hc}, nil)
	if err != nil || pr.State != inventory.StateShippable || len(pr.Handshakes) != 1 {
		t.Fatalf("unit trusting the server root: %v %+v\n%s", err, pr, m.log())
	}
	auditClean(t, s)
}

type broker struct {
	port    int
	logFile string
}

func (b broker) log() string { o, _ := os.ReadFile(b.logFile); return string(o) }

// startBroker runs mosquitto with exactly the lines BrokerConfig prints, on a free loopback port.
func startBroker(t *testing.T, s *Station, dir string) broker {
	t.Helper()
	port := testutil.FreePort(t)
	conf, err := s.BrokerConfig(dir, port)
	if err != nil {
		t.Fatal(err)
	}
	b := broker{port: port, logFile: filepath.Join(t.TempDir(), "mosquitto.log")}
	conf = strings.Replace(conf, fmt.Sprintf("listener %d\n", port), fmt.Sprintf("listener %d 127.0.0.1\n", port), 1)
	conf += "allow_anonymous false\nlog_dest file " + b.logFile + "\nlog_type all\n"
	if os.Geteuid() == 0 {
		conf = "user root\n" + conf
	}
	cf := filepath.Join(t.TempDir(), "mosquitto.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("mosquitto", "-c", cf)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return b
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("mosquitto did not start:\n%s", b.log())
	return b
}

// A re-provisioned unit's superseded certificate is on the CRL; an RMA makes a shippable unit returned with its
// certificate revoked, and the line provisions it again without --reprovision; rotation writes its bundle; the audit
// log verifies throughout.
func TestRMASupersededRotate(t *testing.T) {
	ctx := context.Background()
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	run := func(serial string, reprovision bool) Result {
		t.Helper()
		res, err := s.Provision(ctx, d, ProvisionRequest{Serial: serial, Image: img, Operator: "t", Reprovision: reprovision}, nil)
		if err != nil || res.State != inventory.StateShippable {
			t.Fatalf("provision %s: %v (%s)", serial, err, res.State)
		}
		return res
	}
	first := run("SN-1", false)
	second := run("SN-1", true)
	onCRL := func(c *x509.Certificate) (int, bool) {
		der, _, err := s.CRL(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rl, err := x509.ParseRevocationList(der)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range rl.RevokedCertificateEntries {
			if e.SerialNumber.Cmp(c.SerialNumber) == 0 {
				return e.ReasonCode, true
			}
		}
		return 0, false
	}
	if code, ok := onCRL(first.Certificate); !ok || code != 4 {
		t.Fatalf("the superseded certificate on the CRL: %v, reason %d", ok, code)
	}
	if _, ok := onCRL(second.Certificate); ok {
		t.Fatal("the active certificate is on the CRL")
	}
	u0, _ := s.Inv.Unit(ctx, "SN-1")

	revoked, err := s.RMA(ctx, "SN-1", "t")
	if err != nil || revoked == nil || revoked.Serial != CertSerial(second.Certificate) {
		t.Fatalf("rma: %+v, %v", revoked, err)
	}
	if u, _ := s.Inv.Unit(ctx, "SN-1"); u.State != inventory.StateReturned || u.EKSHA256 != u0.EKSHA256 {
		t.Fatalf("after rma: %+v", u)
	}
	if _, err := s.RMA(ctx, "SN-1", "t"); !errors.Is(err, ErrRefused) {
		t.Fatalf("rma of a returned unit: %v", err)
	}
	if code, ok := onCRL(second.Certificate); !ok || code != 5 {
		t.Fatalf("the returned unit's certificate on the CRL: %v, reason %d", ok, code)
	}
	auditClean(t, s)
	third := run("SN-1", false) // returned: provisioned again like a failed unit
	certs, _ := s.Inv.Certificates(ctx, "SN-1")
	if len(certs) != 3 || certs[2].Status != inventory.CertActive || certs[1].Status != inventory.CertRevoked || certs[0].Status != inventory.CertSuperseded {
		t.Fatalf("history: %+v", certs)
	}
	events, _ := s.Inv.Events(ctx, "SN-1")
	steps := ""
	for _, e := range events {
		steps += e.Step + " "
	}
	if !strings.Contains(steps, "rma") || strings.Count(steps, "handshake") != 3 {
		t.Fatalf("events: %s", steps)
	}
	auditClean(t, s)

	exp, err := s.ExpiringWithin(ctx, 900*24*time.Hour)
	if err != nil || len(exp) != 1 || exp[0].Unit.Serial != "SN-1" {
		t.Fatalf("expiring: %+v, %v", exp, err)
	}
	if exp, _ := s.ExpiringWithin(ctx, 24*time.Hour); len(exp) != 0 {
		t.Fatalf("expiring within a day: %+v", exp)
	}

	out := t.TempDir()
	rot, err := s.Rotate(ctx, "SN-1", nil, out, "t")
	if err == nil && rot.Old.Equal(third.Certificate) {
		// the pipeline stores certificates' DER: nothing more to give
	} else if !errors.Is(err, ErrRefused) || !strings.Contains(err.Error(), "--cert-file") {
		t.Fatalf("rotate without the current certificate: %v", err)
	} else if _, err := s.Rotate(ctx, "SN-1", ca.EncodeCerts(first.Certificate), out, "t"); !errors.Is(err, ErrRefused) {
		t.Fatalf("rotate with another certificate: %v", err)
	} else if rot, err = s.Rotate(ctx, "SN-1", ca.EncodeCerts(third.Certificate), out, "t"); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{BundleCert, BundleChain, BundleRoot, RotateManifest, RotateReadme} {
		if _, err := os.Stat(filepath.Join(out, "SN-1", f)); err != nil {
			t.Fatal(err)
		}
	}
	var m rotateManifest
	mb, _ := os.ReadFile(filepath.Join(out, "SN-1", RotateManifest))
	if err := json.Unmarshal(mb, &m); err != nil || m.Old.Serial != CertSerial(third.Certificate) || m.New.Serial != CertSerial(rot.New) {
		t.Fatalf("manifest %s: %v", mb, err)
	}
	if !publicKeysEqualForTest(rot.New, third.Certificate) {
		t.Fatal("the rotated certificate has another key")
	}
	if _, ok := onCRL(third.Certificate); ok {
		t.Fatal("the rotated-away certificate is on the CRL before the swap is confirmed")
	}
	if _, err := s.Revoke(ctx, RevokeRequest{CertSerial: CertSerial(third.Certificate), Reason: "superseded"}); err != nil {
		t.Fatal(err)
	}
	if code, ok := onCRL(third.Certificate); !ok || code != 4 {
		t.Fatalf("confirmed rotation: on CRL %v reason %d", ok, code)
	}
	if act, _ := s.Inv.ActiveCertificate(ctx, "SN-1"); act.Serial != CertSerial(rot.New) {
		t.Fatalf("active after rotation: %+v", act)
	}
	auditClean(t, s)
}

func publicKeysEqualForTest(a, b *x509.Certificate) bool {
	pa, _ := x509.MarshalPKIXPublicKey(a.PublicKey)
	pb, _ := x509.MarshalPKIXPublicKey(b.PublicKey)
	return string(pa) == string(pb)
}

// A run interrupted after sign resumes with a new key and certificate: the interrupted run's certificate is on the
// CRL as superseded.
func TestResumedUnitSupersededOnCRL(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	img := goldenImage(t)
	ctx, cancel := context.WithCancel(context.Background())
	first, err := s.Provision(ctx, d, ProvisionRequest{Serial: "SN-RES", Image: img}, func(e Event) {
		if e.Step == StepSign && e.Status == StatusOK {
			cancel()
		}
	})
	if !errors.Is(err, ErrInterrupted) || first.Certificate == nil {
		t.Fatalf("interrupted run: %v", err)
	}
	second, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "SN-RES", Image: img}, nil)
	if err != nil || second.Certificate.Equal(first.Certificate) {
		t.Fatalf("resumed run: %v", err)
	}
	der, _, err := s.CRL(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rl, _ := x509.ParseRevocationList(der)
	if len(rl.RevokedCertificateEntries) != 1 || rl.RevokedCertificateEntries[0].SerialNumber.Cmp(first.Certificate.SerialNumber) != 0 ||
		rl.RevokedCertificateEntries[0].ReasonCode != 4 {
		t.Fatalf("CRL entries %+v", rl.RevokedCertificateEntries)
	}
	auditClean(t, s)
}

func TestCRLConfig(t *testing.T) {
	base := string(DefaultConfig("line-1").Marshal())
	if !strings.Contains(base, "# crl:\n#   url: \"http://provision.factory.example:8080/crl/line-1\"") {
		t.Fatalf("station.yaml lacks the commented crl example:\n%s", base)
	}
	c, err := ParseConfig("station.yaml", []byte(base+"crl:\n  url: \"http://crl.example/crl/line-1\"\n  next_update_hours: 12\n"))
	if err != nil || c.CRL.NextUpdate() != 12*time.Hour || c.CRL.DistributionPoints()[0] != "http://crl.example/crl/line-1" {
		t.Fatalf("crl config: %+v, %v", c, err)
	}
	if c, _ := ParseConfig("station.yaml", []byte(base)); c.CRL.NextUpdate() != 24*time.Hour || c.CRL.DistributionPoints() != nil {
		t.Fatalf("default crl config: %+v", c.CRL)
	}
	for _, bad := range []string{"crl:\n  next_update_hours: -1\n", "crl:\n  url: \"not a url\"\n"} {
		if _, err := ParseConfig("station.yaml", []byte(base+bad)); !errors.Is(err, ErrConfig) {
			t.Fatalf("%q: %v", bad, err)
		}
	}
}
