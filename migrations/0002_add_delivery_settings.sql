-- Per-enrollment delivery settings (retries, status classes, breaker, auth, signing), as the
-- JSON the user sent; absent fields take the daemon's defaults at run time.
ALTER TABLE enrollments ADD COLUMN delivery TEXT NOT NULL DEFAULT '{}';
