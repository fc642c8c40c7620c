package tui

import (
	"errors"
	"os"
	"regexp"
	"strings"

	tea "github.com/charmbracelet/bubbletea"

	"provision/station"
	"provision/station/handshake"
)

// bell rings the terminal. tea.Printf would be swallowed while the alternate screen is active; a BEL moves no cursor,
// so it can go straight to the terminal.
func bell() tea.Msg {
	os.Stderr.Write([]byte{'\a'})
	return nil
}

// explain turns an error into an operator's cause and what to do.
func explain(step station.Step, err error) (cause, advice string) {
	cause = shortErr(err)
	var se *station.StepError
	if errors.As(err, &se) {
		cause = "at " + string(se.Step) + ": " + shortErr(se.Err)
	}
	var he *handshake.Error
	switch {
	case errors.Is(err, station.ErrWrongUnit):
		return cause, "the label is not this unit's: set the unit aside, find its own label (or the unit this label belongs to), then scan again"
	case errors.As(err, &he):
		return "at handshake with " + he.Endpoint + ": " + he.Reason.Error(), handshakeAdvice(he.Reason)
	case step == station.StepImage || step == station.StepVerify || errors.Is(err, station.ErrImage):
		return cause, "check the unit's image or storage (plugged in? the right image?), then ctrl+r to retry"
	case step == station.StepKey:
		return cause, "check the unit's TPM connection, then ctrl+r to retry"
	}
	return cause, "ctrl+r retries; call the line engineer if it fails again"
}

func handshakeAdvice(reason error) string {
	switch reason {
	case handshake.ErrClientRejected:
		return "the server does not trust the station CA: set the unit aside and call the line engineer"
	case handshake.ErrServerUntrusted:
		return "the server's certificate is not trusted (endpoint CA): call the line engineer"
	case handshake.ErrUnreachable, handshake.ErrTimeout:
		return "the test server is not reachable: check the network, then ctrl+r to retry"
	case handshake.ErrKeyFailed:
		return "the unit's TPM did not sign: check the unit's TPM connection (fixture, cable), then ctrl+r to retry"
	case handshake.ErrNameNotResolved:
		return "the test server's name does not resolve: call the line engineer (endpoint host name or the station's DNS)"
	}
	return "ctrl+r retries; call the line engineer if it fails again"
}

var wrapRE = regexp.MustCompile(`\s+`)

func shortErr(err error) string {
	s := wrapRE.ReplaceAllString(err.Error(), " ")
	for _, cut := range []string{": invalid serial", ": unit reports another serial: refused by the inventory", ": refused by the inventory"} {
		s = strings.TrimSuffix(s, cut)
	}
	return s
}
