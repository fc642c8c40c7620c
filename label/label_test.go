package label

import (
	"bytes"
	"context"
	"flag"
	"image/png"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"provision/internal/testutil"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const sha = "3f7a1c9e5b2d4f6081a3c5e7092b4d6f8a1c3e5f7092b4d6f8a1c3e5f7092b4d"

func sample() Label {
	return Label{Serial: "SN-0001", CertSHA256: sha, Date: time.Date(2026, 12, 2, 6, 0, 0, 0, time.UTC), Station: "line-1"}
}

func TestPayloadRoundTrip(t *testing.T) {
	p := Payload("SN-0001", sha)
	if p != "P1/SN-0001/"+sha {
		t.Fatalf("payload %q", p)
	}
	s, h, err := ParsePayload(p)
	if err != nil || s != "SN-0001" || h != sha {
		t.Fatalf("ParsePayload = %q, %q, %v", s, h, err)
	}
}

func TestParsePayloadRejects(t *testing.T) {
	for _, s := range []string{
		"", "P1/", "P1//" + sha, "SN-0001/" + sha, "P2/SN-0001/" + sha, "p1/SN-0001/" + sha,
		"P1/SN-0001/" + strings.ToUpper(sha), "P1/SN-0001/" + sha[:63], "P1/SN-0001/" + sha + "0",
		"P1/SN/0001/" + sha, "P1/SN 0001/" + sha, "P1/SN\x000001/" + sha, "P1/SN-0001/" + sha + "\n",
		"P1/" + strings.Repeat("a", 129) + "/" + sha, "P1/\xff/" + sha, "P1/SN-0001/" + sha[:63] + "g",
	} {
		if _, _, err := ParsePayload(s); err == nil {
			t.Errorf("ParsePayload(%q) accepted", s)
		}
	}
}

// FuzzParsePayload: whatever a scanner types, ParsePayload never panics, and what it accepts rebuilds to the same
// payload and is a label it would print.
func FuzzParsePayload(f *testing.F) {
	for _, s := range []string{Payload("SN-0001", sha), "P1/a/b", "P1//", "P1/SN-0001/" + strings.ToUpper(sha), "P1/ü/" + sha} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		serial, h, err := ParsePayload(s)
		if err != nil {
			return
		}
		if Payload(serial, h) != s {
			t.Fatalf("%q parsed to %q, %q", s, serial, h)
		}
		if err := (Label{Serial: serial, CertSHA256: h}).Validate(); err != nil {
			t.Fatalf("%q parsed but its label is invalid: %v", s, err)
		}
	})
}

// golden compares got with testdata/name, or rewrites it under -update.
func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	testutil.Golden(t, filepath.Join("testdata", name), got)
}

func TestZPLGolden(t *testing.T) {
	long := sample()
	long.Serial, long.Title, long.Station = "ACME_GW^2026~"+strings.Repeat("x", 100), "Gateway 3000", ""
	for name, l := range map[string]Label{"SN-0001.zpl": sample(), "long.zpl": long} {
		t.Run(name, func(t *testing.T) {
			b, err := l.Render(ZPL)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, name, b)
			s := string(b)
			if !strings.HasPrefix(s, "^XA\n") || !strings.HasSuffix(s, "^XZ\n") || !strings.Contains(s, "^BQN,2,") {
				t.Fatalf("not a label with a QR code:\n%s", s)
			}
		})
	}
}

// zbarimg decodes the PNG's QR code to exactly the payload.
func TestPNGDecodes(t *testing.T) {
	testutil.RequireTool(t, "zbarimg")
	long := sample()
	long.Serial, long.Title = "ACME_GW-"+strings.Repeat("x", 120), "Gateway 3000"
	for name, l := range map[string]Label{"short": sample(), "long": long} {
		t.Run(name, func(t *testing.T) {
			b, err := l.Render(PNG)
			if err != nil {
				t.Fatal(err)
			}
			img, err := png.Decode(bytes.NewReader(b))
			if err != nil {
				t.Fatal(err)
			}
			if r := img.Bounds(); r.Dx() != pngWidth || r.Dy() != pngHeight {
				t.Fatalf("image %v", r)
			}
			p := filepath.Join(t.TempDir(), "label.png")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("zbarimg", "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", p).Output()
			if err != nil {
				t.Fatalf("zbarimg: %v", err)
			}
			if got := strings.TrimSuffix(string(out), "\n"); got != l.Payload() {
				t.Fatalf("decoded %q, want %q", got, l.Payload())
			}
		})
	}
}

