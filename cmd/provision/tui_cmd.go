package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"provision/cmd/provision/tui"
	"provision/image/golden"
	"provision/inventory"
	"provision/station"
)

// tuiBackend connects the TUI to the station. The unit's TPM is opened for each unit: on a line every unit brings its
// own (the fixture's /dev/tpmrm0, or a forwarded TPM).
type tuiBackend struct {
	st        *station.Station
	tpmURI    string
	profile   string
	handshake station.HandshakeConfig // the same resolution as unit and batch
	makeImgs  bool                    // --demo: generate a sample image for a unit that has none
}

func (b *tuiBackend) CheckSerial(s string) error { return b.st.Config.SerialRule().Check(s) }

func (b *tuiBackend) Shippable(ctx context.Context, serial string) (time.Time, string, bool) {
	u, err := b.st.Inv.Unit(ctx, serial)
	if err != nil || u.State != inventory.StateShippable {
		return time.Time{}, "", false
	}
	return u.Updated, u.Operator, true
}

func (b *tuiBackend) Provision(ctx context.Context, req station.ProvisionRequest, report func(station.Event)) (station.Result, error) {
	if b.makeImgs {
		if _, err := os.Stat(req.Image); errors.Is(err, os.ErrNotExist) {
			os.MkdirAll(filepath.Dir(req.Image), 0o755)
			if err := golden.Build(ctx, req.Image, golden.Options{}); err != nil {
				return station.Result{Serial: req.Serial}, err
			}
		}
	}
	dev, err := openTPM(ctx, b.tpmURI)
	if err != nil {
		report(station.Event{Serial: req.Serial, Step: station.StepKey, Status: station.StatusFailed, Err: err})
		return station.Result{Serial: req.Serial}, &station.StepError{Serial: req.Serial, Step: station.StepKey, Err: err}
	}
	defer dev.Close()
	req.Profile, req.Handshake = b.profile, b.handshake
	return b.st.Provision(ctx, dev, req, report)
}

func todayCounts(ctx context.Context, inv *inventory.DB) (ok, failed int) {
	y, m, d := time.Now().Date()
	for state, n := range map[string]*int{inventory.StateShippable: &ok, inventory.StateFailed: &failed} {
		units, _ := inv.Units(ctx, state)
		for _, u := range units {
			if uy, um, ud := u.Updated.Local().Date(); uy == y && um == m && ud == d {
				*n++
			}
		}
	}
	return ok, failed
}

func newTUICmd(g *globals) *cobra.Command {
	var img, tpmURI, operator, profile string
	var hf handshakeFlags
	var demo bool
	c := &cobra.Command{
		Use:   "tui --image PATH [--operator NAME] [--tpm URI]",
		Short: "The operator's terminal UI for the line: scan a serial, the unit is provisioned, PASS or FAIL",
		Long: `tui is the line operator's screen. A barcode scanner types the serial and Enter; the unit is provisioned at once
(key in its TPM, certificate, image written and verified, live handshake) with each step shown, then a large SHIPPABLE
or FAILED banner with the cause and what to do. An invalid serial is shown inline and nothing starts; a unit already
shippable is not touched ("already provisioned on <date> by <operator>"; ctrl+r re-provisions it after a
confirmation).

--image names the unit's storage: a path with {serial} (images/{serial}.img) or the fixture's block device (/dev/sda)
used for every unit. --operator is recorded with every unit (asked at start when not given).
Keys: Enter start · r retry the failed unit · Esc cancel a running unit (between steps) · ? help · q quit.
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
			if img == "" {
				return usagef("tui: --image is required (a path with {serial}, or the fixture's block device)")
			}
			st, err := station.Open(ctx, stationDir, g.logger())
			if err != nil {
				return err
			}
			defer st.Close()
			hc, err := hf.resolve("tui", st)
			if err != nil {
				return err
			}
			if err := st.LoadCA(passphrase()); err != nil {
				return fmt.Errorf("tui: %w", err)
			}
			if tpmURI, err = tpmFlag("tui", tpmURI, st.Config.TPM); err != nil {
				return err
			}
			if profile == "" {
				profile = st.Config.Profile
			}
			if _, err := st.Config.ResolveProfile(profile); err != nil {
				return usageError{err}
			}
			tpmOK := false
			if d, err := openTPM(ctx, tpmURI); err == nil {
				tpmOK = true
				d.Close()
			}
			ok, failed := todayCounts(ctx, st.Inv)
			op := operator
			if op == "" {
				op = os.Getenv("PROVISION_OPERATOR")
			}
			h := tui.Header{StationID: st.Config.StationID, Operator: op, TPM: tpmURI, TPMOK: tpmOK, CAExpiry: st.CA.Issuing.NotAfter,
				Profile: profile, ImageTarget: img, Handshake: hc.String(), Shippable: ok, Failed: failed}
			return tui.Run(ctx, &tuiBackend{st: st, tpmURI: tpmURI, profile: profile, handshake: hc, makeImgs: demo}, h)
		},
	}
	f := c.Flags()
	f.StringVar(&img, "image", "", "the unit's image: a path with {serial}, or a block device used for every unit")
	f.StringVar(&tpmURI, "tpm", "", "the unit's TPM URI (default: station.yaml)")
	f.StringVar(&operator, "operator", "", "operator name recorded with every unit (asked at start when empty)")
	f.StringVar(&profile, "profile", "", "image profile (default: station.yaml profile)")
	hf.register(f)
	f.BoolVar(&demo, "demo", false, "simulator TPM, throw-away station, generated sample images")
	return c
}
