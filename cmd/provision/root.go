package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"provision/simulator"
	"provision/station"
	"provision/tpm"
)

// globals are the flags every command shares.
type globals struct {
	stationDir string
	verbose    bool
	stdin      io.Reader
	stdout     io.Writer
	stderr     io.Writer
}

func newRootCmd(stdin io.Reader, stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdin: stdin, stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:   "provision",
		Short: "Factory provisioning station: TPM-resident device keys, certificates, disk images, a live mTLS test",
		Long: `provision gives each unit on a manufacturing line its identity: a private key created inside the unit's TPM 2.0
(or a software key for units without one), a client certificate from this station's CA, the files a device needs written
into its disk image, and a live mTLS handshake proving it all works. Every step is recorded in the station's inventory.

Start with:
  provision init                       create a station (CA, inventory, station.yaml)
  provision enroll --serial SN-0001    create a unit's key and certificate

The station directory is --station, else $PROVISION_STATION, else $XDG_STATE_HOME/provision (~/.local/state/provision).
CA keys are encrypted at rest when PROVISION_CA_PASSPHRASE is set (at init and whenever the CA signs).

Exit codes: 0 success, 1 a unit failed, 2 bad command line/serial/station.yaml, 3 refused by the inventory,
4 the station's environment (not initialised, CA key, inventory locked or damaged, TPM unreachable or locked out).`,
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          noArgs,
		RunE: func(c *cobra.Command, args []string) error {
			c.SetOut(g.stdout)
			c.Help()
			fmt.Fprintln(g.stdout, "\nOn the line, start the operator screen:  provision tui --image /dev/sda   (try: provision tui --demo)")
			return nil
		},
	}
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	root.PersistentFlags().StringVar(&g.stationDir, "station", defaultStationDir(), "station directory")
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "debug log on stderr")
	root.AddCommand(newInitCmd(g), newEnrollCmd(g), newInjectCmd(g), newVerifyCmd(g), newUnitCmd(g), newBatchCmd(g), newTUICmd(g), newDemoCmd(g), newSampleImageCmd(g), newInventoryCmd(g), newAuditCmd(g))
	return root
}

func noArgs(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s: unexpected argument %q (see --help)", c.CommandPath(), args[0])
	}
	return nil
}

func defaultStationDir() string {
	if d := os.Getenv("PROVISION_STATION"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "provision")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "provision")
	}
	return "provision-station"
}

func (g *globals) logger() *slog.Logger {
	if !g.verbose {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (g *globals) openStation(ctx context.Context) (*station.Station, error) {
	return station.Open(ctx, g.stationDir, g.logger())
}

// passphrase is the CA key passphrase from the environment; never a flag (it would show in ps and shell history).
func passphrase() []byte {
	if p := os.Getenv("PROVISION_CA_PASSPHRASE"); p != "" {
		return []byte(p)
	}
	return nil
}

// openTPM opens the unit's TPM named by uri, wiring the in-process simulator for "sim". On TPMs without a resource
// manager (the simulators) transient objects a killed run left behind are flushed first.
func openTPM(ctx context.Context, uri string) (*tpm.Device, error) {
	stale := uri == "sim" || strings.HasPrefix(uri, "mssim://")
	return tpm.Open(ctx, uri, tpm.WithSimulator(simulator.Open), tpm.WithFlushStale(stale))
}

// tpmFlag resolves --tpm: empty means the default, anything else must be a TPM URI (exit 2 otherwise).
func tpmFlag(cmd, flag, def string) (string, error) {
	if flag == "" {
		return def, nil
	}
	if !station.ValidTPMURI(flag) {
		return "", usagef("%s: --tpm %q is not a TPM URI (use /dev/tpmrm0, mssim://HOST:PORT, sim or soft)", cmd, flag)
	}
	return flag, nil
}

func operatorName(flag string) string {
	if flag != "" {
		return flag
	}
	if o := os.Getenv("PROVISION_OPERATOR"); o != "" {
		return o
	}
	if u, err := user.Current(); err == nil {
		return u.Username
	}
	return ""
}
