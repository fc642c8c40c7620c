package central

import (
	"context"
	"slices"
	"testing"
	"time"
)

// ExportUnits across two stations: each unit with its active certificate and its latest evidence at its station;
// the filters select by serial, batch, time and state.
func TestExportUnits(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	a, b := newChain("line-1"), newChain("line-2")
	ba := a.unitBatch("SN-A1", "SN-A2")
	ba.Certificates[0].DER, ba.Certificates[0].SHA256 = []byte("der A1"), fp("der A1")
	old := ba.Certificates[0]
	old.Serial, old.SHA256, old.Status, old.DER = "C-old", fp("old"), "superseded", nil
	ba.Certificates = append(ba.Certificates, old)
	ba.Attestations = []Attestation{
		{LocalID: 1, Serial: "SN-A1", Time: time.Now(), EKSHA256: fp("ek-old"), Evidence: []byte(`{"n":1}`)},
		{LocalID: 2, Serial: "SN-A1", Time: time.Now(), EKSHA256: fp("ek"), Evidence: []byte(`{"n":2}`)}}
	push(t, s, ba)
	bb := b.unitBatch("SN-B1")
	bb.Units = append(bb.Units, unit("SN-B2", "line-2", "failed", b.clock))
	bb.Events = append(bb.Events, b.next("SN-B2", "key", "failed", ""))
	push(t, s, bb)
	if err := s.AddBatchJobs(ctx, "batch-1", []string{"SN-A2", "SN-B1"}); err != nil {
		t.Fatal(err)
	}

	exportable := []string{"shippable", "certified"}
	all, err := s.ExportUnits(ctx, ExportFilter{States: exportable})
	if err != nil || len(all) != 3 {
		t.Fatalf("all exportable: %d, %v", len(all), err)
	}
	a1 := all[0]
	if a1.Unit.Serial != "SN-A1" || a1.Certificate.Serial != "C-line-1-SN-A1" || string(a1.Certificate.DER) != "der A1" ||
		string(a1.Evidence) != `{"n":2}` || a1.EvidenceEKSHA256 != fp("ek") {
		t.Errorf("SN-A1: %+v", a1)
	}
	if a2 := all[1]; a2.Certificate.Serial == "" || a2.Certificate.DER != nil || a2.Evidence != nil {
		t.Errorf("SN-A2 (no DER, no evidence): %+v", a2)
	}
	if b1 := all[2]; b1.Unit.Station != "line-2" || b1.Certificate.Station != "line-2" {
		t.Errorf("SN-B1: %+v", b1)
	}
	for name, tc := range map[string]struct {
		f    ExportFilter
		want []string
	}{
		"serials":      {ExportFilter{Serials: []string{"SN-B1", "SN-B2", "SN-X"}}, []string{"SN-B1", "SN-B2"}},
		"batch":        {ExportFilter{Batch: "batch-1", States: exportable}, []string{"SN-A2", "SN-B1"}},
		"since future": {ExportFilter{Since: time.Now().Add(time.Hour)}, nil},
		"failed":       {ExportFilter{States: []string{"failed"}}, []string{"SN-B2"}},
	} {
		got, err := s.ExportUnits(ctx, tc.f)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		var serials []string
		for _, r := range got {
			serials = append(serials, r.Unit.Serial)
		}
		if !slices.Equal(serials, tc.want) {
			t.Errorf("%s: %v, want %v", name, serials, tc.want)
		}
	}
	if got, _ := s.ExportUnits(ctx, ExportFilter{Serials: []string{"SN-B2"}}); len(got) != 1 || got[0].Certificate.Serial != "" {
		t.Errorf("a unit without a certificate: %+v", got)
	}
}
