package central

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPushRepeatIsNoop(t *testing.T) {
	s := newStore(t)
	c := newChain("line-1")
	b := c.unitBatch("SN-0001", "SN-0002")
	b.Attestations = []Attestation{{LocalID: 1, Serial: "SN-0001", Time: time.Now(), Policy: "record", Outcome: "ok",
		Status: "trusted", EKSHA256: fp("ek1"), Warnings: []string{"w"}, Evidence: []byte(`{"a":1}`), EvidenceSHA256: fp("ev")}}
	b.Backlog = 7
	res := push(t, s, b)
	if res.Events != 12 || res.Units != 2 || res.Certificates != 2 || res.Attestations != 1 || len(res.Conflicts) != 0 {
		t.Fatalf("first push: %+v", res)
	}
	res = push(t, s, b)
	if res.Events != 0 || res.Units != 0 || res.Certificates != 0 || res.Attestations != 0 || len(res.Conflicts) != 0 {
		t.Fatalf("repeat: %+v, want nothing stored", res)
	}
	seq, hash, err := s.StationHead(context.Background(), "line-1")
	if err != nil || seq != 12 || hash != c.hash {
		t.Errorf("head = %d %.8s %v, want 12 %.8s", seq, hash, err, c.hash)
	}
	if seq, hash, err := s.StationHead(context.Background(), "nowhere"); err != nil || seq != 0 || hash != "" {
		t.Errorf("head of an unknown station = %d %q %v", seq, hash, err)
	}
	// A batch overlapping the stored chain: the stored part is compared, the rest stored.
	b2 := Batch{Station: "line-1", Events: append(b.Events[10:], c.next("SN-0002", "verify", "ok", ""))}
	if res := push(t, s, b2); res.Events != 1 || len(res.Conflicts) != 0 {
		t.Errorf("overlapping push: %+v", res)
	}
}

func TestPushDifferingRepeat(t *testing.T) {
	s := newStore(t)
	c := newChain("line-1")
	b := c.unitBatch("SN-0001")
	b.Attestations = []Attestation{{LocalID: 4, Serial: "SN-0001", Time: time.Now(), Status: "trusted", EvidenceSHA256: fp("a")}}
	push(t, s, b)

	// The same seqs with other content (a rewritten log), the same certificate serial with another fingerprint, and
	// the same attestation id with other evidence.
	other := newChain("line-1")
	other.clock = other.clock.Add(time.Hour)
	b2 := other.unitBatch("SN-0001")
	b2.Certificates[0].SHA256 = fp("forged")
	b2.Attestations = []Attestation{{LocalID: 4, Serial: "SN-0001", Time: b.Attestations[0].Time, Status: "trusted", EvidenceSHA256: fp("b")}}
	res := push(t, s, b2)
	kinds := map[string]int{}
	for _, cf := range res.Conflicts {
		kinds[cf.Kind]++
	}
	if kinds["event"] != 6 || kinds["certificate"] != 1 || kinds["attestation"] != 1 {
		t.Fatalf("conflicts = %v (%+v)", kinds, res.Conflicts)
	}
	if got := count(t, s, "SELECT count(*) FROM conflicts"); got != 8 {
		t.Errorf("recorded conflicts = %d, want 8", got)
	}
	// Pushing it again reports the conflicts again but records nothing new.
	if res := push(t, s, b2); len(res.Conflicts) != 8 {
		t.Errorf("second differing push: %d conflicts", len(res.Conflicts))
	}
	if got := count(t, s, "SELECT count(*) FROM conflicts"); got != 8 {
		t.Errorf("recorded conflicts after a second push = %d, want 8", got)
	}
	// The stored records are the first ones.
	d, err := s.Unit(context.Background(), "SN-0001")
	if err != nil {
		t.Fatal(err)
	}
	if d.Certificates[0].SHA256 != b.Certificates[0].SHA256 || d.Events[0].Hash != b.Events[0].Hash ||
		d.Attestation.EvidenceSHA256 != fp("a") {
		t.Errorf("a differing repeat overwrote the stored records: %+v", d)
	}
}

