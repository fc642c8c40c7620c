#!/usr/bin/env bash
# Many stations on one central store (PostgreSQL), measured in one run:
#   (1) STATIONS station processes (default 8) x UNITS units each (default 250), concurrently: each unit a
#       `provision enroll --tpm soft` that forwards to the store right after it (as unit/tui/batch do). Checks zero
#       lost and zero duplicated records; prints sync lag p50/p99 (store receipt - event time)   target: p99 < 1 s
#   (2) a backlog of BACKLOG units (default 10000) made while the store was not configured, then `provision sync`:
#       central ingest rate                                                               target: >= 1,000 units/s
#   (3) a distributed batch: 2 workers (`provision batch --central`) over BATCH units (default 200): every unit
#       exactly once
# Soft keys and the smallest sample image keep the disk use small. Needs PostgreSQL's server binaries (Debian's
# postgresql package); as root the cluster runs as the postgres user.
# Usage: bench/central.sh [path/to/provision]   (default: bin/provision, built by `make build`)
source "$(dirname "$0")/lib.sh" "$@"
STATIONS="${STATIONS:-8}" UNITS="${UNITS:-250}" BACKLOG="${BACKLOG:-10000}" BATCH="${BATCH:-200}"

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$pgbin/initdb" ] || { echo "bench: PostgreSQL server binaries missing (apt-get install postgresql)" >&2; exit 2; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg="$(mktemp -d /tmp/provision-bench-pg.XXXXXX)"
chmod 755 "$pg"; [ "$(id -u)" = 0 ] && chown postgres "$pg"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg "$pgbin/initdb" -D "$pg/data" -A trust -U postgres >/dev/null
as_pg "$pgbin/pg_ctl" -D "$pg/data" -l "$pg/log" -w -o "-p $port -k $pg -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
trap 'as_pg "$pgbin/pg_ctl" -D "$pg/data" -m immediate stop >/dev/null 2>&1; rm -rf "$pg" "$w"' EXIT
dsn="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
sql() { as_pg "$pgbin/psql" -X -At -h "$pg" -p "$port" -U postgres -d postgres -c "$1"; }

station() { # station DIR ID [central]: a station, forwarding to the store when the third argument is given
  "$bin" --station "$1" init --id "$2" >/dev/null
  [ -z "${3:-}" ] || printf '\ncentral:\n  dsn: "%s"\n  mode: preferred\n' "$dsn" >>"$1/station.yaml"
}
station "$w/s0" line-0 central
"$bin" --station "$w/s0" central init >/dev/null

# (1) STATIONS x UNITS, concurrently.
for i in $(seq 1 "$STATIONS"); do station "$w/s$i" "line-$i" central; done
t0=$(now)
for i in $(seq 1 "$STATIONS"); do
  ( for n in $(seq -w 1 "$UNITS"); do
      "$bin" --station "$w/s$i" enroll --serial "L$i-$n" --tpm soft --out "$w/b$i" >/dev/null 2>>"$w/errors"
    done ) &
done
wait
t1=$(now)
for i in $(seq 1 "$STATIONS"); do "$bin" --station "$w/s$i" sync >/dev/null; done # whatever a busy store left
local_events=0
for i in $(seq 1 "$STATIONS"); do
  h=$("$bin" --station "$w/s$i" sync --status --json | sed 's/.*"head":\([0-9]*\).*/\1/'); local_events=$((local_events + h))
done
units=$(sql "SELECT count(*) FROM units WHERE serial LIKE 'L%'")
events=$(sql "SELECT count(*) FROM events WHERE station <> 'line-0'")
dups=$(sql "SELECT count(*) FROM (SELECT serial FROM units GROUP BY serial HAVING count(*) > 1) d")
lag=$(sql "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM received - time)) * 1000)::int || ' ' ||
  round(percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM received - time)) * 1000)::int FROM events WHERE station <> 'line-0'")
want=$((STATIONS * UNITS))
echo "(1) $STATIONS stations x $UNITS units in $(( (t1 - t0) / 1000000 )) ms: store holds $units of $want units, $events of $local_events events, $dups duplicated serials"
echo "    sync lag p50 ${lag% *} ms, p99 ${lag#* } ms   (target p99 < 1000 ms)"
[ "$units" = "$want" ] && [ "$events" = "$local_events" ] && [ "$dups" = 0 ] || { echo "bench: LOST OR DUPLICATED RECORDS" >&2; exit 1; }

# (2) a backlog drained by one provision sync.
station "$w/bl" line-backlog
seq -f 'BL-%06g' 1 "$BACKLOG" >"$w/backlog.txt"
"$bin" --station "$w/bl" enroll --serials "$w/backlog.txt" --tpm soft --out "$w/bbl" >/dev/null
printf '\ncentral:\n  dsn: "%s"\n' "$dsn" >>"$w/bl/station.yaml"
t0=$(now); "$bin" --station "$w/bl" sync >/dev/null; t1=$(now)
ms=$(( (t1 - t0) / 1000000 ))
got=$(sql "SELECT count(*) FROM units WHERE station = 'line-backlog'")
echo "(2) backlog of $BACKLOG units drained in $ms ms: $(( BACKLOG * 1000 / (ms > 0 ? ms : 1) )) units/s, store holds $got   (target >= 1000 units/s)"
[ "$got" = "$BACKLOG" ] || { echo "bench: backlog not fully stored" >&2; exit 1; }

# (3) a distributed batch of 2 workers.
"$bin" sample-image "$w/golden.img" >/dev/null
seq -f 'DB-%04g' 1 "$BATCH" >"$w/batch.txt"
for i in 1 2; do station "$w/d$i" "worker-$i" central; done
t0=$(now)
for i in 1 2; do "$bin" --station "$w/d$i" batch --central --serials "$w/batch.txt" --image "$w/golden.img" --out "$w/out$i" --json >"$w/batch$i.jsonl" 2>/dev/null & done
wait
t1=$(now)
ok=$(cat "$w/batch1.jsonl" "$w/batch2.jsonl" | grep -c '"status":"ok"' || true)
distinct=$(cat "$w/batch1.jsonl" "$w/batch2.jsonl" | grep '"status":"ok"' | sed 's/.*"serial":"\([^"]*\)".*/\1/' | sort -u | wc -l)
echo "(3) distributed batch, 2 workers x $BATCH units in $(( (t1 - t0) / 1000000 )) ms: $ok done, $distinct distinct (want $BATCH and $BATCH)"
[ "$ok" = "$BATCH" ] && [ "$distinct" = "$BATCH" ] || { echo "bench: a unit was done twice or not at all" >&2; exit 1; }
