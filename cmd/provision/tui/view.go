package tui

import (
	"fmt"
	"os"
	"strings"

	"github.com/charmbracelet/lipgloss"
	"github.com/muesli/termenv"

	"provision/station"
)

// Styles; plain text under NO_COLOR (words and block letters carry the state, colour only helps).
var (
	noColor  = os.Getenv("NO_COLOR") != ""
	titleSt  = lipgloss.NewStyle().Bold(true)
	dimSt    = lipgloss.NewStyle().Faint(true)
	okSt     = lipgloss.NewStyle().Foreground(lipgloss.Color("2")).Bold(true)
	failSt   = lipgloss.NewStyle().Foreground(lipgloss.Color("1")).Bold(true)
	warnSt   = lipgloss.NewStyle().Foreground(lipgloss.Color("3")).Bold(true)
	passBand = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Color("0")).Background(lipgloss.Color("2"))
	failBand = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Color("15")).Background(lipgloss.Color("1"))
	warnBand = lipgloss.NewStyle().Bold(true).Foreground(lipgloss.Color("0")).Background(lipgloss.Color("3"))
)

func init() {
	if noColor {
		lipgloss.SetColorProfile(termenv.Ascii)
	}
}

const footer = "enter start · ctrl+r run again · esc cancel · F1 help · ctrl+c quit"

// View renders the screen; it fits 80×24.
func (m Model) View() string {
	w := max(m.width, 60)
	var b strings.Builder
	line := func(s string) { b.WriteString(s + "\n") }
	m.viewHeader(line, w)
	if m.help {
		b.WriteString(helpText)
		b.WriteString(dimSt.Render("F1 or Esc: back to the screen"))
		return b.String()
	}
	switch m.phase {
	case phaseUnlock:
		line("The CA key is encrypted: type its passphrase and press Enter (it is not shown).")
		line(m.input.View())
		if m.inputErr != "" {
			line(failSt.Render("✗ ") + cut(m.inputErr, w-2))
		}
		b.WriteString(dimSt.Render("ctrl+c quit"))
		return b.String()
	case phaseOperator:
		line("Who is operating this station? Type your name and press Enter.")
		line(m.input.View())
		b.WriteString(dimSt.Render("ctrl+c quit"))
		return b.String()
	}
	line(m.input.View())
	switch {
	case m.inputErr != "":
		line(failSt.Render("✗ ") + cut(m.inputErr, w-2))
	case m.confirm == confirmQuit:
		line(warnSt.Render(cut("A unit is running. ctrl+c again stops it between steps and quits; Esc goes back.", w)))
	case m.confirm == confirmReprovision:
		line(warnSt.Render(cut(fmt.Sprintf("Re-provision %s? ctrl+r again: new certificate, image rewritten. Esc: no.", m.serial), w)))
	case m.cancelling && m.phase == phaseRunning:
		line(warnSt.Render("cancelling: the unit stops after the current step…"))
	case m.banner == "":
		line(dimSt.Render("scan or type a serial, then Enter"))
	}
	if m.serial != "" && m.banner == "" {
		line("unit " + titleSt.Render(m.serial))
	}
	for _, s := range m.steps {
		line(m.stepView(s, w))
	}
	if m.banner != "" {
		b.WriteString(m.bandView(w))
	}
	if m.cause != "" {
		line(clampLines(wrap(m.cause, w), 2, w))
	}
	if l := m.labelLine(w); l != "" {
		line(l)
	}
	if m.advice != "" && m.phase == phaseDone {
		line(titleSt.Render(clampLines(wrap("→ "+m.advice, w), 2, w)))
	}
	// The history takes what is left of the screen.
	room := m.height - strings.Count(b.String(), "\n") - 1
	if len(m.history) > 0 && room >= 2 {
		line(dimSt.Render("last units"))
		for i := len(m.history) - 1; i >= 0 && i >= len(m.history)-(room-1); i-- {
			hl := m.history[i]
			line(fmt.Sprintf("  %s  %-16s %s", hl.at.Format("15:04:05"), hl.serial, hl.result))
		}
	}
	b.WriteString(dimSt.Render(footer))
	return b.String()
}

func (m Model) viewHeader(line func(string), w int) {
	h := m.header
	ok, failed := m.counts()
	line(titleSt.Render("provision") + cut("  station "+h.StationID+"  operator "+orDash(h.Operator)+
		fmt.Sprintf("  today: %d shippable, %d failed", ok, failed), w-len("provision")))
	uri := cut(h.TPM, 34)
	var tpm string
	switch m.tpm {
	case tpmAnswers:
		tpm = "TPM " + uri + " (answers)"
	case tpmSilent:
		tpm = failSt.Render("TPM not answering") + " (" + uri + ")"
	case tpmPerUnit:
		tpm = "TPM " + uri + " (reached per unit)"
	default:
		tpm = "TPM " + uri + " (not checked yet)"
	}
	ca := "CA until " + h.CAExpiry.Format("2006-01-02")
	if h.CALocked {
		ca = "CA locked"
	}
	if h.Fixture != "" {
		tpm = "fixture " + h.Fixture + "  " + tpm
	}
	line(tpm + "  " + ca)
	line(cut("profile "+h.Profile+"  image "+h.ImageTarget, w))
	line(cut("handshake "+orDash(h.Handshake), w))
	if cr, ok := m.backend.(CentralReporter); ok {
		if text, alarm := cr.CentralStatus(); text != "" {
			if alarm {
				line(failSt.Render(cut(text, w)))
			} else {
				line(cut(text, w))
			}
		}
	}
	line(strings.Repeat("─", min(w, 100)))
}

