package station

import (
	"context"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"provision/image/golden"
	"provision/internal/testutil"
	"provision/simulator"
	"provision/tpm"
)

// BenchmarkProvision runs whole units (key, CSR, sign, image, verify, built-in handshake) and reports the time of each
// step, the TPM commands per unit and the time outside the TPM's own commands (soft keys run no TPM command).
func BenchmarkProvision(b *testing.B) {
	for _, uri := range []string{"soft", "sim"} {
		b.Run(uri, func(b *testing.B) {
			s := newStation(b)
			testutil.RequireTool(b, golden.Tools...)
			img := filepath.Join(b.TempDir(), "unit.img")
			if err := golden.Build(context.Background(), img, golden.Options{}); err != nil {
				b.Fatal(err)
			}
			var cmds atomic.Int64
			d, err := tpm.Open(context.Background(), uri, tpm.WithSimulator(simulator.Open), tpm.WithCounter(&cmds))
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			steps := map[Step]time.Duration{}
			report := func(e Event) {
				if e.Status == StatusOK {
					steps[e.Step] += e.Duration
				}
			}
			// The first unit creates the SRK and starts the built-in server: keep it out of the per-unit figures.
			if _, err := s.Provision(context.Background(), d, ProvisionRequest{Serial: "BEN-TPM", Image: img}, nil); err != nil {
				b.Fatal(err)
			}
			cmds.Store(0)
			n := 0
			b.ResetTimer()
			for b.Loop() {
				n++
				req := ProvisionRequest{Serial: fmt.Sprintf("BEN-%05d", n), Image: img}
				if uri != "soft" {
					req = ProvisionRequest{Serial: "BEN-TPM", Image: img, Reprovision: true} // one TPM is one unit
				}
				if _, err := s.Provision(context.Background(), d, req, report); err != nil {
					b.Fatal(err)
				}
			}
			for _, st := range Steps {
				b.ReportMetric(float64(steps[st].Microseconds())/float64(n)/1000, string(st)+"-ms")
			}
			b.ReportMetric(float64(cmds.Load())/float64(n), "tpm-cmds/unit")
		})
	}
}

// BenchmarkProvisionAttest runs whole units on swtpm with EK certificates, with attestation off and record (trusted:
// its swtpm-localca root configured), and reports the TPM commands per unit and the attest step's time. The same
// serial is re-provisioned each time (one TPM is one unit), so both runs take the same path.
func BenchmarkProvisionAttest(b *testing.B) {
	testutil.RequireTool(b, "swtpm", "swtpm_setup", "swtpm_localca")
	testutil.RequireTool(b, golden.Tools...)
	sw := testutil.StartSwtpm(b, testutil.WithEKCert())
	for _, policy := range []string{AttestOff, AttestRecord} {
		b.Run(policy, func(b *testing.B) {
			s := newStation(b)
			s.Config.Attestation, s.ExtraTPMRoots = policy, []string{sw.EKRootsDir()}
			img := filepath.Join(b.TempDir(), "unit.img")
			if err := golden.Build(context.Background(), img, golden.Options{}); err != nil {
				b.Fatal(err)
			}
			var cmds atomic.Int64
			d, err := tpm.Open(context.Background(), sw.URI, tpm.WithCounter(&cmds), tpm.WithFlushStale(true))
			if err != nil {
				b.Fatal(err)
			}
			defer d.Close()
			var attestTime time.Duration
			report := func(e Event) {
				if e.Status == StatusOK && e.Step == StepAttest {
					attestTime += e.Duration
				}
			}
			req := ProvisionRequest{Serial: "BEN-ATTEST", Image: img, Reprovision: true}
			if _, err := s.Provision(context.Background(), d, req, nil); err != nil {
				b.Fatal(err)
			}
			cmds.Store(0)
			n := 0
			b.ResetTimer()
			for b.Loop() {
				n++
				if _, err := s.Provision(context.Background(), d, req, report); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(attestTime.Microseconds())/float64(n)/1000, "attest-ms")
			b.ReportMetric(float64(cmds.Load())/float64(n), "tpm-cmds/unit")
		})
	}
}
