// Package tui is the operator's terminal UI for the manufacturing line: scan a serial, watch the unit's steps, read a
// PASS/FAIL banner from a step away. It renders station events; all business logic stays in station.
package tui

import (
	"context"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/charmbracelet/bubbles/spinner"
	"github.com/charmbracelet/bubbles/textinput"
	tea "github.com/charmbracelet/bubbletea"
	"github.com/charmbracelet/lipgloss"
	"github.com/muesli/termenv"

	"provision/station"
	"provision/station/handshake"
)

// Backend is what the TUI needs of the station.
type Backend interface {
	// CheckSerial says whether a serial is acceptable (the station's pattern).
	CheckSerial(serial string) error
	// Shippable reports whether the unit already passed, when and by whom.
	Shippable(ctx context.Context, serial string) (since time.Time, operator string, ok bool)
	// Provision runs the unit's pipeline, reporting each step.
	Provision(ctx context.Context, req station.ProvisionRequest, report func(station.Event)) (station.Result, error)
}

// Header is the station's state shown at the top.
type Header struct {
	StationID   string
	Operator    string
	TPM         string
	TPMOK       bool
	CAExpiry    time.Time
	Profile     string
	ImageTarget string // may contain {serial}
	Handshake   string // what the handshake step tests (station.HandshakeConfig.String)
	Shippable   int    // today
	Failed      int    // today
}

type phase int

const (
	phaseOperator phase = iota // asking for the operator's name
	phaseIdle
	phaseRunning
	phaseDone
	phaseConfirmQuit
	phaseConfirmReprovision
)

type stepLine struct {
	name   string
	status string // "", started, ok, failed, skipped
	ms     int64
	detail string
}

type historyLine struct {
	serial, result string
	at             time.Time
}

// Model is the Bubble Tea model.
type Model struct {
	backend   Backend
	header    Header
	phase     phase
	input     textinput.Model
	spin      spinner.Model
	inputErr  string
	serial    string
	steps     []stepLine
	banner    string // "SHIPPABLE", "FAILED", "ALREADY", "CANCELLED"
	cause     string
	advice    string
	history   []historyLine
	lastFail  string
	events    chan station.Event
	cancel    context.CancelFunc
	help      bool
	width     int
	height    int
	prevPhase phase
	refused   string
}

// New builds the model. With an empty operator it asks for one first.
func New(b Backend, h Header) Model {
	in := textinput.New()
	in.Prompt = "serial › "
	in.CharLimit = 128
	in.Focus()
	sp := spinner.New()
	sp.Spinner = spinner.Line
	m := Model{backend: b, header: h, input: in, spin: sp, phase: phaseIdle, width: 80, height: 24}
	if h.Operator == "" {
		m.phase = phaseOperator
		m.input.Prompt = "operator name › "
	}
	return m
}

// Init starts the cursor blink.
func (m Model) Init() tea.Cmd { return textinput.Blink }

type eventMsg station.Event

type doneMsg struct {
	res station.Result
	err error
}

func waitEvent(ch chan station.Event) tea.Cmd {
	return func() tea.Msg {
		e, ok := <-ch
		if !ok {
			return nil
		}
		return eventMsg(e)
	}
}

// Update handles keys, pipeline events and the result.
func (m Model) Update(msg tea.Msg) (tea.Model, tea.Cmd) {
	switch msg := msg.(type) {
	case tea.WindowSizeMsg:
		m.width, m.height = msg.Width, msg.Height
		return m, nil
	case spinner.TickMsg:
		if m.phase != phaseRunning {
			return m, nil
		}
		var cmd tea.Cmd
		m.spin, cmd = m.spin.Update(msg)
		return m, cmd
	case eventMsg:
		m.applyEvent(station.Event(msg))
		return m, waitEvent(m.events)
	case doneMsg:
		return m.finish(msg)
	case tea.KeyMsg:
		return m.key(msg)
	}
	var cmd tea.Cmd
	m.input, cmd = m.input.Update(msg)
	return m, cmd
}

