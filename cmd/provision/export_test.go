package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"provision/internal/testutil"
)

// runExport runs `provision export ARGS` on the station dir through newExportCmd, and returns its stdout, stderr and
// exit code. (The root command wires export; this test needs only the command.)
func runExport(t *testing.T, dir string, args ...string) (string, string, int) {
	t.Helper()
	return inProcess(t, dir, append([]string{"export"}, args...)...)
}

func TestExportCmd(t *testing.T) {
	testutil.RequireTool(t, "openssl")
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "station")
	bundles := t.TempDir()
	t.Setenv("PROVISION_OPERATOR", "tester")
	for _, args := range [][]string{
		{"--station", dir, "init", "--id", "line-1"},
		{"--station", dir, "enroll", "--serial", "SN-0001", "--tpm", "soft", "--out", bundles},
		{"--station", dir, "enroll", "--serial", "SN-0002", "--tpm", "soft", "--out", bundles},
	} {
		var out bytes.Buffer
		if err := run(ctx, args, strings.NewReader(""), &out, &out); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out.String())
		}
	}

	// The inventory keeps each certificate: no bundles needed.
	stdout, stderr, code := runExport(t, dir, "--format", "aws")
	if code != 0 || strings.Count(stdout, "\n") != 2 {
		t.Errorf("aws from the inventory's certificates: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}

	for _, format := range []string{"mender", "aws", "azure"} {
		stdout, stderr, code := runExport(t, dir, "--format", format, "--bundles", bundles)
		if code != 0 || strings.Count(stdout, "\n") != 2 {
			t.Errorf("%s: exit %d, %d lines, stderr %q", format, code, strings.Count(stdout, "\n"), stderr)
		}
		for _, line := range strings.Split(strings.TrimSpace(stdout), "\n") {
			if !json.Valid([]byte(line)) {
				t.Errorf("%s: not JSON: %s", format, line)
			}
		}
	}
	stdout, _, code = runExport(t, dir, "--format", "aws", "--bundles", bundles, "--serial", "SN-0002")
	if code != 0 || !strings.Contains(stdout, `"ThingName":"SN-0002"`) || strings.Contains(stdout, "SN-0001") {
		t.Errorf("--serial SN-0002: exit %d, %s", code, stdout)
	}
	// The AWS line's CA certificate is the one that issued its certificate (what register-ca-certificate needs).
	var thing struct{ CertificatePem, CACertificatePem string }
	if err := json.Unmarshal([]byte(stdout), &thing); err != nil {
		t.Fatal(err)
	}
	tmp := t.TempDir()
	os.WriteFile(filepath.Join(tmp, "ca.pem"), []byte(thing.CACertificatePem), 0o644)
	os.WriteFile(filepath.Join(tmp, "cert.pem"), []byte(thing.CertificatePem), 0o644)
	if out, err := exec.Command("openssl", "verify", "-partial_chain", "-CAfile", filepath.Join(tmp, "ca.pem"),
		filepath.Join(tmp, "cert.pem")).CombinedOutput(); err != nil {
		t.Errorf("openssl verify of the AWS line: %v\n%s", err, out)
	}
	if stdout, _, code = runExport(t, dir, "--format", "aws", "--since", "2999-01-01"); code != 0 || stdout != "" {
		t.Errorf("--since in the future: exit %d, %q", code, stdout)
	}

	// --out: atomic, 0644; the manifest and its signature verify with openssl and ca/audit.pub.
	file := filepath.Join(t.TempDir(), "manifest.json")
	if _, stderr, code := runExport(t, dir, "--format", "manifest", "--out", file); code != 0 {
		t.Fatalf("manifest: exit %d: %s", code, stderr)
	}
	for _, p := range []string{file, file + ".sig"} {
		st, err := os.Stat(p)
		if err != nil || st.Mode().Perm() != 0o644 {
			t.Errorf("%s: %v, mode %v", p, err, st)
		}
	}
	if out, err := exec.Command("openssl", "pkeyutl", "-verify", "-pubin", "-inkey", filepath.Join(dir, "ca", "audit.pub"),
		"-rawin", "-in", file, "-sigfile", file+".sig").CombinedOutput(); err != nil {
		t.Fatalf("openssl pkeyutl -verify: %v\n%s", err, out)
	}
	doc, _ := os.ReadFile(file)
	if !strings.Contains(string(doc), `"serial": "SN-0001"`) || !strings.Contains(string(doc), `"station": "line-1"`) {
		t.Errorf("manifest:\n%s", doc)
	}

	// Exit codes: bad command lines 2, an unknown unit 3.
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"--format", "csv"}, 2},
		{[]string{"--format", "manifest"}, 2},
		{[]string{"--format", "aws", "--serial", "SN-0001", "--since", "2026-01-01"}, 2},
		{[]string{"--format", "aws", "--since", "yesterday"}, 2},
		{[]string{"--format", "aws", "--serial", "SN-9999"}, 3},
	} {
		if _, stderr, code := runExport(t, dir, tc.args...); code != tc.code {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, tc.code, stderr)
		}
	}
}

