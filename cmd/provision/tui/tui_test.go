package tui

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/x/exp/teatest"

	"provision/image/golden"
	"provision/internal/testutil"
	"provision/inventory"
	"provision/simulator"
	"provision/station"
	"provision/tpm"
)

// realBackend is the station with the in-process TPM simulator: the TUI tests run the real pipeline.
type realBackend struct {
	st *station.Station
	hs station.HandshakeConfig // zero: the built-in server
}

// ProbeTPM opens the simulator as the real command opens the unit's TPM.
func (b *realBackend) ProbeTPM(ctx context.Context) error {
	dev, err := tpm.Open(ctx, "sim", tpm.WithSimulator(simulator.Open))
	if err != nil {
		return err
	}
	return dev.Close()
}

func (b *realBackend) UnlockCA(pass []byte) (time.Time, error) {
	if err := b.st.LoadCA(pass); err != nil {
		return time.Time{}, err
	}
	return b.st.CA.Issuing.NotAfter, nil
}

func (b *realBackend) CheckSerial(s string) error { return b.st.Config.SerialRule().Check(s) }

func (b *realBackend) Shippable(ctx context.Context, serial string) (time.Time, string, bool) {
	u, err := b.st.Inv.Unit(ctx, serial)
	if err != nil || u.State != inventory.StateShippable {
		return time.Time{}, "", false
	}
	return u.Updated, u.Operator, true
}

func (b *realBackend) Provision(ctx context.Context, req station.ProvisionRequest, report func(station.Event)) (station.Result, error) {
	dev, err := tpm.Open(ctx, "sim", tpm.WithSimulator(simulator.Open))
	if err != nil {
		return station.Result{}, err
	}
	defer dev.Close()
	req.Handshake = b.hs
	return b.st.Provision(ctx, dev, req, report)
}

func setup(t *testing.T) (*realBackend, Header, string) {
	t.Helper()
	testutil.RequireTool(t, golden.Tools...)
	dir := t.TempDir()
	sd := filepath.Join(dir, "station")
	if _, err := station.Init(context.Background(), sd, station.InitOptions{StationID: "line-1"}); err != nil {
		t.Fatal(err)
	}
	st, err := station.Open(context.Background(), sd, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if err := st.LoadCA(nil); err != nil {
		t.Fatal(err)
	}
	if err := golden.Build(context.Background(), filepath.Join(dir, "SN-0001.img"), golden.Options{}); err != nil {
		t.Fatal(err)
	}
	h := Header{StationID: "line-1", Operator: "alice", TPM: "sim", CAExpiry: st.CA.Issuing.NotAfter,
		Profile: "mender", ImageTarget: filepath.Join(dir, "{serial}.img"), Handshake: "built-in loopback server"}
	return &realBackend{st: st}, h, dir
}

func typeKeys(m tea.Model, s string) tea.Model {
	for _, r := range s {
		m, _ = m.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{r}})
	}
	return m
}

func TestInvalidSerialStartsNothing(t *testing.T) {
	b, h, _ := setup(t)
	var m tea.Model = New(b, h)
	m = typeKeys(m, "ab/c")
	if got := m.(Model).inputErr; !strings.Contains(got, "contains '/'") {
		t.Fatalf("inline error %q", got)
	}
	m, cmd := m.Update(tea.KeyMsg{Type: tea.KeyEnter})
	if m.(Model).phase != phaseIdle || cmd != nil {
		t.Fatal("an invalid serial started something")
	}
	if n, _ := b.st.Inv.UnitCount(context.Background()); n != 0 {
		t.Fatalf("%d units recorded", n)
	}
	// Esc clears the input and the error.
	m = typeKeys(m, "ab/")
	m, _ = m.Update(tea.KeyMsg{Type: tea.KeyEsc})
	if m.(Model).input.Value() != "" || m.(Model).inputErr != "" {
		t.Fatal("esc did not clear")
	}
}

