package tui

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/x/exp/teatest"

	"provision/label"
)

// labelBackend is the real station with a file label printer: each passing unit's ZPL label is written to dir.
type labelBackend struct {
	*realBackend
	printer label.Printer
	fail    error // the printer's failure, when set
}

func (b *labelBackend) LabelPrinter() string { return b.printer.String() }

func (b *labelBackend) PrintLabel(ctx context.Context, serial string) (string, error) {
	c, err := b.st.Inv.ActiveCertificate(ctx, serial)
	if err != nil {
		return "", err
	}
	if b.fail != nil {
		return c.SHA256, b.fail
	}
	data, err := label.Label{Serial: serial, CertSHA256: c.SHA256, Date: c.Issued}.Render(label.ZPL)
	if err != nil {
		return "", err
	}
	return c.SHA256, b.printer.Print(ctx, serial, data)
}

var qrField = regexp.MustCompile(`\^BQN,2,\d\^FDMA,([^^]+)\^FS`)

// printedPayload reads the QR payload of the label printed for serial.
func printedPayload(t *testing.T, dir, serial string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, serial+".zpl"))
	if err != nil {
		t.Fatal(err)
	}
	m := qrField.FindSubmatch(b)
	if m == nil {
		t.Fatalf("no QR code in the label:\n%s", b)
	}
	return string(m[1])
}

func scanIn(tm *teatest.TestModel, s string) {
	tm.Type(s)
	tm.Send(tea.KeyMsg{Type: tea.KeyEnter})
}

// Item 5: a unit that passes gets its label printed; scanning the label's QR code checks it against the unit: the
// right label is LABEL OK, another unit's label or an old one is a FAIL naming the mismatch; a serial is the next unit.
func TestLabelPrintedAndScanned(t *testing.T) {
	rb, h, _ := setup(t)
	dir := t.TempDir()
	b := &labelBackend{realBackend: rb, printer: label.FilePrinter{Path: filepath.Join(dir, "{serial}.zpl")}}
	tm := teatest.NewTestModel(t, New(b, h), teatest.WithInitialTermSize(80, 24))
	waitScreen(t, tm, "(answers)")
	scanIn(tm, "SN-0001")
	waitScreen(t, tm, "stick it on")
	payload := printedPayload(t, dir, "SN-0001")
	_, sha, err := label.ParsePayload(payload)
	if err != nil {
		t.Fatal(err)
	}
	if c, _ := rb.st.Inv.ActiveCertificate(context.Background(), "SN-0001"); c.SHA256 != sha {
		t.Fatalf("label's fingerprint %s, active certificate %s", sha, c.SHA256)
	}

	scanIn(tm, label.Payload("SN-0002", sha))
	waitScreen(t, tm, "label is for SN-0002, unit is SN-0001")
	other := strings.Repeat("0", 64)
	scanIn(tm, label.Payload("SN-0001", other))
	waitScreen(t, tm, "label's certificate is not the unit's")
	scanIn(tm, "P1/SN-0001/xyz")
	waitScreen(t, tm, "not a readable label")
	scanIn(tm, payload)
	waitScreen(t, tm, "LABEL OK")
	tm.Send(tea.KeyMsg{Type: tea.KeyCtrlC})
	fm := tm.FinalModel(t, teatest.WithFinalTimeout(10*time.Second)).(Model)
	if fm.banner != bannerLabelOK || fm.serial != "SN-0001" {
		t.Fatalf("banner %q serial %q", fm.banner, fm.serial)
	}
	checkGolden(t, "label-ok", fm.View())
}

// The wrong label's screen: a FAIL band with the cause, and what to do.
func TestLabelWrongScreen(t *testing.T) {
	rb, h, _ := setup(t)
	b := &labelBackend{realBackend: rb, printer: label.FilePrinter{Path: filepath.Join(t.TempDir(), "{serial}.zpl")}}
	m := New(b, h)
	m.phase, m.serial, m.banner = phaseDone, "SN-0001", bannerPass
	m.label = labelState{status: labelPrinted, serial: "SN-0001", sha: strings.Repeat("a", 64)}
	if !strings.Contains(m.View(), "scan its QR code") {
		t.Fatalf("no request to scan the label:\n%s", m.View())
	}
	nm, cmd := scanKeys(t, m, label.Payload("SN-0002", strings.Repeat("a", 64)))
	got := nm.(Model)
	if got.banner != bannerLabelFail || got.phase != phaseDone || cmd == nil {
		t.Fatalf("banner %q phase %d", got.banner, got.phase)
	}
	fits(t, got.View())
	checkGolden(t, "label-wrong", got.View())
	// A serial after a wrong label is the next unit, as always.
	nm, _ = scanKeys(t, got, "SN-0003")
	if got := nm.(Model); got.phase != phaseRunning || got.serial != "SN-0003" || got.label.status != labelNone {
		t.Fatalf("next unit: phase %d serial %q label %d", got.phase, got.serial, got.label.status)
	}
}

// A printer that fails: the screen says so, ctrl+p prints again; without a label printer a label code is refused.
func TestLabelNotPrinted(t *testing.T) {
	rb, h, _ := setup(t)
	dir := t.TempDir()
	b := &labelBackend{realBackend: rb, printer: label.FilePrinter{Path: filepath.Join(dir, "{serial}.zpl")},
		fail: os.ErrPermission}
	m := New(b, h)
	m.phase, m.serial, m.banner = phaseDone, "SN-0001", bannerPass
	m.label = labelState{status: labelPrinting, serial: "SN-0001"}
	nm, _ := m.Update(labelMsg{run: m.run, sha: strings.Repeat("b", 64), err: os.ErrPermission})
	got := nm.(Model)
	if got.label.status != labelNotPrinted || !strings.Contains(got.View(), "label NOT printed") {
		t.Fatalf("status %d\n%s", got.label.status, got.View())
	}
	nm, cmd := got.Update(key(tea.KeyCtrlP))
	if got := nm.(Model); got.label.status != labelPrinting || cmd == nil {
		t.Fatalf("ctrl+p: status %d", got.label.status)
	}

	// A unit already shippable: ctrl+p prints its label, which can then be checked.
	m = New(b, h)
	m.phase, m.serial, m.banner = phaseDone, "SN-0001", bannerAlready
	nm, cmd = m.Update(key(tea.KeyCtrlP))
	if got := nm.(Model); got.label.status != labelPrinting || got.label.serial != "SN-0001" || cmd == nil {
		t.Fatalf("ctrl+p on an already shippable unit: status %d", got.label.status)
	}
	nm, _ = nm.Update(labelMsg{run: m.run, sha: strings.Repeat("c", 64)})
	nm, _ = scanKeys(t, nm, label.Payload("SN-0001", strings.Repeat("c", 64)))
	if got := nm.(Model); got.banner != bannerLabelOK {
		t.Fatalf("banner %q after scanning the reprinted label", got.banner)
	}

	// No label printer: a label code is never taken for a serial, and nothing is checked.
	m = New(rb, h)
	m.phase, m.serial, m.banner = phaseDone, "SN-0001", bannerPass
	nm, _ = scanKeys(t, m, label.Payload("SN-0001", strings.Repeat("b", 64)))
	if got := nm.(Model); got.phase == phaseRunning || !strings.Contains(got.inputErr, "label code") {
		t.Fatalf("label scan without labels: phase %d err %q", got.phase, got.inputErr)
	}
}
