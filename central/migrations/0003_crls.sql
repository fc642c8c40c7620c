-- Each station's latest CRL (issue #13), pushed by its sync, so `provision serve` at any station answers
-- /crl/<station_id> for every station. One row per station; a push replaces it only with a higher CRL number
-- (PutCRL: an equal number is a no-op, a lower one is ignored).
CREATE TABLE crls (
	station     text COLLATE "C" PRIMARY KEY,
	number      bigint NOT NULL CHECK (number >= 0),   -- the CRL number extension
	der         bytea NOT NULL,                        -- the CRL as the station signed it
	this_update timestamptz NOT NULL,
	next_update timestamptz NOT NULL,
	updated_at  timestamptz NOT NULL DEFAULT now()     -- when the store took this CRL
);
