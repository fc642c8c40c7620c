// Package inventory records units, their certificates and a hash-chained audit log in SQLite.
//
// The database is the source of truth. Every commit is synced to stable storage (WAL, synchronous=FULL) before Update returns,
// so a caller may report success once Update has returned nil.
package inventory

import (
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

//go:embed migrations/*.sql
var migrations embed.FS

// State is a unit's state, stored as these strings (docs/states.md). Station's state machine (station/machine.go) says
// which step leads to which.
type State string

// Unit states.
const (
	StateNew       State = "new"
	StateKeyed     State = "keyed"
	StateCertified State = "certified"
	StateImaged    State = "imaged"
	StateVerified  State = "verified"
	StateShippable State = "shippable"
	StateFailed    State = "failed"
	// StateReturned: a shipped unit came back (`provision rma`): its certificate is revoked; it is re-provisionable.
	StateReturned State = "returned"
)

// Certificate statuses.
const (
	CertActive     = "active"
	CertSuperseded = "superseded"
	CertRevoked    = "revoked"
)

var (
	// ErrNotFound: no such unit or certificate, or no inventory file.
	ErrNotFound = errors.New("not found")
	// ErrLocked: another process holds the inventory longer than the busy timeout.
	ErrLocked = errors.New("inventory is locked by another process")
	// ErrDamaged: the file is not a usable inventory (not SQLite, corrupt, or from a newer provision).
	ErrDamaged = errors.New("inventory is damaged or not an inventory")
	// ErrDuplicate: a uniqueness constraint refused the write (for example a second active certificate).
	ErrDuplicate = errors.New("duplicate record")
	// ErrAudit: the audit chain or its head does not verify.
	ErrAudit = errors.New("audit log does not verify")
)

// Unit is one device as recorded.
type Unit struct {
	Serial       string
	State        State
	FailedStep   string // the step that failed, when State is failed
	Error        string // the failure in words, when State is failed
	KeyKind      string // "tpm" or "soft"
	PublicSHA256 string // SHA-256 of the device public key's PKIX DER
	EKCertSHA256 string // SHA-256 of the TPM's EK certificate, when it has one
	// EKSHA256 binds the unit to its TPM: the SHA-256 of the EK public key (SPKI DER), set by the attest step. At most
	// one unit holds a given EK; once set it is kept (an empty value in PutUnit leaves it as it is).
	EKSHA256 string
	// Fields are the unit's own placeholders (batch CSV columns): subject {name}, templates .Fields.name. Stored so a
	// resumed run and verify render the same files as the run that wrote them.
	Fields   map[string]string
	Operator string
	Station  string
	Created  time.Time
	Updated  time.Time
}

// Certificate is one certificate issued to a unit.
type Certificate struct {
	Serial    string // certificate serial number, lowercase hex
	Unit      string
	SHA256    string
	NotBefore time.Time
	NotAfter  time.Time
	Status    string
	Issued    time.Time
	// RevokedAt and Reason: when and why it was revoked (Reason an RFC 5280 reason name in camelCase); set for revoked
	// certificates and for superseded ones on the CRL (a resume or re-provision replaced them). Zero otherwise.
	RevokedAt time.Time
	Reason    string
	// DER is the certificate itself, stored from inventory version 5 on (empty for older certificates).
	DER []byte
}

// Event is one audit log entry. It never carries key material.
type Event struct {
	Seq        int64
	Time       time.Time
	Serial     string
	Step       string
	Outcome    string // "ok", "failed", "started", ...
	Detail     string
	MS         int64
	Operator   string
	Station    string
	CertSHA256 string
	PrevHash   string
	Hash       string
}

// DB is an open inventory.
type DB struct {
	db       *sql.DB
	path     string
	headPath string
	audit    auditKeys // audit_head.go
	// stateRule checks the units table against the log (WithStateRule; nil: DefaultStateRule).
	stateRule StateRule
}

type options struct {
	create    bool
	headPath  string
	audit     auditKeys
	stateRule StateRule
}

// WithStateRule gives the audit check the owner's rule for which state an entry leaves a unit in.
func WithStateRule(rule StateRule) Option { return func(o *options) { o.stateRule = rule } }

// Option configures Open.
type Option func(*options)

// Create lets Open create the inventory when it does not exist yet (station init). Without it a missing file is ErrNotFound.
func Create() Option { return func(o *options) { o.create = true } }

// WithAuditHead keeps the audit head (entry count and last hash) in this file too, so a removed tail is detected.
func WithAuditHead(path string) Option { return func(o *options) { o.headPath = path } }

// Open opens the inventory at path and applies any pending migrations.
func Open(ctx context.Context, path string, opts ...Option) (*DB, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if !o.create {
		if _, err := os.Stat(path); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("inventory: open %s: %w", path, ErrNotFound)
			}
			return nil, fmt.Errorf("inventory: open %s: %w", path, err)
		}
		if err := probe(ctx, path); err != nil {
			return nil, fmt.Errorf("inventory: open %s: %w", path, err)
		}
	}
	mode := "rw"
	if o.create {
		mode = "rwc"
	}
	sdb, err := openSQL(path, mode)
	if err != nil {
		return nil, fmt.Errorf("inventory: open %s: %w", path, err)
	}
	db := &DB{db: sdb, path: path, headPath: o.headPath, audit: o.audit, stateRule: o.stateRule}
	if err := db.migrate(ctx); err != nil {
		sdb.Close()
		return nil, fmt.Errorf("inventory: open %s: %w", path, err)
	}
	if err := db.refreshHead(ctx); err != nil {
		sdb.Close()
		return nil, fmt.Errorf("inventory: open %s: %w", path, err)
	}
	return db, nil
}

