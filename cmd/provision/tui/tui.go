// Package tui is the operator's terminal UI for the manufacturing line: scan a serial, watch the unit's steps, read a
// PASS/FAIL band from two metres away. It renders station events; all business logic stays in station.
//
// A barcode scanner types the serial character by character and then Enter, so every printable character goes into
// the serial field, whatever state the screen is in: commands and confirmations live only on keys a scanner never
// sends (Enter, Esc, F1, ctrl+r, ctrl+c). Every Enter ends a scan: the field is cleared whether the scan was accepted
// or not. All I/O (the unit's pipeline, the TPM probe, unlocking the CA key) runs in commands that report back with
// messages, never on the UI goroutine.
package tui

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/charmbracelet/bubbles/spinner"
	"github.com/charmbracelet/bubbles/textinput"
	tea "github.com/charmbracelet/bubbletea"

	"provision/station"
	"provision/station/ca"
)

// Backend is what the TUI needs of the station.
type Backend interface {
	// CheckSerial says whether a serial is acceptable (the station's pattern).
	CheckSerial(serial string) error
	// Shippable reports whether the unit already passed, when and by whom.
	Shippable(ctx context.Context, serial string) (since time.Time, operator string, ok bool)
	// Provision runs the unit's pipeline, reporting each step. Cancelling ctx stops it between steps (or interrupts
	// the TPM command in flight); the error then wraps station.ErrInterrupted.
	Provision(ctx context.Context, req station.ProvisionRequest, report func(station.Event)) (station.Result, error)
	// ProbeTPM checks that the unit's TPM answers. It returns by ctx's deadline whatever the TPM does.
	ProbeTPM(ctx context.Context) error
	// UnlockCA decrypts the station's CA key with the passphrase typed at start and returns the issuing CA's expiry.
	UnlockCA(passphrase []byte) (time.Time, error)
}

// CentralReporter is implemented by a backend whose station forwards to a central store: one line for the header,
// alarm when the store is down or reported conflicts (shown in the failure colour).
type CentralReporter interface {
	CentralStatus() (line string, alarm bool)
}

// Header is the station's state shown at the top.
type Header struct {
	StationID   string
	Operator    string
	TPM         string
	Fixture     string // --fixture: the fixture the unit sits on ("" when the station is not on one)
	CAExpiry    time.Time
	CALocked    bool // the CA key is encrypted and no passphrase was given: asked for first
	Profile     string
	ImageTarget string // may contain {serial}
	Handshake   string // what the handshake step tests (station.HandshakeConfig.String)
	// Today holds today's units by serial, each with its latest result (inventory.StateShippable or StateFailed): the
	// counters count units, not attempts.
	Today map[string]string
}

// Today's results as Header.Today holds them.
const (
	resultShippable = "shippable"
	resultFailed    = "failed"
)

// ProbeEvery is how often the TPM is probed while no unit runs; ProbeTimeout bounds one probe.
const (
	ProbeEvery   = 5 * time.Second
	ProbeTimeout = 3 * time.Second
)

type phase int

const (
	phaseUnlock   phase = iota // asking for the CA key's passphrase
	phaseOperator              // asking for the operator's name
	phaseIdle
	phaseRunning
	phaseDone
)

// A confirmation waits for the same control key a second time; any other key drops it.
type confirm int

const (
	confirmNone confirm = iota
	confirmQuit
	confirmReprovision
)

// Banners.
const (
	bannerPass      = "SHIPPABLE"
	bannerFail      = "FAILED"
	bannerAlready   = "ALREADY"
	bannerCancelled = "CANCELLED"
)

type tpmState int

const (
	tpmUnknown tpmState = iota
	tpmAnswers
	tpmSilent
	tpmPerUnit // the TPM's command names each unit ({serial}): it is reached only when a unit runs
)

// ErrPerUnit is what ProbeTPM answers when the unit's TPM can be reached only for a given unit (its command uses
// {serial}): the header says so instead of probing.
var ErrPerUnit = errors.New("the TPM is reached per unit")

type stepLine struct {
	name   station.Step
	status string // "", started, ok, failed, skipped, cancelled
	ms     int64
	detail string
}

type historyLine struct {
	serial, result string
	at             time.Time
}

// Model is the Bubble Tea model.
type Model struct {
	backend    Backend
	header     Header
	phase      phase
	confirm    confirm
	input      textinput.Model
	spin       spinner.Model
	inputErr   string
	serial     string // the unit shown
	steps      []stepLine
	banner     string
	cause      string
	advice     string
	history    []historyLine
	run        int // the current run's number: messages of earlier runs are ignored
	events     chan station.Event
	cancel     context.CancelFunc
	cancelling bool
	quitting   bool // quit once the running unit has stopped
	signalled  bool // a signal (SIGINT/SIGTERM) ended the program
	tpm        tpmState
	probing    bool
	probeWait  time.Duration // ProbeTimeout; shorter in tests
	unlocking  bool
	help       bool
	label      labelState // the shown unit's label (labels on)
	width      int
	height     int
}

