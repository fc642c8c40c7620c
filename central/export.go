package central

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// ExportFilter selects the units of an export from the central store, across all stations. The conditions that are
// set must all hold: Serials (any of them), Batch (a distributed batch's units, AddBatchJobs), Since (changed at or
// after it), States (any of them).
type ExportFilter struct {
	Serials []string
	Batch   string
	Since   time.Time
	States  []string
}

// ExportRecord is what an export needs of one unit: the unit, its active certificate at the unit's station (Serial ""
// when it holds none; DER nil when the store has no copy), and the evidence of its latest attestation there (nil when
// none) with the EK that attestation saw.
type ExportRecord struct {
	Unit             Unit
	Certificate      Certificate
	Evidence         []byte
	EvidenceEKSHA256 string
}

// ExportUnits reads the selected units, by serial.
func (s *Store) ExportUnits(ctx context.Context, f ExportFilter) ([]ExportRecord, error) {
	var where []string
	var args []any
	arg := func(v any) string { args = append(args, v); return "$" + strconv.Itoa(len(args)) }
	if f.Serials != nil {
		where = append(where, "u.serial IN (SELECT unnest("+arg(f.Serials)+"::text[]))")
	}
	if f.Batch != "" {
		where = append(where, "u.serial IN (SELECT serial FROM batch_jobs WHERE batch_id = "+arg(f.Batch)+")")
	}
	if !f.Since.IsZero() {
		where = append(where, "u.updated >= "+arg(f.Since))
	}
	if f.States != nil {
		where = append(where, "u.state IN (SELECT unnest("+arg(f.States)+"::text[]))")
	}
	q := "SELECT " + prefixed("u.", unitColumns) + ", " + prefixed("c.", certColumns) + `, a.evidence, a.ek_sha256
		FROM units u
		LEFT JOIN LATERAL (SELECT * FROM certificates WHERE unit = u.serial AND station = u.station AND status = 'active'
			ORDER BY issued DESC, serial DESC LIMIT 1) c ON true
		LEFT JOIN LATERAL (SELECT evidence, ek_sha256 FROM attestations WHERE serial = u.serial AND station = u.station
			ORDER BY local_id DESC LIMIT 1) a ON true`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY u.serial"
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, classify(s.where, "export units", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (ExportRecord, error) {
		var r ExportRecord
		u, c := &r.Unit, &r.Certificate
		// The certificate's columns are NULL when the unit holds no active one.
		var cSerial, cUnit, cStation, cSHA, cStatus, ek *string
		var nb, na, issued *time.Time
		err := row.Scan(&u.Serial, &u.Station, &u.State, &u.FailedStep, &u.Error, &u.KeyKind, &u.PublicSHA256,
			&u.EKSHA256, &u.EKCertSHA256, &u.Operator, &u.Created, &u.Updated,
			&cSerial, &cUnit, &cStation, &cSHA, &cStatus, &nb, &na, &issued, &c.DER, &r.Evidence, &ek)
		u.Created, u.Updated = u.Created.UTC(), u.Updated.UTC()
		if cSerial != nil {
			c.Serial, c.Unit, c.Station, c.SHA256, c.Status = *cSerial, *cUnit, *cStation, *cSHA, *cStatus
			c.NotBefore, c.NotAfter, c.Issued = nb.UTC(), na.UTC(), issued.UTC()
		}
		if ek != nil {
			r.EvidenceEKSHA256 = *ek
		}
		return r, err
	})
	if err != nil {
		return nil, classify(s.where, "export units", err)
	}
	return out, nil
}

// prefixed is a column list with each column qualified by prefix ("u." + "serial, state" → "u.serial, u.state").
func prefixed(prefix, columns string) string {
	cols := strings.Split(columns, ",")
	for i, c := range cols {
		cols[i] = prefix + strings.TrimSpace(c)
	}
	return strings.Join(cols, ", ")
}
