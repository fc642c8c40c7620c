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
	"time"

	"provision/internal/testutil"
	"provision/inventory"
	"provision/label"
	"provision/station"
)

const labelSHA = "3f7a1c9e5b2d4f6081a3c5e7092b4d6f8a1c3e5f7092b4d6f8a1c3e5f7092b4d"

// labelStation is a station whose inventory holds SN-0001 (shippable, with an active certificate) and SN-0002 (keyed,
// no certificate yet), written straight into the inventory: the label command only reads them.
func labelStation(t *testing.T) string {
	t.Helper()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "station")
	if _, err := station.Init(ctx, dir, station.InitOptions{StationID: "line-1"}); err != nil {
		t.Fatal(err)
	}
	st, err := station.Open(ctx, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	err = st.Inv.Update(ctx, func(tx *inventory.Tx) error {
		if err := tx.PutUnit(inventory.Unit{Serial: "SN-0001", State: inventory.StateShippable, Station: "line-1"}); err != nil {
			return err
		}
		if err := tx.AddCertificate(inventory.Certificate{Serial: "01ab", Unit: "SN-0001", SHA256: labelSHA, NotBefore: now,
			NotAfter: now.Add(time.Hour)}); err != nil {
			return err
		}
		return tx.PutUnit(inventory.Unit{Serial: "SN-0002", State: inventory.StateKeyed, Station: "line-1"})
	})
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func runLabel(t *testing.T, dir string, args ...string) (string, string, int) {
	t.Helper()
	return inProcess(t, dir, append([]string{"label"}, args...)...)
}

func TestLabelCommand(t *testing.T) {
	dir := labelStation(t)
	out, errs, code := runLabel(t, dir, "SN-0001", "--format", "zpl")
	if code != 0 || !strings.Contains(out, "^FDMA,"+label.Payload("SN-0001", labelSHA)+"^FS") || !strings.Contains(out, time.Now().Format("2006-01-02")) {
		t.Fatalf("exit %d\n%s%s", code, out, errs)
	}
	p := filepath.Join(t.TempDir(), "{serial}.png")
	if _, errs, code := runLabel(t, dir, "SN-0001", "--format", "png", "--out", p); code != 0 {
		t.Fatalf("png: exit %d: %s", code, errs)
	}
	if b, err := os.ReadFile(strings.ReplaceAll(p, "{serial}", "SN-0001")); err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Fatalf("png file: %v", err)
	}
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"SN-0002"}, exitRefused, "SN-0002 (keyed) has no active certificate"},
		{[]string{"SN-0404"}, exitRefused, `no unit "SN-0404"`},
		{[]string{"SN-0001", "--format", "pdf"}, exitUsage, "use zpl or png"},
		{[]string{}, exitUsage, "give one serial"},
	} {
		if _, errs, code := runLabel(t, dir, tt.args...); code != tt.code || !strings.Contains(errs, tt.want) {
			t.Errorf("label %v: exit %d %q; want exit %d with %q", tt.args, code, errs, tt.code, tt.want)
		}
	}
}

// The real binary's tui with a PNG label printer (a file): the unit passes, its label is printed, zbarimg reads the
// label's QR code back, and scanning that payload is LABEL OK; another unit's label is a FAIL naming the mismatch.
func TestLabelTUIInTmux(t *testing.T) {
	testutil.RequireTool(t, "zbarimg")
	dir, st, _ := sampleStation(t, "line-3", "SN-0001.img", "tmux")
	labels := filepath.Join(dir, "labels")
	if err := os.Mkdir(labels, 0o755); err != nil {
		t.Fatal(err)
	}
	tt := startTUI(t, st, nil, "--tpm", "sim", "--operator", "dana", "--image", filepath.Join(dir, "{serial}.img"),
		"--label-printer", "file:"+filepath.Join(labels, "{serial}.png"), "--label-format", "png")
	tt.waitFor("scan or type a serial", "TPM sim (answers)")
	tt.scan("SN-0001")
	tt.waitFor("✓ SHIPPABLE", "stick it on")
	out, err := exec.Command("zbarimg", "--quiet", "--raw", filepath.Join(labels, "SN-0001.png")).Output()
	if err != nil {
		t.Fatalf("zbarimg: %v", err)
	}
	payload := strings.TrimSpace(string(out))
	serial, sha, err := label.ParsePayload(payload)
	if err != nil || serial != "SN-0001" {
		t.Fatalf("label's QR code %q: %v", payload, err)
	}
	tt.scan(label.Payload("SN-0009", sha))
	tt.waitFor("WRONG LABEL", "label is for SN-0009, unit is SN-0001")
	tt.scan(payload)
	tt.waitFor("✓ LABEL OK", "SN-0001")
	tt.key("C-c")
	tt.exited(0)
	var shownCert struct {
		Certificates []struct {
			SHA256 string `json:"sha256"`
			Status string `json:"status"`
		} `json:"certificates"`
	}
	if err := json.Unmarshal([]byte(mustCLI(t, st, "inventory", "show", "SN-0001", "--json")), &shownCert); err != nil {
		t.Fatal(err)
	}
	if c := shownCert.Certificates; len(c) != 1 || c[0].SHA256 != sha || c[0].Status != "active" {
		t.Fatalf("the label's fingerprint %s is not the unit's active certificate: %+v", sha, c)
	}
}

// Bad label flags on tui are a usage error (exit 2) before anything starts.
func TestLabelTUIFlags(t *testing.T) {
	dir := labelStation(t)
	for _, args := range [][]string{
		{"--label-printer", "tcp:printer:9100", "--label-format", "png"},
		{"--label-printer", "smb:printer"},
		{"--label-printer", "file:" + filepath.Join(t.TempDir(), "none", "{serial}.zpl")},
		{"--label-format", "pdf"},
	} {
		if _, errs, code := cli(t, dir, append([]string{"tui", "--image", "x.img", "--tpm", "sim"}, args...)...); code != exitUsage ||
			!strings.Contains(errs, "--label-") {
			t.Errorf("tui %v: exit %d %q, want exit 2", args, code, errs)
		}
	}
}