func TestOperatorIsAskedFirst(t *testing.T) {
	b, h, _ := setup(t)
	h.Operator = ""
	var m tea.Model = New(b, h)
	if m.(Model).phase != phaseOperator || !strings.Contains(m.View(), "Who is operating") {
		t.Fatal("operator not asked")
	}
	m = typeKeys(m, "bob")
	m, _ = m.Update(tea.KeyMsg{Type: tea.KeyEnter})
	if m.(Model).header.Operator != "bob" || m.(Model).phase != phaseIdle {
		t.Fatalf("operator %q phase %d", m.(Model).header.Operator, m.(Model).phase)
	}
}

func TestQuitAsksWhileRunning(t *testing.T) {
	b, h, _ := setup(t)
	m := New(b, h)
	m.phase = phaseRunning
	nm, cmd := m.Update(tea.KeyMsg{Type: tea.KeyCtrlC})
	if nm.(Model).confirm != confirmQuit || quits(cmd) {
		t.Fatal("ctrl+c quit a running unit without asking")
	}
	if !strings.Contains(nm.View(), "ctrl+c again") {
		t.Fatalf("no confirmation on screen:\n%s", nm.View())
	}
	nm, _ = nm.Update(tea.KeyMsg{Type: tea.KeyEsc})
	if mm := nm.(Model); mm.phase != phaseRunning || mm.confirm != confirmNone || mm.cancelling {
		t.Fatal("Esc did not drop the confirmation and return to the unit")
	}
	// Twice: the unit is stopped first; the program quits when it has stopped (the doneMsg).
	nm, _ = nm.Update(tea.KeyMsg{Type: tea.KeyCtrlC})
	nm, cmd = nm.Update(tea.KeyMsg{Type: tea.KeyCtrlC})
	if mm := nm.(Model); !mm.quitting || !mm.cancelling || quits(cmd) {
		t.Fatalf("second ctrl+c: quitting %v cancelling %v", mm.quitting, mm.cancelling)
	}
	_, cmd = nm.Update(doneMsg{run: nm.(Model).run, err: &station.StepError{Step: station.StepKey, Err: station.ErrInterrupted}})
	if !quits(cmd) {
		t.Fatal("the program did not quit once the unit stopped")
	}
}

func TestEventsRender(t *testing.T) {
	b, h, _ := setup(t)
	var m tea.Model = New(b, h)
	mm := m.(Model)
	mm.serial = "SN-9"
	for _, s := range station.Steps {
		mm.steps = append(mm.steps, stepLine{name: s})
	}
	mm.phase = phaseRunning
	mm.applyEvent(station.Event{Step: station.StepKey, Status: station.StatusOK, Duration: 12 * time.Millisecond, Detail: "tpm key"})
	v := mm.View()
	if !strings.Contains(v, "✓ key") || !strings.Contains(v, "12 ms") {
		t.Fatalf("view:\n%s", v)
	}
	m2, _ := mm.finish(doneMsg{err: &station.StepError{Serial: "SN-9", Step: station.StepImage, Err: os.ErrNotExist}})
	v = m2.(Model).View()
	if !strings.Contains(v, "FAILED") || !strings.Contains(v, "at image") || !strings.Contains(v, "ctrl+r") {
		t.Fatalf("view:\n%s", v)
	}
	if lines := strings.Count(v, "\n") + 1; lines > 24 {
		t.Fatalf("%d lines: does not fit 80x24", lines)
	}
}

