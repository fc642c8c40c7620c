// Package central is the factory's shared record on PostgreSQL: every station forwards its units, certificates, audit
// events and attestation evidence here (in order, idempotently: a repeat is a no-op, a differing repeat a conflict that
// is recorded, never overwritten), claims serials and TPMs across stations, hands out the units of a distributed batch,
// and answers the supervisor's queries (API, dashboard, metrics). It knows nothing of the station's own packages: the
// station converts its records into this package's types.
package central

import (
	"context"
	"errors"
	"time"
)

var errTodo = errors.New("central: not implemented yet")

// Errors.
var (
	ErrUnreachable    = errors.New("central store unreachable")           // connection refused, timeout, DNS, auth
	ErrNotInitialised = errors.New("central store not initialised")       // no schema: run `provision central init`
	ErrClaimed        = errors.New("claimed at another station")          // serial or TPM taken elsewhere
	ErrConflict       = errors.New("conflicting record in central store") // a differing repeat
	ErrNotFound       = errors.New("not found")
)

// Store is an open central store (a pgx connection pool).
type Store struct{}

// Init creates or migrates the schema (embedded, versioned migrations, each in its own transaction; idempotent).
func Init(ctx context.Context, dsn string) error { return errTodo }

// Open connects (within ctx) and checks the schema version. The password comes from the DSN's environment
// (PGPASSWORD, PGPASSFILE / ~/.pgpass, as libpq does), never from a flag. Errors wrap ErrUnreachable or
// ErrNotInitialised, and never print the password.
func Open(ctx context.Context, dsn string) (*Store, error) { return nil, errTodo }

// Close closes the pool.
func (s *Store) Close() {}

// Ping checks the store answers (within ctx).
func (s *Store) Ping(ctx context.Context) error { return errTodo }

// Unit is a unit as a station recorded it.
type Unit struct {
	Serial, Station, State, FailedStep, Error     string
	KeyKind, PublicSHA256, EKSHA256, EKCertSHA256 string
	Operator                                      string
	Created, Updated                              time.Time
}

// Certificate is one certificate a station issued.
type Certificate struct {
	Serial, Unit, Station, SHA256, Status string
	NotBefore, NotAfter, Issued           time.Time
}

// Event is one audit log entry of a station: (Station, Seq) is its identity; PrevHash/Hash let the store check each
// station's chain.
type Event struct {
	Station                       string
	Seq                           int64
	Time                          time.Time
	Serial, Step, Outcome, Detail string
	MS                            int64
	Operator, CertSHA256          string
	PrevHash, Hash                string
}

// Attestation is one attest run (LocalID: its id in the station's inventory).
type Attestation struct {
	Station                                           string
	LocalID                                           int64
	Serial                                            string
	Time                                              time.Time
	Policy, Outcome, Status                           string
	EKSHA256, EKCertSHA256, EKIssuer, TPMManufacturer string
	Cause                                             string
	Warnings                                          []string
	Evidence                                          []byte // JSON
	EvidenceSHA256                                    string
}

// Batch is what a station pushes at once: events in order (each station's chain continues: seq = the store's last + 1,
// or an event already there), and the current rows of the units, certificates and attestations they touch. Backlog
// is what the station still has to send after this batch (reported in Stations and metrics).
type Batch struct {
	Station      string
	Events       []Event
	Units        []Unit
	Certificates []Certificate
	Attestations []Attestation
	Backlog      int64
}

// Conflict is a record the store refused to overwrite: Kind unit|certificate|event|attestation|ek, Key its identity.
type Conflict struct {
	Kind, Key, Station, Other, Detail string
	Time                              time.Time
}

// PushResult says what a push changed.
type PushResult struct {
	Events, Units, Certificates, Attestations int // newly stored (repeats are not counted)
	Conflicts                                 []Conflict
}

// Push stores b in one transaction. Repeats are no-ops; a differing repeat, or a unit/EK/certificate serial that
// another station already holds, is a Conflict: recorded in the conflicts table, returned, the rest of the batch still
// stored. A gap in a station's event chain (first event's seq > last + 1, or PrevHash not the stored Hash) is an error
// wrapping ErrConflict and stores nothing.
func (s *Store) Push(ctx context.Context, b Batch) (PushResult, error) { return PushResult{}, errTodo }