func TestPushChainGap(t *testing.T) {
	s := newStore(t)
	c := newChain("line-1")
	push(t, s, c.unitBatch("SN-0001"))

	skipped := c.unitBatch("SN-0002") // never pushed
	_ = skipped
	gap := c.unitBatch("SN-0003")
	_, err := s.Push(context.Background(), gap)
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("push after a gap: %v, want ErrConflict", err)
	}
	if got := count(t, s, "SELECT count(*) FROM units WHERE serial = 'SN-0003'"); got != 0 {
		t.Errorf("a refused push stored its unit")
	}
	// The next event with a wrong previous hash.
	wrong := Batch{Station: "line-1", Events: []Event{skipped.Events[0]}}
	wrong.Events[0].PrevHash = fp("not the head")
	if _, err := s.Push(context.Background(), wrong); !errors.Is(err, ErrConflict) {
		t.Errorf("push with a wrong previous hash: %v, want ErrConflict", err)
	}
	// A batch that is not a chain in itself.
	broken := Batch{Station: "line-1", Events: []Event{skipped.Events[0], skipped.Events[2]}}
	if _, err := s.Push(context.Background(), broken); !errors.Is(err, ErrConflict) {
		t.Errorf("push of a broken chain: %v, want ErrConflict", err)
	}
	// The right continuation is fine.
	if res := push(t, s, skipped); res.Events != 6 {
		t.Errorf("continuation: %+v", res)
	}
	// A record of another station in the batch is refused.
	if _, err := s.Push(context.Background(), Batch{Station: "line-1", Units: []Unit{unit("X", "line-2", "new", time.Now())}}); err == nil {
		t.Error("a batch carrying another station's unit was accepted")
	}
}

func TestPushSerialAtTwoStations(t *testing.T) {
	s := newStore(t)
	a, b := newChain("line-1"), newChain("line-2")
	push(t, s, a.unitBatch("SN-0001"))
	res := push(t, s, b.unitBatch("SN-0001"))
	if len(res.Conflicts) != 1 || res.Conflicts[0].Kind != "unit" || res.Conflicts[0].Other != "line-1" ||
		res.Conflicts[0].Key != "SN-0001" {
		t.Fatalf("conflicts = %+v", res.Conflicts)
	}
	if res.Events != 6 || res.Units != 0 {
		t.Errorf("push of the conflicting station: %+v (its events are stored, its unit not)", res)
	}
	d, err := s.Unit(context.Background(), "SN-0001")
	if err != nil || d.Unit.Station != "line-1" {
		t.Fatalf("unit = %+v, %v; want line-1's kept", d.Unit, err)
	}

	// A unit that failed at line-1 may be provisioned at line-2.
	push(t, s, Batch{Station: "line-1", Events: []Event{a.next("SN-0002", "image", "failed", "no space")},
		Units: []Unit{unit("SN-0002", "line-1", "failed", a.clock)}})
	later := b.unitBatch("SN-0002")
	res = push(t, s, later)
	if len(res.Conflicts) != 0 || res.Units != 1 {
		t.Fatalf("takeover of a failed unit: %+v", res)
	}
	if d, _ := s.Unit(context.Background(), "SN-0002"); d.Unit.Station != "line-2" || d.Unit.State != "shippable" {
		t.Errorf("after takeover: %+v", d.Unit)
	}
	// line-2 pushing a state-new row for a serial shippable at line-1 made nothing: ignored.
	if res := push(t, s, Batch{Station: "line-2", Units: []Unit{unit("SN-0001", "line-2", "new", time.Now())}}); len(res.Conflicts) != 0 || res.Units != 0 {
		t.Errorf("new row over another station's unit: %+v", res)
	}
	// The station's own older version is ignored, a newer one stored.
	old := unit("SN-0002", "line-2", "keyed", b.clock.Add(-time.Hour))
	if res := push(t, s, Batch{Station: "line-2", Units: []Unit{old}}); res.Units != 0 {
		t.Errorf("older version stored: %+v", res)
	}
	newer := unit("SN-0002", "line-2", "failed", b.clock.Add(time.Hour))
	newer.FailedStep, newer.Error = "verify", "bad image"
	if res := push(t, s, Batch{Station: "line-2", Units: []Unit{newer}}); res.Units != 1 {
		t.Errorf("newer version not stored: %+v", res)
	}
	if d, _ := s.Unit(context.Background(), "SN-0002"); d.Unit.State != "failed" || d.Unit.FailedStep != "verify" {
		t.Errorf("after update: %+v", d.Unit)
	}
}