// openSQL opens the database with the inventory's connection settings; mode is SQLite's "rw" or "rwc".
func openSQL(path, mode string) (*sql.DB, error) {
	q := url.Values{}
	q.Set("_txlock", "immediate")
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(FULL)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Set("mode", mode)
	return sql.Open("sqlite", (&url.URL{Scheme: "file", OmitHost: true, Path: path, RawQuery: q.Encode()}).String())
}

// probe checks, read-only and before anything can write to it, that an existing file is an inventory: a 0-byte file or
// an SQLite database without the inventory's schema is damage (ErrDamaged), never a new inventory to fill (only
// `provision init` creates one).
func probe(ctx context.Context, path string) error {
	q := url.Values{}
	q.Set("mode", "ro")
	q.Add("_pragma", "busy_timeout(5000)")
	sdb, err := sql.Open("sqlite", (&url.URL{Scheme: "file", OmitHost: true, Path: path, RawQuery: q.Encode()}).String())
	if err != nil {
		return classify(err)
	}
	defer sdb.Close()
	var version, tables int
	if err := sdb.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return classify(err)
	}
	if err := sdb.QueryRowContext(ctx, "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'units'").Scan(&tables); err != nil {
		return classify(err)
	}
	if version == 0 || tables == 0 {
		return fmt.Errorf("%w: the file holds no inventory (empty or not made by provision init)", ErrDamaged)
	}
	return nil
}

// Path is the database file.
func (db *DB) Path() string { return db.path }

// Close closes the database.
func (db *DB) Close() error { return db.db.Close() }

func (db *DB) migrate(ctx context.Context) error {
	var version int
	if err := db.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return classify(err)
	}
	entries, err := fs.ReadDir(migrations, "migrations")
	if err != nil {
		return err
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
	latest := 0
	for _, e := range entries {
		n, err := migrationNumber(e.Name())
		if err != nil {
			return err
		}
		latest = n
		if n <= version {
			continue
		}
		body, err := migrations.ReadFile(path.Join("migrations", e.Name()))
		if err != nil {
			return err
		}
		if strings.HasPrefix(string(body), fkOffMarker) {
			err = db.migrateFKOff(ctx, n, e.Name(), string(body))
		} else {
			err = db.tx(ctx, func(tx *sql.Tx) error { return applyMigration(ctx, tx, n, e.Name(), string(body)) })
		}
		if err != nil {
			return classify(err)
		}
	}
	if version > latest {
		return fmt.Errorf("schema version %d is newer than this provision knows (%d): upgrade provision: %w", version, latest, ErrDamaged)
	}
	return nil
}

