package central

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// The rows of a push: checking and ordering a batch, and moving records between Go values and columns (arrays for
// the bulk statements, scans for reads).

// micro is t as PostgreSQL keeps it (UTC, microseconds), so that what was pushed compares equal to what is read back.
func micro(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return t.UTC().Truncate(time.Microsecond)
}

// normalise checks b and puts it in the form push expects: every record of b's station, times in microseconds,
// events in chain order, units, certificates and attestations in key order (the lock order) without duplicates (the
// newest unit version wins).
func (b *Batch) normalise() error {
	if b.Station == "" {
		return errors.New("central: push without a station id")
	}
	own := func(kind string, st *string) error {
		if *st == "" {
			*st = b.Station
		}
		if *st != b.Station {
			return fmt.Errorf("central: push from station %s carries a %s of station %s", b.Station, kind, *st)
		}
		return nil
	}
	// The caller's slices are its own: work on copies.
	b.Events = append([]Event(nil), b.Events...)
	slices.SortStableFunc(b.Events, func(x, y Event) int { return cmp.Compare(x.Seq, y.Seq) })
	for i := range b.Events {
		e := &b.Events[i]
		if err := own("event", &e.Station); err != nil {
			return err
		}
		e.Time = micro(e.Time)
		if e.Seq < 1 {
			return fmt.Errorf("central: push from station %s: event seq %d: %w", b.Station, e.Seq, ErrConflict)
		}
		if i > 0 {
			if p := b.Events[i-1]; e.Seq != p.Seq+1 || e.PrevHash != p.Hash {
				return fmt.Errorf("central: push from station %s: event %d does not follow event %d: %w",
					b.Station, e.Seq, p.Seq, ErrConflict)
			}
		}
	}
	units := map[string]Unit{}
	for _, u := range b.Units {
		if err := own("unit", &u.Station); err != nil {
			return err
		}
		if u.Serial == "" {
			return fmt.Errorf("central: push from station %s: a unit without a serial", b.Station)
		}
		u.Created, u.Updated = micro(u.Created), micro(u.Updated)
		if have, ok := units[u.Serial]; !ok || !u.Updated.Before(have.Updated) {
			units[u.Serial] = u
		}
	}
	b.Units = sortedValues(units)
	certs := map[string]Certificate{}
	for _, c := range b.Certificates {
		if err := own("certificate", &c.Station); err != nil {
			return err
		}
		if c.Serial == "" || c.SHA256 == "" {
			return fmt.Errorf("central: push from station %s: a certificate without a serial or fingerprint", b.Station)
		}
		if len(c.DER) > 0 && sha256Hex(c.DER) != c.SHA256 {
			return fmt.Errorf("central: push from station %s: certificate %s: its DER is not the certificate %.16s…",
				b.Station, c.Serial, c.SHA256)
		}
		if len(c.DER) == 0 {
			c.DER = nil // NULL in the store
		}
		c.NotBefore, c.NotAfter, c.Issued = micro(c.NotBefore), micro(c.NotAfter), micro(c.Issued)
		certs[c.Serial] = c
	}
	b.Certificates = sortedValues(certs)
	atts := map[int64]Attestation{}
	for _, a := range b.Attestations {
		if err := own("attestation", &a.Station); err != nil {
			return err
		}
		a.Time = micro(a.Time)
		atts[a.LocalID] = a
	}
	b.Attestations = sortedValues(atts)
	return nil
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// sortedValues is a map's values in the order of their keys: the push's rows in key order, so concurrent pushes take
// their row locks in the same order.
func sortedValues[K cmp.Ordered, V any](m map[K]V) []V {
	out := make([]V, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[k])
	}
	return out
}

const unitColumns = "serial, station, state, failed_step, error, key_kind, public_sha256, ek_sha256, ek_cert_sha256, operator, created, updated"

const unitArrays = `unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
	$9::text[], $10::text[], $11::timestamptz[], $12::timestamptz[]) AS v(serial, station, state, failed_step, error,
	key_kind, public_sha256, ek_sha256, ek_cert_sha256, operator, created, updated)`

func scanUnit(row pgx.CollectableRow) (Unit, error) {
	var u Unit
	err := row.Scan(&u.Serial, &u.Station, &u.State, &u.FailedStep, &u.Error, &u.KeyKind, &u.PublicSHA256,
		&u.EKSHA256, &u.EKCertSHA256, &u.Operator, &u.Created, &u.Updated)
	u.Created, u.Updated = u.Created.UTC(), u.Updated.UTC()
	return u, err
}

func sameUnit(a, b Unit) bool {
	return a.Serial == b.Serial && a.Station == b.Station && a.State == b.State && a.FailedStep == b.FailedStep &&
		a.Error == b.Error && a.KeyKind == b.KeyKind && a.PublicSHA256 == b.PublicSHA256 && a.EKSHA256 == b.EKSHA256 &&
		a.EKCertSHA256 == b.EKCertSHA256 && a.Operator == b.Operator && a.Created.Equal(b.Created) &&
		a.Updated.Equal(b.Updated)
}

