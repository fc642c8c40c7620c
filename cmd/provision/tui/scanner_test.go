package tui

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/lipgloss"

	"provision/inventory"
	"provision/station"
	"provision/station/handshake"
)

// quits reports whether cmd (or a command in its batch) quits the program. tea.Quit answers at once; other commands
// (cursor blinks, ticks) are given up after a moment: they are not a quit.
func quits(cmd tea.Cmd) bool {
	if cmd == nil {
		return false
	}
	ch := make(chan tea.Msg, 1)
	go func() { ch <- cmd() }()
	select {
	case msg := <-ch:
		switch msg := msg.(type) {
		case tea.QuitMsg:
			return true
		case tea.BatchMsg:
			for _, c := range msg {
				if quits(c) {
					return true
				}
			}
		}
	case <-time.After(50 * time.Millisecond):
	}
	return false
}

func key(t tea.KeyType) tea.KeyMsg { return tea.KeyMsg{Type: t} }

// scanKeys types s key by key as a barcode scanner does, then Enter; it fails the test if any key quits.
func scanKeys(t *testing.T, m tea.Model, s string) (tea.Model, tea.Cmd) {
	t.Helper()
	for _, r := range s {
		var cmd tea.Cmd
		m, cmd = m.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{r}})
		if quits(cmd) {
			t.Fatalf("typing %q: %q quit the screen", s, r)
		}
	}
	return m.Update(key(tea.KeyEnter))
}

// doneAs puts the model in the state after a unit ended with err (nil: shippable).
func doneAs(t *testing.T, m Model, serial string, err error) Model {
	t.Helper()
	nm, _ := m.start(serial, false)
	m = nm.(Model)
	nm, _ = m.Update(doneMsg{run: m.run, err: err})
	return nm.(Model)
}

var errImage = &station.StepError{Serial: "SN-0002", Step: station.StepImage, Err: fmt.Errorf("image: no such file")}

// Item 1: a scan that starts with q, r or ? goes into the field whatever the screen shows: nothing quits, nothing
// re-runs, no help appears.
func TestScannerCharactersGoToTheField(t *testing.T) {
	b, h, _ := setup(t)
	states := map[string]func() Model{
		"idle":                func() Model { return New(b, h) },
		"after a failure":     func() Model { return doneAs(t, New(b, h), "SN-0002", errImage) },
		"after a pass":        func() Model { return doneAs(t, New(b, h), "SN-0001", nil) },
		"after a cancel":      func() Model { return doneAs(t, New(b, h), "SN-0003", station.ErrInterrupted) },
		"while a unit runs":   func() Model { nm, _ := New(b, h).start("SN-0004", false); return nm.(Model) },
		"asking the operator": func() Model { h := h; h.Operator = ""; return New(b, h) },
	}
	for name, mk := range states {
		for _, serial := range []string{"q-0001", "r-0001", "?-0001", "Q", "R", "y", "n"} {
			t.Run(name+"/"+serial, func(t *testing.T) {
				m0 := mk()
				var m tea.Model = m0
				for _, r := range serial {
					var cmd tea.Cmd
					m, cmd = m.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{r}})
					if quits(cmd) {
						t.Fatalf("%q quit the screen", r)
					}
				}
				got := m.(Model)
				if got.input.Value() != serial {
					t.Fatalf("field %q, want %q", got.input.Value(), serial)
				}
				if got.help || got.phase != m0.phase || got.run != m0.run || got.confirm != confirmNone {
					t.Fatalf("typing %q: help %v phase %d→%d run %d→%d confirm %d", serial, got.help, m0.phase, got.phase,
						m0.run, got.run, got.confirm)
				}
			})
		}
	}
}

