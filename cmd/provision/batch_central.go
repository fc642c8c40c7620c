package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	"provision/central"
	"provision/station"
)

// batchLease is how long a worker holds a unit of a distributed batch: a worker that died frees its unit after it.
var batchLease = 10 * time.Minute

// centralJobs is a distributed batch's queue in the central store (station.BatchJobs). Every machine that runs the same
// serial list joins the same batch: its id is derived from the list.
type centralJobs struct {
	st     *station.Station
	store  *central.Store
	id     string
	worker string
}

func newCentralJobs(ctx context.Context, st *station.Station, units []station.BatchUnit) (*centralJobs, error) {
	store, err := st.CentralStore(ctx)
	if err != nil {
		return nil, err
	}
	serials := make([]string, len(units))
	for i, u := range units {
		serials[i] = u.Serial
	}
	sum := sha256.Sum256([]byte(strings.Join(serials, "\n")))
	host, _ := os.Hostname()
	j := &centralJobs{st: st, store: store, id: "batch-" + hex.EncodeToString(sum[:8]),
		worker: fmt.Sprintf("%s/%s/%d", st.Config.StationID, host, os.Getpid())}
	if err := store.AddBatchJobs(ctx, j.id, serials); err != nil {
		return nil, err
	}
	return j, nil
}

func (j *centralJobs) Take(ctx context.Context) (string, bool, error) {
	return j.store.TakeBatchJob(ctx, j.id, j.worker, batchLease)
}

func (j *centralJobs) Finish(ctx context.Context, serial, status string) error {
	return j.store.FinishBatchJob(ctx, j.id, serial, j.worker, status)
}

func (j *centralJobs) Remaining(ctx context.Context) (int, error) {
	return j.store.BatchRemaining(ctx, j.id)
}
