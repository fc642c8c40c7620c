package central

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"
)

// A push is one transaction: lock the station's row (serialises its pushes: the chain check reads its head), store
// the events that continue the chain and compare the repeats, then units, certificates and attestations, each read
// with FOR UPDATE in key order and written with one statement over arrays (unnest), then the conflicts found, then the
// station's head. Decisions are taken in Go on rows this transaction has locked; a race the locks cannot see (another
// station inserting the same serial, EK or fingerprint at the same moment) ends in a unique violation, and the whole
// push is retried, when the other station's row is visible and judged like any other.

// pushAttempts bounds the retries of a push (or claim) after a deadlock, serialisation failure or unique violation.
const pushAttempts = 4

// retryable says whether a transaction that failed with err can simply run again.
func retryable(err error) bool {
	switch sqlState(err) {
	case "40P01", "40001", "23505": // deadlock, serialisation failure, unique violation (a concurrent insert)
		return true
	}
	return false
}

// inTx runs fn in a transaction, again (a few times) when it fails in a way a second run can fix.
func (s *Store) inTx(ctx context.Context, fn func(pgx.Tx) error) error {
	var err error
	for attempt := 0; attempt < pushAttempts; attempt++ {
		if err = pgx.BeginFunc(ctx, s.pool, fn); err == nil || !retryable(err) || ctx.Err() != nil {
			return err
		}
	}
	return err
}

// Push stores b in one transaction. Repeats are no-ops; a differing repeat, or a unit/EK/certificate serial that
// another station already holds, is a Conflict: recorded in the conflicts table, returned, the rest of the batch still
// stored. A gap in a station's event chain (first event's seq > last + 1, or PrevHash not the stored Hash) is an error
// wrapping ErrConflict and stores nothing.
//
// Units: a station's own unit is replaced by a version not older than the stored one. A serial another station holds
// is taken over only when it is new, failed or returned there; otherwise the push is a conflict and the other
// station's row stays (a pushed unit still in state new made nothing, and is ignored). A unit whose EK another serial
// holds is a conflict of kind ek and is not stored. Certificates: stored by serial; the same serial or fingerprint
// held by another station, unit or fingerprint is a conflict; the station's own certificate may change its status and
// gain its DER (a DER that is not the fingerprint's certificate refuses the whole push). A certificate of a unit
// refused as a conflict is still stored (it was issued: the serial's detail shows both stations' certificates), and so
// are the events (they are the station's chain).
func (s *Store) Push(ctx context.Context, b Batch) (PushResult, error) {
	if err := b.normalise(); err != nil {
		return PushResult{}, err
	}
	var res PushResult
	err := s.inTx(ctx, func(tx pgx.Tx) error {
		res = PushResult{}
		p := pusher{ctx: ctx, tx: tx, b: &b, res: &res}
		return p.push()
	})
	if err != nil {
		return PushResult{}, classify(s.where, "push from station "+b.Station, err)
	}
	return res, nil
}

// StationHead is what the store holds of a station's chain: its last seq and hash (0, "" for none).
func (s *Store) StationHead(ctx context.Context, station string) (seq int64, hash string, err error) {
	err = s.pool.QueryRow(ctx, "SELECT last_seq, last_hash FROM stations WHERE id = $1", station).Scan(&seq, &hash)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, "", nil
	}
	if err != nil {
		return 0, "", classify(s.where, "station head", err)
	}
	return seq, hash, nil
}

// pusher is one attempt at storing a batch.
type pusher struct {
	ctx       context.Context
	tx        pgx.Tx
	b         *Batch
	res       *PushResult
	lastSeq   int64
	lastHash  string
	lastEvent time.Time
}

func (p *pusher) conflict(kind, key, other, format string, args ...any) {
	p.res.Conflicts = append(p.res.Conflicts, Conflict{Kind: kind, Key: key, Station: p.b.Station, Other: other,
		Detail: fmt.Sprintf(format, args...), Time: time.Now().UTC()})
}

func (p *pusher) push() error {
	// The station's row, created on its first push, locked until commit.
	if err := p.tx.QueryRow(p.ctx, `INSERT INTO stations (id) VALUES ($1)
		ON CONFLICT (id) DO UPDATE SET id = excluded.id RETURNING last_seq, last_hash`, p.b.Station).
		Scan(&p.lastSeq, &p.lastHash); err != nil {
		return err
	}
	for _, step := range []func() error{p.events, p.units, p.certificates, p.attestations, p.conflicts} {
		if err := step(); err != nil {
			return err
		}
	}
	var lastEvent *time.Time
	if !p.lastEvent.IsZero() {
		lastEvent = &p.lastEvent
	}
	_, err := p.tx.Exec(p.ctx, `UPDATE stations SET last_sync = statement_timestamp(), last_seq = $2, last_hash = $3,
		last_event = greatest(last_event, $4), backlog = $5 WHERE id = $1`,
		p.b.Station, p.lastSeq, p.lastHash, lastEvent, p.b.Backlog)
	return err
}