// Item 1: ctrl+r runs the shown unit again: a failed one at once, a shippable one after a second ctrl+r; F1 is help.
func TestControlKeys(t *testing.T) {
	b, h, _ := setup(t)
	m := doneAs(t, New(b, h), "SN-0002", errImage)
	nm, _ := m.Update(key(tea.KeyCtrlR))
	if got := nm.(Model); got.phase != phaseRunning || got.serial != "SN-0002" || got.run != m.run+1 {
		t.Fatalf("ctrl+r after a failure: phase %d serial %q", got.phase, got.serial)
	}

	m = doneAs(t, New(b, h), "SN-0001", nil)
	nm, _ = m.Update(key(tea.KeyCtrlR))
	if got := nm.(Model); got.phase != phaseDone || got.confirm != confirmReprovision ||
		!strings.Contains(got.View(), "ctrl+r again") {
		t.Fatalf("first ctrl+r on a shippable unit: phase %d confirm %d\n%s", got.phase, got.confirm, got.View())
	}
	// Any other key drops the confirmation: a scan typed now goes into the field and re-provisions nothing.
	nm2, _ := nm.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{'y'}})
	if got := nm2.(Model); got.confirm != confirmNone || got.input.Value() != "y" {
		t.Fatalf("y after the question: confirm %d field %q", got.confirm, got.input.Value())
	}
	nm, _ = nm.Update(key(tea.KeyCtrlR))
	if got := nm.(Model); got.phase != phaseRunning || got.serial != "SN-0001" {
		t.Fatalf("second ctrl+r: phase %d serial %q", got.phase, got.serial)
	}

	// F1: help, fitting 80x24; F1 or Esc go back, and a scan typed over the help is kept.
	nm, _ = New(b, h).Update(key(tea.KeyF1))
	v := nm.View()
	if !nm.(Model).help || !strings.Contains(v, "ctrl+r") || !strings.Contains(v, "F1") {
		t.Fatalf("F1:\n%s", v)
	}
	fits(t, v)
	checkGolden(t, "help", v)
	nm2, _ = nm.Update(key(tea.KeyEsc))
	if nm2.(Model).help {
		t.Fatal("Esc did not leave the help")
	}
	nm2, _ = nm.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{'S'}})
	if nm2.(Model).help || nm2.(Model).input.Value() != "S" {
		t.Fatal("a character typed over the help was lost")
	}
	// ctrl+c quits at once when no unit runs.
	if _, cmd := New(b, h).Update(key(tea.KeyCtrlC)); !quits(cmd) {
		t.Fatal("ctrl+c did not quit")
	}
}

// fits checks that a screen fits 80x24.
func fits(t *testing.T, v string) {
	t.Helper()
	lines := strings.Split(v, "\n")
	if len(lines) > 24 {
		t.Fatalf("%d lines: does not fit 80x24\n%s", len(lines), v)
	}
	for _, l := range lines {
		if w := lipgloss.Width(l); w > 80 {
			t.Fatalf("line %d cells wide: does not fit 80x24: %q", w, l)
		}
	}
}

// Item 2: every Enter ends a scan. A rejected scan is shown with its value and cleared; the next good scan starts
// alone; a new scan clears the previous unit's band.
func TestEveryEnterEndsAScan(t *testing.T) {
	b, h, _ := setup(t)
	var m tea.Model = doneAs(t, New(b, h), "SN-0001", nil)
	m, cmd := scanKeys(t, m, "../evilTUI-0001")
	got := m.(Model)
	if got.input.Value() != "" {
		t.Fatalf("field after a rejected scan: %q", got.input.Value())
	}
	if !strings.Contains(got.inputErr, "../evilTUI-0001") || !strings.Contains(got.View(), "rejected") {
		t.Fatalf("error line %q does not show the rejected value\n%s", got.inputErr, got.View())
	}
	if got.banner != "" || got.serial != "" || strings.Contains(got.View(), "✓ SHIPPABLE") {
		t.Fatalf("the previous unit's band stayed after a new scan:\n%s", got.View())
	}
	if cmd != nil || got.run != 1 {
		t.Fatal("a rejected scan started something")
	}
	m, _ = scanKeys(t, m, "SN-0005")
	if got := m.(Model); got.phase != phaseRunning || got.serial != "SN-0005" || got.input.Value() != "" || got.inputErr != "" {
		t.Fatalf("good scan after a rejected one: phase %d serial %q field %q err %q", got.phase, got.serial,
			got.input.Value(), got.inputErr)
	}
	// A scan while a unit runs is not appended to anything either: it is refused with its value and cleared.
	m, _ = scanKeys(t, m, "SN-0006")
	if got := m.(Model); got.serial != "SN-0005" || got.input.Value() != "" || !strings.Contains(got.inputErr, "SN-0006") {
		t.Fatalf("scan while running: serial %q field %q err %q", got.serial, got.input.Value(), got.inputErr)
	}
	// A label's QR code is never taken for a serial.
	m = doneAs(t, m.(Model), "SN-0005", nil)
	m, _ = scanKeys(t, m, "P1/SN-0005/abcd")
	if got := m.(Model); got.phase == phaseRunning || !strings.Contains(got.inputErr, "label") {
		t.Fatalf("label scan: phase %d err %q", got.phase, got.inputErr)
	}
}

// A scanner set to end its scans with LF (ctrl+j) instead of CR: the same as Enter.
func TestLineFeedEndsAScan(t *testing.T) {
	b, h, _ := setup(t)
	var m tea.Model = New(b, h)
	m = typeKeys(m, "SN-0008")
	m, _ = m.Update(key(tea.KeyCtrlJ))
	if got := m.(Model); got.phase != phaseRunning || got.serial != "SN-0008" || got.input.Value() != "" {
		t.Fatalf("LF: phase %d serial %q field %q", got.phase, got.serial, got.input.Value())
	}
}