// fkOffMarker starts a migration that rebuilds a table other tables reference (SQLite's documented procedure for schema
// changes ALTER TABLE cannot make): it runs with foreign key enforcement off, and every reference is checked before
// the commit.
const fkOffMarker = "-- provision: foreign_keys off"

func applyMigration(ctx context.Context, tx *sql.Tx, n int, name, body string) error {
	if _, err := tx.ExecContext(ctx, body); err != nil {
		return fmt.Errorf("migration %s: %w", name, err)
	}
	_, err := tx.ExecContext(ctx, "PRAGMA user_version = "+strconv.Itoa(n))
	return err
}

// migrateFKOff applies a table-rebuilding migration on one connection with foreign keys off (the pragma is a no-op
// inside a transaction), checks the references (PRAGMA foreign_key_check) before committing, and turns them on again.
func (db *DB) migrateFKOff(ctx context.Context, n int, name, body string) error {
	conn, err := db.db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "PRAGMA foreign_keys = OFF"); err != nil {
		return err
	}
	defer conn.ExecContext(context.WithoutCancel(ctx), "PRAGMA foreign_keys = ON")
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := applyMigration(ctx, tx, n, name, body); err != nil {
		return err
	}
	rows, err := tx.QueryContext(ctx, "PRAGMA foreign_key_check")
	if err != nil {
		return err
	}
	bad := rows.Next()
	rows.Close()
	if bad {
		return fmt.Errorf("migration %s: a foreign key does not hold after the rebuild: %w", name, ErrDamaged)
	}
	return tx.Commit()
}

func migrationNumber(name string) (int, error) {
	num, _, ok := strings.Cut(name, "_")
	n, err := strconv.Atoi(num)
	if !ok || err != nil || n <= 0 {
		return 0, fmt.Errorf("bad migration file name %q", name)
	}
	return n, nil
}

func (db *DB) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := db.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// classify maps SQLite result codes to this package's sentinels.
func classify(err error) error {
	if err == nil {
		return nil
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED:
			return fmt.Errorf("%w: %v", ErrLocked, err)
		case sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT:
			return fmt.Errorf("%w: %v", ErrDamaged, err)
		case sqlite3.SQLITE_CANTOPEN:
			return fmt.Errorf("%w: %v", ErrNotFound, err)
		case sqlite3.SQLITE_CONSTRAINT:
			if se.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || se.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY {
				return fmt.Errorf("%w: %v", ErrDuplicate, err)
			}
		}
	}
	return err
}

// Tx is a write transaction; see Update.
type Tx struct {
	ctx      context.Context
	tx       *sql.Tx
	appended bool
	audit    txAudit // audit_head.go
}

// Update runs fn in one immediate write transaction and commits it, synced, when fn returns nil.
// When fn appended audit events, the signed audit head is written before the commit (naming both the log before and
// after it) and settled after it (audit_head.go).
func (db *DB) Update(ctx context.Context, fn func(*Tx) error) error {
	sqltx, err := db.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("inventory: begin: %w", classify(err))
	}
	tx := &Tx{ctx: ctx, tx: sqltx}
	if err := fn(tx); err != nil {
		sqltx.Rollback()
		return classify(err)
	}
	if tx.appended {
		if err := db.sealHead(tx); err != nil {
			sqltx.Rollback()
			return fmt.Errorf("inventory: %w", err)
		}
	}
	if err := sqltx.Commit(); err != nil {
		return fmt.Errorf("inventory: commit: %w", classify(err))
	}
	if tx.appended {
		if err := db.afterCommit(ctx, tx); err != nil {
			return fmt.Errorf("inventory: %w", err)
		}
	}
	return nil
}

const timeFormat = time.RFC3339Nano

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(timeFormat)
}

func parseTime(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	t, _ := time.Parse(timeFormat, s)
	return t
}

type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

const unitColumns = "serial, state, failed_step, error, key_kind, public_sha256, ek_cert_sha256, operator, station, created_at, updated_at, fields, ek_sha256"