// unitArgs are the columns of us as arrays, in unitColumns order.
func unitArgs(us []Unit) []any {
	cols := make([][]string, 10)
	for i := range cols {
		cols[i] = make([]string, len(us))
	}
	created, updated := make([]time.Time, len(us)), make([]time.Time, len(us))
	for i, u := range us {
		for j, v := range []string{u.Serial, u.Station, u.State, u.FailedStep, u.Error, u.KeyKind, u.PublicSHA256,
			u.EKSHA256, u.EKCertSHA256, u.Operator} {
			cols[j][i] = v
		}
		created[i], updated[i] = u.Created, u.Updated
	}
	args := make([]any, 0, 12)
	for _, c := range cols {
		args = append(args, c)
	}
	return append(args, created, updated)
}

const certColumns = "serial, unit, station, sha256, status, not_before, not_after, issued, der"

const certArrays = `unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[],
	$7::timestamptz[], $8::timestamptz[], $9::bytea[]) AS v(serial, unit, station, sha256, status, not_before, not_after,
	issued, der)`

func scanCertificate(row pgx.CollectableRow) (Certificate, error) {
	var c Certificate
	err := row.Scan(&c.Serial, &c.Unit, &c.Station, &c.SHA256, &c.Status, &c.NotBefore, &c.NotAfter, &c.Issued, &c.DER)
	c.NotBefore, c.NotAfter, c.Issued = c.NotBefore.UTC(), c.NotAfter.UTC(), c.Issued.UTC()
	return c, err
}

// sameCertificate says whether pushed changes nothing of stored: a push without DER leaves the stored DER as it is.
func sameCertificate(stored, pushed Certificate) bool {
	a, b := stored, pushed
	return a.Serial == b.Serial && a.Unit == b.Unit && a.Station == b.Station && a.SHA256 == b.SHA256 &&
		a.Status == b.Status && a.NotBefore.Equal(b.NotBefore) && a.NotAfter.Equal(b.NotAfter) && a.Issued.Equal(b.Issued) &&
		(len(b.DER) == 0 || bytes.Equal(a.DER, b.DER))
}

func certArgs(cs []Certificate) []any {
	n := len(cs)
	serial, unit, station, sha, status := make([]string, n), make([]string, n), make([]string, n), make([]string, n), make([]string, n)
	nb, na, issued := make([]time.Time, n), make([]time.Time, n), make([]time.Time, n)
	der := make([][]byte, n)
	for i, c := range cs {
		serial[i], unit[i], station[i], sha[i], status[i] = c.Serial, c.Unit, c.Station, c.SHA256, c.Status
		nb[i], na[i], issued[i], der[i] = c.NotBefore, c.NotAfter, c.Issued, c.DER
	}
	return []any{serial, unit, station, sha, status, nb, na, issued, der}
}

const attestationColumns = `station, local_id, serial, time, policy, outcome, status, ek_sha256, ek_cert_sha256,
	ek_issuer, tpm_manufacturer, cause, warnings, evidence, evidence_sha256`

const attestationArrays = `unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[], $5::text[], $6::text[],
	$7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::bytea[], $15::text[])`

func scanAttestation(row pgx.CollectableRow) (Attestation, error) {
	var a Attestation
	var warnings string
	err := row.Scan(&a.Station, &a.LocalID, &a.Serial, &a.Time, &a.Policy, &a.Outcome, &a.Status, &a.EKSHA256,
		&a.EKCertSHA256, &a.EKIssuer, &a.TPMManufacturer, &a.Cause, &warnings, &a.Evidence, &a.EvidenceSHA256)
	if err != nil {
		return a, err
	}
	a.Time = a.Time.UTC()
	if err := json.Unmarshal([]byte(warnings), &a.Warnings); err != nil {
		return a, fmt.Errorf("attestation %s/%d: warnings: %w", a.Station, a.LocalID, err)
	}
	return a, nil
}

func attestationArgs(as []Attestation) ([]any, error) {
	n := len(as)
	str := make([][]string, 12)
	for i := range str {
		str[i] = make([]string, n)
	}
	ids, times, evidence := make([]int64, n), make([]time.Time, n), make([][]byte, n)
	for i, a := range as {
		w, err := json.Marshal(nonNil(a.Warnings))
		if err != nil {
			return nil, err
		}
		for j, v := range []string{a.Station, a.Serial, a.Policy, a.Outcome, a.Status, a.EKSHA256, a.EKCertSHA256,
			a.EKIssuer, a.TPMManufacturer, a.Cause, string(w), a.EvidenceSHA256} {
			str[j][i] = v
		}
		ids[i], times[i], evidence[i] = a.LocalID, a.Time, a.Evidence
	}
	return []any{str[0], ids, str[1], times, str[2], str[3], str[4], str[5], str[6], str[7], str[8], str[9], str[10],
		evidence, str[11]}, nil
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func sameAttestation(a, b Attestation) bool {
	wa, _ := json.Marshal(nonNil(a.Warnings))
	wb, _ := json.Marshal(nonNil(b.Warnings))
	return a.Station == b.Station && a.LocalID == b.LocalID && a.Serial == b.Serial && a.Time.Equal(b.Time) &&
		a.Policy == b.Policy && a.Outcome == b.Outcome && a.Status == b.Status && a.EKSHA256 == b.EKSHA256 &&
		a.EKCertSHA256 == b.EKCertSHA256 && a.EKIssuer == b.EKIssuer && a.TPMManufacturer == b.TPMManufacturer &&
		a.Cause == b.Cause && bytes.Equal(wa, wb) && bytes.Equal(a.Evidence, b.Evidence) &&
		a.EvidenceSHA256 == b.EvidenceSHA256
}
