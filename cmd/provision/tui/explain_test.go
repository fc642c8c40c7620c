package tui

import (
	"fmt"
	"strings"
	"testing"

	"provision/station"
)

// A unit whose own serial is not the scanned one: the FAIL band names both values and says what to do.
func TestExplainWrongUnit(t *testing.T) {
	err := &station.StepError{Serial: "SN-0001", Step: station.StepValidate,
		Err: fmt.Errorf("label says SN-0001, unit says SN-0002: wrong label on this unit? %w", station.ErrWrongUnit)}
	cause, advice := explain(station.StepValidate, err)
	if !strings.Contains(cause, "label says SN-0001, unit says SN-0002: wrong label on this unit?") || strings.Contains(cause, "refused by the inventory") {
		t.Fatalf("cause %q", cause)
	}
	if !strings.Contains(advice, "label is not this unit's") {
		t.Fatalf("advice %q", advice)
	}
}