// New builds the model. With a locked CA it asks for the passphrase first; with an empty operator it asks for one.
func New(b Backend, h Header) Model {
	in := textinput.New()
	in.CharLimit = 128
	in.Focus()
	sp := spinner.New()
	sp.Spinner = spinner.Line
	if h.Today == nil {
		h.Today = map[string]string{}
	}
	m := Model{backend: b, header: h, input: in, spin: sp, width: 80, height: 24, probeWait: ProbeTimeout}
	m.enterPhase(phaseUnlock)
	return m
}

// enterPhase moves to p, skipping the questions already answered.
func (m *Model) enterPhase(p phase) {
	if p == phaseUnlock && !m.header.CALocked {
		p = phaseOperator
	}
	if p == phaseOperator && m.header.Operator != "" {
		p = phaseIdle
	}
	m.phase = p
	m.input.SetValue("")
	m.input.EchoMode = textinput.EchoNormal
	switch p {
	case phaseUnlock:
		m.input.Prompt = "CA key passphrase › "
		m.input.EchoMode = textinput.EchoNone
	case phaseOperator:
		m.input.Prompt = "operator name › "
	default:
		m.input.Prompt = "serial › "
	}
}

// Init starts the cursor blink and the first TPM probe.
func (m Model) Init() tea.Cmd {
	return tea.Batch(textinput.Blink, func() tea.Msg { return probeTickMsg{} })
}

type probeTickMsg struct{}

type probeMsg struct{ err error }

type unlockMsg struct {
	expiry time.Time
	err    error
}

// InterruptMsg asks the program to stop as a signal does: the running unit is cancelled and recorded as interrupted,
// then the program quits. Run sends it when its context is cancelled.
type InterruptMsg struct{}

// Update handles keys, pipeline events, probes and the result.
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
		if msg.run != m.run {
			return m, nil
		}
		m.applyEvent(msg.e)
		return m, waitEvent(m.run, m.events)
	case alreadyMsg:
		if msg.run != m.run {
			return m, nil
		}
		return m.already(msg)
	case doneMsg:
		if msg.run != m.run {
			return m, nil
		}
		return m.finish(msg)
	case probeTickMsg:
		return m.probe()
	case probeMsg:
		m.probing = false
		m.tpm = tpmAnswers
		switch {
		case errors.Is(msg.err, ErrPerUnit):
			m.tpm = tpmPerUnit
			return m, nil // nothing to probe between units
		case msg.err != nil:
			m.tpm = tpmSilent
		}
		return m, tea.Tick(ProbeEvery, func(time.Time) tea.Msg { return probeTickMsg{} })
	case unlockMsg:
		return m.unlocked(msg)
	case labelMsg:
		return m.printed(msg)
	case InterruptMsg:
		m.signalled = true
		if m.phase == phaseRunning {
			m.quitting = true
			m.stopUnit()
			return m, nil
		}
		return m, tea.Quit
	case tea.KeyMsg:
		return m.key(msg)
	}
	var cmd tea.Cmd
	m.input, cmd = m.input.Update(msg)
	return m, cmd
}

// probe checks the TPM in a command, bounded by ProbeTimeout. Not while a unit runs: the unit itself talks to the TPM
// then (a TCP TPM serves one client at a time), and its key step says whether the TPM answers.
func (m Model) probe() (tea.Model, tea.Cmd) {
	if m.probing || m.phase == phaseRunning || m.quitting {
		return m, tea.Tick(ProbeEvery, func(time.Time) tea.Msg { return probeTickMsg{} })
	}
	m.probing = true
	b, wait := m.backend, m.probeWait
	return m, func() tea.Msg {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		return probeMsg{b.ProbeTPM(ctx)}
	}
}

// Signalled reports whether a signal (Run's context) ended the program.
func (m Model) Signalled() bool { return m.signalled }

