package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"provision/central"
	"provision/cmd/provision/tui"
	"provision/image/golden"
	"provision/inventory"
	"provision/label"
	"provision/simulator"
	"provision/station"
	"provision/station/ca"
	"provision/tpm"
)

// tuiBackend connects the TUI to the station. The unit's TPM is opened for each unit: on a line every unit brings its
// own (the fixture's /dev/tpmrm0, or a forwarded TPM).
type tuiBackend struct {
	st        *station.Station
	tpmURI    string // may be a cmd: URI with {serial} and {fixture}, filled per unit
	fixture   string // --fixture
	profile   string
	handshake station.HandshakeConfig // the same resolution as unit and batch
	makeImgs  bool                    // --demo: generate a sample image for a unit that has none
	opening   atomic.Int32            // TPM opens in progress (one that outlived its caller may still wait for the TPM)
	sync      *station.Syncer         // nil without a central store
	printer   label.Printer           // nil: no labels
	labelFmt  label.Format
	labelName string // --label-title
}

// LabelPrinter names the label printer (tui.Labeller); "" without one.
func (b *tuiBackend) LabelPrinter() string {
	if b.printer == nil {
		return ""
	}
	return b.printer.String() + " (" + string(b.labelFmt) + ")"
}

// PrintLabel prints the label of a unit that passed, from its active certificate in the inventory (tui.Labeller).
func (b *tuiBackend) PrintLabel(ctx context.Context, serial string) (string, error) {
	l, err := unitLabel(ctx, b.st.Inv, serial, b.labelName)
	if err != nil {
		return "", err
	}
	data, err := l.Render(b.labelFmt)
	if err != nil {
		return l.CertSHA256, err
	}
	return l.CertSHA256, b.printer.Print(ctx, serial, data)
}

// CentralStatus is the header line about the central store (tui.CentralReporter); "" without one.
func (b *tuiBackend) CentralStatus() (string, bool) {
	if b.sync == nil {
		return "", false
	}
	res, at, err := b.sync.Status()
	mode := b.st.Config.Central.CentralMode()
	switch {
	case at.IsZero():
		return "central store (" + mode + "): connecting…", false
	case err != nil && !errors.Is(err, central.ErrUnreachable) && !errors.Is(err, station.ErrCentralUnreachable):
		return fmt.Sprintf("central store: sync failed at %s: %v", at.Format("15:04:05"), err), true
	case err != nil:
		return fmt.Sprintf("central store DOWN since %s (%s): units are kept here and sent when it is back", at.Format("15:04:05"), mode), true
	case len(res.Conflicts) > 0:
		c := res.Conflicts[0]
		return fmt.Sprintf("central store: %d CONFLICT(S), e.g. %s %s held by %s: tell the supervisor", len(res.Conflicts), c.Kind, c.Key, c.Other), true
	}
	return fmt.Sprintf("central store: synced %s, backlog %d", at.Format("15:04:05"), res.Backlog), false
}

func (b *tuiBackend) CheckSerial(s string) error { return b.st.Config.SerialRule().Check(s) }

func (b *tuiBackend) Shippable(ctx context.Context, serial string) (time.Time, string, bool) {
	u, err := b.st.Inv.Unit(ctx, serial)
	if err != nil || u.State != inventory.StateShippable {
		return time.Time{}, "", false
	}
	return u.Updated, u.Operator, true
}

func (b *tuiBackend) UnlockCA(pass []byte) (time.Time, error) {
	if err := b.st.LoadCA(pass); err != nil {
		return time.Time{}, err
	}
	return b.st.CA.Issuing.NotAfter, nil
}

// ProbeTPM opens the unit's TPM and closes it again, within ctx's deadline. While an earlier open still waits for a
// silent TPM, no second connection is made: the TPM is still not answering.
func (b *tuiBackend) ProbeTPM(ctx context.Context) error {
	if b.tpmURI == "soft" {
		return nil
	}
	if b.opening.Load() > 0 {
		return fmt.Errorf("tpm %s: %w: no answer yet to an earlier command", b.tpmURI, tpm.ErrUnreachable)
	}
	if strings.Contains(b.tpmURI, tpm.PlaceholderSerial) {
		return tui.ErrPerUnit
	}
	uri, err := station.UnitTPMURI(b.tpmURI, "", b.fixture)
	if err != nil {
		return err
	}
	if err := tpm.Probe(ctx, uri, tpm.WithSimulator(simulator.Open)); err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("tpm %s: %w: no answer within %s", b.tpmURI, tpm.ErrUnreachable, tui.ProbeTimeout)
		}
		return err
	}
	return nil
}

// open opens the unit's TPM but returns when ctx ends even if the TPM never answers (a socket that accepts and stays
// silent): the open goes on in the background and closes what it gets.
func (b *tuiBackend) open(ctx context.Context, serial string) (*tpm.Device, error) {
	uri, err := station.UnitTPMURI(b.tpmURI, serial, b.fixture)
	if err != nil {
		return nil, err
	}
	type opened struct {
		d   *tpm.Device
		err error
	}
	ch := make(chan opened, 1)
	b.opening.Add(1)
	go func() {
		d, err := openTPM(ctx, uri)
		b.opening.Add(-1)
		ch <- opened{d, err}
	}()
	select {
	case r := <-ch:
		return r.d, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.d != nil {
				r.d.Close()
			}
		}()
		return nil, context.Cause(ctx)
	}
}

