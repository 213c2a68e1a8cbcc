-- Small key/value facts about the daemon itself. `write_probe` is rewritten by start-up and
-- readiness checks: a committed write is the only proof that the file still takes writes.
CREATE TABLE daemon_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
