package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

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
			if _, err := exec.LookPath(tool); err != nil {
				if os.Getenv("CI") != "" {
					return false, errors.New(tool + " is required under CI")
				}
				return true, nil
			}
			return false, nil
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
