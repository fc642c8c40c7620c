package station

import (
	"context"
	"errors"
	"strings"
	"testing"

	"provision/inventory"
)

// unit_serial: the unit's own serial read over the fixture is compared with the scanned one before anything is made.
func TestUnitSerial(t *testing.T) {
	ctx := context.Background()
	d := openDevice(t, "soft")
	for _, tc := range []struct {
		name, command, mode, serial string
		wantErr                     error  // nil: the unit goes on
		wantText                    string // in the error, or in the validate step's detail
	}{
		{"match", "echo {serial}", "", "SN-US-1", nil, "unit says SN-US-1"},
		{"match via fixture", "echo SN-US-{fixture}", "required", "SN-US-7", nil, "unit says SN-US-7"},
		{"mismatch", "echo SN-US-2", "required", "SN-US-1", ErrWrongUnit, "label says SN-US-1, unit says SN-US-2: wrong label on this unit?"},
		{"mismatch warn", "echo SN-US-2", "warn", "SN-US-3", nil, "label says SN-US-3, unit says SN-US-2 (unit_serial: warn)"},
		{"fails", "false", "required", "SN-US-4", nil, `"false": exit status 1`},
		{"missing", "/nonexistent/cat-serial", "required", "SN-US-5", nil, "no such file or directory"},
		{"fails warn", "false", "warn", "SN-US-6", nil, "unit's own serial not read (unit_serial: warn)"},
		{"stderr", "sh -c 'echo nope >&2; exit 255'", "required", "SN-US-8", nil, "exit status 255: nope"},
		{"empty", "true", "required", "SN-US-9", nil, "printed nothing"},
		{"escape", `printf '\033[2JSN-US-10'`, "required", "SN-US-10", nil, `printed "\x1b[2JSN-US-10": control characters, not a serial`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStation(t)
			s.Config.UnitSerial = UnitSerialConfig{Command: tc.command, Mode: tc.mode}
			var detail string
			_, err := s.Provision(ctx, d, ProvisionRequest{Serial: tc.serial, Image: goldenImage(t), Fixture: "7"}, func(e Event) {
				if e.Step == StepValidate && e.Status == StatusOK {
					detail = e.Detail
				}
			})
			failing := strings.HasPrefix(tc.name, "fails") && tc.mode == "required" || tc.name == "missing" || tc.name == "stderr" || tc.name == "empty" || tc.name == "escape"
			switch {
			case tc.wantErr != nil || failing:
				if err == nil || !strings.Contains(err.Error(), tc.wantText) {
					t.Fatalf("got %v, want an error with %q", err, tc.wantText)
				}
				if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("got %v, want %v", err, tc.wantErr)
				}
				// Nothing was created or recorded under the scanned serial.
				if _, uerr := s.Inv.Unit(ctx, tc.serial); !errors.Is(uerr, inventory.ErrNotFound) {
					t.Fatalf("the inventory has the unit after a refused check: %v", uerr)
				}
			default:
				if err != nil {
					t.Fatalf("unit: %v", err)
				}
				if !strings.Contains(detail, tc.wantText) {
					t.Fatalf("validate detail %q, want %q", detail, tc.wantText)
				}
			}
		})
	}
}

func TestUnitSerialPlaceholders(t *testing.T) {
	if _, err := ExpandUnitCommand("ssh root@{fixture} cat /x", "SN-1", ""); !errors.Is(err, ErrFixture) || !strings.Contains(err.Error(), "--fixture") {
		t.Fatalf("no fixture: %v", err)
	}
	if _, err := ExpandUnitCommand("ssh root@{fixture} x", "SN-1", "a;rm -rf /"); !errors.Is(err, ErrFixture) {
		t.Fatalf("a fixture name with shell syntax must be refused: %v", err)
	}
	got, err := ExpandUnitCommand("cmd:ssh -p 22 root@{fixture} tpm2_send # {serial}", "SN-1", "fe80::1%usb0")
	if err != nil || got != "cmd:ssh -p 22 root@fe80::1%usb0 tpm2_send # SN-1" {
		t.Fatalf("got %q, %v", got, err)
	}
	if err := CheckFixtureName("port-3"); err != nil {
		t.Fatal(err)
	}
	if err := CheckFixtureName("$(reboot)"); err == nil {
		t.Fatal("a fixture name with shell syntax must be refused")
	}
}

func TestCheckFixture(t *testing.T) {
	s := newStation(t)
	if err := s.CheckFixture("cmd:ssh root@{fixture} tpm2_send", ""); !errors.Is(err, ErrFixture) || !strings.Contains(err.Error(), "the TPM URI uses {fixture}") {
		t.Fatalf("TPM URI without a fixture: %v", err)
	}
	if err := s.CheckFixture("cmd:ssh root@{fixture} tpm2_send", "10.0.0.2"); err != nil {
		t.Fatal(err)
	}
	s.Config.UnitSerial = UnitSerialConfig{Command: "ssh root@{fixture} cat /x"}
	if err := s.CheckFixture("soft", ""); !errors.Is(err, ErrFixture) || !strings.Contains(err.Error(), "unit_serial's command uses {fixture}") {
		t.Fatalf("unit_serial without a fixture: %v", err)
	}
	s.Config.UnitSerial.Mode = UnitSerialOff
	if err := s.CheckFixture("soft", ""); err != nil {
		t.Fatalf("unit_serial off: %v", err)
	}
	if err := s.CheckFixture("soft", "a b"); !errors.Is(err, ErrFixture) {
		t.Fatalf("bad name: %v", err)
	}
}