func (m Model) key(k tea.KeyMsg) (tea.Model, tea.Cmd) {
	if m.help && k.String() != "ctrl+c" {
		m.help = false
		return m, nil
	}
	switch m.phase {
	case phaseConfirmQuit:
		switch k.String() {
		case "y", "Y":
			if m.cancel != nil {
				m.cancel()
			}
			return m, tea.Quit
		default:
			m.phase = m.prevPhase
			return m, nil
		}
	case phaseConfirmReprovision:
		if k.String() == "y" || k.String() == "Y" {
			return m.start(m.refused, true)
		}
		m.phase = phaseDone
		return m, nil
	}
	switch k.String() {
	case "ctrl+c", "q":
		if k.String() == "q" && (m.phase == phaseIdle || m.phase == phaseDone || m.phase == phaseOperator) && m.input.Value() != "" {
			break // a "q" inside a serial
		}
		if m.phase == phaseRunning {
			m.prevPhase, m.phase = m.phase, phaseConfirmQuit
			return m, nil
		}
		return m, tea.Quit
	case "esc":
		if m.phase == phaseRunning && m.cancel != nil {
			m.cancel()
			m.cause = "cancelling: the unit stops after the current step"
			return m, nil
		}
		m.input.SetValue("")
		m.inputErr = ""
		return m, nil
	case "?":
		if m.input.Value() == "" {
			m.help = true
			return m, nil
		}
	case "r":
		if (m.phase == phaseDone || m.phase == phaseIdle) && m.input.Value() == "" && m.lastFail != "" {
			return m.start(m.lastFail, false)
		}
	case "ctrl+r":
		if m.phase == phaseDone && m.banner == "ALREADY" {
			m.phase = phaseConfirmReprovision
			return m, nil
		}
	case "enter":
		return m.enter()
	}
	if m.phase == phaseRunning {
		return m, nil // the input is locked while a unit runs
	}
	var cmd tea.Cmd
	m.input, cmd = m.input.Update(k)
	if m.phase != phaseOperator {
		m.inputErr = ""
		if v := strings.TrimSpace(m.input.Value()); v != "" {
			if err := m.backend.CheckSerial(v); err != nil {
				m.inputErr = shortErr(err)
			}
		}
	}
	return m, cmd
}

func (m Model) enter() (tea.Model, tea.Cmd) {
	v := strings.TrimSpace(m.input.Value())
	switch m.phase {
	case phaseOperator:
		if v == "" {
			return m, nil
		}
		m.header.Operator = v
		m.phase = phaseIdle
		m.input.Prompt = "serial › "
		m.input.SetValue("")
		return m, nil
	case phaseRunning:
		return m, nil
	}
	if v == "" {
		return m, nil
	}
	if err := m.backend.CheckSerial(v); err != nil {
		m.inputErr = shortErr(err)
		return m, nil
	}
	m.input.SetValue("")
	if since, op, ok := m.backend.Shippable(context.Background(), v); ok {
		m.phase, m.serial, m.steps = phaseDone, v, nil
		m.banner = "ALREADY"
		m.cause = fmt.Sprintf("%s was already provisioned on %s by %s: nothing changed", v, since.Local().Format("2006-01-02 15:04"), op)
		m.advice = "set the unit aside; ctrl+r re-provisions it (asks first)"
		m.refused = v
		return m, nil
	}
	return m.start(v, false)
}

func (m Model) start(serial string, reprovision bool) (tea.Model, tea.Cmd) {
	ctx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	m.phase, m.serial, m.banner, m.cause, m.advice, m.inputErr = phaseRunning, serial, "", "", "", ""
	m.steps = nil
	for _, s := range station.Steps {
		m.steps = append(m.steps, stepLine{name: s})
	}
	m.events = make(chan station.Event, 64)
	ch := m.events
	img := strings.ReplaceAll(m.header.ImageTarget, "{serial}", serial)
	req := station.ProvisionRequest{Serial: serial, Image: img, Operator: m.header.Operator, Reprovision: reprovision}
	b := m.backend
	run := func() tea.Msg {
		res, err := b.Provision(ctx, req, func(e station.Event) { ch <- e })
		close(ch)
		return doneMsg{res, err}
	}
	return m, tea.Batch(run, waitEvent(ch), m.spin.Tick)
}

func (m *Model) applyEvent(e station.Event) {
	for i := range m.steps {
		if m.steps[i].name == e.Step {
			m.steps[i].status = e.Status
			m.steps[i].ms = e.Duration.Milliseconds()
			m.steps[i].detail = e.Detail
			if e.Err != nil {
				m.steps[i].detail = shortErr(e.Err)
			}
		}
	}
}

