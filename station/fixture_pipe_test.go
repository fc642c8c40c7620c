package station

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"provision/internal/testutil"
	"provision/inventory"
	"provision/tpm"
)

// The unit on its fixture: its TPM behind `ssh … tpm2_send` (a real sshd on loopback, swtpm with EK certificates as
// the unit's TPM), its own serial read over the same ssh.

// tpm2Send is the unit-side command that reaches swtpm (on a unit: tpm2_send --tcti=device:/dev/tpmrm0).
func tpm2Send(sw *testutil.Swtpm) string {
	return fmt.Sprintf("tpm2_send --tcti=swtpm:host=127.0.0.1,port=%d", sw.Port)
}

// openFixture opens the unit's TPM through uri as the line does (stale objects of a killed run flushed).
func openFixture(t *testing.T, uri string) *tpm.Device {
	t.Helper()
	d, err := tpm.Open(context.Background(), uri, tpm.WithFlushStale(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// A whole unit over ssh: shippable with its TPM proven genuine and its own serial checked; the key file in the image
// then signs through the same pipe with OpenSSL's tpm2 provider; the ssh connection killed mid-unit fails the unit with
// the cause in words, and the same unit run again resumes and ships.
func TestFixtureUnitOverSSH(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send", "swtpm", "swtpm_setup", "swtpm_localca", "openssl")
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())
	sshd := testutil.StartSSHD(t)
	ctx := context.Background()
	s := attestStation(t, AttestRequired, sw.EKRootsDir())
	s.Config.UnitSerial = UnitSerialConfig{Command: sshd.Command() + " echo SN-FIX-{fixture}", Mode: UnitSerialRequired}
	uri := "cmd:" + sshd.Command() + " " + tpm2Send(sw)
	img := goldenImage(t)

	var validated string
	res, err := s.Provision(ctx, openFixture(t, uri), ProvisionRequest{Serial: "SN-FIX-1", Image: img, Fixture: "1"}, func(e Event) {
		if e.Step == StepValidate && e.Status == StatusOK {
			validated = e.Detail
		}
	})
	if err != nil {
		t.Fatalf("unit over ssh: %v\nsshd: %s", err, sshd.Log.String())
	}
	if res.State != inventory.StateShippable || !strings.Contains(validated, "unit says SN-FIX-1") {
		t.Fatalf("state %s, validate %q", res.State, validated)
	}
	if a := latestAttestation(t, s, "SN-FIX-1"); a.Status != inventory.AttestTrusted {
		t.Fatalf("attestation over the pipe: %+v", a)
	}

	// The wrong unit on the fixture: refused before anything is created.
	_, err = s.Provision(ctx, openFixture(t, uri), ProvisionRequest{Serial: "SN-FIX-1", Image: img, Fixture: "2", Reprovision: true}, nil)
	if !errors.Is(err, ErrWrongUnit) || !strings.Contains(err.Error(), "label says SN-FIX-1, unit says SN-FIX-2") {
		t.Fatalf("another unit on the fixture: %v", err)
	}

	// OpenSSL's tpm2 provider signs with the image's key file through the same pipe (its cmd TCTI).
	keyPEM, certPEM := readPart(t, img, 4, "/mender/mender-cert-private.pem"), readPart(t, img, 4, "/mender/mender-cert.pem")
	// Without OPENSSL_CONF for ssh: ssh links libcrypto too, would load the tpm2 provider, whose cmd TCTI would start
	// ssh again, and so on (a fork bomb: docs/dependencies.md).
	opensslSignsThrough(t, "cmd:env -u OPENSSL_CONF "+sshd.Command()+" "+tpm2Send(sw), keyPEM, certPEM)

	// The connection killed while the unit is being imaged: the handshake's signature finds the pipe gone.
	d := openFixture(t, uri)
	var killed atomic.Bool
	_, err = s.Provision(ctx, d, ProvisionRequest{Serial: "SN-FIX-1", Image: img, Fixture: "1", Reprovision: true}, func(e Event) {
		if e.Step == StepImage && e.Status == StatusStarted && !killed.Swap(true) {
			sshd.KillSessions(t)
		}
	})
	if !errors.Is(err, tpm.ErrUnreachable) || !strings.Contains(err.Error(), "the unit's key did not sign") ||
		!strings.Contains(err.Error(), "process exited (exit status 255)") {
		t.Fatalf("connection killed mid-unit: %v", err)
	}
	// The TPM went away (the station's environment, not the unit's fault): the unit keeps its last completed state.
	u, uerr := s.Inv.Unit(ctx, "SN-FIX-1")
	if uerr != nil || u.State != inventory.StateVerified {
		t.Fatalf("after the kill: %+v, %v", u, uerr)
	}
	d.Close()
	res, err = s.Provision(ctx, openFixture(t, uri), ProvisionRequest{Serial: "SN-FIX-1", Image: img, Fixture: "1"}, nil)
	if err != nil || res.State != inventory.StateShippable {
		t.Fatalf("run again after the kill: %s, %v", res.State, err)
	}
	if n := activeCount(t, s, "SN-FIX-1"); n != 1 {
		t.Fatalf("%d active certificates", n)
	}
}

// opensslSignsThrough signs a message with OpenSSL's tpm2 provider and the TSS2 key file, its TPM reached through tcti
// (a TCTI configuration string), and checks the signature with the certificate's public key.
func opensslSignsThrough(t *testing.T, tcti, keyPEM, certPEM string) {
	t.Helper()
	msg := []byte("signed on the fixture")
	sig := testutil.OpenSSLSign(t, tcti, []byte(keyPEM), msg)
	block, _ := pem.Decode([]byte(certPEM))
	if block == nil {
		t.Fatal("the image's certificate is not PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignature(x509.ECDSAWithSHA256, msg, sig); err != nil {
		t.Fatalf("OpenSSL's signature does not verify with the unit's certificate: %v", err)
	}
}

// A process in the middle of the pipe flips one bit in the TPM's signature of the CSR: the session check fails the unit
// at csr, nothing is issued, and the unit ships on the next run over a clean pipe.
func TestFixtureTamperedPipe(t *testing.T) {
	testutil.RequireTool(t, "tpm2_send", "swtpm", "swtpm_setup", "swtpm_localca")
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s := attestStation(t, AttestRequired, sw.EKRootsDir())
	img := goldenImage(t)
	middle := fmt.Sprintf("cmd:env %s=15d %s %s", testutil.PipeMiddleEnv, self, tpm2Send(sw)) // 0x15d: TPM2_Sign
	_, err = s.Provision(ctx, openFixture(t, middle), ProvisionRequest{Serial: "SN-TAMPER-1", Image: img}, nil)
	var se *StepError
	if !errors.Is(err, tpm.ErrTampered) || !errors.As(err, &se) || se.Step != StepCSR {
		t.Fatalf("a flipped bit in the CSR's signature: %v", err)
	}
	if n := activeCount(t, s, "SN-TAMPER-1"); n != 0 {
		t.Fatalf("%d certificates issued over a tampered pipe", n)
	}
	if _, err := s.Provision(ctx, openFixture(t, "cmd:"+tpm2Send(sw)), ProvisionRequest{Serial: "SN-TAMPER-1", Image: img}, nil); err != nil {
		t.Fatalf("over a clean pipe: %v", err)
	}
}

// BenchmarkProvisionFixture runs whole units (attestation record, the salted session, image, handshake) on one swtpm
// reached the two ways a line reaches a unit's TPM: mssim:// (a TCP connection per unit) and cmd:tpm2_send (a process
// per unit, as `ssh unit tpm2_send` is). Each unit opens its TPM and closes it, as the TUI does. Compare the two
// ns/op: the target is cmd ≤ 1.5 × mssim.
func BenchmarkProvisionFixture(b *testing.B) {
	testutil.RequireTool(b, "tpm2_send", "swtpm", "swtpm_setup", "swtpm_localca")
	sw := testutil.StartSwtpm(b, testutil.WithEKCert())
	for _, tc := range []struct{ name, uri string }{{"mssim", sw.URI}, {"cmd", "cmd:" + tpm2Send(sw)}} {
		b.Run(tc.name, func(b *testing.B) {
			s := newStation(b)
			s.Config.Attestation, s.ExtraTPMRoots = AttestRecord, []string{sw.EKRootsDir()}
			img := goldenImage(b)
			ctx := context.Background()
			unit := func() {
				d, err := tpm.Open(ctx, tc.uri, tpm.WithFlushStale(true))
				if err != nil {
					b.Fatal(err)
				}
				defer d.Close()
				if _, err := s.Provision(ctx, d, ProvisionRequest{Serial: "BEN-FIXTURE", Image: img, Reprovision: true}, nil); err != nil {
					b.Fatal(err)
				}
			}
			unit() // the first unit starts the built-in server
			for b.Loop() {
				unit()
			}
		})
	}
}