// events stores the events that continue the station's chain and compares those already stored.
func (p *pusher) events() error {
	var fresh, repeats []Event
	for _, e := range p.b.Events {
		if e.Seq <= p.lastSeq {
			repeats = append(repeats, e)
		} else {
			fresh = append(fresh, e)
		}
	}
	if len(fresh) > 0 {
		if f := fresh[0]; f.Seq != p.lastSeq+1 || (p.lastSeq > 0 && f.PrevHash != p.lastHash) {
			return fmt.Errorf("station %s's chain does not continue: the store holds it up to event %d (hash %.16s), "+
				"the push goes on with event %d (previous hash %.16s): %w",
				p.b.Station, p.lastSeq, p.lastHash, f.Seq, f.PrevHash, ErrConflict)
		}
		n := len(fresh)
		seq, ms := make([]int64, n), make([]int64, n)
		tm := make([]time.Time, n)
		serial, step, outcome, detail := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		operator, cert, prev, hash := make([]string, n), make([]string, n), make([]string, n), make([]string, n)
		for i, e := range fresh {
			seq[i], tm[i], serial[i], step[i], outcome[i], detail[i] = e.Seq, e.Time, e.Serial, e.Step, e.Outcome, e.Detail
			ms[i], operator[i], cert[i], prev[i], hash[i] = e.MS, e.Operator, e.CertSHA256, e.PrevHash, e.Hash
			if e.Time.After(p.lastEvent) {
				p.lastEvent = e.Time
			}
		}
		tag, err := p.tx.Exec(p.ctx, `INSERT INTO events (station, seq, time, received, serial, step, outcome, detail, ms,
			operator, cert_sha256, prev_hash, hash)
			SELECT $1, e.seq, e.time, statement_timestamp(), e.serial, e.step, e.outcome, e.detail, e.ms, e.operator,
				e.cert, e.prev, e.hash
			FROM unnest($2::bigint[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
				$9::text[], $10::text[], $11::text[], $12::text[])
				AS e(seq, time, serial, step, outcome, detail, ms, operator, cert, prev, hash)`,
			p.b.Station, seq, tm, serial, step, outcome, detail, ms, operator, cert, prev, hash)
		if err != nil {
			return err
		}
		p.res.Events = int(tag.RowsAffected())
		last := fresh[n-1]
		p.lastSeq, p.lastHash = last.Seq, last.Hash
	}
	if len(repeats) == 0 {
		return nil
	}
	seqs := make([]int64, len(repeats))
	for i, e := range repeats {
		seqs[i] = e.Seq
	}
	rows, err := p.tx.Query(p.ctx, `SELECT seq, hash FROM events
		WHERE station = $1 AND seq IN (SELECT unnest($2::bigint[]))`, p.b.Station, seqs)
	if err != nil {
		return err
	}
	stored := map[int64]string{}
	var sq int64
	var h string
	if _, err := pgx.ForEachRow(rows, []any{&sq, &h}, func() error { stored[sq] = h; return nil }); err != nil {
		return err
	}
	for _, e := range repeats {
		if h, ok := stored[e.Seq]; !ok {
			p.conflict("event", fmt.Sprintf("%s/%d", e.Station, e.Seq), "", "event %d is below the stored head but not stored", e.Seq)
		} else if h != e.Hash {
			p.conflict("event", fmt.Sprintf("%s/%d", e.Station, e.Seq), "", "event %d: stored hash %s, pushed %s", e.Seq, h, e.Hash)
		}
	}
	return nil
}

// takeable are the states in which another station's unit may be taken over: nothing of it is in use.
func takeable(state string) bool { return state == "new" || state == "failed" || state == "returned" }

