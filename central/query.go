package central

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// MaxUnits is the largest (and default) page of Units.
const MaxUnits = 1000

// maxUnitEvents bounds the events of one unit's detail (the newest are kept).
const maxUnitEvents = 2000

// Units lists units by serial, and the cursor of the next page ("" when this is the last).
func (s *Store) Units(ctx context.Context, f UnitFilter) ([]Unit, string, error) {
	limit := f.Limit
	if limit <= 0 || limit > MaxUnits {
		limit = MaxUnits
	}
	var where []string
	var args []any
	arg := func(v any) string { args = append(args, v); return "$" + strconv.Itoa(len(args)) }
	if f.After != "" {
		after, err := base64.RawURLEncoding.DecodeString(f.After)
		if err != nil || len(after) == 0 {
			return nil, "", fmt.Errorf("central: units: %q: %w", f.After, ErrBadCursor)
		}
		where = append(where, "serial > "+arg(string(after)))
	}
	if f.State != "" {
		where = append(where, "state = "+arg(f.State))
	}
	if f.Station != "" {
		where = append(where, "station = "+arg(f.Station))
	}
	if f.Q != "" {
		where = append(where, "serial LIKE "+arg(likePrefix(f.Q)))
	}
	q := "SELECT " + unitColumns + " FROM units"
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY serial LIMIT " + arg(limit+1)
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, "", classify(s.where, "units", err)
	}
	units, err := pgx.CollectRows(rows, scanUnit)
	if err != nil {
		return nil, "", classify(s.where, "units", err)
	}
	next := ""
	if len(units) > limit {
		units = units[:limit]
		next = base64.RawURLEncoding.EncodeToString([]byte(units[limit-1].Serial))
	}
	return units, next, nil
}

// likePrefix is a LIKE pattern matching strings that start with p (its wildcards escaped).
func likePrefix(p string) string {
	r := strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`)
	return r.Replace(p) + "%"
}

// Unit returns one unit's detail, or ErrNotFound.
func (s *Store) Unit(ctx context.Context, serial string) (UnitDetail, error) {
	var d UnitDetail
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{AccessMode: pgx.ReadOnly, IsoLevel: pgx.RepeatableRead},
		func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, "SELECT "+unitColumns+" FROM units WHERE serial = $1", serial)
			if err != nil {
				return err
			}
			if d.Unit, err = pgx.CollectExactlyOneRow(rows, scanUnit); err != nil {
				if errors.Is(err, pgx.ErrNoRows) {
					return fmt.Errorf("unit %s: %w", serial, ErrNotFound)
				}
				return err
			}
			rows, err = tx.Query(ctx, "SELECT "+certColumns+" FROM certificates WHERE unit = $1 ORDER BY issued, serial", serial)
			if err != nil {
				return err
			}
			if d.Certificates, err = pgx.CollectRows(rows, scanCertificate); err != nil {
				return err
			}
			rows, err = tx.Query(ctx, "SELECT * FROM (SELECT "+eventColumns+` FROM events WHERE serial = $1
				ORDER BY time DESC, station, seq DESC LIMIT $2) e ORDER BY time, station, seq`, serial, maxUnitEvents)
			if err != nil {
				return err
			}
			if d.Events, err = pgx.CollectRows(rows, scanEvent); err != nil {
				return err
			}
			rows, err = tx.Query(ctx, "SELECT "+attestationColumns+` FROM attestations WHERE serial = $1
				ORDER BY time DESC, local_id DESC LIMIT 1`, serial)
			if err != nil {
				return err
			}
			a, err := pgx.CollectRows(rows, scanAttestation)
			if err != nil {
				return err
			}
			if len(a) == 1 {
				d.Attestation = &a[0]
			}
			return nil
		})
	if err != nil {
		return UnitDetail{}, classify(s.where, "unit", err)
	}
	return d, nil
}

const eventColumns = "station, seq, time, serial, step, outcome, detail, ms, operator, cert_sha256, prev_hash, hash"

func scanEvent(row pgx.CollectableRow) (Event, error) {
	var e Event
	err := row.Scan(&e.Station, &e.Seq, &e.Time, &e.Serial, &e.Step, &e.Outcome, &e.Detail, &e.MS, &e.Operator,
		&e.CertSHA256, &e.PrevHash, &e.Hash)
	e.Time = e.Time.UTC()
	return e, err
}

// Stations lists every station that pushed.
func (s *Store) Stations(ctx context.Context) ([]StationInfo, error) {
	rows, err := s.pool.Query(ctx, `SELECT s.id, s.last_sync, s.last_seq, s.last_event, s.backlog,
			coalesce(u.units, 0), coalesce(u.shippable, 0), coalesce(u.failed, 0), coalesce(c.n, 0)
		FROM stations s
		LEFT JOIN (SELECT station, count(*) AS units, count(*) FILTER (WHERE state = 'shippable') AS shippable,
				count(*) FILTER (WHERE state = 'failed') AS failed
			FROM units GROUP BY station) u ON u.station = s.id
		LEFT JOIN (SELECT station, count(*) AS n FROM conflicts GROUP BY station) c ON c.station = s.id
		ORDER BY s.id`)
	if err != nil {
		return nil, classify(s.where, "stations", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (StationInfo, error) {
		var si StationInfo
		var lastSync, lastEvent *time.Time
		err := row.Scan(&si.ID, &lastSync, &si.LastSeq, &lastEvent, &si.Backlog, &si.Units, &si.Shippable, &si.Failed,
			&si.Conflicts)
		if lastSync != nil {
			si.LastSync = lastSync.UTC()
		}
		if lastEvent != nil {
			si.LastEvent = lastEvent.UTC()
		}
		return si, err
	})
	if err != nil {
		return nil, classify(s.where, "stations", err)
	}
	return out, nil
}

// Conflicts lists recorded conflicts, newest first.
func (s *Store) Conflicts(ctx context.Context, limit int) ([]Conflict, error) {
	if limit <= 0 || limit > MaxUnits {
		limit = MaxUnits
	}
	rows, err := s.pool.Query(ctx, `SELECT kind, key, station, other, detail, time FROM conflicts
		ORDER BY time DESC, id DESC LIMIT $1`, limit)
	if err != nil {
		return nil, classify(s.where, "conflicts", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Conflict, error) {
		var c Conflict
		err := row.Scan(&c.Kind, &c.Key, &c.Station, &c.Other, &c.Detail, &c.Time)
		c.Time = c.Time.UTC()
		return c, err
	})
	if err != nil {
		return nil, classify(s.where, "conflicts", err)
	}
	return out, nil
}

// RecentUnits lists the units updated last, newest first (at most limit, at most MaxUnits): the dashboard's latest
// units and each station's last one.
func (s *Store) RecentUnits(ctx context.Context, limit int) ([]Unit, error) {
	if limit <= 0 || limit > MaxUnits {
		limit = MaxUnits
	}
	rows, err := s.pool.Query(ctx, "SELECT "+unitColumns+" FROM units ORDER BY updated DESC LIMIT $1", limit)
	if err != nil {
		return nil, classify(s.where, "recent units", err)
	}
	units, err := pgx.CollectRows(rows, scanUnit)
	if err != nil {
		return nil, classify(s.where, "recent units", err)
	}
	return units, nil
}