// export --central: units of two stations from the central store; each one's line is the one its own station
// exports; aws leaves out (exit 1, named) the units another issuing CA signed; --batch needs --central.
func TestExportCentralCmd(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	base := t.TempDir()
	t.Setenv("PROVISION_OPERATOR", "tester")
	var dirs []string
	for i, id := range []string{"line-1", "line-2"} {
		dir := filepath.Join(base, id)
		dirs = append(dirs, dir)
		mustInProcess(t, dir, "init", "--id", id)
		f, err := os.OpenFile(filepath.Join(dir, "station.yaml"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "\ncentral:\n  dsn: %q\n  mode: required\n", dsn)
		f.Close()
		if i == 0 {
			mustInProcess(t, dir, "central", "init")
		}
		mustInProcess(t, dir, "enroll", "--serial", fmt.Sprintf("SN-C%d", i+1), "--tpm", "soft", "--out", t.TempDir())
		mustInProcess(t, dir, "sync")
	}
	mender := mustInProcess(t, dirs[0], "export", "--central", "--format", "mender")
	for i, dir := range dirs {
		local := mustInProcess(t, dir, "export", "--format", "mender")
		if line := strings.Split(mender, "\n")[i] + "\n"; line != local {
			t.Errorf("station %d: from the central store\n%s\nlocal\n%s", i+1, line, local)
		}
	}
	stdout, stderr, code := inProcess(t, dirs[0], "export", "--central", "--format", "aws")
	if code != 1 || !strings.Contains(stdout, `"ThingName":"SN-C1"`) || strings.Contains(stdout, "SN-C2") ||
		!strings.Contains(stderr, "SN-C2: its certificate was not issued by this station's issuing CA: export it at station line-2") {
		t.Errorf("aws from the central store at line-1: exit %d\n%s%s", code, stdout, stderr)
	}
	if _, stderr, code := inProcess(t, dirs[0], "export", "--central", "--format", "aws", "--serial", "SN-NONE"); code != 3 {
		t.Errorf("--central --serial of an unknown unit: exit %d, want 3 (%s)", code, stderr)
	}
	if _, stderr, code := inProcess(t, dirs[0], "export", "--format", "aws", "--batch", "batch-1"); code != 2 {
		t.Errorf("--batch without --central: exit %d, want 2 (%s)", code, stderr)
	}
}

func mustInProcess(t *testing.T, dir string, args ...string) string {
	t.Helper()
	stdout, stderr, code := inProcess(t, dir, args...)
	if code != 0 {
		t.Fatalf("provision %s: exit %d\n%s%s", strings.Join(args, " "), code, stdout, stderr)
	}
	return stdout
}
