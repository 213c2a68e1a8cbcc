-- The durable subscriptions of deleted enrollments that are still to be closed on the broker.
-- DELETE writes the row in the transaction that deletes the enrollment, so it outlives every
-- replica: the owner removes it once it has closed the link; when no replica did within
-- LEASE_TTL_MS (the owner was killed, or none was running), any replica claims it and closes
-- the subscription. Never edit once applied; add a new file (see migrations/README.md).

CREATE TABLE pending_closes (
    enrollment_id     TEXT PRIMARY KEY NOT NULL,
    -- What opening a link to close needs: the link name comes from the id.
    queue             TEXT NOT NULL,
    subscription_args TEXT NOT NULL,
    requested_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Set by the replica trying to close it, so no other tries at the same time, and after a
    -- failure, so the next try waits; a replica that dies mid-attempt leaves it to expire.
    claimed_until     TIMESTAMPTZ,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT
);
