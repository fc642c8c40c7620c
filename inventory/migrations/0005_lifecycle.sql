-- provision: foreign_keys off
-- Life after the line (docs/lifecycle.md). The units table is rebuilt (SQLite cannot change a CHECK constraint in
-- place) to allow the state returned (after `provision rma`); the migration runs with foreign key enforcement off and
-- checks every reference before it commits (inventory.go, migrate).
CREATE TABLE units_new (
	serial         TEXT PRIMARY KEY,
	state          TEXT NOT NULL CHECK (state IN ('new','keyed','certified','imaged','verified','shippable','failed','returned')),
	failed_step    TEXT NOT NULL DEFAULT '',
	error          TEXT NOT NULL DEFAULT '',
	key_kind       TEXT NOT NULL DEFAULT '',
	public_sha256  TEXT NOT NULL DEFAULT '',
	ek_cert_sha256 TEXT NOT NULL DEFAULT '',
	operator       TEXT NOT NULL DEFAULT '',
	station        TEXT NOT NULL DEFAULT '',
	created_at     TEXT NOT NULL,
	updated_at     TEXT NOT NULL,
	fields         TEXT NOT NULL DEFAULT '',
	ek_sha256      TEXT NOT NULL DEFAULT ''
) STRICT;
INSERT INTO units_new (serial, state, failed_step, error, key_kind, public_sha256, ek_cert_sha256, operator, station,
	created_at, updated_at, fields, ek_sha256)
	SELECT serial, state, failed_step, error, key_kind, public_sha256, ek_cert_sha256, operator, station,
	created_at, updated_at, fields, ek_sha256 FROM units;
DROP TABLE units;
ALTER TABLE units_new RENAME TO units;
CREATE UNIQUE INDEX units_one_tpm ON units(ek_sha256) WHERE ek_sha256 != '';

-- Revocation: when (RFC 3339) and why (RFC 5280 reason name in camelCase). A certificate is on the CRL when revoked_at
-- is set: status revoked, or superseded (a resume or re-provision replaced it). der: the certificate itself (from this
-- version on; empty for certificates issued before it), which rotate needs for the unit's public key.
ALTER TABLE certificates ADD COLUMN revoked_at TEXT NOT NULL DEFAULT '';
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE certificates ADD COLUMN der BLOB;
-- Certificates superseded before this version were replaced when the next certificate of their unit was issued.
UPDATE certificates SET revocation_reason = 'superseded', revoked_at = coalesce(
	(SELECT min(c2.issued_at) FROM certificates c2 WHERE c2.unit = certificates.unit AND c2.issued_at > certificates.issued_at),
	certificates.issued_at) WHERE status = 'superseded';

-- The CRL number of the last CRL this station signed (monotonic; one row).
CREATE TABLE crl_state (
	id          INTEGER PRIMARY KEY CHECK (id = 1),
	number      INTEGER NOT NULL,
	this_update TEXT NOT NULL
) STRICT;
