//! The replica settings: `DATABASE_URL` (PostgreSQL, shared by every replica), `LEASE_TTL_MS`,
//! `SNAPSHOT_INTERVAL_MS` and `REPLICA_NAME`. Without `DATABASE_URL` the daemon runs alone on
//! its SQLite file and none of the others apply.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::{ConfigError, invalid};
use crate::enrollment::record::redact_url;

/// Bounds of `LEASE_TTL_MS`: under 1 s a busy database or a GC pause would fence healthy
/// replicas; over 10 min a dead replica's enrollments would wait that long.
pub const LEASE_TTL_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=600_000;

/// `DATABASE_URL` as it comes from the environment: its `Debug` hides it (the password).
#[derive(Deserialize)]
#[serde(transparent)]
pub(super) struct RawDatabaseUrl(String);

impl fmt::Debug for RawDatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How replicas share one PostgreSQL database.
#[derive(Clone)]
pub struct ReplicaSettings {
    /// `postgres://user:pass@host:port/db`; carries the password, so never printed as is
    /// (see [`ReplicaSettings::database_url_redacted`]).
    pub database_url: String,
    /// How long a lease lasts without renewal: a replica killed with `kill -9` loses its
    /// enrollments to the others after this long.
    pub lease_ttl: Duration,
    /// How often an owner publishes its enrollments' live state and counters for the others.
    pub snapshot_interval: Duration,
    /// The readable part of this replica's id (a random suffix is added at every start, so
    /// two processes never share an id).
    pub name: String,
}

impl ReplicaSettings {
    /// The database URL with its password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        Url::parse(&self.database_url)
            .map(|u| redact_url(&u))
            .unwrap_or_else(|_| "(unparsable)".into())
    }
}

impl fmt::Debug for ReplicaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaSettings")
            .field("database_url", &self.database_url_redacted())
            .field("lease_ttl", &self.lease_ttl)
            .field("snapshot_interval", &self.snapshot_interval)
            .field("name", &self.name)
            .finish()
    }
}

pub(super) fn replica_settings(
    database_url: Option<RawDatabaseUrl>,
    lease_ttl_ms: u64,
    snapshot_interval_ms: u64,
    name: Option<String>,
) -> Result<Option<ReplicaSettings>, ConfigError> {
    let Some(RawDatabaseUrl(database_url)) = database_url.filter(|u| !u.0.trim().is_empty()) else {
        return Ok(None);
    };
    // The parse error is not shown: it could quote the URL, password included.
    let url = Url::parse(&database_url).map_err(|_| {
        invalid(
            "DATABASE_URL",
            "not a URL (postgres://user:pass@host:port/db)",
        )
    })?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(invalid(
            "DATABASE_URL",
            "scheme must be postgres or postgresql",
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("DATABASE_URL", "has no host"));
    }
    if !LEASE_TTL_MS_RANGE.contains(&lease_ttl_ms) {
        return Err(invalid("LEASE_TTL_MS", "must be from 1000 to 600000"));
    }
    if !(100..=60_000).contains(&snapshot_interval_ms) {
        return Err(invalid("SNAPSHOT_INTERVAL_MS", "must be from 100 to 60000"));
    }
    let name = name.unwrap_or_else(|| "replica".into());
    if name.is_empty()
        || name.len() > 40
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            "REPLICA_NAME",
            "1 to 40 characters among letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(Some(ReplicaSettings {
        database_url,
        lease_ttl: Duration::from_millis(lease_ttl_ms),
        snapshot_interval: Duration::from_millis(snapshot_interval_ms),
        name,
    }))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, crate::config::ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn replicas_are_off_without_database_url_and_bounded_with_it() {
        assert!(cfg(&[]).expect("defaults").replicas.is_none());
        assert!(
            cfg(&[("DATABASE_URL", "")])
                .expect("empty")
                .replicas
                .is_none()
        );
        let url = "postgres://hp:s3cret-pw@db.example:5432/hp";
        let c = cfg(&[("DATABASE_URL", url)]).expect("valid");
        let r = c.replicas.expect("replicas on");
        assert_eq!(r.lease_ttl, std::time::Duration::from_secs(10));
        assert_eq!(r.snapshot_interval, std::time::Duration::from_secs(2));
        let shown = format!("{r:?} {}", r.database_url_redacted());
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        for (var, value) in [
            ("DATABASE_URL", "mysql://a@b/c"),
            ("DATABASE_URL", "postgres://hp:s3cret-pw@/x y"),
            ("LEASE_TTL_MS", "999"),
            ("SNAPSHOT_INTERVAL_MS", "10"),
            ("REPLICA_NAME", "no spaces"),
        ] {
            let mut vars = vec![(var, value)];
            if var != "DATABASE_URL" {
                vars.push(("DATABASE_URL", url));
            }
            let err = cfg(&vars).expect_err(value).to_string();
            assert!(err.contains(var), "{err}");
            assert!(!err.contains("s3cret-pw"), "{err}");
        }
    }
}
