package main

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"provision/image/golden"
	"provision/simulator"
	"provision/station"
)

func newDemoCmd(g *globals) *cobra.Command {
	var dir string
	var units int
	c := &cobra.Command{
		Use:   "demo [--dir DIR] [--units N]",
		Short: "Provision a few units end to end on the TPM simulator, in a throw-away station",
		Long: `demo creates a throw-away station (its own CA and inventory) and sample golden images (Mender layout), then
provisions --units units on the in-process TPM simulator with the step output an operator sees: key in the TPM, CSR,
signature, image written and read back, a live TLS 1.3 handshake with the TPM-resident key. It ignores --station and
touches nothing outside --dir (default: a new temporary directory), and says where everything is.`,
		Annotations: map[string]string{noStation: "demo has its own throw-away station"},
		Args:        noArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			if units < 1 || units > 100 {
				return usagef("demo: --units %d: 1 to 100", units)
			}
			if dir == "" {
				d, err := os.MkdirTemp("", "provision-demo-")
				if err != nil {
					return err
				}
				dir = d
			}
			w := g.stdout
			st := filepath.Join(dir, "station")
			res, err := station.Init(ctx, st, station.InitOptions{StationID: "demo-station", TPM: "sim", Passphrase: passphrase()})
			if err != nil {
				return err
			}
			if err := trustSimulator(st); err != nil {
				return err
			}
			fmt.Fprintf(w, "station  %s  (root CA %q, issuing CA %q)\n", st, res.Root.Subject.CommonName, res.Issuing.Subject.CommonName)
			s, err := station.Open(ctx, st, g.logger())
			if err != nil {
				return err
			}
			defer s.Close()
			if err := s.LoadCA(passphrase()); err != nil {
				return err
			}
			imgDir := filepath.Join(dir, "images")
			os.MkdirAll(imgDir, 0o755)
			shipped := 0
			start := time.Now()
			for i := 1; i <= units; i++ {
				serial := fmt.Sprintf("DEMO-%04d", i)
				img := filepath.Join(imgDir, serial+".img")
				table := "mbr"
				if i%2 == 0 {
					table = "gpt"
				}
				if err := golden.Build(ctx, img, golden.Options{Table: table}); err != nil {
					return fmt.Errorf("demo: sample image: %w", err)
				}
				fmt.Fprintf(w, "\nunit %s  (tpm sim, image %s, %s)\n", serial, img, table)
				// Each unit brings its own TPM: a fresh simulator, with its own EK and EK certificate.
				dev, err := openTPM(ctx, "sim")
				if err != nil {
					return err
				}
				r, err := s.Provision(ctx, dev, station.ProvisionRequest{Serial: serial, Image: img, Operator: operatorName("")}, stepPrinter(w))
				dev.Close()
				if err != nil {
					fmt.Fprintf(w, "FAILED  %s: %v\n", serial, err)
					continue
				}
				shipped++
				fmt.Fprintf(w, "SHIPPABLE  %s  certificate %s\n", serial, station.CertSerial(r.Certificate))
			}
			fmt.Fprintf(w, `
%d of %d units shippable in %s. Everything is in %s:
  station/   station.yaml, ca/, inventory.db, audit.head
  images/    one Mender-style image per unit, with its certificate, TPM key file and mender.conf written in
Look around:
  provision --station %s inventory list
  provision --station %s inventory show DEMO-0001
  provision --station %s verify --image %s --serial DEMO-0001
  provision --station %s audit verify
The simulator's keys lived only as long as this process; a real unit's TPM keeps them.
Remove it all with: rm -rf %s
`, shipped, units, time.Since(start).Round(time.Millisecond), dir, st, st, st, filepath.Join(imgDir, "DEMO-0001.img"), st, dir)
			if shipped != units {
				return &exitError{code: exitFailed}
			}
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "where to put the throw-away station and images (default: a new temporary directory)")
	c.Flags().IntVar(&units, "units", 3, "how many units to provision")
	return c
}

// trustSimulator puts the in-process simulator's manufacturer root into a demo station's tpm_roots, so its units
// attest as trusted. Only demo stations do this: a simulator is not a genuine TPM.
func trustSimulator(stationDir string) error {
	dir := filepath.Join(stationDir, "tpm_roots")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "provision-simulator-root.pem"), simulator.EKRootPEM(), 0o644)
}
