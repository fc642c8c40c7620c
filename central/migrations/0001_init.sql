-- The central store's first schema. Serials and station ids use the C collation: byte order for keyset pagination and
-- index-backed prefix search (LIKE 'SN-00%').

CREATE TABLE stations (
	id         text COLLATE "C" PRIMARY KEY,
	last_sync  timestamptz,                 -- last push
	last_seq   bigint NOT NULL DEFAULT 0,   -- the station's audit chain as far as it is stored
	last_hash  text NOT NULL DEFAULT '',
	last_event timestamptz,                 -- time of its newest event
	backlog    bigint NOT NULL DEFAULT 0    -- what the station still had to send at its last push
);

CREATE TABLE units (
	serial         text COLLATE "C" PRIMARY KEY,
	station        text COLLATE "C" NOT NULL,
	state          text NOT NULL,
	failed_step    text NOT NULL DEFAULT '',
	error          text NOT NULL DEFAULT '',
	key_kind       text NOT NULL DEFAULT '',
	public_sha256  text NOT NULL DEFAULT '',
	ek_sha256      text NOT NULL DEFAULT '',
	ek_cert_sha256 text NOT NULL DEFAULT '',
	operator       text NOT NULL DEFAULT '',
	created        timestamptz NOT NULL,
	updated        timestamptz NOT NULL
);
-- One TPM, one unit.
CREATE UNIQUE INDEX units_ek ON units (ek_sha256) WHERE ek_sha256 <> '';
CREATE INDEX units_station_state ON units (station, state);
CREATE INDEX units_state ON units (state, serial);
CREATE INDEX units_shipped ON units (updated) WHERE state = 'shippable';

CREATE TABLE certificates (
	serial     text COLLATE "C" PRIMARY KEY,
	unit       text COLLATE "C" NOT NULL,
	station    text COLLATE "C" NOT NULL,
	sha256     text NOT NULL UNIQUE,
	status     text NOT NULL,
	not_before timestamptz NOT NULL,
	not_after  timestamptz NOT NULL,
	issued     timestamptz NOT NULL
);
CREATE INDEX certificates_unit ON certificates (unit);

CREATE TABLE events (
	station     text COLLATE "C" NOT NULL,
	seq         bigint NOT NULL,
	time        timestamptz NOT NULL,
	received    timestamptz NOT NULL,    -- when the push stored it (sync lag = received - time)
	serial      text COLLATE "C" NOT NULL DEFAULT '',
	step        text NOT NULL DEFAULT '',
	outcome     text NOT NULL DEFAULT '',
	detail      text NOT NULL DEFAULT '',
	ms          bigint NOT NULL DEFAULT 0,
	operator    text NOT NULL DEFAULT '',
	cert_sha256 text NOT NULL DEFAULT '',
	prev_hash   text NOT NULL,
	hash        text NOT NULL,
	PRIMARY KEY (station, seq)
);
CREATE INDEX events_serial ON events (serial, time);
CREATE INDEX events_time ON events (time);
CREATE INDEX events_received ON events (received);

CREATE TABLE attestations (
	station          text COLLATE "C" NOT NULL,
	local_id         bigint NOT NULL,
	serial           text COLLATE "C" NOT NULL,
	time             timestamptz NOT NULL,
	policy           text NOT NULL DEFAULT '',
	outcome          text NOT NULL DEFAULT '',
	status           text NOT NULL DEFAULT '',
	ek_sha256        text NOT NULL DEFAULT '',
	ek_cert_sha256   text NOT NULL DEFAULT '',
	ek_issuer        text NOT NULL DEFAULT '',
	tpm_manufacturer text NOT NULL DEFAULT '',
	cause            text NOT NULL DEFAULT '',
	warnings         text NOT NULL DEFAULT '[]',  -- JSON array of strings
	evidence         bytea,                      -- the station's JSON, byte for byte
	evidence_sha256  text NOT NULL DEFAULT '',
	PRIMARY KEY (station, local_id)
);
CREATE INDEX attestations_serial ON attestations (serial, time);

-- Records the store refused to overwrite. One row per (kind, key, station, other): a station that pushes the same
-- conflicting record again does not add rows; time is when it was first seen.
CREATE TABLE conflicts (
	id      bigserial PRIMARY KEY,
	kind    text NOT NULL,
	key     text NOT NULL,
	station text COLLATE "C" NOT NULL,
	other   text NOT NULL DEFAULT '',
	detail  text NOT NULL DEFAULT '',
	time    timestamptz NOT NULL DEFAULT now(),
	UNIQUE (kind, key, station, other)
);
CREATE INDEX conflicts_time ON conflicts (time);

-- Serials being provisioned: a station's claim before the key step, until it expires.
CREATE TABLE claims (
	serial   text COLLATE "C" PRIMARY KEY,
	station  text COLLATE "C" NOT NULL,
	operator text NOT NULL DEFAULT '',
	since    timestamptz NOT NULL,
	expires  timestamptz NOT NULL
);

-- The units of distributed batches: each taken by one worker under a lease.
CREATE TABLE batch_jobs (
	batch_id    text NOT NULL,
	serial      text COLLATE "C" NOT NULL,
	pos         bigint NOT NULL,           -- order in the serial list
	status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'taken', 'ok', 'failed', 'skipped')),
	worker      text NOT NULL DEFAULT '',
	lease_until timestamptz,
	attempts    int NOT NULL DEFAULT 0,
	updated     timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (batch_id, serial)
);
CREATE INDEX batch_jobs_next ON batch_jobs (batch_id, pos) WHERE status IN ('pending', 'taken');
