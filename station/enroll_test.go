package station

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"provision/inventory"
	"provision/simulator"
	"provision/tpm"
)

func newStation(tb testing.TB) *Station {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "station")
	if _, err := Init(context.Background(), dir, InitOptions{StationID: "test"}); err != nil {
		tb.Fatal(err)
	}
	s, err := Open(context.Background(), dir, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if err := s.LoadCA(nil); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

func openDevice(tb testing.TB, uri string) *tpm.Device {
	tb.Helper()
	d, err := tpm.Open(context.Background(), uri, tpm.WithSimulator(simulator.Open), tpm.WithFlushStale(uri != "soft"))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

func enrollOne(tb testing.TB, s *Station, d *tpm.Device, serial, out string, reprovision bool) EnrollResult {
	tb.Helper()
	res, err := s.Enroll(context.Background(), d, []UnitRequest{{Serial: serial}}, EnrollOptions{OutDir: out, Reprovision: reprovision, Operator: "t"})
	if err != nil {
		tb.Fatal(err)
	}
	return res[0]
}

func activeCount(tb testing.TB, s *Station, serial string) int {
	tb.Helper()
	certs, err := s.Inv.Certificates(context.Background(), serial)
	if err != nil {
		tb.Fatal(err)
	}
	n := 0
	for _, c := range certs {
		if c.Status == inventory.CertActive {
			n++
		}
	}
	return n
}

func TestEnrollLifecycle(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "sim")
	out := t.TempDir()
	r := enrollOne(t, s, d, "SN-0001", out, false)
	if r.Err != nil || r.State != inventory.StateCertified || r.KeyKind != tpm.KindTPM {
		t.Fatalf("first enroll: %+v", r)
	}
	if _, err := os.Stat(filepath.Join(out, "SN-0001", "device.tss2.pem")); err != nil {
		t.Fatal(err)
	}
	// Refused while it holds an active certificate.
	r2 := enrollOne(t, s, d, "SN-0001", out, false)
	if !errors.Is(r2.Err, ErrRefused) {
		t.Fatalf("second enroll: %v, want ErrRefused", r2.Err)
	}
	// Re-provisioning supersedes: still exactly one active certificate.
	r3 := enrollOne(t, s, d, "SN-0001", out, true)
	if r3.Err != nil || r3.CertSHA256 == r.CertSHA256 {
		t.Fatalf("reprovision: %+v", r3)
	}
	if n := activeCount(t, s, "SN-0001"); n != 1 {
		t.Fatalf("%d active certificates, want 1", n)
	}
	if _, err := s.Inv.VerifyAudit(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A crash after the certificate was recorded but before the bundle was in place leaves the unit keyed with an active
// certificate and maybe a temp directory: the next run enrolls it again without fuss and supersedes that certificate.
func TestEnrollResumesInterrupted(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	out := t.TempDir()
	r := enrollOne(t, s, d, "SN-0002", out, false)
	// Simulate the interrupted state: unit keyed, bundle gone, a temp directory with a key left behind.
	err := s.Inv.Update(context.Background(), func(tx *inventory.Tx) error {
		u, err := tx.Unit("SN-0002")
		if err != nil {
			return err
		}
		u.State = inventory.StateKeyed
		return tx.PutUnit(u)
	})
	if err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(filepath.Join(out, "SN-0002"))
	stale := filepath.Join(out, tempPrefix+"SN-0002-123")
	os.MkdirAll(stale, 0o700)
	os.WriteFile(filepath.Join(stale, "device.key"), []byte("secret"), 0o600)

	r2 := enrollOne(t, s, d, "SN-0002", out, false)
	if r2.Err != nil || r2.State != inventory.StateCertified {
		t.Fatalf("resume: %+v", r2)
	}
	if r2.CertSHA256 == r.CertSHA256 {
		t.Fatal("resume reused the certificate of the interrupted run")
	}
	if n := activeCount(t, s, "SN-0002"); n != 1 {
		t.Fatalf("%d active certificates, want 1", n)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("the interrupted run's temp directory (with a key) is still there")
	}
}

func TestEnrollListGroups(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	out := t.TempDir()
	var units []UnitRequest
	for i := 0; i < enrollGroup*2+5; i++ {
		units = append(units, UnitRequest{Serial: fmt.Sprintf("LST-%04d", i)})
	}
	res, err := s.Enroll(context.Background(), d, units, EnrollOptions{OutDir: out})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != len(units) {
		t.Fatalf("%d results for %d units", len(res), len(units))
	}
	for _, r := range res {
		if r.Err != nil || r.State != inventory.StateCertified {
			t.Fatalf("%s: %+v", r.Serial, r)
		}
	}
	certified, err := s.Inv.Units(context.Background(), inventory.StateCertified)
	if err != nil || len(certified) != len(units) {
		t.Fatalf("%d certified units in the inventory: %v", len(certified), err)
	}
	entries, _ := os.ReadDir(out)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tempPrefix) {
			t.Fatalf("temp directory left: %s", e.Name())
		}
	}
}

func TestEnrollBadBundleDir(t *testing.T) {
	s := newStation(t)
	d := openDevice(t, "soft")
	blocker := filepath.Join(t.TempDir(), "file")
	os.WriteFile(blocker, nil, 0o644)
	if _, err := s.Enroll(context.Background(), d, []UnitRequest{{Serial: "SN-0009"}}, EnrollOptions{OutDir: blocker}); err == nil {
		t.Fatal("enroll into a file as output directory succeeded")
	}
	// Nothing was recorded for the unit: no certificate was issued.
	if _, err := s.Inv.Unit(context.Background(), "SN-0009"); !errors.Is(err, inventory.ErrNotFound) {
		t.Fatalf("unit recorded: %v", err)
	}
}

func BenchmarkEnroll(b *testing.B) {
	for _, uri := range []string{"soft", "sim"} {
		b.Run(uri, func(b *testing.B) {
			s := newStation(b)
			d := openDevice(b, uri)
			out := b.TempDir()
			i := 0
			for b.Loop() {
				i++
				res, err := s.Enroll(context.Background(), d, []UnitRequest{{Serial: fmt.Sprintf("BEN-%06d", i)}}, EnrollOptions{OutDir: out})
				if err != nil || res[0].Err != nil {
					b.Fatal(err, res[0].Err)
				}
			}
		})
	}
	b.Run("soft-list-500", func(b *testing.B) {
		s := newStation(b)
		d := openDevice(b, "soft")
		n := 0
		for b.Loop() {
			units := make([]UnitRequest, 500)
			for i := range units {
				n++
				units[i] = UnitRequest{Serial: fmt.Sprintf("LB-%07d", n)}
			}
			if _, err := s.Enroll(context.Background(), d, units, EnrollOptions{OutDir: b.TempDir()}); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*500)/1000, "ms/unit")
	})
}