func scanUnit(row interface{ Scan(...any) error }) (Unit, error) {
	var u Unit
	var created, updated, fields string
	err := row.Scan(&u.Serial, &u.State, &u.FailedStep, &u.Error, &u.KeyKind, &u.PublicSHA256, &u.EKCertSHA256,
		&u.Operator, &u.Station, &created, &updated, &fields, &u.EKSHA256)
	u.Created, u.Updated = parseTime(created), parseTime(updated)
	if err == nil && fields != "" {
		if jerr := json.Unmarshal([]byte(fields), &u.Fields); jerr != nil {
			return u, fmt.Errorf("unit %q: fields: %v: %w", u.Serial, jerr, ErrDamaged)
		}
	}
	return u, err
}

func getUnit(ctx context.Context, q queryer, serial string) (Unit, error) {
	u, err := scanUnit(q.QueryRowContext(ctx, "SELECT "+unitColumns+" FROM units WHERE serial = ?", serial))
	if errors.Is(err, sql.ErrNoRows) {
		return Unit{}, fmt.Errorf("inventory: unit %q: %w", serial, ErrNotFound)
	}
	if err != nil {
		return Unit{}, fmt.Errorf("inventory: unit %q: %w", serial, classify(err))
	}
	return u, nil
}

// Unit returns the unit with this serial, or ErrNotFound.
func (db *DB) Unit(ctx context.Context, serial string) (Unit, error) {
	return getUnit(ctx, db.db, serial)
}

// Unit returns the unit with this serial inside the transaction, or ErrNotFound.
func (tx *Tx) Unit(serial string) (Unit, error) { return getUnit(tx.ctx, tx.tx, serial) }

// Units lists units ordered by serial; state filters when not empty.
func (db *DB) Units(ctx context.Context, state State) ([]Unit, error) {
	query := "SELECT " + unitColumns + " FROM units"
	var args []any
	if state != "" {
		query += " WHERE state = ?"
		args = append(args, state)
	}
	rows, err := db.db.QueryContext(ctx, query+" ORDER BY serial", args...)
	if err != nil {
		return nil, fmt.Errorf("inventory: list units: %w", classify(err))
	}
	defer rows.Close()
	var out []Unit
	for rows.Next() {
		u, err := scanUnit(rows)
		if err != nil {
			return nil, fmt.Errorf("inventory: list units: %w", classify(err))
		}
		out = append(out, u)
	}
	return out, rows.Err()
}

// UnitCount is the number of units recorded.
func (db *DB) UnitCount(ctx context.Context) (int, error) {
	var n int
	if err := db.db.QueryRowContext(ctx, "SELECT count(*) FROM units").Scan(&n); err != nil {
		return 0, fmt.Errorf("inventory: count units: %w", classify(err))
	}
	return n, nil
}

