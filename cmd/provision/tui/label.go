package tui

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"provision/label"
)

// Labels: when the backend has a label printer, a unit that passes gets its label printed at once (in a command);
// then the screen asks for the label's QR code to be scanned. A scan that starts with label.Prefix is checked against
// the unit just shipped: LABEL OK, or a FAIL band with its cause. Any other scan is the next unit, as always.

// Labeller is implemented by a backend that prints labels.
type Labeller interface {
	// LabelPrinter names the printer for the operator; "" when labels are off.
	LabelPrinter() string
	// PrintLabel renders and prints the label of a unit that passed; it returns the certificate fingerprint the label
	// carries (also when printing failed, when it is known).
	PrintLabel(ctx context.Context, serial string) (certSHA256 string, err error)
}

// PrintTimeout bounds printing one label.
const PrintTimeout = 30 * time.Second

// Banners of a label check.
const (
	bannerLabelOK   = "LABEL OK"
	bannerLabelFail = "LABEL FAIL"
)

type labelStatus int

const (
	labelNone       labelStatus = iota
	labelPrinting               // the print command runs
	labelPrinted                // printed: waiting for its QR code
	labelNotPrinted             // the printer failed: ctrl+p prints again
	labelChecked                // scanned: the band says LABEL OK or FAIL
)

// labelState is the label of the unit on the screen.
type labelState struct {
	status labelStatus
	serial string // the unit the label is for
	sha    string // the certificate fingerprint on the label
	err    string // why it was not printed
}

type labelMsg struct {
	run int
	sha string
	err error
}

// labeller returns the backend's label printer, or nil when labels are off.
func (m Model) labeller() Labeller {
	if lb, ok := m.backend.(Labeller); ok && lb.LabelPrinter() != "" {
		return lb
	}
	return nil
}

// printLabel prints the label of the unit shown, in a command.
func (m Model) printLabel() (Model, tea.Cmd) {
	lb := m.labeller()
	if lb == nil || m.serial == "" {
		return m, nil
	}
	m.label = labelState{status: labelPrinting, serial: m.serial, sha: m.label.sha}
	run, serial := m.run, m.serial
	return m, func() tea.Msg {
		ctx, cancel := context.WithTimeout(context.Background(), PrintTimeout)
		defer cancel()
		sha, err := lb.PrintLabel(ctx, serial)
		return labelMsg{run, sha, err}
	}
}

func (m Model) printed(msg labelMsg) (tea.Model, tea.Cmd) {
	if msg.run != m.run || m.label.status != labelPrinting {
		return m, nil
	}
	if msg.sha != "" {
		m.label.sha = msg.sha
	}
	if msg.err != nil {
		m.label.status, m.label.err = labelNotPrinted, shortErr(msg.err)
		return m, bell
	}
	m.label.status = labelPrinted
	return m, nil
}

// reprint is ctrl+p: print the shown unit's label again, or the label of a unit shown as already shippable.
func (m Model) reprint() (tea.Model, tea.Cmd) {
	if m.phase != phaseDone || m.label.status == labelPrinting || m.label.status == labelNone && m.banner != bannerAlready {
		return m, nil
	}
	return m.printLabel()
}

// awaitsLabel says whether a scanned label code is checked against the unit shown.
func (m Model) awaitsLabel() bool {
	return m.phase == phaseDone && m.label.sha != "" &&
		(m.label.status == labelPrinted || m.label.status == labelNotPrinted || m.label.status == labelChecked)
}

// checkLabel checks a scanned label code against the unit whose label was printed.
func (m Model) checkLabel(code string) (tea.Model, tea.Cmd) {
	m.label.status = labelChecked
	serial, sha, err := label.ParsePayload(code)
	switch {
	case errors.Is(err, label.ErrPayload):
		m.cause = "the scanned code is not a readable label: " + shortErr(err)
	case serial != m.label.serial:
		m.cause = fmt.Sprintf("label is for %s, unit is %s", serial, m.label.serial)
	case sha != m.label.sha:
		m.cause = fmt.Sprintf("label's certificate is not the unit's (label %s…, unit %s…): an old label of this unit",
			prefix(sha, 12), prefix(m.label.sha, 12))
	default:
		m.banner, m.cause, m.advice = bannerLabelOK, "", "scan the next unit"
		m.history = append(m.history, historyLine{m.serial, "LABEL OK", time.Now()})
		return m, nil
	}
	m.banner = bannerLabelFail
	m.advice = "take the wrong label off, then scan the unit's own label (ctrl+p prints it again)"
	m.history = append(m.history, historyLine{m.serial, "LABEL WRONG", time.Now()})
	return m, bell
}

// labelLine is the label's state under the band; "" when there is nothing to say.
func (m Model) labelLine(w int) string {
	lb := m.labeller()
	if lb == nil || m.phase != phaseDone {
		return ""
	}
	switch m.label.status {
	case labelPrinting:
		return cut("label: printing on "+lb.LabelPrinter()+"…", w)
	case labelPrinted:
		return warnSt.Render(cut("label printed: stick it on, then scan its QR code ("+lb.LabelPrinter()+")", w))
	case labelNotPrinted:
		return failSt.Render("✗ ") + cut("label NOT printed: "+m.label.err+"; ctrl+p prints it again", w-2)
	}
	return ""
}

func prefix(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// isLabelCode says whether a scan is a label's QR code rather than a serial.
func isLabelCode(v string) bool { return strings.HasPrefix(v, label.Prefix) }
