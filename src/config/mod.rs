//! The daemon's configuration: read once at start from the environment (and `.env` when present,
//! loaded by `main`), validated, then passed down. Nothing else in the crate reads the environment.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use url::Url;

mod api_guard;
mod raw;
mod relay;
mod replicas;
mod secrets;
mod target;

pub use api_guard::ApiGuardSettings;
pub use relay::RelaySettings;
pub use replicas::ReplicaSettings;

use raw::RawConfig;

use crate::enrollment::outcome::FailureOutcomePolicy;
use crate::enrollment::policy::{DeliveryDefaults, RetryPolicy};
use crate::enrollment::record::redact_url;
use crate::enrollment::settings::{BackoffKind, MAX_ATTEMPTS, MAX_IN_FLIGHT, MAX_PREFETCH};
use crate::enrollment::target::TargetPolicy;
use crate::seal::Keyring;

/// Why the configuration cannot be used. Every message names the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Env(#[from] envy::Error),
    #[error("invalid configuration: {var}: {reason}")]
    Invalid { var: &'static str, reason: String },
}

fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        reason: reason.into(),
    }
}

/// Largest `AMQP_CONNECTION_POOL`: a slot grows connections when the broker's channel-max is
/// reached, so a handful of slots carries thousands of enrollments.
pub const MAX_CONNECTION_POOL: usize = 256;
/// Largest `AMQP_LINKS_PER_SESSION`: RabbitMQ 4.0 takes 256 links on a session by default
/// (`link_max_per_session`); past a broker's limit an attach is refused, which may cost the
/// session and every link on it.
pub const MAX_LINKS_PER_SESSION: usize = 256;
/// Accepts per disposition at most: beyond a few hundred the saving per message is nil.
pub const MAX_SETTLE_BATCH: usize = 1000;
/// An accept waits at most a second: longer only widens what a crash redelivers.
pub const MAX_SETTLE_BATCH_DELAY_US: u64 = 1_000_000;

/// Bounds of `AMQP_MAX_MESSAGE_BYTES`: below 1 KiB hardly a message fits; above 1 GiB one
/// message (held whole while its POST runs, per in-flight slot) could take the daemon's memory.
pub const AMQP_MAX_MESSAGE_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=1024 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    /// Broker URL; may carry the SASL PLAIN user and password, so it is never printed as is
    /// (see [`Config::amqp_url_redacted`]).
    pub amqp_url: Url,
    pub http_host: IpAddr,
    pub http_port: u16,
    /// The SQLite file that mirrors the enrollment map.
    pub sqlite_path: PathBuf,
    /// A `tracing_subscriber::EnvFilter` directive such as `info` or `hot_potato=debug`.
    pub log_level: String,
    pub log_format: LogFormat,
    /// How long in-flight POSTs may run on SIGINT/SIGTERM before their tasks are aborted.
    pub shutdown_grace: Duration,
    /// How a failed delivery is handed back; `auto` follows the broker's advertised outcomes.
    pub failure_outcome: FailureOutcomePolicy,
    /// Link credit for enrollments that do not set `subscription_args.prefetch`.
    pub default_prefetch: u32,
    /// Reconnect backoff bounds (exponential with jitter between them).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Bound on TCP connect + AMQP open + attach, so a broker that accepts and stalls
    /// cannot hang a worker.
    pub amqp_connect_timeout: Duration,
    /// What an enrollment's `delivery` settings fall back to.
    pub delivery_defaults: DeliveryDefaults,
    /// `TARGET_ALLOWLIST` and `TARGET_DENY_PRIVATE`: which targets and addresses are allowed.
    pub target_policy: TargetPolicy,
    /// `TARGET_DIRECT_HTTP1`: plain-HTTP targets through the direct HTTP/1.1 client rather
    /// than reqwest (when no proxy is set).
    pub target_direct_http1: bool,

    /// Bearer token the API requires; `None` leaves the API open (bind to loopback then).
    pub api_token: Option<String>,
    /// Whether `/metrics` requires the token too.
    pub metrics_require_token: bool,
    /// Whether per-message metrics carry an `enrollment_id` label.
    pub metrics_per_enrollment: bool,
    /// Origins allowed to call the API from a browser; none by default.
    pub cors_origins: Vec<String>,
    /// Mutating requests allowed per client IP per minute; 0 turns the limit off.
    pub api_rate_limit_per_min: u32,
    /// 0: a connection per enrollment; N: enrollments share N connections.
    pub amqp_connection_pool: usize,
    /// Enrollments' links on one pooled session (`AMQP_LINKS_PER_SESSION`; 1: a session each).
    pub amqp_links_per_session: usize,
    /// The receiver link's `max-message-size`: the largest message the daemon takes in.
    pub amqp_max_message_bytes: u64,
    /// Accepts gathered into one disposition at most (`SETTLE_BATCH_MAX`; 1 turns it off).
    pub settle_batch_max: usize,
    /// How long the oldest gathered accept may wait (`SETTLE_BATCH_DELAY_US`).
    pub settle_batch_delay: Duration,
    /// `SECRETS_KEY` (seals) and `SECRETS_KEY_PREVIOUS` (still opens, during a rotation).
    pub secrets: Keyring,
    /// API timeouts, connection cap, readiness probe interval, trusted proxies.
    pub api_guard: ApiGuardSettings,
    /// `DATABASE_URL` and the lease settings: `Some` runs this daemon as one replica of many.
    pub replicas: Option<ReplicaSettings>,
    /// `PUBLISH_MAX_BYTES`, `PUBLISH_ADDRESSES`, `REPLY_ADDRESS`.
    pub relay: RelaySettings,
}

