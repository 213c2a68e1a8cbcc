-- Whether the enrollment was paused through the API; a paused enrollment's worker is not
-- started at load.
ALTER TABLE enrollments ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
