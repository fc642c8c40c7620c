package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"provision/station"
	"provision/tpm"
)

func newBatchCmd(g *globals) *cobra.Command {
	var (
		serials, golden, out, tpmURI, profile, targets, operator string
		distributed                                              bool
		workers                                                  int
		asJSON, failFast, hash, reprovision                      bool
		hf                                                       handshakeFlags
	)
	c := &cobra.Command{
		Use:   "batch --serials FILE --image GOLDEN --out DIR [--workers N] [--tpm soft|sim|URI]",
		Short: "Prepare per-unit images from a golden image and a list of serials",
		Long: `batch turns one golden image and a list of serials into per-unit images, each provisioned end to end (key,
certificate, image written and verified, handshake test) and recorded in the inventory:
  DIR/<serial>.img     cloned from GOLDEN (a reflink where the file system supports it, else a sparse copy of the data
                       regions only), personalised in place, verified; written as <serial>.img.partial, synced, and
                       renamed only when the unit is shippable. The golden image is never modified. Images are 0600
                       in a 0700 DIR (they hold the units' keys; an existing DIR is made 0700).
  DIR/report.json      {"units":[{serial,state,status,image,sha256,certificate,steps,ms,error,detail,run}],
                        "summary":{ok,failed,skipped,not_started,interrupted,earlier,ms}}
  DIR/report.csv       one row per unit (with --targets, --out only says where the reports go; default: here)
status is what this run did: ok, failed, skipped (already shippable), not_started (the batch stopped before it),
interrupted (stopped between steps; resumes next time); state is the unit's state in the inventory. A rerun keeps
the rows of earlier runs (certificate, image, hash).
--serials FILE: one serial per line (a first line "serial" is a header), or CSV with a "serial" column whose other
columns fill {name} placeholders in the subject and templates. Every line is checked first: any bad line is exit 2,
listing each, before anything is written.
--targets FILE (CSV serial,image) personalises existing per-unit images or block devices in place instead of cloning.
Keys are software keys by default (no unit is present); --tpm sim for CI, or a TPM that travels with the image.
Running it again skips shippable units (--reprovision does them again) and retries failed ones. One batch at a time
per DIR: a second one is refused (exit 4). Ctrl-C stops cleanly: running units stop between steps and resume next
time; the reports are written; exit 130. Exit 1 if any unit failed; --fail-fast takes no new unit after a failure.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := hf.check("batch"); err != nil {
				return err
			}
			ctx := cmd.Context()
			if (serials == "") == (targets == "") {
				return usagef("batch: give --serials (with --image and --out) or --targets")
			}
			if serials != "" && (golden == "" || out == "") {
				return usagef("batch: --serials needs --image GOLDEN and --out DIR")
			}
			if workers < 1 || workers > 64 {
				return usagef("batch: --workers %d: 1 to 64", workers)
			}
			s, err := g.openSession(ctx, "batch")
			if err != nil {
				return err
			}
			defer s.close()
			st := s.st
			if _, err := st.Config.ResolveProfile(profile); err != nil {
				return usageError{fmt.Errorf("batch: %w", err)}
			}
			var units []station.BatchUnit
			if serials != "" {
				f, err := os.Open(serials)
				if err != nil {
					return usagef("batch: --serials: %v", err)
				}
				reqs, err := station.ParseSerialList(serials, f, st.Config.SerialRule())
				f.Close()
				if err != nil {
					return fmt.Errorf("batch: %w", err)
				}
				for _, r := range reqs {
					units = append(units, station.BatchUnit{UnitRequest: r})
				}
				if gs, err := os.Stat(golden); err != nil || !gs.Mode().IsRegular() {
					return usagef("batch: --image %s: not a readable golden image file", golden)
				}
			} else {
				data, err := os.ReadFile(targets)
				if err != nil {
					return usagef("batch: --targets: %v", err)
				}
				if units, err = station.ParseTargets(targets, data, st.Config.SerialRule()); err != nil {
					return fmt.Errorf("batch: %w", err)
				}
			}
			reportDir := out
			if reportDir == "" {
				reportDir = "."
			} else {
				was, err := station.PrepareOutDir(out)
				if err != nil {
					return &exitError{code: exitStation, err: fmt.Errorf("batch: --out: %w", err)}
				}
				if was != 0 {
					fmt.Fprintf(g.stderr, "batch: --out %s was %04o: made 0700, the images hold device keys\n", out, was)
				}
			}
			lock, err := station.LockOutDir(reportDir)
			if err != nil {
				return &exitError{code: exitStation, err: fmt.Errorf("batch: %w", err)}
			}
			defer lock.Release()
			if err := s.openUnit(ctx, tpmURI, "soft", &hf); err != nil {
				return err
			}
			var openTPMPerUnit func(context.Context, string) (*tpm.Device, error)
			switch {
			case s.tpmURI == "sim": // each unit brings its own TPM: a fresh simulator per unit (one at a time per process)
				s.dev.Close()
				openTPMPerUnit = func(ctx context.Context, _ string) (*tpm.Device, error) { return openTPM(ctx, "sim") }
			case s.dev == nil: // a cmd: TPM URI naming {serial}: each unit's own fixture command
				openTPMPerUnit = s.openUnitTPM
			}
			if out != "" {
				st.RemoveStalePartials(ctx, out)
			}
			earlier, warning, err := readEarlierReport(reportDir)
			if err != nil {
				return err
			}
			if warning != "" {
				fmt.Fprintln(g.stderr, warning)
			}
			start := time.Now()
			run := start.UTC().Format(rfc3339)
			prog := newProgress(g.stderr, len(units), asJSON)
			enc := json.NewEncoder(g.stdout)
			rows := newBatchRows(earlier, run, hash)
			var jobs station.BatchJobs
			if distributed {
				if !st.HasCentral() {
					return usagef("batch: --central needs a central store: set central: dsn in station.yaml")
				}
				cj, err := newCentralJobs(ctx, st, units)
				if err != nil {
					return fmt.Errorf("batch --central: %w", err)
				}
				jobs = cj
				fmt.Fprintf(g.stderr, "batch %s: %d units shared through the central store (worker %s)\n", cj.id, len(units), cj.worker)
			}
			syncer := st.NewSyncer(time.Second) // nil without a central store
			if syncer != nil {
				sctx, stop := context.WithCancel(ctx)
				done := make(chan struct{})
				go func() { syncer.Run(sctx); close(done) }()
				defer func() {
					stop()
					<-done
					res, _, err := syncer.Status()
					reportSync(g, res, err)
				}()
			}
			results, err := st.Batch(ctx, s.dev, units, station.BatchOptions{Golden: golden, OutDir: out, Workers: workers,
				Profile: profile, Handshake: s.hc, FailFast: failFast, Hash: hash, Reprovision: reprovision,
				Operator: operatorName(operator), OpenTPM: openTPMPerUnit, Jobs: jobs}, func(r station.BatchResult) {
				prog.add(r)
				syncer.Kick()
				row := rows.add(r)
				if asJSON {
					enc.Encode(row)
				}
			})
			prog.finish()
			if err != nil {
				return err
			}
			rep := rows.report(ctx, st, earlier, results)
			rep.Summary.MS = time.Since(start).Milliseconds()
			if err := writeReports(reportDir, rep); err != nil {
				return err
			}
			sum := rep.Summary
			reportFile := filepath.Join(reportDir, "report.json")
			if !asJSON {
				stopped := ""
				if sum.Interrupted+sum.NotStarted > 0 {
					stopped = fmt.Sprintf(", %d interrupted, %d not started", sum.Interrupted, sum.NotStarted)
				}
				fmt.Fprintf(g.stdout, "%d ok, %d failed, %d skipped%s in %s; report: %s\n", sum.OK, sum.Failed, sum.Skipped,
					stopped, time.Since(start).Round(time.Millisecond), reportFile)
				for _, u := range rep.Units[:len(results)] {
					if u.Status == station.BatchFailed {
						fmt.Fprintf(g.stdout, "✗ %s  %s\n", u.Serial, u.Error)
					}
				}
			}
			if ctx.Err() != nil && sum.Interrupted+sum.NotStarted > 0 {
				return fmt.Errorf("batch: %w: %d interrupted, %d not started (see %s): run the same command again to finish",
					station.ErrInterrupted, sum.Interrupted, sum.NotStarted, reportFile)
			}
			if sum.Failed > 0 {
				return &exitError{code: exitFailed, err: fmt.Errorf("batch: %d of %d units failed (see %s)", sum.Failed,
					len(units), reportFile)}
			}
			return nil
		},
	}
	f := c.Flags()
	f.StringVar(&serials, "serials", "", "serial list: one per line, or CSV with a serial column")
	f.StringVar(&golden, "image", "", "the golden image to clone per unit (never modified)")
	f.StringVar(&out, "out", "", "directory for the per-unit images and the reports")
	f.StringVar(&targets, "targets", "", "CSV serial,image: personalise existing images or block devices in place")
	f.IntVar(&workers, "workers", 2, "units in parallel")
	f.StringVar(&tpmURI, "tpm", "soft", "key source: soft (default), sim, or a TPM URI that travels with the image")
	f.StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	hf.register(f)
	f.StringVar(&operator, "operator", "", "operator recorded with each unit")
	f.BoolVar(&asJSON, "json", false, "one JSON line per unit on stdout")
	f.BoolVar(&failFast, "fail-fast", false, "take no new unit after the first failure (running ones finish)")
	f.BoolVar(&hash, "hash", false, "add each image's SHA-256 to the report (reads every image whole)")
	f.BoolVar(&distributed, "central", false, "share the batch with other machines running the same serial list: each unit is claimed in the central store and done once")
	f.BoolVar(&reprovision, "reprovision", false, "provision shippable units again (new key and certificate; the old one is superseded)")
	return c
}

// progress shows a bar with ETA on a terminal (stderr), else a plain line every few seconds; nothing with --json.
type progress struct {
	mu                   sync.Mutex
	w                    io.Writer
	tty, quiet           bool
	total, ok, fail, skp int
	stop                 int // interrupted or not started
	start, last          time.Time
}

func newProgress(w io.Writer, total int, quiet bool) *progress {
	p := &progress{w: w, total: total, quiet: quiet, start: time.Now(), last: time.Now()}
	if f, ok := w.(*os.File); ok {
		_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
		p.tty = err == nil
	}
	return p
}

func (p *progress) add(r station.BatchResult) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch r.Status {
	case station.BatchOK:
		p.ok++
	case station.BatchFailed:
		p.fail++
	case station.BatchSkipped:
		p.skp++
	default:
		p.stop++
	}
	if p.quiet {
		return
	}
	done := p.ok + p.fail + p.skp + p.stop
	el := time.Since(p.start)
	eta := time.Duration(0)
	if done > 0 {
		eta = el / time.Duration(done) * time.Duration(p.total-done)
	}
	if p.tty {
		const width = 30
		fill := width * done / max(p.total, 1)
		fmt.Fprintf(p.w, "\r[%s%s] %d/%d  ok %d  failed %d  skipped %d  ETA %s ", strings.Repeat("#", fill),
			strings.Repeat(".", width-fill), done, p.total, p.ok, p.fail, p.skp, eta.Round(time.Second))
		return
	}
	if time.Since(p.last) > 3*time.Second || done == p.total {
		p.last = time.Now()
		fmt.Fprintf(p.w, "batch: %d/%d done (ok %d, failed %d, skipped %d), %s elapsed, ETA %s\n", done, p.total, p.ok, p.fail,
			p.skp, el.Round(time.Second), eta.Round(time.Second))
	}
}

func (p *progress) finish() {
	if p.tty && !p.quiet {
		fmt.Fprintln(p.w)
	}
}
