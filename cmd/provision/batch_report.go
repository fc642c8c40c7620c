package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"provision/internal/fsutil"
	"provision/inventory"
	"provision/station"
)

// batchUnitJSON is one row of report.json (and one line of batch --json).
type batchUnitJSON struct {
	Serial      string          `json:"serial"`
	State       inventory.State `json:"state"`  // the inventory's state after the run; "" when it has no record of the unit
	Status      string          `json:"status"` // ok | failed | skipped | not_started | interrupted: what this run did
	Image       string          `json:"image"`
	SHA256      string          `json:"sha256,omitempty"`
	Certificate *certJSON       `json:"certificate,omitempty"` // the unit's active certificate
	Steps       []stepJSON      `json:"steps"`
	MS          int64           `json:"ms"`
	Error       string          `json:"error,omitempty"`
	Detail      string          `json:"detail,omitempty"`
	Run         string          `json:"run"` // start of the batch run the status is from (RFC 3339 UTC)
}

type batchSummary struct {
	OK          int   `json:"ok"`
	Failed      int   `json:"failed"`
	Skipped     int   `json:"skipped"`
	NotStarted  int   `json:"not_started"`
	Interrupted int   `json:"interrupted"`
	Earlier     int   `json:"earlier"` // rows kept from earlier runs for units not in this run's list
	MS          int64 `json:"ms"`
}

type batchReport struct {
	Units   []batchUnitJSON `json:"units"`
	Summary batchSummary    `json:"summary"`
}

func (s *batchSummary) add(status string) {
	switch status {
	case station.BatchOK:
		s.OK++
	case station.BatchFailed:
		s.Failed++
	case station.BatchSkipped:
		s.Skipped++
	case station.BatchNotStarted:
		s.NotStarted++
	case station.BatchInterrupted:
		s.Interrupted++
	}
}

func toBatchJSON(r station.BatchResult, run string) batchUnitJSON {
	u := toUnitJSON(r.Result, r.Err)
	out := batchUnitJSON{Serial: r.Serial, State: r.State, Status: r.Status, Image: r.Image, SHA256: r.SHA256,
		Certificate: u.Certificate, Steps: u.Steps, MS: r.Duration.Milliseconds(), Error: u.Error, Detail: r.Detail, Run: run}
	if c := r.Certificate; c.SHA256 != "" {
		out.Certificate = &certJSON{Serial: c.Serial, SHA256: c.SHA256, NotAfter: c.NotAfter.UTC().Format(rfc3339)}
	}
	if r.Result.Serial == "" { // the pipeline did not run: no steps to show
		out.Steps = []stepJSON{}
	}
	return out
}

// readEarlierReport reads the report.json an earlier batch left in dir (none: an empty report). An unreadable one is
// kept aside as report.json.unreadable-<time> rather than lost.
func readEarlierReport(dir string) (batchReport, string, error) {
	p := filepath.Join(dir, "report.json")
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return batchReport{}, "", nil
	}
	var rep batchReport
	if err == nil {
		err = json.Unmarshal(b, &rep)
	}
	if err == nil {
		return rep, "", nil
	}
	aside := fmt.Sprintf("%s.unreadable-%s", p, time.Now().UTC().Format("20060102T150405Z"))
	if rerr := os.Rename(p, aside); rerr != nil {
		return batchReport{}, "", fmt.Errorf("batch: earlier report %s is unreadable (%v) and cannot be moved aside: %w", p, err, rerr)
	}
	return batchReport{}, fmt.Sprintf("batch: earlier report %s is unreadable (%v): moved to %s", p, err, aside), nil
}

// batchRows turns results into report rows as they come, on top of the earlier report: a unit this run did not
// give a new image keeps the earlier image hash (same image, same active certificate); with hash, a skipped unit
// that has none gets one.
type batchRows struct {
	prev map[string]batchUnitJSON
	rows map[string]batchUnitJSON
	run  string
	hash bool
}

func newBatchRows(earlier batchReport, run string, hash bool) *batchRows {
	b := &batchRows{prev: make(map[string]batchUnitJSON, len(earlier.Units)), rows: map[string]batchUnitJSON{}, run: run, hash: hash}
	for _, u := range earlier.Units {
		b.prev[u.Serial] = u
	}
	return b
}

// add makes and keeps the row of one result (called once per unit).
func (b *batchRows) add(r station.BatchResult) batchUnitJSON {
	u := toBatchJSON(r, b.run)
	if p, ok := b.prev[u.Serial]; ok && u.Status != station.BatchOK && u.SHA256 == "" && u.Image != "" &&
		u.Image == p.Image && sameCert(u.Certificate, p.Certificate) {
		u.SHA256 = p.SHA256
	}
	if b.hash && u.Status == station.BatchSkipped && u.SHA256 == "" && u.Image != "" {
		u.SHA256, _ = station.ImageSHA256(u.Image)
	}
	b.rows[u.Serial] = u
	return u
}

// report is this run's rows in list order, then the earlier rows of units not in this run, with their state
// refreshed from the inventory.
func (b *batchRows) report(ctx context.Context, st *station.Station, earlier batchReport, results []station.BatchResult) batchReport {
	rep := batchReport{Units: make([]batchUnitJSON, 0, len(results)+len(earlier.Units))}
	inRun := make(map[string]bool, len(results))
	for _, r := range results {
		u, ok := b.rows[r.Serial]
		if !ok {
			u = b.add(r)
		}
		inRun[u.Serial] = true
		rep.Summary.add(u.Status)
		rep.Units = append(rep.Units, u)
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	for _, u := range earlier.Units {
		if inRun[u.Serial] {
			continue
		}
		inRun[u.Serial] = true // a repeated row in a hand-edited report is kept once
		if unit, err := st.Inv.Unit(rctx, u.Serial); err == nil {
			u.State = unit.State
		}
		rep.Summary.Earlier++
		rep.Units = append(rep.Units, u)
	}
	return rep
}

func sameCert(a, b *certJSON) bool {
	return a != nil && b != nil && a.SHA256 == b.SHA256
}

var reportCSVHeader = []string{"serial", "status", "state", "image", "certificate_serial", "certificate_sha256", "image_sha256",
	"ms", "error", "detail", "run"}

func writeReports(dir string, rep batchReport) error {
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileSync(filepath.Join(dir, "report.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("batch: report: %w", err)
	}
	var buf bytes.Buffer
	w := csv.NewWriter(&buf)
	w.Write(reportCSVHeader)
	for _, u := range rep.Units {
		var cs, ch string
		if u.Certificate != nil {
			cs, ch = u.Certificate.Serial, u.Certificate.SHA256
		}
		w.Write([]string{u.Serial, u.Status, string(u.State), u.Image, cs, ch, u.SHA256, fmt.Sprint(u.MS), u.Error, u.Detail, u.Run})
	}
	w.Flush()
	if err := fsutil.WriteFileSync(filepath.Join(dir, "report.csv"), buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("batch: report: %w", err)
	}
	return nil
}