func TestPushEKConflict(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	ek := fp("one TPM")
	u1 := unit("SN-0001", "line-1", "shippable", time.Now())
	u1.EKSHA256 = ek
	push(t, s, Batch{Station: "line-1", Units: []Unit{u1}})
	u2 := unit("SN-0002", "line-2", "keyed", time.Now())
	u2.EKSHA256 = ek
	u3 := unit("SN-0003", "line-2", "keyed", time.Now())
	res := push(t, s, Batch{Station: "line-2", Units: []Unit{u2, u3}})
	if len(res.Conflicts) != 1 || res.Conflicts[0].Kind != "ek" || res.Conflicts[0].Key != ek || res.Units != 1 {
		t.Fatalf("push: %+v", res)
	}
	if _, err := s.Unit(ctx, "SN-0002"); !errors.Is(err, ErrNotFound) {
		t.Errorf("the unit with a taken EK was stored: %v", err)
	}
	err := s.CheckEK(ctx, ek, "SN-0002")
	if !errors.Is(err, ErrClaimed) {
		t.Fatalf("CheckEK of a bound TPM: %v", err)
	}
	if want := "the TPM of SN-0002 is bound to SN-0001 at station line-1"; !strings.Contains(err.Error(), want) {
		t.Errorf("message %q, want %q", err, want)
	}
	for _, args := range [][2]string{{ek, "SN-0001"}, {fp("other"), "SN-0002"}, {"", "SN-0002"}} {
		if err := s.CheckEK(ctx, args[0], args[1]); err != nil {
			t.Errorf("CheckEK(%.8s, %s): %v", args[0], args[1], err)
		}
	}
	// Two units of one batch with the same EK: the second is the conflict.
	a, b := unit("SN-0010", "line-3", "keyed", time.Now()), unit("SN-0011", "line-3", "keyed", time.Now())
	a.EKSHA256, b.EKSHA256 = fp("twice"), fp("twice")
	if res := push(t, s, Batch{Station: "line-3", Units: []Unit{a, b}}); len(res.Conflicts) != 1 || res.Units != 1 {
		t.Errorf("same EK twice in a batch: %+v", res)
	}
}

// TestPushConcurrentStations: 8 stations push at once, some serials at two of them; nothing deadlocks, every record
// is stored once, every contested serial belongs to exactly one station.
func TestPushConcurrentStations(t *testing.T) {
	s := newStore(t)
	const stations, batches, perBatch = 8, 5, 40
	var wg sync.WaitGroup
	errs := make(chan error, stations)
	conflicts := make(chan int, stations*batches)
	for st := 0; st < stations; st++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newChain(fmt.Sprintf("line-%d", st))
			for i := 0; i < batches; i++ {
				sns := serials(fmt.Sprintf("S%d-%d-", st, i), perBatch)
				sns = append(sns, fmt.Sprintf("SHARED-%d-%d", i, st/2)) // stations 2k and 2k+1 both make it
				res, err := s.Push(context.Background(), c.unitBatch(sns...))
				if err != nil {
					errs <- err
					return
				}
				conflicts <- len(res.Conflicts)
			}
		}()
	}
	wg.Wait()
	close(errs)
	close(conflicts)
	for err := range errs {
		t.Fatal(err)
	}
	total := 0
	for n := range conflicts {
		total += n
	}
	// Each shared serial: a unit conflict for the loser (its certificate, of its own serial, is stored).
	if want := batches * stations / 2; total != want {
		t.Errorf("conflicts = %d, want %d", total, want)
	}
	if got, want := count(t, s, "SELECT count(*) FROM units"), stations*batches*perBatch+batches*stations/2; got != want {
		t.Errorf("units = %d, want %d", got, want)
	}
	if got, want := count(t, s, "SELECT count(*) FROM events"), stations*batches*(perBatch+1)*6; got != want {
		t.Errorf("events = %d, want %d", got, want)
	}
	for _, si := range mustStations(t, s) {
		if si.LastSeq != int64(batches*(perBatch+1)*6) {
			t.Errorf("station %s head %d", si.ID, si.LastSeq)
		}
	}
}

