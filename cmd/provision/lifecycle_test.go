package main

import (
	"crypto/x509"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"provision/internal/testutil"
)

func TestLifecycleCommands(t *testing.T) {
	t.Setenv("PROVISION_OPERATOR", "tester")
	testutil.RequireTool(t, "openssl")
	dir := t.TempDir()
	st := filepath.Join(dir, "station")
	mustCLI(t, st, "init", "--id", "life")
	b := filepath.Join(dir, "b")
	mustCLI(t, st, "enroll", "--serial", "LC-0001", "--tpm", "soft", "--out", b)
	mustCLI(t, st, "enroll", "--serial", "LC-0002", "--tpm", "soft", "--out", b)

	if _, errs, code := inProcess(t, st, "revoke", "LC-0001", "--reason", "stolen"); code != 2 || !strings.Contains(errs, "keyCompromise") {
		t.Fatalf("bad reason: exit %d %s", code, errs)
	}
	if _, errs, code := inProcess(t, st, "revoke", "LC-0001"); code != 2 {
		t.Fatalf("no reason: exit %d %s", code, errs)
	}
	if _, errs, code := inProcess(t, st, "revoke", "LC-9999", "--reason", "keyCompromise"); code != 3 {
		t.Fatalf("unknown unit: exit %d %s", code, errs)
	}
	out, errs, code := inProcess(t, st, "revoke", "LC-0001", "--reason", "keyCompromise")
	if code != 0 || !strings.Contains(out, "revoked certificate") || !strings.Contains(out, "CRL 1 written") {
		t.Fatalf("revoke: exit %d\n%s%s", code, out, errs)
	}
	if _, errs, code := inProcess(t, st, "revoke", "LC-0001", "--reason", "keyCompromise"); code != 3 {
		t.Fatalf("revoke again: exit %d %s", code, errs)
	}
	crlFile := filepath.Join(dir, "crl.pem")
	if _, errs, code := inProcess(t, st, "crl", "--out", crlFile); code != 0 {
		t.Fatalf("crl: exit %d %s", code, errs)
	}
	text, err := exec.Command("openssl", "crl", "-in", crlFile, "-noout", "-text").CombinedOutput()
	if err != nil || !strings.Contains(string(text), "Key Compromise") {
		t.Fatalf("openssl crl: %v\n%s", err, text)
	}
	verify := func(serial string) error {
		u := filepath.Join(b, serial)
		return exec.Command("openssl", "verify", "-crl_check", "-CRLfile", crlFile, "-CAfile", filepath.Join(u, "ca.crt"),
			"-untrusted", filepath.Join(u, "chain.crt"), filepath.Join(u, "device.crt")).Run()
	}
	if verify("LC-0001") == nil || verify("LC-0002") != nil {
		t.Fatal("openssl verify -crl_check disagrees with the CRL")
	}
	der, _, code := inProcess(t, st, "crl", "--der")
	if rl, err := x509.ParseRevocationList([]byte(der)); code != 0 || err != nil || rl.Number.Int64() != 3 {
		t.Fatalf("crl --der: exit %d, %v", code, err)
	}

	out, _, code = inProcess(t, st, "expiring", "--within", "1000d", "--json")
	var exp expiringJSON
	if code != 0 || json.Unmarshal([]byte(out), &exp) != nil || len(exp.Units) != 1 || exp.Units[0].Serial != "LC-0002" || exp.Units[0].DaysLeft < 800 {
		t.Fatalf("expiring: exit %d %s", code, out)
	}
	if _, _, code := inProcess(t, st, "expiring", "--within", "soon"); code != 2 {
		t.Fatalf("expiring --within soon: exit %d", code)
	}
	if _, errs, code := inProcess(t, st, "rma", "LC-0002"); code != 3 || !strings.Contains(errs, "certified") {
		t.Fatalf("rma of a unit never shipped: exit %d %s", code, errs)
	}
	if _, errs, code := inProcess(t, st, "rotate", "LC-0002", "--out", filepath.Join(dir, "rot")); code != 3 {
		t.Fatalf("rotate of a unit never shipped: exit %d %s", code, errs)
	}

	srv := filepath.Join(dir, "broker")
	out, errs, code = inProcess(t, st, "ca", "server-cert", "--name", "broker.example.com", "--ip", "127.0.0.1", "--out", srv)
	if code != 0 || !strings.Contains(out, "made the server root") || !strings.Contains(out, "set server_ca: ca/server-root.crt") {
		t.Fatalf("ca server-cert: exit %d\n%s%s", code, out, errs)
	}
	for _, f := range []string{"server.crt", "server.key", "ca.crt", "client-ca.crt"} {
		if _, err := os.Stat(filepath.Join(srv, f)); err != nil {
			t.Fatal(err)
		}
	}
	if o, err := exec.Command("openssl", "verify", "-purpose", "sslserver", "-CAfile", filepath.Join(srv, "ca.crt"), filepath.Join(srv, "server.crt")).CombinedOutput(); err != nil {
		t.Fatalf("openssl verify of the server certificate: %v %s", err, o)
	}
	if err := exec.Command("openssl", "verify", "-CAfile", filepath.Join(st, "ca", "root.crt"), "-untrusted", filepath.Join(st, "ca", "issuing.crt"), filepath.Join(srv, "server.crt")).Run(); err == nil {
		t.Fatal("the server certificate chains to the device root")
	}
	if _, _, code := inProcess(t, st, "ca", "server-cert", "--out", srv); code != 2 {
		t.Fatalf("server-cert without names: exit %d", code)
	}
	out, _, code = inProcess(t, st, "ca", "broker-config", "--dir", srv)
	for _, want := range []string{"listener 8883", "cafile " + filepath.Join(srv, "client-ca.crt"), "crlfile " + filepath.Join(st, "crl.pem"),
		"require_certificate true", "use_identity_as_username true"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("broker-config lacks %q:\n%s", want, out)
		}
	}
	mustCLI(t, st, "audit", "verify")
}
