package central

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestClaimRace: two stations claim the same serial at the same moment: exactly one wins, the other is told who.
func TestClaimRace(t *testing.T) {
	s := newStore(t)
	for i := 0; i < 10; i++ {
		serial := fmt.Sprintf("SN-%04d", i)
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make([]error, 2)
		for g := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[g] = s.ClaimUnit(context.Background(), serial, fmt.Sprintf("line-%d", g+1), "op", time.Minute)
			}()
		}
		close(start)
		wg.Wait()
		won := 0
		for g, err := range errs {
			switch {
			case err == nil:
				won++
			case errors.Is(err, ErrClaimed):
				other := fmt.Sprintf("line-%d", 2-g)
				if want := serial + " is being provisioned at station " + other + " (operator op) since "; !strings.Contains(err.Error(), want) {
					t.Errorf("refusal %q, want it to contain %q", err, want)
				}
			default:
				t.Fatalf("claim %s: %v", serial, err)
			}
		}
		if won != 1 {
			t.Fatalf("%s: %d stations won the claim (%v)", serial, won, errs)
		}
	}
}

func TestClaimRenewReleaseExpire(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if err := s.ClaimUnit(ctx, "SN-1", "line-1", "alice", time.Minute); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimUnit(ctx, "SN-1", "line-1", "alice", time.Minute); err != nil {
		t.Fatalf("renewal by the same station: %v", err)
	}
	err := s.ClaimUnit(ctx, "SN-1", "line-2", "bob", time.Minute)
	var ce *ClaimError
	if !errors.As(err, &ce) || ce.Station != "line-1" || ce.Operator != "alice" || ce.What != "provisioning" {
		t.Fatalf("claim held elsewhere: %v", err)
	}
	if err := s.ReleaseUnit(ctx, "SN-1", "line-2"); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimUnit(ctx, "SN-1", "line-2", "bob", time.Minute); !errors.Is(err, ErrClaimed) {
		t.Fatalf("another station's release dropped the claim: %v", err)
	}
	if err := s.ReleaseUnit(ctx, "SN-1", "line-1"); err != nil {
		t.Fatal(err)
	}
	if err := s.ClaimUnit(ctx, "SN-1", "line-2", "bob", 200*time.Millisecond); err != nil {
		t.Fatalf("claim after release: %v", err)
	}
	// line-2's claim expires: line-1 takes over.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := s.ClaimUnit(ctx, "SN-1", "line-1", "alice", time.Minute)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrClaimed) || time.Now().After(deadline) {
			t.Fatalf("claim after expiry: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestClaimShippableElsewhere(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	c := newChain("line-2")
	push(t, s, c.unitBatch("SN-0001"))
	err := s.ClaimUnit(ctx, "SN-0001", "line-1", "alice", time.Minute)
	if !errors.Is(err, ErrClaimed) {
		t.Fatalf("claim of a unit shippable elsewhere: %v", err)
	}
	if !regexp.MustCompile(`SN-0001 is shippable at station line-2 since \d{4}-\d\d-\d\d$`).MatchString(err.Error()) {
		t.Errorf("message %q", err)
	}
	if err := s.ClaimUnit(ctx, "SN-0001", "line-2", "bob", time.Minute); err != nil {
		t.Errorf("the station holding the unit may claim it (reprovision): %v", err)
	}
}

// TestBatchJobs: two workers over 200 serials: each unit is taken exactly once.
func TestBatchJobs(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	list := serials("SN-", 200)
	for i := 0; i < 2; i++ { // every worker adds the list: idempotent
		if err := s.AddBatchJobs(ctx, "b1", list); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	taken := map[string]string{}
	var wg sync.WaitGroup
	for w := 0; w < 2; w++ {
		worker := fmt.Sprintf("w%d", w)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				sn, ok, err := s.TakeBatchJob(ctx, "b1", worker, time.Minute)
				if err != nil {
					t.Error(err)
					return
				}
				if !ok {
					return
				}
				mu.Lock()
				if prev, dup := taken[sn]; dup {
					t.Errorf("%s taken by %s and %s", sn, prev, worker)
				}
				taken[sn] = worker
				mu.Unlock()
				if err := s.FinishBatchJob(ctx, "b1", sn, worker, "ok"); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if len(taken) != 200 {
		t.Fatalf("taken %d units, want 200", len(taken))
	}
	per := map[string]int{}
	for _, w := range taken {
		per[w]++
	}
	t.Logf("units per worker: %v", per)
	prog, err := s.BatchProgress(ctx, "b1")
	if err != nil || prog["ok"] != 200 || len(prog) != 1 {
		t.Errorf("progress = %v, %v", prog, err)
	}
	// Adding the list again leaves finished units finished.
	if err := s.AddBatchJobs(ctx, "b1", list); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.TakeBatchJob(ctx, "b1", "w9", time.Minute); ok {
		t.Error("a finished batch handed out a unit")
	}
}

func TestBatchJobLeaseExpiry(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if err := s.AddBatchJobs(ctx, "b2", []string{"SN-B", "SN-A"}); err != nil {
		t.Fatal(err)
	}
	first, ok, err := s.TakeBatchJob(ctx, "b2", "dead", 200*time.Millisecond)
	if err != nil || !ok || first != "SN-B" {
		t.Fatalf("take = %q %v %v, want SN-B (list order)", first, ok, err)
	}
	second, _, _ := s.TakeBatchJob(ctx, "b2", "live", time.Minute)
	if second != "SN-A" {
		t.Fatalf("second take = %q", second)
	}
	if err := s.FinishBatchJob(ctx, "b2", second, "live", "ok"); err != nil {
		t.Fatal(err)
	}
	// Nothing left until the dead worker's lease runs out; then its unit is taken over.
	var got string
	deadline := time.Now().Add(5 * time.Second)
	for got == "" {
		sn, ok, err := s.TakeBatchJob(ctx, "b2", "live", time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			got = sn
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the expired lease was never taken over")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got != "SN-B" {
		t.Fatalf("took over %q, want SN-B", got)
	}
	if err := s.FinishBatchJob(ctx, "b2", "SN-B", "dead", "ok"); !errors.Is(err, ErrClaimed) {
		t.Errorf("finish by the worker that lost its lease: %v, want ErrClaimed", err)
	}
	if err := s.RenewBatchJob(ctx, "b2", "SN-B", "dead", time.Minute); !errors.Is(err, ErrClaimed) {
		t.Errorf("renew by the worker that lost its lease: %v, want ErrClaimed", err)
	}
	if err := s.RenewBatchJob(ctx, "b2", "SN-B", "live", time.Minute); err != nil {
		t.Error(err)
	}
	if err := s.FinishBatchJob(ctx, "b2", "SN-B", "live", "failed"); err != nil {
		t.Fatal(err)
	}
	if err := s.FinishBatchJob(ctx, "b2", "SN-B", "live", "failed"); err != nil {
		t.Errorf("finishing twice: %v", err)
	}
	if err := s.FinishBatchJob(ctx, "b2", "SN-B", "live", "done"); err == nil {
		t.Error("status done accepted")
	}
	if err := s.FinishBatchJob(ctx, "b2", "SN-Z", "live", "ok"); !errors.Is(err, ErrNotFound) {
		t.Errorf("finish of a unit not in the batch: %v", err)
	}
	prog, _ := s.BatchProgress(ctx, "b2")
	keys := []string{}
	for k, v := range prog {
		keys = append(keys, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(keys)
	if strings.Join(keys, " ") != "failed=1 ok=1" {
		t.Errorf("progress %v", keys)
	}
}
