-- The certificates themselves, so `provision export --central` hands off units of every station. Certificates pushed
-- before this migration (or by a station whose inventory holds no copy) have none: NULL, and an export skips them.
ALTER TABLE certificates ADD COLUMN der bytea;
