package central

import (
	"context"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Windows and bounds of Stats: every query reads an indexed recent slice, so polling stays cheap as the store grows.
const (
	statsFailureWindow = "24 hours" // FailuresByStep, FailureCauses
	statsStepWindow    = "1 hour"   // StepMS
	statsLagWindow     = "1 hour"   // SyncLagMS
	statsMaxRows       = 50000      // rows read per figure at most
	statsLagPerStation = 1000       // the newest events per station in SyncLagMS
	causeWords         = 6          // a failure's cause: its first words
	causeMaxLen        = 80
)

// Stats computes the figures (bounded queries; fine to poll every few seconds).
//
// FailuresByStep and FailureCauses count failed events of the last 24 hours (by event time); StepMS holds the ok
// steps of the last hour; SyncLagMS the newest 1,000 events per station received in the last hour; UnitsPerHour counts
// units that are shippable now by the hour of their last update (the last slot is the past hour); each station's
// SyncLagMS is sorted, smallest first. A cause is the failure's detail with the unit's
// serial replaced by {serial}, cut to its first six words.
func (s *Store) Stats(ctx context.Context) (Stats, error) {
	st := Stats{
		UnitsByState:   map[string]map[string]int{},
		FailuresByStep: map[string]map[string]int{},
		FailureCauses:  map[string]int{},
		StepMS:         map[string]map[string][]int64{},
		UnitsPerHour:   map[string][]int{},
		SyncLagMS:      map[string][]int64{},
	}
	var b pgx.Batch
	var station, key, detail string
	var n int
	var ms int64
	b.Queue("SELECT station, state, count(*) FROM units GROUP BY station, state").Query(func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&station, &key, &n}, func() error {
			inc(st.UnitsByState, station, key, n)
			return nil
		})
		return err
	})
	b.Queue(`SELECT station, step, count(*) FROM events WHERE outcome = 'failed'
		AND time > statement_timestamp() - interval '` + statsFailureWindow + `' GROUP BY station, step`).
		Query(func(rows pgx.Rows) error {
			_, err := pgx.ForEachRow(rows, []any{&station, &key, &n}, func() error {
				inc(st.FailuresByStep, station, key, n)
				return nil
			})
			return err
		})
	b.Queue(`SELECT serial, detail FROM events WHERE outcome = 'failed'
		AND time > statement_timestamp() - interval '`+statsFailureWindow+`' ORDER BY time DESC LIMIT $1`, statsMaxRows).
		Query(func(rows pgx.Rows) error {
			_, err := pgx.ForEachRow(rows, []any{&key, &detail}, func() error {
				st.FailureCauses[failureCause(key, detail)]++
				return nil
			})
			return err
		})
	b.Queue(`SELECT station, step, ms FROM events WHERE outcome = 'ok'
		AND time > statement_timestamp() - interval '`+statsStepWindow+`' ORDER BY time DESC LIMIT $1`, statsMaxRows).
		Query(func(rows pgx.Rows) error {
			_, err := pgx.ForEachRow(rows, []any{&station, &key, &ms}, func() error {
				if st.StepMS[station] == nil {
					st.StepMS[station] = map[string][]int64{}
				}
				st.StepMS[station][key] = append(st.StepMS[station][key], ms)
				return nil
			})
			return err
		})
	b.Queue("SELECT id FROM stations").Query(func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&station}, func() error {
			st.UnitsPerHour[station] = make([]int, 24)
			return nil
		})
		return err
	})
	b.Queue(`SELECT station, floor(extract(epoch FROM statement_timestamp() - updated) / 3600)::int AS h, count(*)
		FROM units WHERE state = 'shippable' AND updated > statement_timestamp() - interval '24 hours'
		GROUP BY station, h`).Query(func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&station, &n, &ms}, func() error {
			if st.UnitsPerHour[station] == nil {
				st.UnitsPerHour[station] = make([]int, 24)
			}
			if n >= 0 && n < 24 {
				st.UnitsPerHour[station][23-n] += int(ms)
			}
			return nil
		})
		return err
	})
	b.Queue(`SELECT station, lag FROM (
			SELECT station, (extract(epoch FROM received - time) * 1000)::bigint AS lag,
				row_number() OVER (PARTITION BY station ORDER BY received DESC, seq DESC) AS rn
			FROM events WHERE received > statement_timestamp() - interval '`+statsLagWindow+`') e
		WHERE rn <= $1 ORDER BY station, lag`, statsLagPerStation).Query(func(rows pgx.Rows) error {
		_, err := pgx.ForEachRow(rows, []any{&station, &ms}, func() error {
			st.SyncLagMS[station] = append(st.SyncLagMS[station], ms)
			return nil
		})
		return err
	})
	b.Queue("SELECT count(*) FROM conflicts").QueryRow(func(row pgx.Row) error { return row.Scan(&st.Conflicts) })
	if err := s.pool.SendBatch(ctx, &b).Close(); err != nil {
		return Stats{}, classify(s.where, "stats", err)
	}
	return st, nil
}

func inc(m map[string]map[string]int, a, b string, n int) {
	if m[a] == nil {
		m[a] = map[string]int{}
	}
	m[a][b] += n
}

// failureCause is the first words of a failure's detail, with the unit's serial taken out so that the same failure
// of different units counts as one cause.
func failureCause(serial, detail string) string {
	if serial != "" {
		detail = strings.ReplaceAll(detail, serial, "{serial}")
	}
	words := strings.Fields(detail)
	if len(words) > causeWords {
		words = words[:causeWords]
	}
	c := strings.Join(words, " ")
	if r := []rune(c); len(r) > causeMaxLen {
		c = string(r[:causeMaxLen])
	}
	if c == "" {
		return "(no detail)"
	}
	return c
}