// Item 3: the header names the handshake target.
func TestHeaderShowsHandshake(t *testing.T) {
	b, h, _ := setup(t)
	h.Handshake = "mqtts://broker.line:8883 (server CA ca/fleet.pem)"
	if v := New(b, h).View(); !strings.Contains(v, "handshake mqtts://broker.line:8883 (server CA ca/fleet.pem)") {
		t.Fatalf("header:\n%s", v)
	}
	// Long values never push the header past 80 columns.
	h.StationID, h.Operator = strings.Repeat("station-", 5), strings.Repeat("operator ", 4)
	h.TPM = "mssim://tpm-forwarder.fixture-12.factory.example:2321"
	h.ImageTarget = "/srv/line/images/" + strings.Repeat("sub/", 20) + "{serial}.img"
	h.Handshake = strings.Repeat("mqtts://broker.line:8883, ", 5) + "(server CA ca/fleet.pem)"
	m := New(b, h)
	fits(t, m.View())
	m.tpm = tpmSilent
	fits(t, m.View())
}

// silentTPM is a TPM that never answers: its probe waits for the deadline.
type silentTPM struct{ Backend }

func (silentTPM) ProbeTPM(ctx context.Context) error {
	<-ctx.Done()
	return fmt.Errorf("tpm: no answer: %w", ctx.Err())
}

// Item 4: the TPM is probed in a command with a deadline, never on the UI goroutine; a silent TPM is shown as such
// and the screen keeps taking keys meanwhile; probes repeat.
func TestTPMProbe(t *testing.T) {
	b, h, _ := setup(t)
	mm := New(silentTPM{b}, h)
	mm.probeWait = 200 * time.Millisecond
	var m tea.Model = mm
	if v := m.View(); !strings.Contains(v, "TPM sim (not checked yet)") {
		t.Fatalf("before the first probe:\n%s", v)
	}
	m, cmd := m.Update(probeTickMsg{})
	if cmd == nil || !m.(Model).probing {
		t.Fatal("no probe started")
	}
	res := make(chan tea.Msg, 1)
	go func() { res <- cmd() }()
	m = typeKeys(m, "SN-1") // the screen answers while the probe waits
	if m.(Model).input.Value() != "SN-1" {
		t.Fatal("keys were not taken while the TPM was probed")
	}
	var msg tea.Msg
	select {
	case msg = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("the probe did not end at its deadline")
	}
	m, cmd = m.Update(msg)
	if v := m.View(); !strings.Contains(v, "TPM not answering") {
		t.Fatalf("header after a silent probe:\n%s", v)
	}
	if cmd == nil || m.(Model).probing {
		t.Fatal("the probe is not repeated")
	}
	// A TPM that answers again.
	m, _ = m.Update(probeMsg{})
	if v := m.View(); !strings.Contains(v, "TPM sim (answers)") {
		t.Fatalf("header after a good probe:\n%s", v)
	}
	// No probe while a unit runs (the unit talks to the TPM).
	rm, _ := m.(Model).start("SN-0009", false)
	if rm, _ = rm.Update(probeTickMsg{}); rm.(Model).probing {
		t.Fatal("probed while a unit runs")
	}
}

// Item 4: a cancelled unit says cancelled, not FAILED at key.
func TestCancelledUnitSaysCancelled(t *testing.T) {
	b, h, _ := setup(t)
	m := New(b, h)
	nm, _ := m.start("SN-0007", false)
	m = nm.(Model)
	m.applyEvent(station.Event{Step: station.StepKey, Status: station.StatusStarted, Detail: "opening the TPM"})
	nm, _ = m.Update(key(tea.KeyEsc))
	if !nm.(Model).cancelling || !strings.Contains(nm.View(), "cancelling") {
		t.Fatalf("Esc while running:\n%s", nm.View())
	}
	cause := fmt.Errorf("%w: %w", station.ErrInterrupted, context.Canceled)
	nm, _ = nm.Update(eventMsg{m.run, station.Event{Step: station.StepKey, Status: station.StatusCancelled, Err: cause}})
	nm, _ = nm.Update(doneMsg{run: m.run, err: &station.StepError{Serial: "SN-0007", Step: station.StepKey, Err: cause}})
	v := nm.View()
	if !strings.Contains(v, "CANCELLED") || !strings.Contains(v, "cancelled") || strings.Contains(v, "FAIL") {
		t.Fatalf("cancelled unit:\n%s", v)
	}
	if ok, failed := nm.(Model).counts(); ok != 0 || failed != 0 {
		t.Fatalf("a cancelled unit counted: %d %d", ok, failed)
	}
}

