package tui

import (
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/x/exp/teatest"

	"provision/station"
)

// On a fixture: the header names it next to the TPM; a unit whose own serial is not the scanned one is a FAIL naming
// both, with what to do; a TPM reached only per unit ({serial} in its command) says so instead of being probed.
func TestFixtureScreen(t *testing.T) {
	b, h, _ := setup(t)
	b.st.Config.UnitSerial = station.UnitSerialConfig{Command: "echo SN-0002", Mode: station.UnitSerialRequired}
	h.Fixture = "usb-port-3"
	tm := teatest.NewTestModel(t, New(b, h), teatest.WithInitialTermSize(100, 30))
	waitScreen(t, tm, "fixture usb-port-3  TPM sim (answers)")
	tm.Type("SN-0001")
	tm.Send(tea.KeyMsg{Type: tea.KeyEnter})
	waitScreen(t, tm, "unit says SN-0002")
	tm.Send(tea.KeyMsg{Type: tea.KeyCtrlC})
	v := tm.FinalModel(t, teatest.WithFinalTimeout(10*time.Second)).View()
	for _, want := range []string{"label says SN-0001, unit says SN-0002: wrong label on this unit?", "the label is not this unit's"} {
		if !strings.Contains(strings.Join(strings.Fields(v), " "), want) {
			t.Errorf("screen lacks %q:\n%s", want, v)
		}
	}

	m := New(b, h)
	next, _ := m.Update(probeMsg{ErrPerUnit})
	if v := next.(Model).View(); !strings.Contains(v, "fixture usb-port-3  TPM sim (reached per unit)") {
		t.Fatalf("per-unit TPM header:\n%s", v)
	}
}
