package station

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"provision/central"
	"provision/internal/testutil"
	"provision/inventory"
)

// centralStation is a fresh station with its own id, forwarding to the central store at dsn in mode.
func centralStation(t *testing.T, id, dsn, mode string) *Station {
	t.Helper()
	s := newStation(t)
	s.Config.StationID, s.Config.Central = id, CentralConfig{DSN: dsn, Mode: mode}
	s.Config.Attestation = AttestOff // soft keys and several units: not what these tests are about
	s.ConnectCentral(func(ctx context.Context) (*central.Store, error) { return central.Open(ctx, dsn) })
	t.Cleanup(s.CloseCentral)
	return s
}

func initCentral(t *testing.T, dsn string) *central.Store {
	t.Helper()
	ctx := context.Background()
	if err := central.Init(ctx, dsn); err != nil {
		t.Fatal(err)
	}
	st, err := central.Open(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return st
}

func centralEvents(t *testing.T, st *central.Store, serial string) int {
	t.Helper()
	d, err := st.Unit(context.Background(), serial)
	if err != nil {
		t.Fatal(err)
	}
	return len(d.Events)
}

// Two stations on one central store, the same serial at both at once: exactly one ships, the other is refused
// naming the station; after sync the store holds one unit, with every entry once.
func TestCentralSameSerialAtTwoStations(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	store := initCentral(t, dsn)
	a := centralStation(t, "line-1", dsn, CentralRequired)
	b := centralStation(t, "line-2", dsn, CentralRequired)
	img1, img2 := goldenImage(t), goldenImage(t)
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, s := range []*Station{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := openDevice(t, "soft")
			_, errs[i] = s.Provision(context.Background(), d, ProvisionRequest{Serial: "SN-TWICE", Image: []string{img1, img2}[i]}, nil)
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, ErrRefused) && errors.Is(err, central.ErrClaimed):
		default:
			t.Fatalf("unexpected error: %v", err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d stations shipped SN-TWICE: %v", ok, errs)
	}
	for _, s := range []*Station{a, b} {
		if _, err := s.SyncCentral(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	d, err := store.Unit(context.Background(), "SN-TWICE")
	if err != nil || d.Unit.State != string(inventory.StateShippable) {
		t.Fatalf("central unit: %+v %v", d.Unit, err)
	}
	// Later, the other station: refused, naming the station that shipped it.
	loser := a
	if d.Unit.Station == "line-1" {
		loser = b
	}
	_, err = loser.Provision(context.Background(), openDevice(t, "soft"), ProvisionRequest{Serial: "SN-TWICE", Image: goldenImage(t)}, nil)
	if !errors.Is(err, ErrRefused) || !errors.Is(err, central.ErrClaimed) {
		t.Fatalf("the other station later: %v", err)
	}
}

// preferred: the store down, units still ship locally and go to the store once it is back; required: refused with a
// clear cause, nothing recorded.
func TestCentralOutage(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.CreateDB(t)
	store := initCentral(t, dsn)
	pref := centralStation(t, "line-1", dsn, CentralPreferred)
	req := centralStation(t, "line-2", dsn, CentralRequired)
	pg.Stop(t)
	ctx := context.Background()
	for i := 1; i <= 2; i++ {
		if _, err := pref.Provision(ctx, openDevice(t, "soft"), ProvisionRequest{Serial: fmt.Sprintf("SN-DOWN-%d", i), Image: goldenImage(t)}, nil); err != nil {
			t.Fatalf("preferred with the store down: %v", err)
		}
	}
	if _, err := pref.SyncCentral(ctx); err == nil {
		t.Fatal("sync with the store down worked")
	}
	if st, _ := pref.SyncStatus(ctx); st.Backlog == 0 {
		t.Fatal("no backlog while the store is down")
	}
	start := time.Now()
	_, err := req.Provision(ctx, openDevice(t, "soft"), ProvisionRequest{Serial: "SN-REQ-1", Image: goldenImage(t)}, nil)
	if !errors.Is(err, ErrCentralUnreachable) {
		t.Fatalf("required with the store down: %v", err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("refusing took %s", took)
	}
	if _, err := req.Inv.Unit(ctx, "SN-REQ-1"); !errors.Is(err, inventory.ErrNotFound) {
		t.Fatalf("a refused unit was recorded: %v", err)
	}
	pg.Start(t)
	time.Sleep(centralRetryAfter) // the station waits that long before trying a store that failed
	res, err := pref.SyncCentral(ctx)
	if err != nil {
		t.Fatalf("sync after the store came back: %v", err)
	}
	if res.Backlog != 0 || res.Events == 0 {
		t.Fatalf("sync: %+v", res)
	}
	local, _ := pref.Inv.Events(ctx, "SN-DOWN-2")
	if n := centralEvents(t, store, "SN-DOWN-2"); n != len(local) {
		t.Fatalf("central holds %d entries of SN-DOWN-2, the station %d", n, len(local))
	}
}

// A sync that stopped after the store committed and before the cursor moved sends the same entries again: the store
// keeps one of each. A conflict found later (the same serial shipped at two stations while the store was down) is
// reported, and the first record kept.
func TestCentralResyncAndConflict(t *testing.T) {
	pg := testutil.StartPostgres(t)
	dsn := pg.CreateDB(t)
	store := initCentral(t, dsn)
	a := centralStation(t, "line-1", dsn, CentralPreferred)
	b := centralStation(t, "line-2", dsn, CentralPreferred)
	ctx := context.Background()
	if _, err := a.Provision(ctx, openDevice(t, "soft"), ProvisionRequest{Serial: "SN-A-1", Image: goldenImage(t)}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.SyncCentral(ctx); err != nil {
		t.Fatal(err)
	}
	// The cursor lost (a kill between the store's commit and the cursor's write): everything again.
	if err := a.Inv.SetSyncCursor(ctx, syncName, 0, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := a.SyncCentral(ctx); err != nil {
		t.Fatal(err)
	}
	local, _ := a.Inv.Events(ctx, "SN-A-1")
	if n := centralEvents(t, store, "SN-A-1"); n != len(local) {
		t.Fatalf("central holds %d entries, the station %d", n, len(local))
	}
	// Both stations ship SN-X while the store is down; the second to sync gets the conflict.
	pg.Stop(t)
	for _, s := range []*Station{a, b} {
		if _, err := s.Provision(ctx, openDevice(t, "soft"), ProvisionRequest{Serial: "SN-X", Image: goldenImage(t)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	pg.Start(t)
	time.Sleep(centralRetryAfter)
	if _, err := a.SyncCentral(ctx); err != nil {
		t.Fatal(err)
	}
	res, err := b.SyncCentral(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Conflicts) == 0 {
		t.Fatal("the same serial shipped at two stations: no conflict reported")
	}
	if d, _ := store.Unit(ctx, "SN-X"); d.Unit.Station != "line-1" {
		t.Fatalf("the first record was not kept: %+v", d.Unit)
	}
}

// storeJobs is the central store's batch queue for one worker (cmd/provision wires the same for batch --central).
type storeJobs struct {
	st            *central.Store
	batch, worker string
	lease         time.Duration
}

func (j storeJobs) Take(ctx context.Context) (string, bool, error) {
	return j.st.TakeBatchJob(ctx, j.batch, j.worker, j.lease)
}
func (j storeJobs) Finish(ctx context.Context, serial, status string) error {
	return j.st.FinishBatchJob(ctx, j.batch, serial, j.worker, status)
}
func (j storeJobs) Remaining(ctx context.Context) (int, error) {
	return j.st.BatchRemaining(ctx, j.batch)
}

// A distributed batch of two workers (two stations) over one list: every unit done exactly once; a unit a dead
// worker held comes back when its lease expires.
func TestCentralDistributedBatch(t *testing.T) {
	dsn := testutil.PostgresDB(t)
	store := initCentral(t, dsn)
	ctx := context.Background()
	var units []BatchUnit
	var serials []string
	for i := 1; i <= 12; i++ {
		units = append(units, BatchUnit{UnitRequest: UnitRequest{Serial: fmt.Sprintf("SN-B-%03d", i)}})
		serials = append(serials, units[i-1].Serial)
	}
	if err := store.AddBatchJobs(ctx, "b1", serials); err != nil {
		t.Fatal(err)
	}
	// A worker that died holding SN-B-001: its lease expires after a second.
	if s, ok, err := store.TakeBatchJob(ctx, "b1", "dead", time.Second); err != nil || !ok || s != "SN-B-001" {
		t.Fatalf("dead worker's take: %q %v %v", s, ok, err)
	}
	golden := goldenImage(t)
	results := make([][]BatchResult, 2)
	var wg sync.WaitGroup
	for w := range 2 {
		s := centralStation(t, fmt.Sprintf("line-%d", w+1), dsn, CentralRequired)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rs, err := s.Batch(ctx, openDevice(t, "soft"), units, BatchOptions{Golden: golden, OutDir: t.TempDir(), Workers: 2,
				Jobs: storeJobs{st: store, batch: "b1", worker: fmt.Sprintf("w%d", w), lease: time.Minute}}, nil)
			if err != nil {
				t.Error(err)
			}
			results[w] = rs
		}()
	}
	wg.Wait()
	done := map[string]int{}
	for _, rs := range results {
		for _, r := range rs {
			switch r.Status {
			case BatchOK:
				done[r.Serial]++
			case BatchSkipped:
			default:
				t.Errorf("%s: %s %v", r.Serial, r.Status, r.Err)
			}
		}
	}
	for _, s := range serials {
		if done[s] != 1 {
			t.Errorf("%s done %d times", s, done[s])
		}
	}
	if n, err := store.BatchRemaining(ctx, "b1"); err != nil || n != 0 {
		t.Fatalf("remaining %d, %v", n, err)
	}
}
