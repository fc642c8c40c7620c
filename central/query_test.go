package central

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestUnitsPagination(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	a, b := newChain("line-1"), newChain("line-2")
	push(t, s, a.unitBatch(serials("SN-A", 15)...))
	push(t, s, b.unitBatch(serials("SN-B", 10)...))
	push(t, s, Batch{Station: "line-2", Units: []Unit{unit("SN-B0003", "line-2", "failed", time.Now()),
		unit("SN_X", "line-2", "keyed", time.Now())}})

	var all []string
	f := UnitFilter{Limit: 10}
	for page := 0; ; page++ {
		us, next, err := s.Units(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		if (next == "") != (page == 2) || len(us) > 10 {
			t.Fatalf("page %d: %d units, next %q", page, len(us), next)
		}
		for _, u := range us {
			all = append(all, u.Serial)
		}
		if next == "" {
			break
		}
		if strings.Contains(next, "SN") {
			t.Errorf("cursor %q is the bare serial", next)
		}
		f.After = next
	}
	if len(all) != 26 || all[0] != "SN-A0000" || all[25] != "SN_X" {
		t.Fatalf("all pages: %d units %v", len(all), all)
	}
	for i := 1; i < len(all); i++ {
		if all[i] <= all[i-1] {
			t.Fatalf("not in serial order at %d: %s after %s", i, all[i], all[i-1])
		}
	}
	for _, tc := range []struct {
		name string
		f    UnitFilter
		want int
	}{
		{"prefix", UnitFilter{Q: "SN-B"}, 10},
		{"prefix one", UnitFilter{Q: "SN-A0014"}, 1},
		{"underscore is literal", UnitFilter{Q: "SN_"}, 1},
		{"percent is literal", UnitFilter{Q: "SN%"}, 0},
		{"state", UnitFilter{State: "shippable"}, 24},
		{"state and station", UnitFilter{State: "failed", Station: "line-2"}, 1},
		{"station", UnitFilter{Station: "line-1"}, 15},
		{"default limit", UnitFilter{Limit: 0}, 26},
		{"limit above max", UnitFilter{Limit: 5000}, 26},
	} {
		us, next, err := s.Units(ctx, tc.f)
		if err != nil || len(us) != tc.want || next != "" {
			t.Errorf("%s: %d units, next %q, %v; want %d", tc.name, len(us), next, err, tc.want)
		}
	}
	if _, _, err := s.Units(ctx, UnitFilter{After: "!!not base64"}); !errors.Is(err, ErrBadCursor) {
		t.Errorf("bad cursor: %v", err)
	}
}

func TestUnitDetail(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	c := newChain("line-1")
	b := c.unitBatch("SN-0001", "SN-0002")
	t0 := time.Now().Add(-time.Hour)
	b.Attestations = []Attestation{
		{LocalID: 1, Serial: "SN-0001", Time: t0, Status: "untrusted", Warnings: nil},
		{LocalID: 2, Serial: "SN-0001", Time: t0.Add(time.Minute), Status: "trusted", EKIssuer: "CN=ek ca",
			Warnings: []string{"manufacturer id:00001014 vs IBM"}, Evidence: []byte(`{"ek":"x"}`), EvidenceSHA256: fp("e")},
	}
	push(t, s, b)
	d, err := s.Unit(ctx, "SN-0001")
	if err != nil {
		t.Fatal(err)
	}
	if d.Unit.Station != "line-1" || d.Unit.State != "shippable" || len(d.Certificates) != 1 || len(d.Events) != 6 {
		t.Fatalf("detail: %+v", d)
	}
	for i, e := range d.Events {
		if e.Serial != "SN-0001" || (i > 0 && !e.Time.After(d.Events[i-1].Time)) {
			t.Errorf("event %d: %+v (want this unit's, oldest first)", i, e)
		}
	}
	if d.Events[0].Hash != b.Events[0].Hash || !d.Events[0].Time.Equal(micro(b.Events[0].Time)) {
		t.Errorf("first event %+v, pushed %+v", d.Events[0], b.Events[0])
	}
	at := d.Attestation
	if at == nil || at.LocalID != 2 || at.Status != "trusted" || len(at.Warnings) != 1 || string(at.Evidence) != `{"ek":"x"}` {
		t.Errorf("attestation %+v, want the latest", at)
	}
	if !d.Unit.Updated.Equal(micro(b.Units[0].Updated)) {
		t.Errorf("updated %v, pushed %v", d.Unit.Updated, b.Units[0].Updated)
	}
	if _, err := s.Unit(ctx, "SN-NONE"); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown unit: %v", err)
	}
}

