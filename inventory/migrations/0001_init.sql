-- Units, their certificates and the hash-chained audit log.
CREATE TABLE units (
	serial         TEXT PRIMARY KEY,
	state          TEXT NOT NULL CHECK (state IN ('new','keyed','certified','imaged','verified','shippable','failed')),
	failed_step    TEXT NOT NULL DEFAULT '',
	error          TEXT NOT NULL DEFAULT '',
	key_kind       TEXT NOT NULL DEFAULT '',
	public_sha256  TEXT NOT NULL DEFAULT '',
	ek_cert_sha256 TEXT NOT NULL DEFAULT '',
	operator       TEXT NOT NULL DEFAULT '',
	station        TEXT NOT NULL DEFAULT '',
	created_at     TEXT NOT NULL,
	updated_at     TEXT NOT NULL
) STRICT;

CREATE TABLE certificates (
	serial     TEXT PRIMARY KEY,
	unit       TEXT NOT NULL REFERENCES units(serial),
	sha256     TEXT NOT NULL UNIQUE,
	not_before TEXT NOT NULL,
	not_after  TEXT NOT NULL,
	status     TEXT NOT NULL CHECK (status IN ('active','superseded','revoked')),
	issued_at  TEXT NOT NULL
) STRICT;
CREATE INDEX certificates_unit ON certificates(unit);
-- A unit holds at most one active certificate, whatever the code above does.
CREATE UNIQUE INDEX certificates_one_active ON certificates(unit) WHERE status = 'active';

CREATE TABLE events (
	seq         INTEGER PRIMARY KEY,
	time        TEXT NOT NULL,
	serial      TEXT NOT NULL,
	step        TEXT NOT NULL,
	outcome     TEXT NOT NULL,
	detail      TEXT NOT NULL DEFAULT '',
	ms          INTEGER NOT NULL DEFAULT 0,
	operator    TEXT NOT NULL DEFAULT '',
	station     TEXT NOT NULL DEFAULT '',
	cert_sha256 TEXT NOT NULL DEFAULT '',
	prev_hash   TEXT NOT NULL,
	hash        TEXT NOT NULL
) STRICT;
CREATE INDEX events_serial ON events(serial, seq);