// Item 5: the counters count units: a unit that failed and then passed, or passed twice, is one shippable unit.
func TestCountersCountUnits(t *testing.T) {
	b, h, _ := setup(t)
	h.Today = map[string]string{"OLD-1": string(inventory.StateShippable), "OLD-2": string(inventory.StateFailed)}
	m := New(b, h)
	m = doneAs(t, m, "SN-0002", errImage)
	m = doneAs(t, m, "SN-0002", nil)
	m = doneAs(t, m, "SN-0002", nil) // re-provisioned
	m = doneAs(t, m, "OLD-2", errImage)
	if v := m.View(); !strings.Contains(v, "today: 2 shippable, 1 failed") {
		t.Fatalf("counters:\n%s", v)
	}
}

// Item 5: PASS and FAIL are full-width bands with the word in block letters; the screen fits 80x24.
func TestBands(t *testing.T) {
	b, h, _ := setup(t)
	for _, c := range []struct {
		word string
		err  error
	}{{"PASS", nil}, {"FAIL", errImage}, {"FAIL", &station.StepError{Serial: "SN-0002", Step: station.StepHandshake,
		Err: &handshake.Error{Endpoint: "mqtts://127.0.0.1:8883", Reason: handshake.ErrClientRejected, Detail: strings.Repeat("long detail ", 20)}}}} {
		m := doneAs(t, New(b, h), "SN-0002", c.err)
		for i := range m.steps {
			m.steps[i].status, m.steps[i].detail = station.StatusOK, strings.Repeat("x", 100)
		}
		v := m.View()
		fits(t, v)
		letters := blockWord(c.word)
		if len(letters) != 5 {
			t.Fatalf("no block letters for %s", c.word)
		}
		lines := strings.Split(v, "\n")
		found := 0
		for _, l := range lines {
			for _, row := range letters {
				if strings.Contains(l, row) {
					found++
					if w := lipgloss.Width(l); w != 80 {
						t.Errorf("band line %d cells wide, want the full 80: %q", w, l)
					}
					break
				}
			}
		}
		if found != 5 {
			t.Fatalf("%s: %d of 5 block-letter rows on screen:\n%s", c.word, found, v)
		}
	}
}

// Item 5: an encrypted CA key is asked for at start, without echo; a wrong passphrase asks again.
func TestCAPassphraseAsked(t *testing.T) {
	b, h, dir := setupEncrypted(t, "s3cret words")
	h.Operator = ""
	var m tea.Model = New(b, h)
	if v := m.View(); m.(Model).phase != phaseUnlock || !strings.Contains(v, "passphrase") || !strings.Contains(v, "CA locked") {
		t.Fatalf("not asked for the passphrase:\n%s", v)
	}
	fits(t, m.View())
	checkGolden(t, "unlock", m.View())
	unlock := func(m tea.Model, pass string) tea.Model {
		m = typeKeys(m, pass)
		if strings.Contains(m.View(), pass) {
			t.Fatalf("the passphrase is echoed:\n%s", m.View())
		}
		m, cmd := m.Update(key(tea.KeyEnter))
		if cmd == nil {
			t.Fatal("Enter did not unlock")
		}
		m, _ = m.Update(cmd())
		return m
	}
	m = unlock(m, "wrong")
	fits(t, m.View())
	if got := m.(Model); got.phase != phaseUnlock || !strings.Contains(got.View(), "wrong CA key passphrase") {
		t.Fatalf("after a wrong passphrase:\n%s", got.View())
	}
	m = unlock(m, "s3cret words")
	if got := m.(Model); got.phase != phaseOperator || strings.Contains(got.View(), "CA locked") || got.input.Value() != "" {
		t.Fatalf("after the right passphrase: phase %d\n%s", got.phase, got.View())
	}
	_ = dir
}

func setupEncrypted(t *testing.T, pass string) (*realBackend, Header, string) {
	t.Helper()
	dir := t.TempDir()
	sd := dir + "/station"
	if _, err := station.Init(context.Background(), sd, station.InitOptions{StationID: "line-1", Passphrase: []byte(pass)}); err != nil {
		t.Fatal(err)
	}
	st, err := station.Open(context.Background(), sd, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.LoadCA(nil); err == nil {
		t.Fatal("an encrypted CA key loaded without its passphrase")
	}
	return &realBackend{st: st}, Header{StationID: "line-1", TPM: "sim", CALocked: true, Profile: "mender",
		ImageTarget: dir + "/{serial}.img"}, dir
}
