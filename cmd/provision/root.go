package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"provision/central"
	"provision/simulator"
	"provision/station"
	"provision/tpm"
)

// globals are the flags every command shares.
type globals struct {
	stationDir string
	verbose    bool
	tpmRoots   []string // --tpm-roots
	stdin      io.Reader
	stdout     io.Writer
	stderr     io.Writer
	log        *slog.Logger // made once by logger()
}

// noStation marks a command (cobra annotation) that never opens --station, so a bad --station does not stop it.
const noStation = "provision/no-station"

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

Exit codes: 0 success, 1 a unit failed, 2 bad command line/serial/profile/station.yaml, 3 refused by the inventory
(or no such unit), 4 the station's environment (not initialised, not a directory, CA key, inventory locked or damaged,
TPM unreachable or locked out), 130 interrupted (Ctrl-C, SIGTERM): run the same command again to resume.
-v logs each step and TPM command with its time to stderr.`,
		SilenceErrors:              true,
		SilenceUsage:               true,
		SuggestionsMinimumDistance: 2,
		Args:                       noArgs,
		PersistentPreRunE: func(c *cobra.Command, args []string) error {
			if usesStation(c) {
				if err := checkStationDir(g.stationDir); err != nil {
					return err
				}
			}
			c.SetContext(withLogger(c.Context(), g.logger()))
			return nil
		},
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
	root.SetFlagErrorFunc(flagError)
	root.PersistentFlags().StringVar(&g.stationDir, "station", defaultStationDir(), "station directory")
	root.PersistentFlags().BoolVarP(&g.verbose, "verbose", "v", false, "debug log on stderr")
	root.PersistentFlags().StringArrayVar(&g.tpmRoots, "tpm-roots", nil, "a folder of PEM files: TPM vendor roots trusted besides the built-in ones and tpm_roots (repeatable)")
	root.AddCommand(newInitCmd(g), newEnrollCmd(g), newInjectCmd(g), newVerifyCmd(g), newUnitCmd(g), newBatchCmd(g), newTUICmd(g), newDemoCmd(g), newSampleImageCmd(g), newInventoryCmd(g), newAuditCmd(g), newAttestCmd(g), newCentralCmd(g), newSyncCmd(g), newServeCmd(g), newExportCmd(g), newLabelCmd(g), newRevokeCmd(g), newCRLCmd(g), newRMACmd(g), newExpiringCmd(g), newRotateCmd(g), newCACmd(g))
	return root
}

// noArgs refuses arguments. On a command with subcommands an argument is a mistyped command: the closest commands
// are suggested, as cobra would.
func noArgs(c *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	if c.HasSubCommands() {
		msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
		if c.SuggestionsMinimumDistance <= 0 {
			c.SuggestionsMinimumDistance = 2 // cobra's default, which SuggestionsFor alone does not apply
		}
		if s := c.SuggestionsFor(args[0]); len(s) > 0 {
			msg += ". Did you mean this? " + strings.Join(s, ", ")
		}
		return usagef("%s (see %s --help)", msg, c.CommandPath())
	}
	return usagef("%s: unexpected argument %q (see %s --help)", commandName(c), args[0], c.CommandPath())
}

// groupCmd is a command that only holds subcommands: alone it shows its help, with an argument it names the mistyped
// command (a command without RunE would print its help and exit 0 on `provision inventory lsit`).
func groupCmd(c *cobra.Command) *cobra.Command {
	c.Args = noArgs
	c.RunE = func(c *cobra.Command, args []string) error { return c.Help() }
	return c
}

// commandName is the command path without the program name: "unit", "inventory show".
func commandName(c *cobra.Command) string {
	if !c.HasParent() {
		return c.Name()
	}
	return strings.TrimPrefix(c.CommandPath(), c.Root().Name()+" ")
}

// flagError names the command whose flag was wrong and the closest flag it has: "unit: unknown flag: --seriall; did
// you mean --serial?".
func flagError(c *cobra.Command, err error) error {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "unknown flag: --"); ok {
		best, bestD := "", 3 // suggest flags at most 2 edits away
		visit := func(f *pflag.Flag) {
			if d := editDistance(name, f.Name); d < bestD {
				best, bestD = f.Name, d
			}
		}
		c.Flags().VisitAll(visit)
		c.InheritedFlags().VisitAll(visit)
		if best != "" {
			msg += "; did you mean --" + best + "?"
		}
	}
	if c.HasParent() {
		msg = commandName(c) + ": " + msg
	}
	return usageError{fmt.Errorf("%s (see %s --help)", msg, c.CommandPath())}
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// usesStation reports whether c may open --station: not demo, sample-image, help or completion.
func usesStation(c *cobra.Command) bool {
	for p := c; p != nil; p = p.Parent() {
		if p.Annotations[noStation] != "" || p.Name() == "help" || p.Name() == cobra.ShellCompRequestCmd ||
			p.Name() == cobra.ShellCompNoDescRequestCmd || p.Name() == "completion" {
			return false
		}
	}
	return true
}

// checkStationDir refuses a --station that exists but is not a directory (exit 4, the station's environment), before a
// command reads "station.yaml/station.yaml: not a directory" or init tries to create a station inside a file. A
// missing directory is left to the command: init creates it, the others say it is not initialised.
func checkStationDir(dir string) error {
	fi, err := os.Stat(dir)
	switch {
	case err == nil && fi.IsDir(), errors.Is(err, fs.ErrNotExist):
		return nil
	case err == nil, errors.Is(err, syscall.ENOTDIR):
		return &exitError{code: exitStation, err: fmt.Errorf("station %s is not a directory: point --station or PROVISION_STATION at a station directory (provision init makes one)", dir)}
	}
	return &exitError{code: exitStation, err: fmt.Errorf("station %s: %w", dir, err)}
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

// logger is the -v debug log on stderr (each step and TPM command with its time); without -v it discards.
func (g *globals) logger() *slog.Logger {
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
		if g.verbose {
			g.log = slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
		}
	}
	return g.log
}

type loggerKey struct{}

// withLogger hands the -v logger to code that gets only a context (openTPM, called from every command and the TUI).
func withLogger(ctx context.Context, log *slog.Logger) context.Context {
	if ctx == nil {
		ctx = context.Background()
	}
	return context.WithValue(ctx, loggerKey{}, log)
}

// loggerFrom is the -v logger carried by ctx; a discarding one when there is none.
func loggerFrom(ctx context.Context) *slog.Logger {
	if log, ok := ctx.Value(loggerKey{}).(*slog.Logger); ok && log != nil {
		return log
	}
	return slog.New(slog.DiscardHandler)
}

func (g *globals) openStation(ctx context.Context) (*station.Station, error) {
	st, err := station.Open(ctx, g.stationDir, g.logger())
	if err == nil {
		wireStation(st, g)
	}
	return st, err
}

// wireStation gives an open station what only the binary wires: extra TPM roots (--tpm-roots) and the central store
// named in station.yaml (opened on first use).
func wireStation(st *station.Station, g *globals) {
	st.ExtraTPMRoots = g.tpmRoots
	if dsn := st.Config.Central.DSN; dsn != "" {
		st.ConnectCentral(func(ctx context.Context) (*central.Store, error) { return central.Open(ctx, dsn) })
	}
}

// session is what a one-shot command holds while it runs: the open station and, after openUnit, the CA loaded, the
// unit's TPM open and the handshake resolved. unit, enroll and batch open one (inject and verify use the station part);
// close releases it all.
type session struct {
	cmd         string // "unit", "enroll", ...: the prefix of its errors
	st          *station.Station
	tpmURI      string                  // after openUnit: --tpm, resolved (a cmd: URI with its placeholders filled)
	tpmTemplate string                  // after openUnit: --tpm before its placeholders were filled
	serial      string                  // the unit's serial, when one unit is run: fills {serial} in a cmd: TPM URI
	fixture     string                  // --fixture: fills {fixture}
	dev         *tpm.Device             // after openUnit
	hc          station.HandshakeConfig // after openUnit with handshake flags
}

// openSession opens the station for the command cmd.
func (g *globals) openSession(ctx context.Context, cmd string) (*session, error) {
	st, err := g.openStation(ctx)
	if err != nil {
		return nil, err
	}
	return &session{cmd: cmd, st: st}, nil
}

// close closes the unit's TPM, if open, and leaves the station as a one-shot command does (see Station.Exit).
func (s *session) close() {
	if s.dev != nil {
		s.dev.Close()
	}
	s.st.Exit()
}

// checkSerial checks serial against the station's serial rule (exit 2).
func (s *session) checkSerial(serial string) error {
	if err := s.st.Config.SerialRule().Check(serial); err != nil {
		return fmt.Errorf("%s: %w", s.cmd, err)
	}
	return nil
}

// loadCA loads the station CA, with the passphrase from the environment.
func (s *session) loadCA() error {
	if err := s.st.LoadCA(passphrase()); err != nil {
		return fmt.Errorf("%s: %w", s.cmd, err)
	}
	return nil
}

// openUnit readies the unit's side: --tpm resolved (def when the flag is empty), the handshake configuration (when hf
// is not nil), the CA loaded, and the unit's TPM opened.
func (s *session) openUnit(ctx context.Context, tpmURI, def string, hf *handshakeFlags) error {
	uri, err := tpmFlag(s.cmd, tpmURI, def)
	if err != nil {
		return err
	}
	s.tpmTemplate = uri
	perUnit := s.serial == "" && strings.Contains(uri, tpm.PlaceholderSerial) // a batch's TPM command names each unit
	if !perUnit {
		if uri, err = station.UnitTPMURI(uri, s.serial, s.fixture); err != nil {
			return usagef("%s: TPM %v", s.cmd, err)
		}
	}
	s.tpmURI = uri
	if hf != nil {
		if s.hc, err = hf.resolve(s.cmd, s.st); err != nil {
			return err
		}
	}
	if err := s.loadCA(); err != nil {
		return err
	}
	if perUnit {
		return nil // opened per unit (session.openUnitTPM)
	}
	if s.dev, err = openTPM(ctx, uri); err != nil {
		return fmt.Errorf("%s: %w", s.cmd, err)
	}
	return nil
}

// openUnitTPM opens the TPM of one unit of a batch: the --tpm template with the unit's serial filled in.
func (s *session) openUnitTPM(ctx context.Context, serial string) (*tpm.Device, error) {
	uri, err := station.UnitTPMURI(s.tpmTemplate, serial, s.fixture)
	if err != nil {
		return nil, err
	}
	return openTPM(ctx, uri)
}

// passphrase is the CA key passphrase from the environment; never a flag (it would show in ps and shell history).
func passphrase() []byte {
	if p := os.Getenv("PROVISION_CA_PASSPHRASE"); p != "" {
		return []byte(p)
	}
	return nil
}

// openTPM opens the unit's TPM named by uri, wiring the in-process simulator for "sim". On TPMs without a resource
// manager (the simulators) transient objects a killed run left behind are flushed first. With -v (the logger ctx
// carries) it logs the open and, through tpmLogOptions, every TPM command with its time.
func openTPM(ctx context.Context, uri string) (*tpm.Device, error) {
	log := loggerFrom(ctx)
	u, _ := tpm.ParseURI(uri)                                                       // a bad URI is tpm.Open's to refuse
	stale := u.Kind == tpm.URISim || u.Kind == tpm.URIMssim || u.Kind == tpm.URICmd // a cmd: pipe may reach swtpm
	opts := append([]tpm.Option{tpm.WithSimulator(simulator.Open), tpm.WithFlushStale(stale)}, tpmLogOptions(log)...)
	start := time.Now()
	dev, err := tpm.Open(ctx, uri, opts...)
	if err != nil {
		log.Debug("tpm open", "uri", uri, "ms", time.Since(start).Milliseconds(), "err", err)
		return nil, err
	}
	log.Debug("tpm open", "uri", uri, "ms", time.Since(start).Milliseconds())
	return dev, nil
}

// tpmLogOptions are the tpm.Open options that make the TPM log each command it sends, with its time, to log (the -v
// debug log): command name, response code and milliseconds, never parameters.
func tpmLogOptions(log *slog.Logger) []tpm.Option {
	return []tpm.Option{tpm.WithLogger(log)}
}

// tpmFlag resolves --tpm: empty means the default, anything else must be a TPM URI (exit 2 otherwise).
func tpmFlag(cmd, flag, def string) (string, error) {
	if flag == "" {
		return def, nil
	}
	if !station.ValidTPMURI(flag) {
		return "", usagef("%s: --tpm %q is not a TPM URI (use %s)", cmd, flag, tpm.URIForms)
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
