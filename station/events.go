package station

import (
	"crypto/x509"
	"errors"
	"provision/inventory"
	"time"
)

// Event is one step's progress, reported as it happens. It is a plain value: front ends render it.
type Event struct {
	Serial   string
	Step     Step
	Status   string // "started", "ok", "failed", "skipped", "cancelled"
	Detail   string
	Err      error
	Duration time.Duration
}

// Step statuses.
const (
	StatusStarted = "started"
	StatusOK      = "ok"
	StatusFailed  = "failed"
	StatusSkipped = "skipped"
	// StatusSoft: the attest step of a unit with a software key: there is no TPM to attest.
	StatusSoft = "soft"
	// StatusCancelled: the run was interrupted (Esc, Ctrl-C, SIGTERM) during or before this step; the unit keeps the
	// state of its last completed step and resumes when run again.
	StatusCancelled = "cancelled"
)

// OutcomeInterrupted is the audit outcome of a step that a cancellation stopped.
const OutcomeInterrupted = "interrupted"

// ErrInterrupted: the run was stopped (Esc, Ctrl-C, SIGTERM) between or during steps; the unit resumes when run again.
// It wraps the context's cause, so errors.Is(err, context.Canceled) holds too (exit 130).
var ErrInterrupted = errors.New("interrupted")

// Steps is the pipeline in order.
var Steps = []Step{StepValidate, StepKey, StepAttest, StepCSR, StepSign, StepImage, StepVerify, StepHandshake}

// ProvisionRequest is one unit to provision.
type ProvisionRequest struct {
	Serial      string
	Fields      map[string]string
	Image       string          // raw image file or block device
	Profile     string          // default: station.yaml profile
	Handshake   HandshakeConfig // Station.HandshakeConfig; zero: the built-in test server
	Reprovision bool
	Operator    string
	Fixture     string // the fixture the unit sits on: fills {fixture} in unit_serial's command (and the TPM URI)
}

// StepResult is one step of a finished run.
type StepResult struct {
	Name     Step
	Status   string
	Duration time.Duration
	Err      error
}

// Result is a unit's run.
type Result struct {
	Serial      string
	State       inventory.State
	Steps       []StepResult
	Certificate *x509.Certificate
	CertSHA256  string
	KeyKind     string
	Handshakes  []HandshakeResult
	// Attestation is what this run's attest step found (nil when it did not run: a resumed unit, or a failure before).
	Attestation *AttestResult
}

// AttestResult is the attest step's verdict on a unit's TPM.
type AttestResult struct {
	Status   string // trusted | untrusted | absent | off | soft
	EKSHA256 string // SHA-256 of the EK public key (SPKI DER)
	Cause    string // why not trusted
}

// HandshakeResult is one live mTLS test of a unit.
type HandshakeResult struct {
	Endpoint   string
	Protocol   string // "tls", "mqtt", "https"
	TLSVersion string
	Duration   time.Duration
	Detail     string
}
