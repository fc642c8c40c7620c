package station

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"provision/tpm"
)

// The unit on its fixture (docs/station.md "Fixtures"): the station reaches the unit's TPM and its own serial through
// commands (ssh to the fixture's port, a serial console helper) whose {serial} and {fixture} placeholders are filled
// per unit.

// ErrWrongUnit: the unit on the fixture reports another serial than the scanned one (unit_serial: required). It is a
// refusal (exit 3): nothing was created for either serial.
var ErrWrongUnit = fmt.Errorf("unit reports another serial: %w", ErrRefused)

// ErrFixture: a fixture name or a placeholder value that cannot go into a command.
var ErrFixture = errors.New("bad fixture")

// Unit-serial modes (station.yaml unit_serial.mode).
const (
	UnitSerialRequired = "required"
	UnitSerialWarn     = "warn"
	UnitSerialOff      = "off"
)

// UnitSerialTimeout bounds the unit_serial command (ssh to a fixture answers in well under a second).
const UnitSerialTimeout = 15 * time.Second

// UnitSerialConfig is station.yaml's unit_serial: the command that prints the unit's own serial and what a mismatch
// does.
type UnitSerialConfig struct {
	// Command runs without a shell ({serial}, {fixture} filled in); its stdout, trimmed, is the unit's serial.
	Command string `yaml:"command" validate:"max=4096"`
	// Mode: required (default when Command is set: a mismatch or a failure refuses the unit), warn (noted in the
	// validate step, the unit goes on) or off.
	Mode string `yaml:"mode" validate:"omitempty,oneof=required warn off"`
}

// EffectiveMode is the mode in force: off without a command, required when a command is set without a mode.
func (c UnitSerialConfig) EffectiveMode() string {
	switch {
	case c.Command == "" || c.Mode == UnitSerialOff:
		return UnitSerialOff
	case c.Mode == "":
		return UnitSerialRequired
	}
	return c.Mode
}

// fixtureValue is what may fill a placeholder of a command: letters, digits and . _ - : @ % + , = / [ ] (host names,
// IPv4/IPv6 addresses with zone, user@host, a serial console's device path, serials). Nothing a shell or ssh's remote shell would interpret.
var fixtureValue = regexp.MustCompile(`^[A-Za-z0-9/][A-Za-z0-9._:@%+,=/\[\]-]{0,127}$`)

// CheckFixtureName checks a --fixture name (it fills {fixture} in commands).
func CheckFixtureName(name string) error {
	if name == "" || fixtureValue.MatchString(name) {
		return nil
	}
	return fmt.Errorf("fixture %q: use letters, digits and . _ - : @ %% + , = / [ ] (a host name or address, up to 128): %w", name, ErrFixture)
}

// ExpandUnitCommand fills {serial} and {fixture} in a command or cmd: TPM URI. A placeholder the command uses must have
// a value that fixtureValue allows (it becomes part of a command line); an unknown {name} is left for the caller's
// parser to refuse.
func ExpandUnitCommand(s, serial, fixture string) (string, error) {
	for _, p := range []struct{ name, value, what string }{
		{tpm.PlaceholderSerial, serial, "serial"},
		{tpm.PlaceholderFixture, fixture, "fixture"},
	} {
		if !strings.Contains(s, p.name) {
			continue
		}
		if p.value == "" {
			if p.what == "fixture" {
				return "", fmt.Errorf("%q uses {fixture}: name the fixture (--fixture NAME): %w", s, ErrFixture)
			}
			return "", fmt.Errorf("%q uses {serial}, and no serial is known yet: %w", s, ErrFixture)
		}
		if !fixtureValue.MatchString(p.value) {
			return "", fmt.Errorf("%s %q cannot go into the command %q: use letters, digits and . _ - : @ %% + , = / [ ]: %w",
				p.what, p.value, s, ErrFixture)
		}
		s = strings.ReplaceAll(s, p.name, p.value)
	}
	return s, nil
}

// UnitTPMURI is the unit's TPM URI with the placeholders of a cmd: URI filled (other URIs are returned as they are).
func UnitTPMURI(uri, serial, fixture string) (string, error) {
	if !strings.HasPrefix(uri, "cmd:") {
		return uri, nil
	}
	return ExpandUnitCommand(uri, serial, fixture)
}

