// Command provision is the factory provisioning station: it gives each unit a TPM-resident key and a certificate from
// the station's CA, writes them into the unit's image and proves them with a live mTLS handshake.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"provision/central"
	"provision/inventory"
	"provision/station"
	"provision/station/ca"
	"provision/tpm"
)

func main() {
	os.Exit(mainExit())
}

func mainExit() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	return report(err, os.Stderr)
}

// Exit codes: a contract with scripts and line controllers, documented in docs/exit-codes.md (keep them in step).
const (
	exitOK          = 0
	exitFailed      = 1   // a unit failed; verify found a failed check; audit verify found a mismatch
	exitUsage       = 2   // bad command line, serial, serial file, profile or station.yaml
	exitRefused     = 3   // refused by the inventory (including a unit it does not hold)
	exitStation     = 4   // the station's own environment
	exitInterrupted = 130 // SIGINT/SIGTERM/Esc: what ran stopped between steps and resumes when run again
	exitInternal    = exitFailed
)

// exitError carries an exit code chosen by a command, with the message already printed (or none to print).
type exitError struct {
	code int
	err  error // nil: nothing more to print
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit %d", e.code)
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

// usageError marks a bad command line.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// exitCode maps an error to the documented exit codes.
func exitCode(err error) int {
	var ee *exitError
	var ue usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ee):
		return ee.code
	case errors.Is(err, station.ErrInterrupted), errors.Is(err, context.Canceled):
		return exitInterrupted
	case errors.As(err, &ue), errors.Is(err, station.ErrConfig), errors.Is(err, station.ErrBadSerial),
		errors.Is(err, station.ErrSerialFile), errors.Is(err, station.ErrExists), errors.Is(err, station.ErrEndpoint),
		errors.Is(err, station.ErrProfile):
		return exitUsage
	case errors.Is(err, station.ErrRefused):
		return exitRefused
	case errors.Is(err, station.ErrNotInitialised), errors.Is(err, station.ErrCA), errors.Is(err, tpm.ErrUnreachable),
		errors.Is(err, tpm.ErrLockout), errors.Is(err, tpm.ErrBadURI), errors.Is(err, inventory.ErrLocked),
		errors.Is(err, inventory.ErrDamaged), errors.Is(err, inventory.ErrNotFound), errors.Is(err, station.ErrOutDirBusy),
		errors.Is(err, station.ErrCentralUnreachable), errors.Is(err, central.ErrUnreachable), errors.Is(err, central.ErrNotInitialised), errors.Is(err, central.ErrConflict),
		errors.Is(err, central.ErrSchemaTooNew):
		return exitStation
	}
	return exitInternal
}

// report prints err as one line on stderr, with advice where the cause is known, and returns the exit code.
func report(err error, stderr io.Writer) int {
	code := exitCode(err)
	var ee *exitError
	if err != nil && !(errors.As(err, &ee) && ee.err == nil) {
		msg := strings.ReplaceAll(err.Error(), "\n", " ")
		if hint := advice(err); hint != "" && !strings.Contains(msg, hint) {
			msg += " (" + hint + ")"
		}
		fmt.Fprintln(stderr, "provision: "+msg)
	}
	return code
}

func advice(err error) string {
	switch {
	case errors.Is(err, ca.ErrPassphraseNeeded), errors.Is(err, ca.ErrWrongPassphrase):
		return "set PROVISION_CA_PASSPHRASE to the passphrase given at init"
	case errors.Is(err, tpm.ErrUnreachable):
		return "check that the unit's TPM is connected and the --tpm URI is right"
	case errors.Is(err, tpm.ErrLockout):
		return "the TPM is in dictionary-attack lockout: wait for it to recover or clear it with the lockout authorisation"
	case errors.Is(err, tpm.ErrObjectMemory):
		return "the TPM is out of object memory: power-cycle the unit or flush its transient objects"
	case errors.Is(err, inventory.ErrLocked):
		return "another provision process is using this station; wait for it or stop it"
	case errors.Is(err, inventory.ErrAudit):
		return "run `provision audit verify` to see what does not match; restore audit.head from backup if it was lost"
	case errors.Is(err, inventory.ErrDamaged):
		return "restore inventory.db from backup; do not delete it, it is the record of issued certificates"
	case errors.Is(err, station.ErrImage):
		return "check the unit's image or storage: present, the right layout for the profile, not in use; then run the unit again"
	case errors.Is(err, station.ErrBadSerial):
		return "rescan the unit's label; serial.pattern in station.yaml says what a serial looks like"
	case errors.Is(err, station.ErrConfig):
		return "fix station.yaml; `provision init --help` shows the defaults"
	}
	return ""
}

func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	root := newRootCmd(stdin, stdout, stderr)
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}
