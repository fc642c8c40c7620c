-- A unit's own data that templates and resume need: the batch CSV columns ({name}, .Fields.name) as a JSON object.
ALTER TABLE units ADD COLUMN fields TEXT NOT NULL DEFAULT '';
