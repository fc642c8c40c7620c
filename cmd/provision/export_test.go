package main

import (
	"bytes"
	"context"
	"encoding/json"
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