// StationHead is what the store holds of a station's chain: its last seq and hash (0, "" for none).
func (s *Store) StationHead(ctx context.Context, station string) (seq int64, hash string, err error) {
	return 0, "", errTodo
}

// ClaimUnit claims serial for station before the unit's key is made. It fails with ErrClaimed (the message names the
// other station and the date) when the unit is shippable at another station, or another station's unexpired claim
// holds it. A claim expires after ttl; the same station's claim is renewed.
func (s *Store) ClaimUnit(ctx context.Context, serial, station, operator string, ttl time.Duration) error {
	return errTodo
}

// ReleaseUnit drops station's claim on serial (no-op when it holds none).
func (s *Store) ReleaseUnit(ctx context.Context, serial, station string) error { return errTodo }

// CheckEK fails with ErrClaimed when the TPM with this EK fingerprint is bound to another serial in the store.
func (s *Store) CheckEK(ctx context.Context, ekSHA256, serial string) error { return errTodo }

// AddBatchJobs records the serials of a distributed batch (idempotent: serials already there keep their state).
func (s *Store) AddBatchJobs(ctx context.Context, batchID string, serials []string) error {
	return errTodo
}

// TakeBatchJob hands worker the next unit of the batch no live worker holds (FOR UPDATE SKIP LOCKED): pending, or
// taken by a worker whose lease expired. ok is false when none is left.
func (s *Store) TakeBatchJob(ctx context.Context, batchID, worker string, lease time.Duration) (serial string, ok bool, err error) {
	return "", false, errTodo
}

// FinishBatchJob records the outcome (ok, failed, skipped) of worker's unit.
func (s *Store) FinishBatchJob(ctx context.Context, batchID, serial, worker, status string) error {
	return errTodo
}

// UnitFilter selects units: State, Station exact; Q a serial prefix; Limit (default 1000, at most 1000); After the
// cursor a previous page returned.
type UnitFilter struct {
	State, Station, Q string
	Limit             int
	After             string
}

// Units lists units by serial, and the cursor of the next page ("" when this is the last).
func (s *Store) Units(ctx context.Context, f UnitFilter) ([]Unit, string, error) {
	return nil, "", errTodo
}

// UnitDetail is one unit with its certificates, events (oldest first) and latest attestation.
type UnitDetail struct {
	Unit         Unit
	Certificates []Certificate
	Events       []Event
	Attestation  *Attestation
}

// Unit returns one unit's detail, or ErrNotFound.
func (s *Store) Unit(ctx context.Context, serial string) (UnitDetail, error) {
	return UnitDetail{}, errTodo
}

// StationInfo is one station as the store sees it.
type StationInfo struct {
	ID                string
	LastSync          time.Time // last push
	LastSeq           int64
	LastEvent         time.Time // time of its newest event
	Backlog           int64     // as the station reported at its last push
	Units             int
	Shippable, Failed int
	Conflicts         int
}

// Stations lists every station that pushed.
func (s *Store) Stations(ctx context.Context) ([]StationInfo, error) { return nil, errTodo }

// Stats are the figures of the dashboard and /metrics.
type Stats struct {
	UnitsByState   map[string]map[string]int     // station → state → units
	FailuresByStep map[string]map[string]int     // station → step → failed events
	FailureCauses  map[string]int                // cause (first words of the failure) → count
	StepMS         map[string]map[string][]int64 // station → step → durations of ok steps (the last hour)
	UnitsPerHour   map[string][]int              // station → shippable units in each of the last 24 hours (oldest first)
	SyncLagMS      map[string][]int64            // station → push time − event time of recent events
	Conflicts      int
}

// Stats computes the figures (bounded queries; fine to poll every few seconds).
func (s *Store) Stats(ctx context.Context) (Stats, error) { return Stats{}, errTodo }

// Conflicts lists recorded conflicts, newest first.
func (s *Store) Conflicts(ctx context.Context, limit int) ([]Conflict, error) { return nil, errTodo }

// BatchRemaining is how many units of the batch are not finished (pending, or taken by a worker).
func (s *Store) BatchRemaining(ctx context.Context, batchID string) (int, error) { return 0, errTodo }
