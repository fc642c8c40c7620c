// Package central is the factory's shared record on PostgreSQL: every station forwards its units, certificates, audit
// events and attestation evidence here (in order, idempotently: a repeat is a no-op, a differing repeat a conflict that
// is recorded, never overwritten), claims serials and TPMs across stations, hands out the units of a distributed batch,
// and answers the supervisor's queries (API, dashboard, metrics). It knows nothing of the station's own packages: the
// station converts its records into this package's types.
//
// The schema is embedded (migrations/NNNN_*.sql, applied in order by Init, each in its own transaction, recorded in
// schema_version). Concurrency: every transaction takes its locks in one order (the pushing station's row and its
// events, then units, certificates, attestations and conflicts, each by key order), so stations pushing at once never
// deadlock, and a station's own pushes are serialised by its row lock (the chain check needs it). Connection failures,
// timeouts and authentication failures wrap ErrUnreachable, so callers can tell an outage from a refusal; no error
// carries the DSN's password (DSNs are shown as RedactDSN gives them).
package central

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Errors.
var (
	ErrUnreachable    = errors.New("central store unreachable")           // connection refused, timeout, DNS, auth
	ErrNotInitialised = errors.New("central store not initialised")       // no schema: run `provision central init`
	ErrClaimed        = errors.New("claimed at another station")          // serial or TPM taken elsewhere
	ErrConflict       = errors.New("conflicting record in central store") // a differing repeat
	ErrNotFound       = errors.New("not found")
	ErrSchemaTooNew   = errors.New("central store schema newer than this binary") // upgrade provision
	ErrBadCursor      = errors.New("bad page cursor")                             // UnitFilter.After not from Units
)

// ConnectTimeout bounds a connection attempt when the DSN sets no connect_timeout: `required` mode fails fast.
const ConnectTimeout = 3 * time.Second

// Store is an open central store (a pgx connection pool).
type Store struct {
	pool  *pgxpool.Pool
	where string // the redacted DSN, for messages
}

// Init creates or migrates the schema (embedded, versioned migrations, each in its own transaction; idempotent).
func Init(ctx context.Context, dsn string) error {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return parseError(err)
	}
	setDefaults(cfg)
	where := redact(cfg)
	conn, err := pgx.ConnectConfig(ctx, cfg.ConnConfig)
	if err != nil {
		return unreachable(where, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := migrate(ctx, conn); err != nil {
		return classify(where, "init", err)
	}
	return nil
}

// Open connects (within ctx) and checks the schema version. The password comes from the DSN's environment
// (PGPASSWORD, PGPASSFILE / ~/.pgpass, as libpq does), never from a flag. Errors wrap ErrUnreachable or
// ErrNotInitialised (or ErrSchemaTooNew), and never print the password.
func Open(ctx context.Context, dsn string) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, parseError(err)
	}
	setDefaults(cfg)
	where := redact(cfg)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, unreachable(where, err)
	}
	s := &Store{pool: pool, where: where}
	if err := s.checkSchema(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return s, nil
}

// checkSchema fails unless the store's schema is exactly the version this binary's migrations make.
func (s *Store) checkSchema(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.pool.Config().ConnConfig.ConnectTimeout+5*time.Second)
	defer cancel()
	v, err := schemaVersion(ctx, s.pool)
	if err != nil {
		return classify(s.where, "open", err)
	}
	want := latestVersion()
	switch {
	case v == 0:
		return fmt.Errorf("%w (%s has no schema): run `provision central init`", ErrNotInitialised, s.where)
	case v < want:
		return fmt.Errorf("%w (%s has schema version %d, this binary needs %d): run `provision central init`",
			ErrNotInitialised, s.where, v, want)
	case v > want:
		return fmt.Errorf("%w (%s has schema version %d, this binary knows up to %d): upgrade provision",
			ErrSchemaTooNew, s.where, v, want)
	}
	return nil
}

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

// Ping checks the store answers (within ctx).
func (s *Store) Ping(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return classify(s.where, "ping", err)
	}
	return nil
}

// Where is the store's DSN without its password (for status lines).
func (s *Store) Where() string { return s.where }

// Unit is a unit as a station recorded it.
type Unit struct {
	Serial, Station, State, FailedStep, Error     string
	KeyKind, PublicSHA256, EKSHA256, EKCertSHA256 string
	Operator                                      string
	Created, Updated                              time.Time
}

// Certificate is one certificate a station issued. DER is the certificate itself (its SHA-256 is SHA256); nil when
// the station holds no copy, or pushed it before the store kept certificates (schema 4): a push with DER fills a row
// without, a push without leaves a stored DER as it is.
type Certificate struct {
	Serial, Unit, Station, SHA256, Status string
	NotBefore, NotAfter, Issued           time.Time
	DER                                   []byte
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

// UnitFilter selects units: State, Station exact; Q a serial prefix; Limit (default 1000, at most 1000); After the
// cursor a previous page returned.
type UnitFilter struct {
	State, Station, Q string
	Limit             int
	After             string
}

// UnitDetail is one unit with its certificates, events (oldest first) and latest attestation.
type UnitDetail struct {
	Unit         Unit
	Certificates []Certificate
	Events       []Event
	Attestation  *Attestation
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
