package station

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"provision/internal/testutil"
	"strings"
	"testing"

	"provision/station/profile"
	"provision/tpm"
)

// Files that station.yaml names are read from inside the station directory only. What the text alone gives away
// (absolute paths, "..") is refused when station.yaml is loaded.
func TestProfileTemplateOutsideStationRefusedAtLoad(t *testing.T) {
	base := string(DefaultConfig("st").Marshal())
	for _, tt := range []struct{ from, want string }{
		{"template:/etc/passwd", "absolute path"},
		{"template:../../etc/shadow", "climbs out with .."},
		{"template:templates/../../x", "climbs out with .."},
	} {
		t.Run(tt.from, func(t *testing.T) {
			y := base + "\nprofiles: {p: {base: mender, files: [{to: \"rootfs:/etc/x\", from: \"" + tt.from + "\"}]}}\n"
			_, err := ParseConfig("station.yaml", []byte(y))
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "inside the station directory") {
				t.Fatalf("got %v, want ErrConfig saying %q", err, tt.want)
			}
		})
	}
}

// A template that reaches out through a symlink, or names a CA key (directly or through a symlink inside the
// station), is refused when the profile is applied; a plain template inside the station works.
func TestProfileTemplateStationFile(t *testing.T) {
	s := newStation(t)
	dir := s.Layout.Dir
	secret := filepath.Join(t.TempDir(), "host-secret")
	os.WriteFile(secret, []byte("host secret\n"), 0o600)
	os.MkdirAll(filepath.Join(dir, "templates"), 0o755)
	os.WriteFile(filepath.Join(dir, "templates", "ok.txt"), []byte("serial {{.Serial}}\n"), 0o644)
	if err := os.Symlink(secret, filepath.Join(dir, "templates", "out.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../ca/issuing.key", filepath.Join(dir, "templates", "key.txt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(s.Layout.IssuingKey(), filepath.Join(dir, "templates", "hard.txt")); err != nil {
		t.Fatal(err)
	}
	key, _ := os.ReadFile(s.Layout.IssuingKey())
	os.WriteFile(filepath.Join(dir, "templates", "copy.txt"), key, 0o600)
	plan := func(from string) (*profile.Plan, error) {
		p, err := profile.Resolve("p", map[string]profile.Profile{"p": {Partitions: map[string]profile.PartitionSpec{"rootfs": {Select: "2", Mount: "/"}},
			Files: []profile.FileSpec{{To: "rootfs:/etc/x", From: from}}}})
		if err != nil {
			return nil, err
		}
		return p.Plan("p", Layout{Dir: dir}, testMaterial("soft"))
	}
	got, err := plan("template:templates/ok.txt")
	if err != nil || string(got.Files[0].Data) != "serial SN-1\n" {
		t.Fatalf("template inside the station: %v %+v", err, got)
	}
	for _, tt := range []struct{ from, want string }{
		{"template:templates/out.txt", "a symlink that leaves the station directory"},
		{"template:ca/issuing.key", "never a source"},
		{"template:templates/key.txt", "never a source"},
		{"template:ca/audit.key", "never a source"},
		{"template:templates/hard.txt", "hard link to a CA or audit key"},
		{"template:templates/copy.txt", "holds a private key"},
	} {
		t.Run(tt.from, func(t *testing.T) {
			_, err := plan(tt.from)
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v, want ErrConfig saying %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
		})
	}
}

// server_ca is read from inside the station directory only, and never a CA key or a file holding a private key.
func TestServerCAInsideStation(t *testing.T) {
	s := newStation(t)
	dir := s.Layout.Dir
	outside := filepath.Join(t.TempDir(), "fleet-ca.pem")
	root, _ := os.ReadFile(s.Layout.RootCert())
	os.WriteFile(outside, root, 0o644)
	os.Symlink(outside, filepath.Join(dir, "linked-ca.pem"))
	key, _ := os.ReadFile(s.Layout.IssuingKey())
	os.WriteFile(filepath.Join(dir, "with-key.pem"), append(append([]byte{}, root...), key...), 0o644)
	os.WriteFile(filepath.Join(dir, "fleet-ca.pem"), root, 0o644)
	for _, tt := range []struct{ serverCA, want string }{
		{outside, "absolute path"},
		{"../" + filepath.Base(filepath.Dir(outside)) + "/fleet-ca.pem", "climbs out with .."},
		{"linked-ca.pem", "a symlink that leaves the station directory"},
		{"ca/issuing.key", "never a source"},
		{"with-key.pem", "holds a private key"},
	} {
		t.Run(tt.serverCA, func(t *testing.T) {
			s.Config.ServerCA = tt.serverCA
			b, err := s.ServerCA()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("got %v (%d bytes), want ErrConfig saying %q", err, len(b), tt.want)
			}
		})
	}
	s.Config.ServerCA = "fleet-ca.pem"
	if b, err := s.ServerCA(); err != nil || string(b) != string(root) {
		t.Fatalf("server_ca inside the station: %v", err)
	}
}

// A key file aimed at a FAT partition is refused before anything is written, unless the file entry says
// allow_unprotected_key; verify flags one that is there without the opt-in. The built-in profiles keep keys off FAT.
func TestKeyFileOnFATRefused(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	s.Config.Profiles = map[string]profile.Profile{
		"bootkey": {Base: "mender", Files: []profile.FileSpec{{To: "boot:/device.key", From: "key", Name: "bootkey"}}},
		"bootkey-ok": {Base: "mender", Files: []profile.FileSpec{{To: "boot:/device.key", From: "key", Name: "bootkey",
			AllowUnprotectedKey: true}}},
	}
	img := goldenWithDpkg(t, nil)
	before := testutil.FileSum(t, img)
	prof, err := s.Config.ResolveProfile("bootkey")
	if err != nil {
		t.Fatal(err)
	}
	plan, err := prof.Plan("bootkey", s.Layout, testMaterial("soft"))
	if err != nil {
		t.Fatal(err)
	}
	if err := PreflightPlan(context.Background(), img, plan); !errors.Is(err, ErrUnprotectedKey) || !errors.Is(err, ErrImage) {
		t.Fatalf("pre-flight: got %v, want ErrUnprotectedKey", err)
	}
	_, err = s.Provision(context.Background(), d, ProvisionRequest{Serial: "FAT-0001", Image: img, Profile: "bootkey", Operator: "t"}, nil)
	if !errors.Is(err, ErrUnprotectedKey) || !strings.Contains(err.Error(), "allow_unprotected_key: true") || !strings.Contains(err.Error(), "partition 1 is FAT") {
		t.Fatalf("got %v, want ErrUnprotectedKey naming the opt-in", err)
	}
	if testutil.FileSum(t, img) != before {
		t.Error("the refused image changed")
	}
	res, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "FAT-0002", Image: img, Profile: "bootkey-ok", Operator: "t"}, nil)
	if err != nil || res.KeyKind != tpm.KindSoft {
		t.Fatalf("with allow_unprotected_key: %v", err)
	}
	if got := readPart(t, img, 1, "/device.key"); !strings.Contains(got, "PRIVATE KEY") {
		t.Fatalf("key not written to FAT: %q", got)
	}
	// The same image read with a profile that does not allow it: verify says the key is unprotected.
	checks, err := s.VerifyImage(context.Background(), img, "FAT-0002", VerifyOptions{Profile: "bootkey"})
	if c := checkNamed(checks, "/uboot/device.key (partition 1) key file protected"); err == nil || c == nil || c.OK {
		t.Fatalf("verify: %v, check %+v", err, c)
	}
	if _, err := ParseConfig("station.yaml", []byte(string(DefaultConfig("st").Marshal())+
		"\nprofiles: {p: {base: mender, files: [{to: \"boot:/x\", from: cert, allow_unprotected_key: true}]}}\n")); err == nil ||
		!strings.Contains(err.Error(), "allow_unprotected_key applies to from: key or ak_key only") {
		t.Fatalf("allow_unprotected_key on a certificate: %v", err)
	}
}
