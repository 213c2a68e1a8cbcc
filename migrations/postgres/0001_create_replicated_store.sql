-- The PostgreSQL store, shared by replicas: the enrollments (as in SQLite), the live replicas,
-- one lease per enrollment, and the owners' snapshots of live state. Never edit once applied;
-- add a new file (see migrations/README.md).

CREATE TABLE enrollments (
    id                TEXT PRIMARY KEY NOT NULL,
    queue             TEXT NOT NULL,
    target_url        TEXT NOT NULL,
    subscription_args TEXT NOT NULL DEFAULT '{}',
    created_at        TEXT NOT NULL,
    delivery          TEXT NOT NULL DEFAULT '{}',
    paused            BOOLEAN NOT NULL DEFAULT FALSE,
    -- The store, not an in-process scan, decides duplicates across replicas.
    UNIQUE (queue, target_url)
);

-- One row per running replica, its heartbeat renewed with its leases.
CREATE TABLE replicas (
    id           TEXT PRIMARY KEY NOT NULL,
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Who runs an enrollment, until when. Expiry is the database's clock only.
CREATE TABLE leases (
    enrollment_id TEXT PRIMARY KEY NOT NULL REFERENCES enrollments (id) ON DELETE CASCADE,
    owner         TEXT NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX leases_owner ON leases (owner);

-- The owner's live state and counters of an enrollment, as JSON, for every replica's view.
CREATE TABLE snapshots (
    enrollment_id TEXT PRIMARY KEY NOT NULL REFERENCES enrollments (id) ON DELETE CASCADE,
    replica       TEXT NOT NULL,
    status        TEXT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE daemon_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- Every change to an enrollment reaches every replica at once: `<op> <id>`.
CREATE FUNCTION hot_potato_enrollment_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('hot_potato_enrollments', 'DELETE ' || OLD.id);
    ELSE
        PERFORM pg_notify('hot_potato_enrollments', TG_OP || ' ' || NEW.id);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER enrollments_changed AFTER INSERT OR UPDATE OR DELETE ON enrollments
    FOR EACH ROW EXECUTE FUNCTION hot_potato_enrollment_changed();
