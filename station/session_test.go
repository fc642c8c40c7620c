package station

import (
	"context"
	"errors"
	"strings"
	"testing"

	"provision/internal/testutil"
	"provision/inventory"
	"provision/tpm"
)

// A whole unit on swtpm with EK certificates: the key step salts the TPM session to the certified EK the attest step
// then proves (the same one), and says so; a TPM without EK certificates gets a session on its default EK, trusted on
// first use, and the step says that.
func TestSessionUnit(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	for _, tc := range []struct {
		name, want string
		ekCert     bool
	}{
		{"EK certificate", "session: EK of NV 0x1c00016 (persistent 0x81010016)", true},
		{"no EK certificate", "session: default EK (template L-2 (ECC P-256)), no EK certificate: trusted on first use", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opts []testutil.SwtpmOption
			var roots []string
			if tc.ekCert {
				opts = append(opts, testutil.WithEKCert())
			}
			sw := testutil.StartSwtpm(t, opts...)
			if tc.ekCert {
				roots = append(roots, sw.EKRootsDir())
			}
			s := attestStation(t, AttestRecord, roots...)
			res, err := provisionOne(t, s, sw.URI, "SN-0001")
			if err != nil {
				t.Fatal(err)
			}
			detail := stepDetail(t, s, "SN-0001", StepKey)
			if !strings.Contains(detail, tc.want) {
				t.Fatalf("key step detail %q, want %q", detail, tc.want)
			}
			if tc.ekCert && res.Attestation.Status != "trusted" {
				t.Fatalf("attestation %+v", res.Attestation)
			}
		})
	}
}

// stepDetail is the detail of the last "ok" event of step for serial.
func stepDetail(t *testing.T, s *Station, serial string, step Step) string {
	t.Helper()
	evs, err := s.Inv.Events(context.Background(), serial)
	if err != nil {
		t.Fatal(err)
	}
	detail := ""
	for _, e := range evs {
		if e.Step == string(step) && e.Outcome == "ok" {
			detail = e.Detail
		}
	}
	return detail
}

// A host in the middle that flips one bit in the TPM's answer to the device key's TPM2_Create, or to the CSR's
// TPM2_Sign: the unit fails at that step with ErrTampered, the inventory records the failure and why, and no
// certificate is issued.
func TestSessionTamperedUnit(t *testing.T) {
	testutil.RequireTool(t, "swtpm", "swtpm_setup", "swtpm_localca")
	sw := testutil.StartSwtpm(t, testutil.WithEKCert())
	proxy := testutil.NewTamperProxy(t, sw.URI)
	for _, tc := range []struct {
		name   string
		cc     uint32
		step   Step
		serial string
	}{
		{"TPM2_Create of the device key", 0x153, StepKey, "SN-0001"},
		{"TPM2_Sign of the CSR", 0x15d, StepCSR, "SN-0002"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := attestStation(t, AttestRecord, sw.EKRootsDir())
			proxy.FlipNext(tc.cc)
			res, err := provisionOne(t, s, proxy.URI, tc.serial)
			var se *StepError
			if !errors.As(err, &se) || se.Step != tc.step || !errors.Is(err, tpm.ErrTampered) {
				t.Fatalf("altered %s: %v; want %s to fail with tpm.ErrTampered", tc.name, err, tc.step)
			}
			if !strings.Contains(err.Error(), "session check") {
				t.Errorf("the error does not say what happened: %v", err)
			}
			if res.Certificate != nil || activeCount(t, s, tc.serial) != 0 {
				t.Fatal("a certificate was issued")
			}
			certs, err := s.Inv.Certificates(context.Background(), tc.serial)
			if err != nil || len(certs) != 0 {
				t.Fatalf("certificates recorded: %v, %v", certs, err)
			}
			u, err := s.Inv.Unit(context.Background(), tc.serial)
			if err != nil || u.State != inventory.StateFailed {
				t.Fatalf("unit %+v, %v: want failed", u, err)
			}
			evs, _ := s.Inv.Events(context.Background(), tc.serial)
			if last := evs[len(evs)-1]; last.Step != string(tc.step) || !strings.Contains(last.Detail, "session check") {
				t.Fatalf("last event %+v", last)
			}
			// The next run, on a fresh connection through an honest path, resumes and ships the unit.
			if _, err := provisionOne(t, s, proxy.URI, tc.serial); err != nil {
				t.Fatalf("after tampering, the unit again: %v", err)
			}
		})
	}
}