func (m Model) stepView(s stepLine, w int) string {
	mark := "·"
	switch s.status {
	case station.StatusStarted:
		mark = m.spin.View()
	case station.StatusOK:
		mark = okSt.Render("✓")
	case station.StatusFailed:
		mark = failSt.Render("✗")
	case station.StatusSkipped, station.StatusSoft:
		mark = dimSt.Render("-")
	case station.StatusCancelled:
		mark = warnSt.Render("◌")
	}
	ms := ""
	if s.status == station.StatusOK || s.status == station.StatusFailed {
		ms = fmt.Sprintf("%5d ms", s.ms)
	}
	return fmt.Sprintf(" %s %-10s %8s  %s", mark, s.name, ms, dimSt.Render(cut(s.detail, w-26)))
}

// bandView is the result, readable from two metres: a full-width band with the word in block letters for PASS and
// FAIL (the word itself, not only a colour), a plain band for the other outcomes.
func (m Model) bandView(w int) string {
	var st lipgloss.Style
	var word string
	var side []string
	switch m.banner {
	case bannerPass:
		st, word, side = passBand, "PASS", []string{"", "✓ SHIPPABLE", "", m.serial, ""}
	case bannerFail:
		st, word, side = failBand, "FAIL", []string{"", "✗ FAILED", "", m.serial, ""}
	case bannerLabelOK:
		st, word, side = passBand, "OK", []string{"", "✓ LABEL OK", "", m.serial, ""}
	case bannerLabelFail:
		st, word, side = failBand, "FAIL", []string{"", "✗ WRONG LABEL", "", m.serial, ""}
	case bannerAlready:
		st, side = warnBand, []string{"", "ALREADY SHIPPABLE  " + m.serial + "  (not touched)", ""}
	default:
		st, side = warnBand, []string{"", "CANCELLED  " + m.serial + "  (resumes where it stopped)", ""}
	}
	rows := make([]string, len(side))
	letters := blockWord(word)
	for i := range rows {
		r := "  "
		if letters != nil {
			r += letters[i] + "    "
		}
		rows[i] = st.Width(w).Render(cut(r+side[i], w))
	}
	return strings.Join(rows, "\n") + "\n"
}

const helpText = `Keys: a barcode scanner types only characters and Enter; the rest are commands.
  Enter    ends a scan: the unit starts (the field is cleared, accepted or not)
  ctrl+p   prints the shown unit's label again (with a label printer); scanning
           the label's QR code checks that it is the unit's own label
  ctrl+r   runs the shown unit again: a failed or cancelled unit resumes at
           once, a shippable one is re-provisioned when ctrl+r is pressed twice
  Esc      cancels the running unit: it stops between steps, the inventory stays
           consistent, and the unit resumes when scanned again; clears the field
  F1       this help
  ctrl+c   quits; while a unit runs press it twice (the unit stops first)
Counters: today's units, each once with its latest result (not attempts).
SHIPPABLE means key, certificate, image and a live handshake all passed.
`

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

// cut shortens s to n display cells, marking the cut with "…".
func cut(s string, n int) string {
	if n < 4 || lipgloss.Width(s) <= n {
		return s
	}
	r := []rune(s)
	for len(r) > 0 && lipgloss.Width(string(r)) > n-1 {
		r = r[:len(r)-1]
	}
	return string(r) + "…"
}

// clampLines keeps at most n lines, the last cut with "…" when more followed.
func clampLines(s string, n, w int) string {
	lines := strings.Split(s, "\n")
	if len(lines) <= n {
		return s
	}
	lines = lines[:n]
	lines[n-1] = cut(lines[n-1]+" …", w)
	return strings.Join(lines, "\n")
}

func wrap(s string, w int) string {
	if w < 20 {
		return s
	}
	var out, line []string
	n := 0
	var words []string
	for _, word := range strings.Fields(s) {
		for r := []rune(word); ; r = r[w:] { // a word wider than the screen (a path) is split
			if len(r) <= w {
				words = append(words, string(r))
				break
			}
			words = append(words, string(r[:w]))
		}
	}
	for _, word := range words {
		wl := len([]rune(word))
		if n+wl+1 > w && n > 0 {
			out = append(out, strings.Join(line, " "))
			line, n = nil, 0
		}
		line = append(line, word)
		n += wl + 1
	}
	if len(line) > 0 {
		out = append(out, strings.Join(line, " "))
	}
	return strings.Join(out, "\n")
}
