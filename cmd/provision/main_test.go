package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

	"provision/image/golden"
	"provision/internal/testutil"
	"provision/inventory"
	"provision/station"
	"provision/tpm"
)

func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){"provision": func() { os.Exit(mainExit()) }})
}

// TestScripts runs the CLI end to end: cmd/provision/testdata/script/*.txtar.
//
// Extra commands:
//
//	exits N prog args...   run prog; its exit code must be N; a non-zero exit must print exactly one line on stderr
//	oneline file           the file holds exactly one line
//
// Condition [missing:tool] is true when tool is not installed and CI is unset (so `[missing:swtpm] skip`); under CI a
// missing tool fails the script instead.
func TestScripts(t *testing.T) {
	testscript.Run(t, testscript.Params{
		Dir:                 "testdata/script",
		RequireExplicitExec: true,
		Setup: func(env *testscript.Env) error {
			env.Setenv("PROVISION_STATION", env.WorkDir+"/station")
			env.Setenv("PROVISION_OPERATOR", "tester")
			env.Setenv("CI", os.Getenv("CI"))
			return nil
		},
		Condition: func(cond string) (bool, error) {
			tool, ok := strings.CutPrefix(cond, "missing:")
			if !ok {
				return false, errors.New("unknown condition " + cond)
			}
			return testutil.Missing(tool)
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"exits": func(ts *testscript.TestScript, neg bool, args []string) {
				if len(args) < 2 {
					ts.Fatalf("usage: exits N prog args...")
				}
				want, err := strconv.Atoi(args[0])
				ts.Check(err)
				err = ts.Exec(args[1], args[2:]...)
				got := 0
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					got = ee.ExitCode()
				} else if err != nil {
					ts.Fatalf("%v", err)
				}
				if got != want {
					ts.Fatalf("exit code %d, want %d", got, want)
				}
			},
			"oneline": func(ts *testscript.TestScript, neg bool, args []string) {
				// oneline file: the file (usually stderr saved with cp) holds exactly one line
				data := ts.ReadFile(args[0])
				if n := strings.Count(strings.TrimRight(data, "\n"), "\n"); n != 0 || data == "" {
					ts.Fatalf("%s: want exactly one line, got %q", args[0], data)
				}
			},
		},
	})
}

// TestExitCode maps errors to the exit codes docs/exit-codes.md documents.
func TestExitCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want int
	}{
		{"success", nil, exitOK},
		{"unit failed", &station.StepError{Serial: "SN-1", Step: station.StepHandshake, Err: errors.New("refused")}, exitFailed},
		{"usage", usagef("unit: --serial and --image are required"), exitUsage},
		{"station.yaml", fmt.Errorf("station.yaml:3: key: %w", station.ErrConfig), exitUsage},
		{"bad serial", fmt.Errorf("unit: %w", station.ErrBadSerial), exitUsage},
		{"unknown profile", fmt.Errorf("unit: no built-in profile %q: %w", "nosuch", station.ErrProfile), exitUsage},
		{"endpoint", fmt.Errorf("endpoint: %w", station.ErrEndpoint), exitUsage},
		{"refused", &station.StepError{Serial: "SN-1", Step: station.StepValidate, Err: station.ErrRefused}, exitRefused},
		{"not initialised", fmt.Errorf("station x: %w", station.ErrNotInitialised), exitStation},
		{"CA", fmt.Errorf("unit: %w", station.ErrCA), exitStation},
		{"TPM unreachable", &station.StepError{Serial: "SN-1", Step: station.StepKey, Err: tpm.ErrUnreachable}, exitStation},
		{"TPM lockout", tpm.ErrLockout, exitStation},
		{"inventory locked", inventory.ErrLocked, exitStation},
		{"inventory damaged", inventory.ErrDamaged, exitStation},
		{"interrupted", &station.StepError{Serial: "SN-1", Step: station.StepImage, Err: fmt.Errorf("%w: %w", station.ErrInterrupted, context.Canceled)}, exitInterrupted},
		{"context cancelled", fmt.Errorf("station x: %w", context.Canceled), exitInterrupted},
		{"chosen code", &exitError{code: exitRefused}, exitRefused},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := exitCode(tc.err); got != tc.want {
				t.Errorf("exitCode(%v) = %d, want %d", tc.err, got, tc.want)
			}
		})
	}
}

// cancelOn is a stdout that cancels the command's context once a line containing mark was written: an operator's
// Ctrl-C at a known point of the pipeline, without timing.
type cancelOn struct {
	mark   string
	cancel context.CancelFunc
	buf    strings.Builder
}

func (w *cancelOn) Write(p []byte) (int, error) {
	w.buf.Write(p)
	if strings.Contains(w.buf.String(), w.mark) {
		w.cancel()
	}
	return len(p), nil
}

// TestInterruptedExit130: a unit interrupted between steps exits 130 with one line, keeps the state of its last
// completed step with an "interrupted" event (docs/states.md), and the same command then finishes it.
func TestInterruptedExit130(t *testing.T) {
	testutil.RequireTool(t, "sfdisk", "mke2fs", "mkfs.fat", "mcopy")
	dir := t.TempDir()
	st, img := filepath.Join(dir, "station"), filepath.Join(dir, "unit.img")
	t.Setenv("PROVISION_OPERATOR", "tester")
	var stdout, stderr strings.Builder
	if err := run(context.Background(), []string{"--station", st, "init"}, strings.NewReader(""), &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	if err := golden.Build(context.Background(), img, golden.Options{}); err != nil {
		t.Fatal(err)
	}
	args := []string{"--station", st, "unit", "--serial", "SN-0130", "--image", img, "--tpm", "soft"}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &cancelOn{mark: "✓ key", cancel: cancel}
	stderr.Reset()
	err := run(ctx, args, strings.NewReader(""), out, &stderr)
	if code := report(err, &stderr); code != exitInterrupted {
		t.Fatalf("interrupted unit: exit %d, want %d (err %v)\nstdout:\n%s", code, exitInterrupted, err, out.buf.String())
	}
	if lines := strings.Count(strings.TrimRight(stderr.String(), "\n"), "\n"); lines != 0 {
		t.Errorf("interrupted unit: want one line on stderr, got %q", stderr.String())
	}

	stdout.Reset()
	if err := run(context.Background(), []string{"--station", st, "inventory", "show", "SN-0130", "--json"}, strings.NewReader(""), &stdout, &stderr); err != nil {
		t.Fatal(err)
	}
	var rec unitJSON
	if err := json.Unmarshal([]byte(stdout.String()), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.State != inventory.StateKeyed {
		t.Errorf("interrupted after key: state %q, want %q", rec.State, inventory.StateKeyed)
	}
	if n := len(rec.Events); n == 0 || rec.Events[n-1].Outcome != station.OutcomeInterrupted || rec.Events[n-1].Step != string(station.StepAttest) {
		t.Errorf("interrupted after key: last event %+v, want step attest, outcome interrupted", rec.Events)
	}

	stdout.Reset()
	if err := run(context.Background(), args, strings.NewReader(""), &stdout, &stderr); err != nil {
		t.Fatalf("the same command again: %v\n%s", err, stdout.String())
	}
	if !strings.Contains(stdout.String(), "SHIPPABLE") {
		t.Errorf("the same command again: not shippable:\n%s", stdout.String())
	}
}