var normalizers = []struct {
	re  *regexp.Regexp
	rep string
}{
	{regexp.MustCompile(`\x1b\[[0-9;?]*[a-zA-Z]`), ""},
	{regexp.MustCompile(`/tmp/[^ \n]*?/(\{serial\}|SN-\d+)\.img`), "DIR/$1.img"},
	{regexp.MustCompile(` +\d+ ms\b`), " N ms"},
	{regexp.MustCompile(`[^ \n]*…`), "…"}, // a step detail cut to the terminal width: its length depends on the paths

	{regexp.MustCompile(`\b[0-9a-f]{16,}\b`), "HEX"},
	{regexp.MustCompile(`127\.0\.0\.1:\d+`), "127.0.0.1:PORT"},
	{regexp.MustCompile(`\d\d:\d\d:\d\d`), "HH:MM:SS"},
	{regexp.MustCompile(`\d{4}-\d\d-\d\d( \d\d:\d\d)?`), "DATE"},
	{regexp.MustCompile(`[ \t]+\n`), "\n"},
	{regexp.MustCompile(`\n{2,}`), "\n"},
}

func normalize(s string) string {
	for _, n := range normalizers {
		s = n.re.ReplaceAllString(s, n.rep)
	}
	return s
}

func checkGolden(t *testing.T, name, got string) {
	t.Helper()
	testutil.Golden(t, filepath.Join("testdata", name+".golden"), []byte(normalize(got)))
}

// flow drives the program like a barcode scanner and returns the final screen.
func flow(t *testing.T, b Backend, h Header, keys string, until string) string {
	t.Helper()
	tm := teatest.NewTestModel(t, New(b, h), teatest.WithInitialTermSize(80, 24))
	waitScreen(t, tm, "(answers)") // the first TPM probe has answered: the header is the same on every run
	if keys != "" {
		tm.Type(keys)
		tm.Send(tea.KeyMsg{Type: tea.KeyEnter})
	}
	if until != "" {
		teatest.WaitFor(t, tm.Output(), func(out []byte) bool { return bytes.Contains(out, []byte(until)) },
			teatest.WithDuration(20*time.Second), teatest.WithCheckInterval(20*time.Millisecond))
	}
	tm.Send(tea.KeyMsg{Type: tea.KeyCtrlC})
	fm := tm.FinalModel(t, teatest.WithFinalTimeout(10*time.Second))
	return fm.View()
}

func TestFlows(t *testing.T) {
	b, h, _ := setup(t)
	checkGolden(t, "idle", flow(t, b, h, "", ""))
	checkGolden(t, "invalid", flow(t, b, h, "x/", "contains"))
	checkGolden(t, "pass", flow(t, b, h, "SN-0001", "SHIPPABLE"))
	checkGolden(t, "already", flow(t, b, h, "SN-0001", "ALREADY"))
	checkGolden(t, "fail", flow(t, b, h, "SN-0002", "FAILED"))
}

// The screen while a unit runs: finished steps with their time, the current one with a spinner, the rest pending.
func TestRunningScreen(t *testing.T) {
	b, h, _ := setup(t)
	m := New(b, h)
	m.phase, m.serial = phaseRunning, "SN-0003"
	for _, s := range station.Steps {
		m.steps = append(m.steps, stepLine{name: s})
	}
	m.applyEvent(station.Event{Step: station.StepValidate, Status: station.StatusOK, Detail: "new unit"})
	m.applyEvent(station.Event{Step: station.StepKey, Status: station.StatusOK, Duration: 41 * time.Millisecond, Detail: "tpm ecc-p256 key 0123456789abcdef"})
	m.applyEvent(station.Event{Step: station.StepAttest, Status: station.StatusOK, Duration: 20 * time.Millisecond,
		Detail: "trusted: EK 5d0e3d1c8a3b6f0e issued by CN=Infineon OPTIGA(TM) TPM 2.0 ECC CA 059"})
	m.applyEvent(station.Event{Step: station.StepCSR, Status: station.StatusStarted})
	v := m.View()
	if !strings.Contains(v, m.spin.View()) {
		t.Fatal("no spinner on the running step")
	}
	checkGolden(t, "running", v)
}

// waitScreen waits until the program's output shows want.
func waitScreen(t *testing.T, tm *teatest.TestModel, want string) {
	t.Helper()
	teatest.WaitFor(t, tm.Output(), func(out []byte) bool { return bytes.Contains(out, []byte(want)) },
		teatest.WithDuration(30*time.Second), teatest.WithCheckInterval(20*time.Millisecond))
}

