package tui

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/x/exp/teatest"

	"provision/image/golden"
	"provision/inventory"
	"provision/simulator"
	"provision/station"
	"provision/tpm"
)

// updating reports -update (the flag teatest defines): rewrite the golden files.
func updating() bool {
	f := flag.Lookup("update")
	return f != nil && f.Value.String() == "true"
}

// realBackend is the station with the in-process TPM simulator: the TUI tests run the real pipeline.
type realBackend struct {
	st *station.Station
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
	return b.st.Provision(ctx, dev, req, report)
}

func setup(t *testing.T) (*realBackend, Header, string) {
	t.Helper()
	simulator.RequireTool(t, golden.Tools...)
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
	h := Header{StationID: "line-1", Operator: "alice", TPM: "sim", TPMOK: true, CAExpiry: st.CA.Issuing.NotAfter,
		Profile: "mender", ImageTarget: filepath.Join(dir, "{serial}.img")}
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
	nm, cmd := m.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{'q'}})
	if nm.(Model).phase != phaseConfirmQuit || cmd != nil {
		t.Fatal("q quit a running unit without asking")
	}
	nm, _ = nm.Update(tea.KeyMsg{Type: tea.KeyRunes, Runes: []rune{'n'}})
	if nm.(Model).phase != phaseRunning {
		t.Fatal("declining did not return to the unit")
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
	if !strings.Contains(v, "FAILED") || !strings.Contains(v, "at image") || !strings.Contains(v, "press r") {
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
	p := filepath.Join("testdata", name+".golden")
	got = normalize(got)
	if updating() {
		os.MkdirAll("testdata", 0o755)
		if err := os.WriteFile(p, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Fatalf("%s differs from the golden file:\n--- got\n%s\n--- want\n%s", name, got, want)
	}
}

// flow drives the program like a barcode scanner and returns the final screen.
func flow(t *testing.T, b Backend, h Header, keys string, until string) string {
	t.Helper()
	tm := teatest.NewTestModel(t, New(b, h), teatest.WithInitialTermSize(80, 24))
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
	m.applyEvent(station.Event{Step: station.StepCSR, Status: station.StatusStarted})
	v := m.View()
	if !strings.Contains(v, m.spin.View()) {
		t.Fatal("no spinner on the running step")
	}
	checkGolden(t, "running", v)
}