// TestPushConcurrentSameStation: two pushers of one station (a restarted sync racing the old one) push the same
// batches: each event is stored once, nothing is a conflict.
func TestPushConcurrentSameStation(t *testing.T) {
	s := newStore(t)
	c := newChain("line-1")
	var bs []Batch
	for i := 0; i < 10; i++ {
		bs = append(bs, c.unitBatch(serials(fmt.Sprintf("B%d-", i), 20)...))
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	stored, conflicts := 0, 0
	for g := 0; g < 2; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, b := range bs {
				res, err := s.Push(context.Background(), b)
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				stored += res.Events
				conflicts += len(res.Conflicts)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if stored != 10*20*6 || conflicts != 0 {
		t.Errorf("stored %d events (want %d), %d conflicts", stored, 10*20*6, conflicts)
	}
	if got := count(t, s, "SELECT count(*) FROM events"); got != 10*20*6 {
		t.Errorf("events = %d", got)
	}
}

func mustStations(t *testing.T, s *Store) []StationInfo {
	t.Helper()
	st, err := s.Stations(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// BenchmarkPush measures the central ingest rate: batches of 500 units, each with its 6 events and certificate (a
// station draining its backlog). Reports units/s.
func BenchmarkPush(b *testing.B) {
	s := newStore(b)
	c := newChain("bench")
	const perBatch = 500
	batches := make([]Batch, b.N)
	for i := range batches {
		batches[i] = c.unitBatch(serials(fmt.Sprintf("B%06d-", i), perBatch)...)
	}
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if _, err := s.Push(context.Background(), batches[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*perBatch)/time.Since(start).Seconds(), "units/s")
}

// BenchmarkPushStations is BenchmarkPush with 8 stations draining their backlogs at once (each b.N batches of 500
// units). Reports the store's total units/s.
func BenchmarkPushStations(b *testing.B) {
	s := newStore(b)
	const stations, perBatch = 8, 500
	work := make([][]Batch, stations)
	for st := range work {
		c := newChain(fmt.Sprintf("line-%d", st))
		for i := 0; i < b.N; i++ {
			work[st] = append(work[st], c.unitBatch(serials(fmt.Sprintf("L%d-B%06d-", st, i), perBatch)...))
		}
	}
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	for st := range work {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, batch := range work[st] {
				if _, err := s.Push(context.Background(), batch); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(stations*b.N*perBatch)/time.Since(start).Seconds(), "units/s")
}

// BenchmarkPushLatency: 8 stations each push one unit at a time (a running line syncing as it goes): reports the p50
// and p99 time of a push, the store's share of the sync lag.
func BenchmarkPushLatency(b *testing.B) {
	s := newStore(b)
	const stations = 8
	work := make([][]Batch, stations)
	for st := range work {
		c := newChain(fmt.Sprintf("line-%d", st))
		for i := 0; i < b.N; i++ {
			work[st] = append(work[st], c.unitBatch(fmt.Sprintf("L%d-%06d", st, i)))
		}
	}
	b.ResetTimer()
	var mu sync.Mutex
	var took []time.Duration
	var wg sync.WaitGroup
	for st := range work {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, batch := range work[st] {
				t0 := time.Now()
				if _, err := s.Push(context.Background(), batch); err != nil {
					b.Error(err)
					return
				}
				mu.Lock()
				took = append(took, time.Since(t0))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(took[len(took)*99/100].Microseconds())/1000, "p99-ms")
}