func (b *tuiBackend) Provision(ctx context.Context, req station.ProvisionRequest, report func(station.Event)) (station.Result, error) {
	ctx = withLogger(ctx, b.st.Log) // the screen starts units from its own context: -v reaches the TPM this way
	if b.makeImgs {
		if _, err := os.Stat(req.Image); errors.Is(err, os.ErrNotExist) {
			os.MkdirAll(filepath.Dir(req.Image), 0o755)
			if err := golden.Build(ctx, req.Image, golden.Options{}); err != nil {
				return station.Result{Serial: req.Serial}, err
			}
		}
	}
	report(station.Event{Serial: req.Serial, Step: station.StepKey, Status: station.StatusStarted, Detail: "opening the TPM"})
	start := time.Now()
	dev, err := b.open(ctx, req.Serial)
	if err != nil {
		status := station.StatusFailed
		if ctx.Err() != nil { // Esc, ctrl+c or a signal while the TPM did not answer: cancelled, not a failure
			status, err = station.StatusCancelled, fmt.Errorf("%w: %w", station.ErrInterrupted, context.Cause(ctx))
		}
		report(station.Event{Serial: req.Serial, Step: station.StepKey, Status: status, Err: err, Duration: time.Since(start)})
		return station.Result{Serial: req.Serial}, &station.StepError{Serial: req.Serial, Step: station.StepKey, Err: err}
	}
	defer dev.Close()
	req.Profile, req.Handshake = b.profile, b.handshake
	defer b.sync.Kick() // forward the unit to the central store soon (nil-safe)
	return b.st.Provision(ctx, dev, req, report)
}

// todayUnits are the units whose record changed today, by serial, with their state when shippable or failed.
func todayUnits(ctx context.Context, inv *inventory.DB) map[string]string {
	y, m, d := time.Now().Date()
	today := map[string]string{}
	for _, state := range []inventory.State{inventory.StateShippable, inventory.StateFailed} {
		units, _ := inv.Units(ctx, state)
		for _, u := range units {
			if uy, um, ud := u.Updated.Local().Date(); uy == y && um == m && ud == d {
				today[u.Serial] = string(state)
			}
		}
	}
	return today
}

// caExpiry reads the issuing CA certificate's expiry without its key (the key may still be locked).
func caExpiry(st *station.Station) time.Time {
	b, err := os.ReadFile(st.Layout.IssuingCert())
	if err != nil {
		return time.Time{}
	}
	certs, err := ca.ParseCerts(b)
	if err != nil || len(certs) == 0 {
		return time.Time{}
	}
	return certs[0].NotAfter
}

