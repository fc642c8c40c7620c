-- Genuine-TPM proof (step attest): the TPM each unit is bound to, and the evidence of every attest run.
-- ek_sha256 is the SHA-256 of the unit's EK public key (SPKI DER); empty when the unit was never attested.
ALTER TABLE units ADD COLUMN ek_sha256 TEXT NOT NULL DEFAULT '';
-- One TPM, one unit: the database refuses a second unit with the same EK, whatever the code above does.
CREATE UNIQUE INDEX units_one_tpm ON units(ek_sha256) WHERE ek_sha256 != '';

CREATE TABLE attestations (
	id                    INTEGER PRIMARY KEY,
	serial                TEXT NOT NULL REFERENCES units(serial),
	time                  TEXT NOT NULL,
	policy                TEXT NOT NULL CHECK (policy IN ('off','record','required')),
	outcome               TEXT NOT NULL CHECK (outcome IN ('ok','failed')),
	status                TEXT NOT NULL CHECK (status IN ('trusted','untrusted','absent','off','soft')),
	ek_sha256             TEXT NOT NULL DEFAULT '',
	ek_certificate_sha256 TEXT NOT NULL DEFAULT '',
	ek_issuer             TEXT NOT NULL DEFAULT '',
	tpm_manufacturer      TEXT NOT NULL DEFAULT '',
	cause                 TEXT NOT NULL DEFAULT '',
	warnings              TEXT NOT NULL DEFAULT '',
	evidence              TEXT NOT NULL DEFAULT '',
	evidence_sha256       TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX attestations_serial ON attestations(serial, id);