impl Config {
    /// Reads and validates the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads and validates the configuration from `(NAME, value)` pairs.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = envy::from_iter(vars)?;
        Self::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let amqp_url = Url::parse(&raw.amqp_url)
            .map_err(|e| invalid("AMQP_URL", format!("not a URL ({e})")))?;
        if !matches!(amqp_url.scheme(), "amqp" | "amqps") {
            return Err(invalid("AMQP_URL", "scheme must be amqp or amqps"));
        }
        if amqp_url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("AMQP_URL", "has no host"));
        }
        let http_host: IpAddr = raw
            .http_host
            .parse()
            .map_err(|_| invalid("HTTP_HOST", "must be an IP address such as 127.0.0.1"))?;
        if raw.sqlite_backup_path.as_os_str().is_empty() {
            return Err(invalid("SQLITE_BACKUP_PATH", "must not be empty"));
        }
        if tracing_subscriber::EnvFilter::try_new(&raw.log_level).is_err() {
            return Err(invalid(
                "LOG_LEVEL",
                "must be a level (error, warn, info, debug, trace) or a tracing filter directive",
            ));
        }
        let log_format = match raw.log_format.as_deref().map(str::trim) {
            None | Some("") | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(_) => return Err(invalid("LOG_FORMAT", "must be text or json")),
        };
        let failure_outcome = match raw.failure_outcome.as_deref().map(str::trim) {
            None | Some("") => FailureOutcomePolicy::Auto,
            Some(v) => v
                .parse()
                .map_err(|_| invalid("FAILURE_OUTCOME", "must be auto, released or modified"))?,
        };
        if raw.delivery_timeout_ms == 0 {
            return Err(invalid("DELIVERY_TIMEOUT_MS", "must be greater than 0"));
        }
        if raw.default_prefetch == 0 || raw.default_prefetch > MAX_PREFETCH {
            return Err(invalid(
                "DEFAULT_PREFETCH",
                format!("must be between 1 and {MAX_PREFETCH}"),
            ));
        }
        if raw.reconnect_min_ms == 0 {
            return Err(invalid("RECONNECT_MIN_MS", "must be greater than 0"));
        }
        if raw.reconnect_max_ms < raw.reconnect_min_ms {
            return Err(invalid(
                "RECONNECT_MAX_MS",
                "must not be smaller than RECONNECT_MIN_MS",
            ));
        }
        if raw.amqp_connect_timeout_ms == 0 {
            return Err(invalid("AMQP_CONNECT_TIMEOUT_MS", "must be greater than 0"));
        }
        if !(1..=MAX_IN_FLIGHT).contains(&raw.delivery_max_in_flight) {
            return Err(invalid(
                "DELIVERY_MAX_IN_FLIGHT",
                format!("must be from 1 to {MAX_IN_FLIGHT}"),
            ));
        }
        if !(1..=MAX_ATTEMPTS).contains(&raw.retry_max_attempts) {
            return Err(invalid(
                "RETRY_MAX_ATTEMPTS",
                format!("must be from 1 to {MAX_ATTEMPTS}"),
            ));
        }
        let retry_backoff = match raw.retry_backoff.as_deref().map(str::trim) {
            None | Some("") => BackoffKind::Exponential,
            Some(v) => v
                .parse()
                .map_err(|_| invalid("RETRY_BACKOFF", "must be fixed, linear or exponential"))?,
        };
        if raw.retry_base_ms == 0 {
            return Err(invalid("RETRY_BASE_MS", "must be greater than 0"));
        }
        if raw.retry_max_ms < raw.retry_base_ms {
            return Err(invalid(
                "RETRY_MAX_MS",
                "must not be smaller than RETRY_BASE_MS",
            ));
        }
        if raw.breaker_open_ms == 0 {
            return Err(invalid("BREAKER_OPEN_MS", "must be greater than 0"));
        }
        let target_policy =
            target::target_policy(raw.target_allowlist.as_deref(), raw.target_deny_private)?;
        let response_max_bytes = target::response_max_bytes(raw.response_max_bytes)?;
        if raw.amqp_connection_pool > MAX_CONNECTION_POOL {
            return Err(invalid(
                "AMQP_CONNECTION_POOL",
                format!(
                    "must be from 0 (a connection per enrollment) to {}",
                    MAX_CONNECTION_POOL
                ),
            ));
        }
        if !(1..=MAX_LINKS_PER_SESSION).contains(&raw.amqp_links_per_session) {
            return Err(invalid(
                "AMQP_LINKS_PER_SESSION",
                format!("must be from 1 (a session per enrollment) to {MAX_LINKS_PER_SESSION}"),
            ));
        }
        if raw.amqp_links_per_session > 1 && raw.amqp_connection_pool == 0 {
            return Err(invalid(
                "AMQP_LINKS_PER_SESSION",
                "shares sessions of pooled connections: set AMQP_CONNECTION_POOL too".to_string(),
            ));
        }
        if !(1..=MAX_SETTLE_BATCH).contains(&raw.settle_batch_max) {
            return Err(invalid(
                "SETTLE_BATCH_MAX",
                format!("must be from 1 (an accept per message) to {MAX_SETTLE_BATCH}"),
            ));
        }
        if raw.settle_batch_delay_us > MAX_SETTLE_BATCH_DELAY_US {
            return Err(invalid(
                "SETTLE_BATCH_DELAY_US",
                format!("must be from 0 to {MAX_SETTLE_BATCH_DELAY_US} (1 s)"),
            ));
        }
        if !AMQP_MAX_MESSAGE_BYTES_RANGE.contains(&raw.amqp_max_message_bytes) {
            return Err(invalid(
                "AMQP_MAX_MESSAGE_BYTES",
                format!(
                    "must be from {} (1 KiB) to {} (1 GiB)",
                    AMQP_MAX_MESSAGE_BYTES_RANGE.start(),
                    AMQP_MAX_MESSAGE_BYTES_RANGE.end()
                ),
            ));
        }
        let api_guard = ApiGuardSettings::from_raw(&raw)?;
        let relay = RelaySettings::from_raw(&raw)?;
        let api_token = raw.api_token.filter(|t| !t.is_empty());
        if api_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(invalid("API_TOKEN", "must be at least 16 characters"));
        }
        let mut cors_origins = Vec::new();
        for origin in raw
            .cors_origins
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let parsed = Url::parse(origin)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/");
            if parsed.is_none() || axum::http::HeaderValue::from_str(origin).is_err() {
                return Err(invalid(
                    "CORS_ORIGINS",
                    format!("`{origin}` is not an origin such as https://ops.example.com"),
                ));
            }
            cors_origins.push(origin.trim_end_matches('/').to_string());
        }
        let delivery_defaults = DeliveryDefaults {
            max_in_flight: raw.delivery_max_in_flight,
            timeout: Duration::from_millis(raw.delivery_timeout_ms),
            retry: RetryPolicy {
                max_attempts: raw.retry_max_attempts,
                backoff: retry_backoff,
                base_ms: raw.retry_base_ms,
                max_ms: raw.retry_max_ms,
                jitter: raw.retry_jitter,
            },
            breaker_threshold: raw.breaker_failure_threshold,
            breaker_open: Duration::from_millis(raw.breaker_open_ms),
            response_max_bytes,
        };
        Ok(Config {
            amqp_url,
            http_host,
            http_port: raw.http_port,
            sqlite_path: raw.sqlite_backup_path,
            log_level: raw.log_level,
            log_format,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            failure_outcome,
            default_prefetch: raw.default_prefetch,
            reconnect_min: Duration::from_millis(raw.reconnect_min_ms),
            reconnect_max: Duration::from_millis(raw.reconnect_max_ms),
            amqp_connect_timeout: Duration::from_millis(raw.amqp_connect_timeout_ms),
            delivery_defaults,
            target_policy,
            target_direct_http1: raw.target_direct_http1,
            api_token,
            metrics_require_token: raw.metrics_require_token,
            metrics_per_enrollment: raw.metrics_per_enrollment,
            cors_origins,
            api_rate_limit_per_min: raw.api_rate_limit_per_min,
            amqp_connection_pool: raw.amqp_connection_pool,
            amqp_links_per_session: raw.amqp_links_per_session,
            amqp_max_message_bytes: raw.amqp_max_message_bytes,
            settle_batch_max: raw.settle_batch_max,
            settle_batch_delay: Duration::from_micros(raw.settle_batch_delay_us),
            secrets: secrets::from_raw(raw.secrets_key, raw.secrets_key_previous)?,
            api_guard,
            replicas: replicas::replica_settings(
                raw.database_url,
                raw.lease_ttl_ms,
                raw.snapshot_interval_ms,
                raw.replica_name,
            )?,
            relay,
        })
    }

    /// The broker URL with any password replaced, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(&self.amqp_url)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("amqp_url", &self.amqp_url_redacted())
            .field("http_host", &self.http_host)
            .field("http_port", &self.http_port)
            .field("sqlite_path", &self.sqlite_path)
            .field("log_level", &self.log_level)
            .field("log_format", &self.log_format)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("failure_outcome", &self.failure_outcome)
            .field("default_prefetch", &self.default_prefetch)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("amqp_connect_timeout", &self.amqp_connect_timeout)
            .field("delivery_defaults", &self.delivery_defaults)
            .field("target_policy", &self.target_policy)
            .field("api_token", &self.api_token.as_ref().map(|_| "***"))
            .field("metrics_require_token", &self.metrics_require_token)
            .field("metrics_per_enrollment", &self.metrics_per_enrollment)
            .field("target_direct_http1", &self.target_direct_http1)
            .field("cors_origins", &self.cors_origins)
            .field("api_rate_limit_per_min", &self.api_rate_limit_per_min)
            .field("amqp_connection_pool", &self.amqp_connection_pool)
            .field("amqp_links_per_session", &self.amqp_links_per_session)
            .field("amqp_max_message_bytes", &self.amqp_max_message_bytes)
            .field("settle_batch_max", &self.settle_batch_max)
            .field("settle_batch_delay", &self.settle_batch_delay)
            .field("secrets", &self.secrets)
            .field("api_guard", &self.api_guard)
            .field("replicas", &self.replicas)
            .field("relay", &self.relay)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.amqp_url.as_str(), "amqp://localhost:5672");
        assert_eq!(c.http_port, 8080);
        assert_eq!(c.sqlite_path, PathBuf::from("hotpotato.sqlite"));
        assert_eq!(c.failure_outcome, FailureOutcomePolicy::Auto);
        assert_eq!(c.amqp_max_message_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn the_message_size_bound_takes_1_kib_to_1_gib() {
        for (value, ok) in [
            ("1023", false),
            ("1024", true),
            ("1048576", true),
            ("1073741824", true),
            ("1073741825", false),
            ("0", false),
            ("-1", false),
            ("64MiB", false),
        ] {
            let got = cfg(&[("AMQP_MAX_MESSAGE_BYTES", value)]);
            match got {
                Ok(c) if ok => assert_eq!(c.amqp_max_message_bytes.to_string(), value),
                Err(e) if !ok => {
                    assert!(
                        e.to_string().contains("AMQP_MAX_MESSAGE_BYTES"),
                        "{value}: {e}"
                    )
                }
                other => panic!("{value}: {:?}", other.map(|c| c.amqp_max_message_bytes)),
            }
        }
    }

    #[test]
    fn links_per_session_take_1_to_256_and_need_a_pool() {
        let pooled = |links: &str| {
            cfg(&[
                ("AMQP_CONNECTION_POOL", "2"),
                ("AMQP_LINKS_PER_SESSION", links),
            ])
            .map(|c| c.amqp_links_per_session)
        };
        assert_eq!(cfg(&[]).map(|c| c.amqp_links_per_session).ok(), Some(1));
        assert_eq!(pooled("1").ok(), Some(1));
        assert_eq!(pooled("256").ok(), Some(256));
        for refused in [
            pooled("0"),
            pooled("257"),
            cfg(&[("AMQP_LINKS_PER_SESSION", "8")]).map(|_| 0),
        ] {
            let e = refused.expect_err("refused");
            assert!(e.to_string().contains("AMQP_LINKS_PER_SESSION"), "{e}");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        for (vars, name) in [
            (vec![("HTTP_PORT", "eighty")], "HTTP_PORT"),
            (vec![("AMQP_URL", "http://x")], "AMQP_URL"),
            (vec![("AMQP_URL", "not a url")], "AMQP_URL"),
            (vec![("HTTP_HOST", "example.com")], "HTTP_HOST"),
            (vec![("FAILURE_OUTCOME", "rejected")], "FAILURE_OUTCOME"),
            (vec![("DEFAULT_PREFETCH", "0")], "DEFAULT_PREFETCH"),
            (vec![("LOG_LEVEL", "[")], "LOG_LEVEL"),
            (vec![("RETRY_BACKOFF", "random")], "RETRY_BACKOFF"),
            (vec![("RETRY_MAX_ATTEMPTS", "0")], "RETRY_MAX_ATTEMPTS"),
            (
                vec![("TARGET_ALLOWLIST", "a.test, not valid")],
                "TARGET_ALLOWLIST",
            ),
            (
                vec![("DELIVERY_MAX_IN_FLIGHT", "0")],
                "DELIVERY_MAX_IN_FLIGHT",
            ),
        ] {
            let err = cfg(&vars).expect_err("must be refused").to_string();
            assert!(err.contains(name), "{err} should name {name}");
        }
    }

    #[test]
    fn debug_output_hides_the_broker_password() {
        let c = cfg(&[
            ("AMQP_URL", "amqp://guest:s3cret@localhost:5672"),
            ("API_TOKEN", "t0ken-t0ken-t0ken-x"),
        ])
        .expect("valid");
        assert!(!format!("{c:?}").contains("t0ken"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("guest"));
    }
}