func newTUICmd(g *globals) *cobra.Command {
	var img, tpmURI, operator, profile string
	var hf handshakeFlags
	var demo bool
	var labelPrinter, labelFormat, labelTitle, fixture string
	c := &cobra.Command{
		Use:   "tui --image PATH [--operator NAME] [--tpm URI] [--endpoint URL --endpoint-ca FILE]",
		Short: "The operator's terminal UI for the line: scan a serial, the unit is provisioned, PASS or FAIL",
		Long: `tui is the line operator's screen. A barcode scanner types the serial and Enter; the unit is provisioned at once
(key in its TPM, certificate, image written and verified, live handshake) with each step shown, then a full-width PASS
or FAIL band in block letters with the cause and what to do. Every Enter ends a scan and clears the field: a rejected
scan (shown with its value) never sticks to the next one. A unit already shippable is not touched ("already
provisioned on <date> by <operator>").

Every printable character goes into the serial field (serials may start with q, r or ?); commands use keys a scanner
never sends: Enter start · ctrl+r run the shown unit again (a failed or cancelled one resumes; a shippable one is
re-provisioned when pressed twice) · Esc cancel the running unit (it stops between steps and resumes later) · F1 help ·
ctrl+c quit (twice while a unit runs). SIGINT/SIGTERM stop the running unit between steps, record it as interrupted,
and exit 130.

The handshake is the one "provision unit" does: --endpoint/--endpoint-ca, else station.yaml endpoints:/endpoint_ca:
(default server_ca), else the built-in loopback server; the header shows the target. The header also shows whether
the unit's TPM answers (probed in the background every few seconds). An encrypted CA key is asked for at start when
PROVISION_CA_PASSPHRASE is not set (not shown as typed).

--image names the unit's storage: a path with {serial} (images/{serial}.img) or the fixture's block device (/dev/sda)
used for every unit. --operator is recorded with every unit (asked at start when not given).
--label-printer prints each unit's label as soon as it passes (serial, date, and a QR code with the serial and the
certificate fingerprint; see "provision label"): file:PATH ({serial} in PATH), lpr:QUEUE (lpr -o raw for ZPL; lpr: the
default queue) or tcp:HOST:9100 (raw ZPL); --label-format zpl (default) or png. Then the screen asks for the label's QR
code: scanning it checks that the label is the unit's (LABEL OK, or a FAIL band naming the mismatch); ctrl+p prints
the label again. Scanning the next serial instead simply starts the next unit.
--fixture NAME: the units sit on a fixture the station reaches through a command (--tpm 'cmd:ssh … root@{fixture}
tpm2_send'); the header shows the fixture and whether its TPM answers, and station.yaml unit_serial: checks each
unit's own serial against the scanned one (a mismatch is a FAIL naming both).
--demo: simulator TPM, a throw-away station and generated sample images: try it in one command.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			stationDir := g.stationDir
			if demo {
				dir, err := os.MkdirTemp("", "provision-tui-demo-")
				if err != nil {
					return err
				}
				stationDir = filepath.Join(dir, "station")
				if _, err := station.Init(ctx, stationDir, station.InitOptions{StationID: "demo-station", TPM: "sim"}); err != nil {
					return err
				}
				if err := trustSimulator(stationDir); err != nil {
					return err
				}
				if img == "" {
					img = filepath.Join(dir, "images", "{serial}.img")
				}
				if tpmURI == "" {
					tpmURI = "sim"
				}
				fmt.Fprintf(g.stderr, "demo station in %s\n", dir)
			}
			if err := hf.check("tui"); err != nil {
				return err
			}
			var printer label.Printer
			lf, err := label.ParseFormat(labelFormat)
			if err != nil {
				return usageError{fmt.Errorf("tui: --label-format: %w", err)}
			}
			if labelPrinter != "" {
				if printer, err = label.ParsePrinter(labelPrinter, lf); err != nil {
					return usageError{fmt.Errorf("tui: --label-printer: %w", err)}
				}
				if err := label.Check(printer); err != nil {
					return usageError{fmt.Errorf("tui: --label-printer: %w", err)}
				}
			}
			if img == "" {
				return usagef("tui: --image is required (a path with {serial}, or the fixture's block device)")
			}
			st, err := station.Open(ctx, stationDir, g.logger())
			if err != nil {
				return err
			}
			defer st.Close()
			wireStation(st, g)
			hc, err := hf.resolve("tui", st)
			if err != nil {
				return err
			}
			// An encrypted CA key without PROVISION_CA_PASSPHRASE: the screen asks for the passphrase first (no echo).
			locked := false
			if err := st.LoadCA(passphrase()); errors.Is(err, ca.ErrPassphraseNeeded) {
				locked = true
			} else if err != nil {
				return fmt.Errorf("tui: %w", err)
			}
			if tpmURI, err = tpmFlag("tui", tpmURI, st.Config.TPM); err != nil {
				return err
			}
			if err := st.CheckFixture(tpmURI, fixture); err != nil {
				return usagef("tui: --fixture: %v", err)
			}
			if profile == "" {
				profile = st.Config.Profile
			}
			if _, err := st.Config.ResolveProfile(profile); err != nil {
				return usageError{err}
			}
			op := operator
			if op == "" {
				op = os.Getenv("PROVISION_OPERATOR")
			}
			// The TPM is not opened here: the screen probes it in the background, so a silent TPM never blocks it.
			h := tui.Header{StationID: st.Config.StationID, Operator: op, TPM: tpmURI, Fixture: fixture, CAExpiry: caExpiry(st), CALocked: locked,
				Profile: profile, ImageTarget: img, Handshake: hc.String(), Today: todayUnits(ctx, st.Inv)}
			b := &tuiBackend{st: st, tpmURI: tpmURI, fixture: fixture, profile: profile, handshake: hc, makeImgs: demo,
				printer: printer, labelFmt: lf, labelName: labelTitle}
			if b.sync = st.NewSyncer(2 * time.Second); b.sync != nil {
				sctx, stop := context.WithCancel(ctx)
				done := make(chan struct{})
				go func() { b.sync.Run(sctx); close(done) }()
				defer func() { stop(); <-done }()
				b.sync.Kick()
			}
			return tui.Run(ctx, b, h)
		},
	}
	f := c.Flags()
	f.StringVar(&img, "image", "", "the unit's image: a path with {serial}, or a block device used for every unit")
	f.StringVar(&tpmURI, "tpm", "", "the unit's TPM URI (default: station.yaml): /dev/tpmrm0, mssim://HOST:PORT, cmd:COMMAND ({serial}, {fixture}), sim or soft")
	f.StringVar(&fixture, "fixture", "", "the fixture the units sit on (host name or address): fills {fixture} in a cmd: TPM URI and unit_serial's command")
	f.StringVar(&operator, "operator", "", "operator name recorded with every unit (asked at start when empty)")
	f.StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	hf.register(f)
	f.StringVar(&labelPrinter, "label-printer", "", "print each passing unit's label: file:PATH, lpr:QUEUE or tcp:HOST:9100")
	f.StringVar(&labelFormat, "label-format", "zpl", "label format: zpl (thermal printers) or png")
	f.StringVar(&labelTitle, "label-title", "", "a product name printed above the serial on labels")
	f.BoolVar(&demo, "demo", false, "simulator TPM, throw-away station, generated sample images")
	return c
}