func TestStationsStatsConflicts(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	a, b := newChain("line-1"), newChain("line-2")
	a.clock, b.clock = time.Now().Add(-time.Second), time.Now().Add(-time.Second)
	ba := a.unitBatch("SN-0001", "SN-0002")
	ba.Events = append(ba.Events, a.next("SN-0003", "image", "failed", "image: write SN-0003.img: no space left on device"))
	ba.Units = append(ba.Units, Unit{Serial: "SN-0003", Station: "line-1", State: "failed", FailedStep: "image",
		Created: a.clock, Updated: a.clock})
	ba.Backlog = 42
	push(t, s, ba)
	bb := b.unitBatch("SN-0001", "SN-0004")
	bb.Events = append(bb.Events, b.next("SN-0005", "image", "failed", "image: write SN-0005.img: no space left on device"))
	push(t, s, bb)

	st := mustStations(t, s)
	if len(st) != 2 {
		t.Fatalf("stations: %+v", st)
	}
	l1, l2 := st[0], st[1]
	if l1.ID != "line-1" || l1.LastSeq != 13 || l1.Backlog != 42 || l1.Units != 3 || l1.Shippable != 2 || l1.Failed != 1 ||
		l1.Conflicts != 0 || time.Since(l1.LastSync) > time.Minute || !l1.LastEvent.Equal(micro(a.clock)) {
		t.Errorf("line-1: %+v", l1)
	}
	if l2.ID != "line-2" || l2.Units != 1 || l2.Conflicts != 1 {
		t.Errorf("line-2: %+v", l2)
	}

	stats, err := s.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if stats.UnitsByState["line-1"]["shippable"] != 2 || stats.UnitsByState["line-1"]["failed"] != 1 ||
		stats.UnitsByState["line-2"]["shippable"] != 1 {
		t.Errorf("units by state: %v", stats.UnitsByState)
	}
	if stats.FailuresByStep["line-1"]["image"] != 1 || stats.FailuresByStep["line-2"]["image"] != 1 {
		t.Errorf("failures by step: %v", stats.FailuresByStep)
	}
	if got := stats.FailureCauses["image: write {serial}.img: no space left"]; got != 2 {
		t.Errorf("failure causes: %v", stats.FailureCauses)
	}
	if got := len(stats.StepMS["line-1"]["key"]); got != 2 {
		t.Errorf("step durations: %v", stats.StepMS)
	}
	if h := stats.UnitsPerHour["line-1"]; len(h) != 24 || h[23] != 2 {
		t.Errorf("units per hour: %v", stats.UnitsPerHour)
	}
	if lag := stats.SyncLagMS["line-1"]; len(lag) != 13 || lag[0] < 0 || lag[len(lag)-1] > 60000 {
		t.Errorf("sync lag: %v", lag)
	}
	if stats.Conflicts != 1 {
		t.Errorf("conflicts: %d", stats.Conflicts)
	}

	cs, err := s.Conflicts(ctx, 10)
	if err != nil || len(cs) != 1 || cs[0].Kind != "unit" || cs[0].Station != "line-2" || cs[0].Other != "line-1" ||
		!strings.Contains(cs[0].Detail, "SN-0001 is shippable at station line-1") {
		t.Errorf("conflicts: %+v %v", cs, err)
	}
}
