package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"provision/internal/fsutil"
	"provision/station"
)

type batchUnitJSON struct {
	Serial      string     `json:"serial"`
	State       string     `json:"state"`
	Status      string     `json:"status"`
	Image       string     `json:"image"`
	SHA256      string     `json:"sha256,omitempty"`
	Certificate *certJSON  `json:"certificate,omitempty"`
	Steps       []stepJSON `json:"steps"`
	MS          int64      `json:"ms"`
	Error       string     `json:"error,omitempty"`
}

type batchReport struct {
	Units   []batchUnitJSON `json:"units"`
	Summary struct {
		OK      int   `json:"ok"`
		Failed  int   `json:"failed"`
		Skipped int   `json:"skipped"`
		MS      int64 `json:"ms"`
	} `json:"summary"`
}

func toBatchJSON(r station.BatchResult) batchUnitJSON {
	u := toUnitJSON(r.Result, r.Err)
	out := batchUnitJSON{Serial: r.Serial, State: u.State, Status: r.Status, Image: r.Image, SHA256: r.SHA256,
		Certificate: u.Certificate, Steps: u.Steps, MS: r.Duration.Milliseconds(), Error: u.Error}
	if out.State == "" && r.Status == "skipped" {
		out.State = "shippable"
	}
	if r.Status == "skipped" {
		out.Steps = []stepJSON{}
		if r.Err != nil {
			out.Error = "not started: " + r.Err.Error()
		}
	}
	return out
}

// parseTargets reads a --targets CSV: serial,image per line (header optional).
func parseTargets(name string, data []byte, rule *station.SerialRule) ([]station.BatchUnit, error) {
	r := csv.NewReader(bytes.NewReader(data))
	r.Comment = '#'
	r.FieldsPerRecord = -1
	var units []station.BatchUnit
	var bad []station.LineError
	seen := map[string]int{}
	for {
		rec, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			bad = append(bad, station.LineError{Reason: err.Error()})
			break
		}
		line, _ := r.FieldPos(0)
		if len(rec) == 2 && strings.EqualFold(strings.TrimSpace(rec[0]), "serial") && strings.EqualFold(strings.TrimSpace(rec[1]), "image") {
			continue
		}
		if len(rec) != 2 {
			bad = append(bad, station.LineError{Line: line, Reason: "want serial,image"})
			continue
		}
		serial, img := strings.TrimSpace(rec[0]), strings.TrimSpace(rec[1])
		if err := rule.Check(serial); err != nil {
			bad = append(bad, station.LineError{Line: line, Reason: strings.TrimSuffix(err.Error(), ": "+station.ErrBadSerial.Error())})
			continue
		}
		if first, dup := seen[serial]; dup {
			bad = append(bad, station.LineError{Line: line, Reason: fmt.Sprintf("serial %q repeats line %d", serial, first)})
			continue
		}
		seen[serial] = line
		if _, err := os.Stat(img); err != nil {
			bad = append(bad, station.LineError{Line: line, Reason: err.Error()})
			continue
		}
		units = append(units, station.BatchUnit{UnitRequest: station.UnitRequest{Serial: serial}, Target: img})
	}
	if len(bad) > 0 {
		return nil, &station.SerialFileError{Name: name, Lines: bad}
	}
	if len(units) == 0 {
		return nil, &station.SerialFileError{Name: name, Lines: []station.LineError{{Reason: "no targets"}}}
	}
	return units, nil
}

