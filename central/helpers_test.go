package central

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"testing"
	"time"

	"provision/internal/testutil"
)

// newStore is an initialised, open store on a fresh database of the test binary's PostgreSQL.
func newStore(tb testing.TB) *Store {
	tb.Helper()
	dsn := testutil.PostgresDB(tb)
	ctx := context.Background()
	if err := Init(ctx, dsn); err != nil {
		tb.Fatal(err)
	}
	s, err := Open(ctx, dsn)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Close)
	return s
}

// chain is a station's audit log being written: each event carries the previous hash.
type chain struct {
	station string
	seq     int64
	hash    string
	clock   time.Time
}

func newChain(station string) *chain {
	return &chain{station: station, hash: "0000000000000000000000000000000000000000000000000000000000000000",
		clock: time.Now().Add(-time.Minute)}
}

// next appends one event.
func (c *chain) next(serial, step, outcome, detail string) Event {
	c.seq++
	c.clock = c.clock.Add(time.Millisecond)
	e := Event{Station: c.station, Seq: c.seq, Time: c.clock, Serial: serial, Step: step, Outcome: outcome,
		Detail: detail, MS: 12, Operator: "alice", PrevHash: c.hash}
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s|%d|%s|%s|%s|%s|%s", e.PrevHash, e.Seq, e.Serial, e.Step, e.Outcome, e.Detail, e.Time)))
	e.Hash = hex.EncodeToString(sum[:])
	c.hash = e.Hash
	return e
}

// unitBatch is what a station pushes after provisioning serials: each unit's events (key, sign, image, verify,
// handshake, shippable), its shippable row and its certificate.
func (c *chain) unitBatch(serials ...string) Batch {
	b := Batch{Station: c.station}
	for _, sn := range serials {
		for _, step := range []string{"key", "sign", "image", "verify", "handshake"} {
			b.Events = append(b.Events, c.next(sn, step, "ok", ""))
		}
		b.Events = append(b.Events, c.next(sn, "handshake", "shippable", ""))
		b.Units = append(b.Units, unit(sn, c.station, "shippable", c.clock))
		b.Certificates = append(b.Certificates, cert(sn, c.station, c.clock))
	}
	return b
}

func unit(serial, station, state string, at time.Time) Unit {
	return Unit{Serial: serial, Station: station, State: state, KeyKind: "tpm", PublicSHA256: fp("pub" + serial),
		Operator: "alice", Created: at.Add(-time.Second), Updated: at}
}

func cert(serial, station string, at time.Time) Certificate {
	return Certificate{Serial: "C-" + station + "-" + serial, Unit: serial, Station: station, SHA256: fp("cert" + station + serial),
		Status: "active", NotBefore: at, NotAfter: at.AddDate(1, 0, 0), Issued: at}
}

func fp(s string) string { sum := sha256.Sum256([]byte(s)); return hex.EncodeToString(sum[:]) }

func push(tb testing.TB, s *Store, b Batch) PushResult {
	tb.Helper()
	res, err := s.Push(context.Background(), b)
	if err != nil {
		tb.Fatalf("push from %s: %v", b.Station, err)
	}
	return res
}

// count runs a count(*) query.
func count(tb testing.TB, s *Store, sql string, args ...any) int {
	tb.Helper()
	var n int
	if err := s.pool.QueryRow(context.Background(), sql, args...).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

func serials(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%04d", prefix, i)
	}
	return out
}
