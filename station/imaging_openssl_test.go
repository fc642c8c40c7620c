package station

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"

	"provision/image"
	"provision/image/golden"
	"provision/internal/testutil"
	"provision/station/profile"
)

// dpkgFixture reads a package database from the profile package's testdata: "debian12" (tpm2-openssl 1.1.1 with
// tpm2-abrmd) or "debian13" (tpm2-openssl 1.3).
func dpkgFixture(tb testing.TB, name string) string {
	tb.Helper()
	b, err := os.ReadFile("profile/testdata/" + name + ".status")
	if err != nil {
		tb.Fatal(err)
	}
	return string(b)
}

// goldenWithDpkg builds a Mender-style golden image and writes a package database (/var/lib/dpkg/status) into the
// given partitions, as a Debian-family root file system has one (golden.Build writes none).
func goldenWithDpkg(tb testing.TB, status map[int]string) string {
	tb.Helper()
	testutil.RequireTool(tb, golden.Tools...)
	img := tb.TempDir() + "/unit.img"
	ctx := context.Background()
	if err := golden.Build(ctx, img, golden.Options{}); err != nil {
		tb.Fatal(err)
	}
	if len(status) == 0 {
		return img
	}
	im, err := image.Open(ctx, img)
	if err != nil {
		tb.Fatal(err)
	}
	var writes []image.Write
	for _, p := range im.Partitions() {
		if s, ok := status[p.Number]; ok {
			writes = append(writes, image.Write{Partition: p, Path: profile.DpkgStatus, Data: []byte(s), Mode: 0o644})
		}
	}
	if err := im.Apply(ctx, writes); err != nil {
		tb.Fatal(err)
	}
	if err := im.Close(); err != nil {
		tb.Fatal(err)
	}
	return img
}

// readPart reads a file from one partition of an image.
func readPart(tb testing.TB, img string, part int, name string) string {
	tb.Helper()
	ctx := context.Background()
	im, err := image.Open(ctx, img, image.ReadOnly())
	if err != nil {
		tb.Fatal(err)
	}
	defer im.Close()
	for _, p := range im.Partitions() {
		if p.Number == part {
			b, err := readImageFile(ctx, im, p, name)
			if err != nil {
				tb.Fatalf("partition %d: %s: %v", part, name, err)
			}
			return string(b)
		}
	}
	tb.Fatalf("no partition %d", part)
	return ""
}

func checkNamed(checks []Check, substr string) *Check {
	for i := range checks {
		if strings.Contains(checks[i].Name, substr) {
			return &checks[i]
		}
	}
	return nil
}

// tpm_openssl auto (the mender default) writes the form the image's tpm2-openssl needs, into both root file
// systems, and verify says which form and why; without a package database it writes provider and warns.
func TestTPMOpenSSLAutoFromImage(t *testing.T) {
	s := newStation(t)
	s.Config.Attestation = AttestOff // many units on one simulator
	d := openDevice(t, "sim")
	debian12, debian13 := dpkgFixture(t, "debian12"), dpkgFixture(t, "debian13")
	const cnf, dropin = "/etc/mender/openssl-tpm2.cnf", "/etc/systemd/system/mender-client.service.d/10-tpm2.conf"
	tests := []struct {
		name     string
		status   map[int]string
		line     string // the verify line after "TPM OpenSSL configuration: "
		cnfHas   string
		cnfLacks string
		tcti     string
	}{
		{"debian 12", map[int]string{2: debian12, 3: debian12},
			"tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status → provider-abrmd",
			"default_properties = ?provider=tpm2,tpm2.digest!=yes", "", "TPM2OPENSSL_TCTI=tabrmd:bus_type=system"},
		{"debian 13", map[int]string{2: debian13, 3: debian13},
			"tpm2-openssl 1.3.0-1 in /var/lib/dpkg/status → provider",
			"tpm2 = tpm2_sect", "default_properties", "TPM2OPENSSL_TCTI=device:/dev/tpmrm0"},
		{"only rootfs A has a package database", map[int]string{2: debian12},
			"tpm2-openssl 1.1.1-1 in /var/lib/dpkg/status → provider-abrmd",
			"default_properties = ?provider=tpm2,tpm2.digest!=yes", "", "tabrmd:bus_type=system"},
		{"no package database", nil,
			"tpm2-openssl version unknown (no /var/lib/dpkg/status in partition 2; no /var/lib/dpkg/status in partition 3) → provider (warning: assumed tpm2-openssl 1.2 or later",
			"tpm2 = tpm2_sect", "default_properties", "TPM2OPENSSL_TCTI=device:/dev/tpmrm0"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := goldenWithDpkg(t, tt.status)
			serial := "OSSL-000" + string(rune('1'+i))
			if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: serial, Image: img, Operator: "t"}, nil); err != nil {
				t.Fatal(err)
			}
			for _, part := range []int{2, 3} {
				c := readPart(t, img, part, cnf)
				if !strings.Contains(c, tt.cnfHas) || tt.cnfLacks != "" && strings.Contains(c, tt.cnfLacks) {
					t.Errorf("partition %d %s:\n%s", part, cnf, c)
				}
				if di := readPart(t, img, part, dropin); !strings.Contains(di, tt.tcti) {
					t.Errorf("partition %d %s:\n%s", part, dropin, di)
				}
			}
			checks, err := s.VerifyImage(context.Background(), img, serial, VerifyOptions{})
			if err != nil {
				t.Fatal(err)
			}
			c := checkNamed(checks, "TPM OpenSSL configuration: ")
			if c == nil || !c.OK || !strings.HasPrefix(c.Name, "TPM OpenSSL configuration: "+tt.line) {
				t.Fatalf("verify line %+v, want %q", c, tt.line)
			}
		})
	}
	t.Run("root file systems disagree", func(t *testing.T) {
		img := goldenWithDpkg(t, map[int]string{2: debian12, 3: debian13})
		_, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "OSSL-0009", Image: img, Operator: "t"}, nil)
		if !errors.Is(err, ErrImage) || !strings.Contains(err.Error(), "different TPM OpenSSL forms") || !strings.Contains(err.Error(), "set tpm_openssl") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("forced by the profile", func(t *testing.T) {
		s.Config.Profiles = map[string]profile.Profile{"abrmd": {Base: "mender", TPMOpenSSL: profile.OpenSSLProviderABRMD}}
		defer func() { s.Config.Profiles = nil }()
		img := goldenWithDpkg(t, map[int]string{2: debian13, 3: debian13})
		if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "OSSL-0010", Image: img, Profile: "abrmd", Operator: "t"}, nil); err != nil {
			t.Fatal(err)
		}
		if c := readPart(t, img, 3, cnf); !strings.Contains(c, "default_properties") {
			t.Errorf("forced provider-abrmd not written:\n%s", c)
		}
		checks, err := s.VerifyImage(context.Background(), img, "OSSL-0010", VerifyOptions{Profile: "abrmd"})
		if err != nil {
			t.Fatal(err)
		}
		if c := checkNamed(checks, "TPM OpenSSL configuration: "); c == nil || c.Name != "TPM OpenSSL configuration: tpm_openssl: provider-abrmd in profile abrmd → provider-abrmd" {
			t.Fatalf("verify line %+v", c)
		}
	})
}
