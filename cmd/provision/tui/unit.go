package tui

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"provision/station"
)

// One unit's run: started in a command, its events fed back through a channel (re-armed after each message), ended by
// a doneMsg or, for a unit already shippable, an alreadyMsg. Every message carries its run's number: messages of an
// earlier run are ignored.

type eventMsg struct {
	run int
	e   station.Event
}

type doneMsg struct {
	run int
	res station.Result
	err error
}

type alreadyMsg struct {
	run      int
	since    time.Time
	operator string
}

func waitEvent(run int, ch chan station.Event) tea.Cmd {
	return func() tea.Msg {
		e, ok := <-ch
		if !ok {
			return nil
		}
		return eventMsg{run, e}
	}
}

func (m Model) start(serial string, reprovision bool) (tea.Model, tea.Cmd) {
	ctx, cancel := context.WithCancel(context.Background())
	m.run++
	m.cancel, m.cancelling = cancel, false
	m.phase, m.serial, m.banner, m.cause, m.advice = phaseRunning, serial, "", "", ""
	m.steps, m.label = nil, labelState{}
	for _, s := range station.Steps {
		m.steps = append(m.steps, stepLine{name: s})
	}
	m.events = make(chan station.Event, 64)
	ch, run := m.events, m.run
	img := strings.ReplaceAll(m.header.ImageTarget, "{serial}", serial)
	req := station.ProvisionRequest{Serial: serial, Image: img, Operator: m.header.Operator, Reprovision: reprovision,
		Fixture: m.header.Fixture}
	b := m.backend
	work := func() tea.Msg {
		defer close(ch)
		if !reprovision {
			if since, op, ok := b.Shippable(ctx, serial); ok {
				return alreadyMsg{run, since, op}
			}
		}
		res, err := b.Provision(ctx, req, func(e station.Event) { ch <- e })
		return doneMsg{run, res, err}
	}
	return m, tea.Batch(work, waitEvent(run, ch), m.spin.Tick)
}

func (m *Model) applyEvent(e station.Event) {
	for i := range m.steps {
		if m.steps[i].name == e.Step {
			m.steps[i].status = e.Status
			m.steps[i].ms = e.Duration.Milliseconds()
			m.steps[i].detail = e.Detail
			if e.Status == station.StatusCancelled {
				m.steps[i].detail = "cancelled"
			} else if e.Err != nil {
				m.steps[i].detail = shortErr(e.Err)
			}
		}
	}
}

// endRun leaves the running phase; it quits the program when a quit was asked for while the unit ran.
func (m *Model) endRun() tea.Cmd {
	if m.cancel != nil {
		m.cancel()
		m.cancel = nil
	}
	m.cancelling = false
	m.phase = phaseDone
	if m.confirm == confirmQuit { // nothing runs any more: ctrl+c quits at once
		m.confirm = confirmNone
	}
	if m.quitting {
		return tea.Quit
	}
	return nil
}

func (m Model) already(a alreadyMsg) (tea.Model, tea.Cmd) {
	quit := m.endRun()
	m.steps = nil
	m.banner = bannerAlready
	m.cause = fmt.Sprintf("%s was already provisioned on %s by %s: nothing changed", m.serial,
		a.since.Local().Format("2006-01-02 15:04"), orDash(a.operator))
	m.advice = "set the unit aside; ctrl+r twice re-provisions it"
	if m.labeller() != nil {
		m.advice += "; ctrl+p prints its label"
	}
	return m, quit
}

// interrupted says whether a run ended because it was cancelled (Esc, ctrl+c, a signal), not because a step failed.
func interrupted(err error) bool {
	return errors.Is(err, station.ErrInterrupted) || errors.Is(err, context.Canceled)
}

func (m Model) finish(d doneMsg) (tea.Model, tea.Cmd) {
	quit := m.endRun()
	now := time.Now()
	switch {
	case d.err == nil:
		m.banner, m.cause, m.advice = bannerPass, "", "scan the next unit"
		if m.tpm != tpmPerUnit {
			m.tpm = tpmAnswers // the unit's key was made in it
		}
		m.header.Today[m.serial] = resultShippable
		m.history = append(m.history, historyLine{m.serial, "SHIPPABLE", now})
		if quit != nil {
			return m, quit
		}
		return m.printLabel()
	case interrupted(d.err):
		m.banner = bannerCancelled
		m.cause = "cancelled: stopped between steps; the inventory is consistent and the unit resumes where it stopped"
		m.advice = "ctrl+r resumes this unit; or scan the next one"
		for i := range m.steps { // a step that never reported is not pending any more
			if m.steps[i].status == station.StatusStarted {
				m.steps[i].status, m.steps[i].detail = station.StatusCancelled, "cancelled"
			}
		}
		m.history = append(m.history, historyLine{m.serial, "cancelled", now})
		return m, quit
	}
	m.banner = bannerFail
	var se *station.StepError
	var step station.Step
	if errors.As(d.err, &se) {
		step = se.Step
	}
	m.cause, m.advice = explain(step, d.err)
	m.header.Today[m.serial] = resultFailed
	m.history = append(m.history, historyLine{m.serial, "FAILED " + string(step), now})
	if quit != nil {
		return m, tea.Batch(bell, quit)
	}
	return m, bell
}

// counts are today's units: shippable and failed, each unit once with its latest result.
func (m Model) counts() (ok, failed int) {
	for _, r := range m.header.Today {
		switch r {
		case resultShippable:
			ok++
		case resultFailed:
			failed++
		}
	}
	return ok, failed
}