// units decides each unit against the locked rows of its serial and of its EK, then inserts and updates in bulk.
func (p *pusher) units() error {
	if len(p.b.Units) == 0 {
		return nil
	}
	serials, eks := make([]string, 0, len(p.b.Units)), []string{}
	for _, u := range p.b.Units {
		serials = append(serials, u.Serial)
		if u.EKSHA256 != "" {
			eks = append(eks, u.EKSHA256)
		}
	}
	// Joins with the arrays, not "= ANY($1)": a generic plan's ANY over a parameter is a linear search per row.
	rows, err := p.tx.Query(p.ctx, "SELECT "+unitColumns+` FROM units WHERE serial IN (
			SELECT unnest($1::text[])
			UNION SELECT serial FROM units WHERE ek_sha256 IN (SELECT unnest($2::text[])) AND ek_sha256 <> '')
		ORDER BY serial FOR UPDATE`, serials, eks)
	if err != nil {
		return err
	}
	existing, err := pgx.CollectRows(rows, scanUnit)
	if err != nil {
		return err
	}
	bySerial, byEK := map[string]Unit{}, map[string]Unit{}
	for _, u := range existing {
		bySerial[u.Serial] = u
		if u.EKSHA256 != "" {
			byEK[u.EKSHA256] = u
		}
	}
	var inserts, updates []Unit
	for _, u := range p.b.Units {
		ex, held := bySerial[u.Serial]
		if h, ok := byEK[u.EKSHA256]; ok && u.EKSHA256 != "" && h.Serial != u.Serial {
			p.conflict("ek", u.EKSHA256, h.Station, "the TPM of %s (EK %.16s…) is bound to %s at station %s",
				u.Serial, u.EKSHA256, h.Serial, h.Station)
			continue
		}
		switch {
		case !held:
			inserts = append(inserts, u)
		case ex.Station == u.Station:
			if u.Updated.Before(ex.Updated) || sameUnit(u, ex) {
				continue // an older version, or a repeat
			}
			updates = append(updates, u)
		case u.State == "new":
			continue // nothing was made of it at this station: no key, no certificate
		case takeable(ex.State) && !u.Updated.Before(ex.Updated):
			updates = append(updates, u)
		default:
			p.conflict("unit", u.Serial, ex.Station, "%s is %s at station %s since %s; station %s has it %s",
				u.Serial, ex.State, ex.Station, ex.Updated.Format(time.RFC3339), u.Station, u.State)
			continue
		}
		if held && ex.EKSHA256 != "" {
			delete(byEK, ex.EKSHA256)
		}
		if u.EKSHA256 != "" {
			byEK[u.EKSHA256] = u
		}
	}
	if len(inserts) > 0 {
		tag, err := p.tx.Exec(p.ctx, "INSERT INTO units ("+unitColumns+") SELECT * FROM "+unitArrays, unitArgs(inserts)...)
		if err != nil {
			return err
		}
		p.res.Units += int(tag.RowsAffected())
	}
	if len(updates) > 0 {
		tag, err := p.tx.Exec(p.ctx, `UPDATE units AS t SET station = v.station, state = v.state,
			failed_step = v.failed_step, error = v.error, key_kind = v.key_kind, public_sha256 = v.public_sha256,
			ek_sha256 = v.ek_sha256, ek_cert_sha256 = v.ek_cert_sha256, operator = v.operator, created = v.created,
			updated = v.updated
			FROM `+unitArrays+" WHERE t.serial = v.serial", unitArgs(updates)...)
		if err != nil {
			return err
		}
		p.res.Units += int(tag.RowsAffected())
	}
	return nil
}

