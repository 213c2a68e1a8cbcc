-- Enrollments: one row per (queue, target_url) pair. The daemon's in-memory map is loaded
-- from this table at start and every create/delete is committed here before the API answers.
CREATE TABLE enrollments (
    id                TEXT PRIMARY KEY NOT NULL,
    queue             TEXT NOT NULL,
    target_url        TEXT NOT NULL,
    subscription_args TEXT NOT NULL DEFAULT '{}',
    created_at        TEXT NOT NULL,
    UNIQUE (queue, target_url)
);