func (m Model) finish(d doneMsg) (tea.Model, tea.Cmd) {
	if m.cancel != nil {
		m.cancel()
		m.cancel = nil
	}
	m.phase = phaseDone
	now := time.Now()
	switch {
	case d.err == nil:
		m.banner, m.cause, m.advice = "SHIPPABLE", "", "scan the next unit"
		m.header.Shippable++
		m.lastFail = ""
		m.history = append(m.history, historyLine{m.serial, "SHIPPABLE", now})
		return m, nil
	case errors.Is(d.err, context.Canceled):
		m.banner = "CANCELLED"
		m.cause = "stopped between steps; the inventory is consistent"
		m.advice = "press r to resume this unit, or scan the next one"
		m.lastFail = m.serial
		m.history = append(m.history, historyLine{m.serial, "cancelled", now})
		return m, nil
	}
	m.banner = "FAILED"
	var se *station.StepError
	step := ""
	if errors.As(d.err, &se) {
		step = se.Step
	}
	m.cause, m.advice = explain(step, d.err)
	m.header.Failed++
	m.lastFail = m.serial
	m.history = append(m.history, historyLine{m.serial, "FAILED " + step, now})
	return m, bell
}

// bell rings the terminal. tea.Printf would be swallowed while the alternate screen is active; a BEL moves no cursor,
// so it can go straight to the terminal.
func bell() tea.Msg {
	os.Stderr.Write([]byte{'\a'})
	return nil
}

// explain turns an error into an operator's cause and what to do.
func explain(step string, err error) (cause, advice string) {
	cause = shortErr(err)
	var se *station.StepError
	if errors.As(err, &se) {
		cause = "at " + se.Step + ": " + shortErr(se.Err)
	}
	var he *handshake.Error
	switch {
	case errors.As(err, &he):
		return "at handshake: " + he.Reason.Error(), handshakeAdvice(he.Reason)
	case step == station.StepImage || step == station.StepVerify:
		return cause, "check the unit's image or storage (is it plugged in? the right image?), then press r to retry"
	case step == station.StepKey:
		return cause, "check the unit's TPM connection, then press r to retry"
	}
	return cause, "press r to retry; call the line engineer if it fails again"
}

func handshakeAdvice(reason error) string {
	switch reason {
	case handshake.ErrClientRejected:
		return "the server does not trust the station CA: call the line engineer"
	case handshake.ErrServerUntrusted:
		return "the server's certificate is not trusted (endpoint CA): call the line engineer"
	case handshake.ErrUnreachable, handshake.ErrTimeout:
		return "the test server is not reachable: check the network, then press r"
	}
	return "press r to retry; call the line engineer if it fails again"
}

var wrapRE = regexp.MustCompile(`\s+`)

func shortErr(err error) string {
	s := wrapRE.ReplaceAllString(err.Error(), " ")
	for _, cut := range []string{": invalid serial", ": refused by the inventory"} {
		s = strings.TrimSuffix(s, cut)
	}
	return s
}

// Styles; plain text under NO_COLOR (words carry the state, colour only helps).
var (
	noColor   = os.Getenv("NO_COLOR") != ""
	titleSt   = lipgloss.NewStyle().Bold(true)
	dimSt     = lipgloss.NewStyle().Faint(true)
	okSt      = lipgloss.NewStyle().Foreground(lipgloss.Color("2")).Bold(true)
	failSt    = lipgloss.NewStyle().Foreground(lipgloss.Color("1")).Bold(true)
	warnSt    = lipgloss.NewStyle().Foreground(lipgloss.Color("3")).Bold(true)
	bannerBox = lipgloss.NewStyle().Bold(true).Padding(0, 2).Border(lipgloss.ThickBorder())
)

func init() {
	if noColor {
		lipgloss.SetColorProfile(termenv.Ascii)
	}
}