func TestRenderRefusesBadLabels(t *testing.T) {
	for _, l := range []Label{
		{Serial: "SN-0001", CertSHA256: "abc"},
		{Serial: "SN/0001", CertSHA256: sha},
		{Serial: "", CertSHA256: sha},
		{Serial: "SN-0001", CertSHA256: sha, Title: "a\nb"},
	} {
		if _, err := l.Render(ZPL); err == nil {
			t.Errorf("%+v rendered", l)
		}
	}
	if _, err := sample().Render("pdf"); err == nil {
		t.Error("pdf rendered")
	}
}

func TestParsePrinter(t *testing.T) {
	for _, tt := range []struct {
		spec string
		f    Format
		want string // "" for an error
	}{
		{"file:labels/{serial}.zpl", ZPL, "file labels/{serial}.zpl"},
		{"lpr:zebra", ZPL, "lpr queue zebra"},
		{"lpr:", PNG, "lpr (default queue)"},
		{"tcp:10.0.0.5:9100", ZPL, "tcp 10.0.0.5:9100"},
		{"tcp:10.0.0.5:9100", PNG, ""},
		{"tcp:10.0.0.5", ZPL, ""},
		{"lpr:-o", ZPL, ""},
		{"file:", ZPL, ""},
		{"printer", ZPL, ""},
		{"smb:x", ZPL, ""},
		{"file:x", "pdf", ""},
	} {
		p, err := ParsePrinter(tt.spec, tt.f)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("ParsePrinter(%q, %s) accepted", tt.spec, tt.f)
		case tt.want != "" && (err != nil || p.String() != tt.want):
			t.Errorf("ParsePrinter(%q, %s) = %v, %v; want %s", tt.spec, tt.f, p, err, tt.want)
		}
	}
}

func TestFilePrinter(t *testing.T) {
	dir := t.TempDir()
	p, _ := ParsePrinter("file:"+filepath.Join(dir, "{serial}.zpl"), ZPL)
	if err := p.Print(context.Background(), "SN-0001", []byte("^XA^XZ")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "SN-0001.zpl")); err != nil || string(b) != "^XA^XZ" {
		t.Fatalf("file: %q %v", b, err)
	}
	if err := Check(p); err != nil {
		t.Fatal(err)
	}
	missing := FilePrinter{Path: filepath.Join(dir, "none", "{serial}")}
	if err := missing.Print(context.Background(), "S", nil); err == nil {
		t.Fatal("printed into a missing directory")
	}
	if err := Check(missing); err == nil {
		t.Fatal("Check accepted a missing directory")
	}
	if err := Check(LPRPrinter{Command: filepath.Join(dir, "no-lpr")}); err == nil {
		t.Fatal("Check accepted a missing lpr")
	}
}

// lpr gets the label on its standard input, -o raw for ZPL, and the queue.
func TestLPRPrinter(t *testing.T) {
	dir := t.TempDir()
	fake := filepath.Join(dir, "lpr")
	script := "#!/bin/sh\necho \"$@\" > " + dir + "/args\ncat > " + dir + "/data\n"
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	p := LPRPrinter{Queue: "zebra", Raw: true, Command: fake}
	if err := p.Print(context.Background(), "SN-0001", []byte("^XA^XZ")); err != nil {
		t.Fatal(err)
	}
	args, _ := os.ReadFile(filepath.Join(dir, "args"))
	data, _ := os.ReadFile(filepath.Join(dir, "data"))
	if string(args) != "-P zebra -o raw -T label SN-0001\n" || string(data) != "^XA^XZ" {
		t.Fatalf("lpr got args %q data %q", args, data)
	}
	failing := LPRPrinter{Command: "false"}
	if err := failing.Print(context.Background(), "SN-0001", nil); err == nil {
		t.Fatal("a failing lpr printed")
	}
}

func TestTCPPrinter(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		b, _ := io.ReadAll(c)
		c.Close()
		got <- b
	}()
	p, err := ParsePrinter("tcp:"+ln.Addr().String(), ZPL)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Print(context.Background(), "SN-0001", []byte("^XA^XZ")); err != nil {
		t.Fatal(err)
	}
	if b := <-got; string(b) != "^XA^XZ" {
		t.Fatalf("printer got %q", b)
	}
	// Nobody listening: an error, not a hang.
	addr := ln.Addr().String()
	ln.Close()
	start := time.Now()
	if err := (TCPPrinter{Addr: addr, Timeout: 2 * time.Second}).Print(context.Background(), "SN-0001", []byte("x")); err == nil {
		t.Fatal("printed to a closed port")
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("the timeout was not kept")
	}
}