func newBatchCmd(g *globals) *cobra.Command {
	var (
		serials, golden, out, tpmURI, profile, targets, operator string
		workers                                                  int
		asJSON, failFast, hash                                   bool
		hf                                                       handshakeFlags
	)
	c := &cobra.Command{
		Use:   "batch --serials FILE --image GOLDEN --out DIR [--workers N] [--tpm soft|sim|URI]",
		Short: "Prepare per-unit images from a golden image and a list of serials",
		Long: `batch turns one golden image and a list of serials into per-unit images, each provisioned end to end (key,
certificate, image written and verified, handshake test) and recorded in the inventory:
  DIR/<serial>.img     cloned from GOLDEN (a reflink where the file system supports it, else a sparse copy of the data
                       regions only), personalised in place, verified; written as <serial>.img.partial, synced, and
                       renamed only when the unit is shippable. The golden image is never modified.
  DIR/report.json      {"units":[{serial,state,status,image,certificate,steps,ms,error}],"summary":{ok,failed,skipped,ms}}
  DIR/report.csv       one row per unit (with --targets, --out only says where the reports go; default: here)
--serials FILE: one serial per line, or CSV with a "serial" column whose other columns fill {name} placeholders in the
subject and templates. Every line is checked first: any bad line is exit 2, listing each, before anything is written.
--targets FILE (CSV serial,image) personalises existing per-unit images or block devices in place instead of cloning.
Keys are software keys by default (no unit is present); --tpm sim for CI, or a TPM that travels with the image.
Running it again skips finished units and retries failed ones. Ctrl-C stops cleanly: running units stop between steps
and resume next time. Exit 1 if any unit failed; --fail-fast stops at the first failure.`,
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
			st, err := g.openStation(ctx)
			if err != nil {
				return err
			}
			defer st.Exit() // one-shot command: see Station.Exit
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
				if err := os.MkdirAll(out, 0o755); err != nil {
					return fmt.Errorf("batch: --out: %w", err)
				}
			} else {
				data, err := os.ReadFile(targets)
				if err != nil {
					return usagef("batch: --targets: %v", err)
				}
				if units, err = parseTargets(targets, data, st.Config.SerialRule()); err != nil {
					return fmt.Errorf("batch: %w", err)
				}
				if out != "" {
					if err := os.MkdirAll(out, 0o755); err != nil {
						return fmt.Errorf("batch: --out: %w", err)
					}
				}
			}
			if tpmURI, err = tpmFlag("batch", tpmURI, "soft"); err != nil {
				return err
			}
			if err := st.LoadCA(passphrase()); err != nil {
				return fmt.Errorf("batch: %w", err)
			}
			dev, err := openTPM(ctx, tpmURI)
			if err != nil {
				return fmt.Errorf("batch: %w", err)
			}
			defer dev.Close()
			if out != "" {
				st.RemoveStalePartials(ctx, out)
			}
			hc, err := hf.resolve("batch", st)
			if err != nil {
				return err
			}
			prog := newProgress(g.stderr, len(units), asJSON)
			enc := json.NewEncoder(g.stdout)
			start := time.Now()
			results := st.Batch(ctx, dev, units, station.BatchOptions{Golden: golden, OutDir: out, Workers: workers, Profile: profile,
				Handshake: hc, FailFast: failFast, Hash: hash, Operator: operatorName(operator)}, func(r station.BatchResult) {
				prog.add(r)
				if asJSON {
					enc.Encode(toBatchJSON(r))
				}
			})
			prog.finish()
			rep := batchReport{Units: []batchUnitJSON{}}
			for _, r := range results {
				rep.Units = append(rep.Units, toBatchJSON(r))
				switch r.Status {
				case "ok":
					rep.Summary.OK++
				case "failed":
					rep.Summary.Failed++
				default:
					rep.Summary.Skipped++
				}
			}
			rep.Summary.MS = time.Since(start).Milliseconds()
			reportDir := out
			if reportDir == "" {
				reportDir = "."
			}
			if err := writeReports(reportDir, rep); err != nil {
				return err
			}
			if !asJSON {
				fmt.Fprintf(g.stdout, "%d ok, %d failed, %d skipped in %s; report: %s\n", rep.Summary.OK, rep.Summary.Failed,
					rep.Summary.Skipped, time.Since(start).Round(time.Millisecond), filepath.Join(reportDir, "report.json"))
				for _, u := range rep.Units {
					if u.Status == "failed" {
						fmt.Fprintf(g.stdout, "✗ %s  %s\n", u.Serial, u.Error)
					}
				}
			}
			if errors.Is(ctx.Err(), context.Canceled) {
				return &exitError{code: exitFailed, err: errors.New("batch: interrupted: run the same command again to finish")}
			}
			if rep.Summary.Failed > 0 {
				return &exitError{code: exitFailed, err: fmt.Errorf("batch: %d of %d units failed (see %s)", rep.Summary.Failed,
					len(units), filepath.Join(reportDir, "report.json"))}
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
	f.BoolVar(&failFast, "fail-fast", false, "stop at the first failed unit")
	f.BoolVar(&hash, "hash", false, "add each image's SHA-256 to the report (reads every image whole)")
	return c
}

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
	w.Write([]string{"serial", "status", "state", "image", "certificate_serial", "certificate_sha256", "image_sha256", "ms", "error"})
	for _, u := range rep.Units {
		var cs, ch string
		if u.Certificate != nil {
			cs, ch = u.Certificate.Serial, u.Certificate.SHA256
		}
		w.Write([]string{u.Serial, u.Status, u.State, u.Image, cs, ch, u.SHA256, fmt.Sprint(u.MS), u.Error})
	}
	w.Flush()
	if err := fsutil.WriteFileSync(filepath.Join(dir, "report.csv"), buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("batch: report: %w", err)
	}
	return nil
}

// progress shows a bar with ETA on a terminal (stderr), else a plain line every few seconds; nothing with --json.
type progress struct {
	mu                   sync.Mutex
	w                    io.Writer
	tty, quiet           bool
	total, ok, fail, skp int
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
	case "ok":
		p.ok++
	case "failed":
		p.fail++
	default:
		p.skp++
	}
	if p.quiet {
		return
	}
	done := p.ok + p.fail + p.skp
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