// certificates stores new certificates and status changes of the station's own, and refuses any other change.
func (p *pusher) certificates() error {
	if len(p.b.Certificates) == 0 {
		return nil
	}
	serials, shas := make([]string, len(p.b.Certificates)), make([]string, len(p.b.Certificates))
	for i, c := range p.b.Certificates {
		serials[i], shas[i] = c.Serial, c.SHA256
	}
	rows, err := p.tx.Query(p.ctx, "SELECT "+certColumns+` FROM certificates WHERE serial IN (
			SELECT unnest($1::text[])
			UNION SELECT serial FROM certificates WHERE sha256 IN (SELECT unnest($2::text[])))
		ORDER BY serial FOR UPDATE`, serials, shas)
	if err != nil {
		return err
	}
	existing, err := pgx.CollectRows(rows, scanCertificate)
	if err != nil {
		return err
	}
	bySerial, bySHA := map[string]Certificate{}, map[string]Certificate{}
	for _, c := range existing {
		bySerial[c.Serial], bySHA[c.SHA256] = c, c
	}
	var inserts, updates []Certificate
	for _, c := range p.b.Certificates {
		ex, held := bySerial[c.Serial]
		if h, ok := bySHA[c.SHA256]; ok && h.Serial != c.Serial {
			p.conflict("certificate", c.Serial, h.Station, "fingerprint %.16s… is certificate %s of %s at station %s",
				c.SHA256, h.Serial, h.Unit, h.Station)
			continue
		}
		switch {
		case !held:
			inserts = append(inserts, c)
			bySHA[c.SHA256] = c
		case ex.Station != c.Station || ex.Unit != c.Unit || ex.SHA256 != c.SHA256:
			p.conflict("certificate", c.Serial, ex.Station, "certificate %s is stored for %s at station %s "+
				"(fingerprint %.16s…); station %s has it for %s (fingerprint %.16s…)",
				c.Serial, ex.Unit, ex.Station, ex.SHA256, c.Station, c.Unit, c.SHA256)
		case !sameCertificate(ex, c):
			updates = append(updates, c)
		}
	}
	if len(inserts) > 0 {
		tag, err := p.tx.Exec(p.ctx, "INSERT INTO certificates ("+certColumns+") SELECT * FROM "+certArrays, certArgs(inserts)...)
		if err != nil {
			return err
		}
		p.res.Certificates += int(tag.RowsAffected())
	}
	if len(updates) > 0 {
		tag, err := p.tx.Exec(p.ctx, `UPDATE certificates AS t SET status = v.status, not_before = v.not_before,
			not_after = v.not_after, issued = v.issued, der = coalesce(v.der, t.der)
			FROM `+certArrays+" WHERE t.serial = v.serial", certArgs(updates)...)
		if err != nil {
			return err
		}
		p.res.Certificates += int(tag.RowsAffected())
	}
	return nil
}

// attestations inserts new evidence and compares the repeats with what is stored.
func (p *pusher) attestations() error {
	if len(p.b.Attestations) == 0 {
		return nil
	}
	args, err := attestationArgs(p.b.Attestations)
	if err != nil {
		return err
	}
	rows, err := p.tx.Query(p.ctx, "INSERT INTO attestations ("+attestationColumns+") SELECT * FROM "+attestationArrays+
		" ON CONFLICT (station, local_id) DO NOTHING RETURNING local_id", args...)
	if err != nil {
		return err
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return err
	}
	p.res.Attestations = len(ids)
	inserted := map[int64]bool{}
	for _, id := range ids {
		inserted[id] = true
	}
	var repeats []int64
	for _, a := range p.b.Attestations {
		if !inserted[a.LocalID] {
			repeats = append(repeats, a.LocalID)
		}
	}
	if len(repeats) == 0 {
		return nil
	}
	rows, err = p.tx.Query(p.ctx, "SELECT "+attestationColumns+` FROM attestations
		WHERE station = $1 AND local_id IN (SELECT unnest($2::bigint[]))`, p.b.Station, repeats)
	if err != nil {
		return err
	}
	stored, err := pgx.CollectRows(rows, scanAttestation)
	if err != nil {
		return err
	}
	byID := map[int64]Attestation{}
	for _, a := range stored {
		byID[a.LocalID] = a
	}
	for _, a := range p.b.Attestations {
		if inserted[a.LocalID] {
			continue
		}
		if ex := byID[a.LocalID]; !sameAttestation(ex, a) {
			p.conflict("attestation", fmt.Sprintf("%s/%d", a.Station, a.LocalID), "",
				"attestation %d of %s differs from the stored one (evidence %.16s…, pushed %.16s…)",
				a.LocalID, a.Serial, ex.EvidenceSHA256, a.EvidenceSHA256)
		}
	}
	return nil
}

// conflicts records the conflicts found (once per kind, key, station and other station).
func (p *pusher) conflicts() error {
	cs := p.res.Conflicts
	if len(cs) == 0 {
		return nil
	}
	sorted := append([]Conflict(nil), cs...)
	sort.Slice(sorted, func(i, j int) bool {
		a, b := sorted[i], sorted[j]
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		if a.Key != b.Key {
			return a.Key < b.Key
		}
		return a.Other < b.Other
	})
	n := len(sorted)
	kind, key, station, other, detail := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	for i, c := range sorted {
		kind[i], key[i], station[i], other[i], detail[i] = c.Kind, c.Key, c.Station, c.Other, c.Detail
	}
	_, err := p.tx.Exec(p.ctx, `INSERT INTO conflicts (kind, key, station, other, detail, time)
		SELECT v.*, statement_timestamp() FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
			AS v(kind, key, station, other, detail)
		ON CONFLICT (kind, key, station, other) DO NOTHING`, kind, key, station, other, detail)
	return err
}