// PutUnit inserts or replaces the unit's record. Created is kept from the first insert; Updated is set to now.
func (tx *Tx) PutUnit(u Unit) error {
	now := fmtTime(time.Now())
	fields := ""
	if len(u.Fields) > 0 {
		b, err := json.Marshal(u.Fields)
		if err != nil {
			return fmt.Errorf("inventory: put unit %q: fields: %w", u.Serial, err)
		}
		fields = string(b)
	}
	_, err := tx.tx.ExecContext(tx.ctx, `INSERT INTO units (`+unitColumns+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
		ON CONFLICT(serial) DO UPDATE SET state=excluded.state, failed_step=excluded.failed_step, error=excluded.error,
		key_kind=excluded.key_kind, public_sha256=excluded.public_sha256, ek_cert_sha256=excluded.ek_cert_sha256,
		operator=excluded.operator, station=excluded.station, updated_at=excluded.updated_at,
		fields=CASE WHEN excluded.fields = '' THEN units.fields ELSE excluded.fields END,
		ek_sha256=CASE WHEN excluded.ek_sha256 = '' THEN units.ek_sha256 ELSE excluded.ek_sha256 END`,
		u.Serial, u.State, u.FailedStep, u.Error, u.KeyKind, u.PublicSHA256, u.EKCertSHA256, u.Operator, u.Station, now, now, fields,
		u.EKSHA256)
	if err != nil {
		return fmt.Errorf("inventory: put unit %q: %w", u.Serial, classify(err))
	}
	return nil
}

const certColumns = "serial, unit, sha256, not_before, not_after, status, issued_at, revoked_at, revocation_reason, der"

func scanCert(row interface{ Scan(...any) error }) (Certificate, error) {
	var c Certificate
	var nb, na, issued, revoked string
	err := row.Scan(&c.Serial, &c.Unit, &c.SHA256, &nb, &na, &c.Status, &issued, &revoked, &c.Reason, &c.DER)
	c.NotBefore, c.NotAfter, c.Issued, c.RevokedAt = parseTime(nb), parseTime(na), parseTime(issued), parseTime(revoked)
	return c, err
}

func activeCert(ctx context.Context, q queryer, serial string) (Certificate, error) {
	c, err := scanCert(q.QueryRowContext(ctx, "SELECT "+certColumns+" FROM certificates WHERE unit = ? AND status = 'active'", serial))
	if errors.Is(err, sql.ErrNoRows) {
		return Certificate{}, fmt.Errorf("inventory: active certificate of %q: %w", serial, ErrNotFound)
	}
	if err != nil {
		return Certificate{}, fmt.Errorf("inventory: active certificate of %q: %w", serial, classify(err))
	}
	return c, nil
}

// ActiveCertificate returns the unit's active certificate, or ErrNotFound.
func (db *DB) ActiveCertificate(ctx context.Context, serial string) (Certificate, error) {
	return activeCert(ctx, db.db, serial)
}

// ActiveCertificate returns the unit's active certificate inside the transaction, or ErrNotFound.
func (tx *Tx) ActiveCertificate(serial string) (Certificate, error) {
	return activeCert(tx.ctx, tx.tx, serial)
}

// Certificates lists every certificate issued to the unit, oldest first.
func (db *DB) Certificates(ctx context.Context, serial string) ([]Certificate, error) {
	certs, err := db.listCerts(ctx, "WHERE unit = ? ORDER BY issued_at, rowid", serial)
	if err != nil {
		return nil, fmt.Errorf("inventory: certificates of %q: %w", serial, err)
	}
	return certs, nil
}

// AddCertificate records a newly issued certificate as the unit's active one; any other active certificate of the unit is
// marked superseded in the same transaction and revoked with reason superseded (on the CRL from now on: a resume or
// re-provision leaves no orphaned certificate valid). A rotation keeps the old one valid until the swap is confirmed
// (AddRotatedCertificate).
func (tx *Tx) AddCertificate(c Certificate) error { return tx.addCertificate(c, true) }

func (tx *Tx) addCertificate(c Certificate, revokeOld bool) error {
	if c.Issued.IsZero() {
		c.Issued = time.Now()
	}
	revokedAt, reason := fmtTime(c.Issued), ReasonSuperseded
	if !revokeOld {
		revokedAt, reason = "", ""
	}
	if _, err := tx.tx.ExecContext(tx.ctx, "UPDATE certificates SET status = 'superseded', revoked_at = ?, revocation_reason = ? WHERE unit = ? AND status = 'active'",
		revokedAt, reason, c.Unit); err != nil {
		return fmt.Errorf("inventory: supersede certificates of %q: %w", c.Unit, classify(err))
	}
	_, err := tx.tx.ExecContext(tx.ctx, "INSERT INTO certificates ("+certColumns+") VALUES (?,?,?,?,?,?,?,'','',?)",
		c.Serial, c.Unit, c.SHA256, fmtTime(c.NotBefore), fmtTime(c.NotAfter), CertActive, fmtTime(c.Issued), c.DER)
	if err != nil {
		return fmt.Errorf("inventory: add certificate %s of %q: %w", c.Serial, c.Unit, classify(err))
	}
	return nil
}

// SetCertificateStatus changes the status of the certificate with this serial number.
func (tx *Tx) SetCertificateStatus(certSerial, status string) error {
	res, err := tx.tx.ExecContext(tx.ctx, "UPDATE certificates SET status = ? WHERE serial = ?", status, certSerial)
	if err != nil {
		return fmt.Errorf("inventory: set certificate %s %s: %w", certSerial, status, classify(err))
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("inventory: certificate %s: %w", certSerial, ErrNotFound)
	}
	return nil
}
