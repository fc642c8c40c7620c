package tui

import (
	"context"
	"errors"
	"fmt"
	"time"

	tea "github.com/charmbracelet/bubbletea"

	"provision/station"
)

// StopGrace bounds how long Run waits, after its context is cancelled, for the running unit to stop and be recorded.
const StopGrace = 20 * time.Second

// Run starts the program and returns when the operator quits (nil) or ctx is cancelled (SIGINT/SIGTERM): then the
// running unit is cancelled, stops between steps and is recorded as interrupted before Run returns an error wrapping
// station.ErrInterrupted (exit 130).
//
// The program does not get ctx (tea.WithContext would kill it at once, leaving the unit's step unfinished and
// unrecorded), nor Bubble Tea's own signal handler (it quits on SIGTERM the same way): ctx's cancellation reaches the
// model as an InterruptMsg instead.
func Run(ctx context.Context, b Backend, h Header, opts ...tea.ProgramOption) error {
	p := tea.NewProgram(New(b, h), append([]tea.ProgramOption{tea.WithAltScreen(), tea.WithoutSignalHandler()}, opts...)...)
	done := make(chan struct{})
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		p.Send(InterruptMsg{})
		select {
		case <-done:
		case <-time.After(StopGrace):
			p.Kill()
		}
	}()
	fm, err := p.Run()
	close(done)
	m, _ := fm.(Model)
	switch {
	case m.Signalled() || ctx.Err() != nil:
		return fmt.Errorf("tui: stopped by a signal; a running unit was interrupted and resumes when scanned again: %w", station.ErrInterrupted)
	case err != nil && !errors.Is(err, tea.ErrProgramKilled):
		return fmt.Errorf("tui: %w", err)
	}
	return err
}