// checkUnitSerial runs unit_serial's command for the unit on the fixture and compares what it prints with the
// scanned serial. It returns a note for the validate step's detail ("" when the check is off) and, under required,
// the error that refuses the unit: ErrWrongUnit on a mismatch, the command's failure otherwise. Under warn both are
// notes.
func (s *Station) checkUnitSerial(ctx context.Context, serial, fixture string) (string, error) {
	c := s.Config.UnitSerial
	mode := c.EffectiveMode()
	if mode == UnitSerialOff {
		return "", nil
	}
	got, err := runUnitSerial(ctx, c.Command, serial, fixture)
	switch {
	case err != nil && mode == UnitSerialWarn:
		return fmt.Sprintf("unit's own serial not read (unit_serial: warn): %v", err), nil
	case err != nil:
		return "", fmt.Errorf("unit's own serial: %w (unit_serial: required; fix the fixture or set mode: warn)", err)
	case got != serial && mode == UnitSerialWarn:
		return fmt.Sprintf("label says %s, unit says %s (unit_serial: warn)", serial, got), nil
	case got != serial:
		return "", fmt.Errorf("label says %s, unit says %s: wrong label on this unit? %w", serial, got, ErrWrongUnit)
	}
	return "unit says " + got, nil
}

// runUnitSerial runs the unit_serial command (no shell, placeholders filled) and returns its stdout trimmed of space
// and NULs (a device-tree serial ends in one). Its stderr names the cause when it fails.
func runUnitSerial(ctx context.Context, command, serial, fixture string) (string, error) {
	line, err := ExpandUnitCommand(command, serial, fixture)
	if err != nil {
		return "", err
	}
	argv, err := tpm.SplitCommand(line)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, UnitSerialTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // ssh's own children end with it
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	var stdout limitedBuffer
	stdout.max = 4096
	stderr := tpm.NewOutputTail(4096)
	cmd.Stdout, cmd.Stderr = &stdout, stderr
	err = cmd.Run()
	if ctx.Err() != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return "", fmt.Errorf("%q did not finish within %s", line, UnitSerialTimeout)
		}
		return "", fmt.Errorf("%q: %w", line, context.Cause(ctx))
	}
	if err != nil {
		return "", fmt.Errorf("%q: %v%s", line, err, stderr.Note())
	}
	got := strings.Trim(stdout.String(), " \t\r\n\x00")
	if got == "" {
		return "", fmt.Errorf("%q printed nothing", line)
	}
	if strings.ContainsAny(got, "\n\x00") || len(got) > 128 {
		return "", fmt.Errorf("%q printed %d bytes over several lines, not one serial", line, len(got))
	}
	if strings.IndexFunc(got, func(r rune) bool { return unicode.IsControl(r) || r == utf8.RuneError }) >= 0 {
		return "", fmt.Errorf("%q printed %q: control characters, not a serial", line, got)
	}
	return got, nil
}

// limitedBuffer keeps the first max bytes written to it and drops the rest (a command's output is never unbounded).
type limitedBuffer struct {
	bytes.Buffer
	max int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.max - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// check refuses a mode that needs a command without one, and a command that does not split into argv.
func (c UnitSerialConfig) check() error {
	if c.Command == "" {
		if c.Mode == UnitSerialRequired || c.Mode == UnitSerialWarn {
			return fmt.Errorf("mode %s needs a command (the one that prints the unit's own serial)", c.Mode)
		}
		return nil
	}
	_, err := tpm.SplitCommand(c.Command)
	return err
}

// CheckFixture refuses, before any unit starts, a TPM URI or a unit_serial command that names {fixture} when no
// fixture is given, and a fixture name that cannot fill a command (the operator's screen would fail every unit).
func (s *Station) CheckFixture(tpmURI, fixture string) error {
	if err := CheckFixtureName(fixture); err != nil {
		return err
	}
	if fixture != "" {
		return nil
	}
	switch {
	case strings.Contains(tpmURI, tpm.PlaceholderFixture):
		return fmt.Errorf("the TPM URI uses {fixture}: name the fixture (--fixture NAME): %w", ErrFixture)
	case strings.Contains(s.Config.UnitSerial.Command, tpm.PlaceholderFixture) && s.Config.UnitSerial.EffectiveMode() != UnitSerialOff:
		return fmt.Errorf("unit_serial's command uses {fixture}: name the fixture (--fixture NAME): %w", ErrFixture)
	}
	return nil
}