func (m Model) key(k tea.KeyMsg) (tea.Model, tea.Cmd) {
	if m.help {
		m.help = false
		if k.Type == tea.KeyF1 || k.Type == tea.KeyEsc {
			return m, nil
		}
	}
	prev := m.confirm
	m.confirm = confirmNone // any key but the confirming one drops a confirmation
	switch k.Type {
	case tea.KeyCtrlC:
		if m.phase != phaseRunning {
			return m, tea.Quit
		}
		if prev == confirmQuit {
			m.quitting = true
			m.stopUnit()
			return m, nil
		}
		m.confirm = confirmQuit
		return m, nil
	case tea.KeyEsc:
		switch {
		case prev != confirmNone:
		case m.phase == phaseRunning:
			m.stopUnit()
		default:
			m.input.SetValue("")
			m.inputErr = ""
		}
		return m, nil
	case tea.KeyF1:
		m.help = true
		return m, nil
	case tea.KeyCtrlR:
		return m.again(prev)
	case tea.KeyCtrlP:
		return m.reprint()
	case tea.KeyEnter, tea.KeyCtrlJ: // scanners end a scan with CR (Enter) or LF (ctrl+j)
		return m.enter()
	case tea.KeyRunes, tea.KeySpace, tea.KeyBackspace, tea.KeyDelete, tea.KeyLeft, tea.KeyRight, tea.KeyHome, tea.KeyEnd,
		tea.KeyCtrlU, tea.KeyCtrlW, tea.KeyCtrlA, tea.KeyCtrlE, tea.KeyCtrlK:
		// Printable characters always go into the field, also while a unit runs (the next scan can start early).
		var cmd tea.Cmd
		m.input, cmd = m.input.Update(k)
		if m.phase != phaseUnlock && m.phase != phaseOperator {
			m.inputErr = ""
			if v := strings.TrimSpace(m.input.Value()); v != "" {
				if err := m.backend.CheckSerial(v); err != nil {
					m.inputErr = shortErr(err)
				}
			}
		}
		return m, cmd
	}
	return m, nil
}

// stopUnit cancels the running unit: it stops between steps (or its TPM command is interrupted) and is recorded as
// interrupted.
func (m *Model) stopUnit() {
	if m.cancel != nil {
		m.cancel()
	}
	m.cancelling = true
}

// again is ctrl+r: run the shown unit again. A failed or cancelled unit resumes at once; a shippable one is
// re-provisioned only when ctrl+r is pressed a second time.
func (m Model) again(prev confirm) (tea.Model, tea.Cmd) {
	if m.phase != phaseDone || m.serial == "" {
		return m, nil
	}
	switch m.banner {
	case bannerFail, bannerCancelled:
		return m.start(m.serial, false)
	case bannerPass, bannerAlready, bannerLabelOK, bannerLabelFail:
		if prev == confirmReprovision {
			return m.start(m.serial, true)
		}
		m.confirm = confirmReprovision
	}
	return m, nil
}

// enter ends a scan: the field is cleared whatever happens next.
func (m Model) enter() (tea.Model, tea.Cmd) {
	raw := m.input.Value()
	v := strings.TrimSpace(raw)
	m.input.SetValue("")
	m.inputErr = ""
	switch m.phase {
	case phaseUnlock:
		if raw == "" || m.unlocking {
			return m, nil
		}
		m.unlocking = true
		b, pass := m.backend, []byte(raw)
		return m, func() tea.Msg {
			exp, err := b.UnlockCA(pass)
			clear(pass)
			return unlockMsg{exp, err}
		}
	case phaseOperator:
		if v == "" {
			return m, nil
		}
		m.header.Operator = v
		m.enterPhase(phaseIdle)
		return m, nil
	case phaseRunning:
		if v != "" {
			m.inputErr = fmt.Sprintf("scan %q ignored: %s is still running; scan it again when this unit has finished", v, m.serial)
		}
		return m, nil
	}
	if v == "" {
		return m, nil
	}
	if isLabelCode(v) && m.awaitsLabel() {
		return m.checkLabel(v)
	}
	// A new scan replaces the previous unit on the screen, whether it is accepted or not.
	m.serial, m.steps, m.banner, m.cause, m.advice = "", nil, "", "", ""
	if err := m.checkScan(v); err != nil {
		m.inputErr = "rejected: " + err.Error()
		m.phase = phaseIdle
		return m, nil
	}
	return m.start(v, false)
}

// checkScan checks a scanned value; its error names the value.
func (m Model) checkScan(v string) error {
	if isLabelCode(v) {
		return fmt.Errorf("%q is a label code, not a serial: scan the unit's serial", v)
	}
	if err := m.backend.CheckSerial(v); err != nil {
		s := shortErr(err)
		if !strings.Contains(s, v) {
			s = fmt.Sprintf("%q: %s", v, s)
		}
		return errors.New(s)
	}
	return nil
}

func (m Model) unlocked(u unlockMsg) (tea.Model, tea.Cmd) {
	m.unlocking = false
	switch {
	case errors.Is(u.err, ca.ErrWrongPassphrase):
		m.inputErr = "wrong CA key passphrase: type it again"
		return m, nil
	case u.err != nil:
		m.inputErr = shortErr(u.err)
		return m, nil
	}
	m.inputErr = ""
	m.header.CALocked, m.header.CAExpiry = false, u.expiry
	m.enterPhase(phaseOperator)
	return m, nil
}