// hangingHandshake is a backend whose handshake goes to a server that never answers: the unit waits in its last step.
func hangingHandshake(t *testing.T, b *realBackend) *realBackend {
	addr, _ := testutil.SilentListener(t)
	return &realBackend{st: b.st, hs: station.HandshakeConfig{Endpoints: []string{"tls://" + addr}, CA: x509.NewCertPool(), CAFile: "ca/none.pem"}}
}

// startHangingUnit runs the program on a unit whose handshake never answers and waits until the unit is in that step.
func startHangingUnit(t *testing.T) (*realBackend, *teatest.TestModel) {
	t.Helper()
	b, h, _ := setup(t)
	tm := teatest.NewTestModel(t, New(hangingHandshake(t, b), h), teatest.WithInitialTermSize(80, 24))
	waitScreen(t, tm, "(answers)") // the first TPM probe has answered: the header is the same on every run (as in flow)
	tm.Type("SN-0001")
	tm.Send(tea.KeyMsg{Type: tea.KeyEnter})
	waitScreen(t, tm, "checks passed")
	return b, tm
}

// Item 4: Esc stops the running unit (its context is cancelled): CANCELLED on screen, the step says cancelled, the
// unit keeps its last state and the inventory records the interruption.
func TestEscCancelsRunningUnit(t *testing.T) {
	b, tm := startHangingUnit(t)
	tm.Send(tea.KeyMsg{Type: tea.KeyEsc})
	waitScreen(t, tm, "CANCELLED")
	tm.Send(tea.KeyMsg{Type: tea.KeyCtrlC})
	v := tm.FinalModel(t, teatest.WithFinalTimeout(10*time.Second)).View()
	checkGolden(t, "cancelled", v)
	checkInterrupted(t, b, "SN-0001")
}

func checkInterrupted(t *testing.T, b *realBackend, serial string) {
	t.Helper()
	u, err := b.st.Inv.Unit(context.Background(), serial)
	if err != nil {
		t.Fatal(err)
	}
	if u.State != inventory.StateVerified {
		t.Fatalf("unit %s is %s, want verified (its last completed step)", serial, u.State)
	}
	evs, err := b.st.Inv.Events(context.Background(), serial)
	if err != nil {
		t.Fatal(err)
	}
	if last := evs[len(evs)-1]; last.Outcome != station.OutcomeInterrupted || last.Step != string(station.StepHandshake) {
		t.Fatalf("last event %+v, want interrupted at handshake", last)
	}
}

// Item 16: a signal (Run's context) stops the running unit between steps, records it as interrupted, then quits.
func TestSignalStopsRunningUnit(t *testing.T) {
	b, tm := startHangingUnit(t)
	tm.Send(InterruptMsg{})
	fm := tm.FinalModel(t, teatest.WithFinalTimeout(20*time.Second)).(Model)
	if !fm.Signalled() || fm.banner != bannerCancelled {
		t.Fatalf("signalled %v banner %q", fm.Signalled(), fm.banner)
	}
	checkInterrupted(t, b, "SN-0001")
}

// Item 16: Run returns an error wrapping station.ErrInterrupted (exit 130) when its context is cancelled.
func TestRunInterrupted(t *testing.T) {
	b, h, _ := setup(t)
	ctx, cancel := context.WithCancel(context.Background())
	in, out := &bytes.Buffer{}, &bytes.Buffer{}
	errc := make(chan error, 1)
	go func() { errc <- Run(ctx, b, h, tea.WithInput(in), tea.WithOutput(out), tea.WithoutRenderer()) }()
	cancel() // before or after the program started: the same

	select {
	case err := <-errc:
		if !errors.Is(err, station.ErrInterrupted) {
			t.Fatalf("Run: %v, want ErrInterrupted", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
}