// View renders the screen; it fits 80×24.
func (m Model) View() string {
	w := max(m.width, 60)
	var b strings.Builder
	h := m.header
	tpmState := "answers"
	if !h.TPMOK {
		tpmState = "NOT ANSWERING"
	}
	b.WriteString(titleSt.Render("provision") + "  station " + h.StationID + "  operator " + orDash(h.Operator) + "\n")
	b.WriteString(fmt.Sprintf("TPM %s (%s)  CA until %s  profile %s\n", h.TPM, tpmState, h.CAExpiry.Format("2006-01-02"), h.Profile))
	b.WriteString(fmt.Sprintf("image %s  today: %d shippable, %d failed\n", h.ImageTarget, h.Shippable, h.Failed))
	b.WriteString(strings.Repeat("─", min(w, 100)) + "\n")
	if m.help {
		b.WriteString(helpText)
		return b.String()
	}
	switch m.phase {
	case phaseOperator:
		b.WriteString("Who is operating this station? Type your name and press Enter.\n" + m.input.View() + "\n")
		return b.String()
	case phaseConfirmQuit:
		b.WriteString(warnSt.Render("A unit is running. Quit anyway? It stops after the current step and resumes next time. [y/N]") + "\n")
		return b.String()
	case phaseConfirmReprovision:
		b.WriteString(warnSt.Render(fmt.Sprintf("Re-provision %s? Its certificate is superseded and its image rewritten. [y/N]", m.refused)) + "\n")
		return b.String()
	}
	b.WriteString(m.input.View() + "\n")
	if m.inputErr != "" {
		b.WriteString(failSt.Render("✗ ") + m.inputErr + "\n")
	} else {
		b.WriteString(dimSt.Render("scan or type a serial, then Enter") + "\n")
	}
	if m.serial != "" {
		b.WriteString("unit " + titleSt.Render(m.serial) + "\n")
		for _, s := range m.steps {
			mark := "·"
			switch s.status {
			case station.StatusStarted:
				mark = m.spin.View()
			case station.StatusOK:
				mark = okSt.Render("✓")
			case station.StatusFailed:
				mark = failSt.Render("✗")
			case station.StatusSkipped:
				mark = dimSt.Render("-")
			}
			ms := ""
			if s.status == station.StatusOK || s.status == station.StatusFailed {
				ms = fmt.Sprintf("%5d ms", s.ms)
			}
			detail := s.detail
			if max := w - 26; len(detail) > max && max > 3 {
				detail = detail[:max-1] + "…"
			}
			b.WriteString(fmt.Sprintf(" %s %-10s %8s  %s\n", mark, s.name, ms, dimSt.Render(detail)))
		}
	}
	switch m.banner {
	case "SHIPPABLE":
		b.WriteString("\n" + bannerBox.BorderForeground(lipgloss.Color("2")).Render(okSt.Render("PASS  ✓ SHIPPABLE  "+m.serial)) + "\n")
	case "FAILED":
		b.WriteString("\n" + bannerBox.BorderForeground(lipgloss.Color("1")).Render(failSt.Render("FAIL  ✗ FAILED  "+m.serial)) + "\n")
	case "ALREADY", "CANCELLED":
		b.WriteString("\n" + bannerBox.BorderForeground(lipgloss.Color("3")).Render(warnSt.Render(m.banner+"  "+m.serial)) + "\n")
	}
	if m.cause != "" {
		b.WriteString(wrap(m.cause, w) + "\n")
	}
	if m.advice != "" && m.phase == phaseDone {
		b.WriteString(titleSt.Render(wrap("→ "+m.advice, w)) + "\n")
	}
	// The history takes what is left of the screen.
	room := m.height - strings.Count(b.String(), "\n") - 2
	if len(m.history) > 0 && room >= 2 {
		b.WriteString(dimSt.Render("last units") + "\n")
		for i := len(m.history) - 1; i >= 0 && i >= len(m.history)-(room-1); i-- {
			hl := m.history[i]
			b.WriteString(fmt.Sprintf("  %s  %-16s %s\n", hl.at.Format("15:04:05"), hl.serial, hl.result))
		}
	}
	b.WriteString(dimSt.Render("enter start · r retry · esc cancel · ? help · q quit"))
	return b.String()
}

const helpText = `Keys
  Enter    start the unit whose serial was scanned or typed
  r        retry the last failed or cancelled unit
  Esc      cancel the running unit (it stops between steps; the inventory stays consistent); clears the input
  ctrl+r   re-provision a unit that is already shippable (asks first)
  ?        this help          q / ctrl+c   quit (asks first while a unit runs)
A unit is SHIPPABLE only when its key, certificate, image and a live handshake all passed.
Press any key to go back.
`

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func wrap(s string, w int) string {
	if w < 20 {
		return s
	}
	var out, line []string
	n := 0
	for _, word := range strings.Fields(s) {
		if n+len(word)+1 > w && n > 0 {
			out = append(out, strings.Join(line, " "))
			line, n = nil, 0
		}
		line = append(line, word)
		n += len(word) + 1
	}
	if len(line) > 0 {
		out = append(out, strings.Join(line, " "))
	}
	return strings.Join(out, "\n")
}

// Run starts the program and returns when the operator quits.
func Run(ctx context.Context, b Backend, h Header, opts ...tea.ProgramOption) error {
	_, err := tea.NewProgram(New(b, h), append([]tea.ProgramOption{tea.WithContext(ctx), tea.WithAltScreen()}, opts...)...).Run()
	if errors.Is(err, tea.ErrProgramKilled) && ctx.Err() != nil {
		return nil
	}
	return err
}
