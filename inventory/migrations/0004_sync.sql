-- Forwarding to a central store: how far the audit log has been sent (the last event the store acknowledged).
CREATE TABLE sync_state (
	name      TEXT PRIMARY KEY,
	seq       INTEGER NOT NULL,
	hash      TEXT NOT NULL,
	synced_at TEXT NOT NULL
) STRICT;
