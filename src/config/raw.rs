//! The environment as it comes, before validation: one field per variable (envy's mapping of
//! the lower-cased name) and its default.

use std::path::PathBuf;

use serde::Deserialize;

use super::replicas::RawDatabaseUrl;
use super::secrets::RawSecret;

/// Raw values as they come from the environment; field names are the variable names in
/// lower case (envy's mapping), so renaming a field renames a public variable.
#[derive(Debug, Deserialize)]
pub(super) struct RawConfig {
    #[serde(default = "default_amqp_url")]
    pub(super) amqp_url: String,
    #[serde(default = "default_http_host")]
    pub(super) http_host: String,
    #[serde(default = "default_http_port")]
    pub(super) http_port: u16,
    #[serde(default = "default_sqlite_path")]
    pub(super) sqlite_backup_path: PathBuf,
    #[serde(default = "default_log_level")]
    pub(super) log_level: String,
    #[serde(default)]
    pub(super) log_format: Option<String>,
    #[serde(default = "default_delivery_timeout_ms")]
    pub(super) delivery_timeout_ms: u64,
    #[serde(default = "default_shutdown_grace_ms")]
    pub(super) shutdown_grace_ms: u64,
    #[serde(default)]
    pub(super) failure_outcome: Option<String>,
    #[serde(default = "default_prefetch")]
    pub(super) default_prefetch: u32,
    #[serde(default = "default_reconnect_min_ms")]
    pub(super) reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub(super) reconnect_max_ms: u64,
    #[serde(default = "default_amqp_connect_timeout_ms")]
    pub(super) amqp_connect_timeout_ms: u64,
    #[serde(default = "default_max_in_flight")]
    pub(super) delivery_max_in_flight: u32,
    #[serde(default = "default_retry_max_attempts")]
    pub(super) retry_max_attempts: u32,
    #[serde(default)]
    pub(super) retry_backoff: Option<String>,
    #[serde(default = "default_retry_base_ms")]
    pub(super) retry_base_ms: u64,
    #[serde(default = "default_retry_max_ms")]
    pub(super) retry_max_ms: u64,
    #[serde(default = "default_true")]
    pub(super) retry_jitter: bool,
    #[serde(default = "default_breaker_failure_threshold")]
    pub(super) breaker_failure_threshold: u32,
    #[serde(default = "default_breaker_open_ms")]
    pub(super) breaker_open_ms: u64,
    #[serde(default)]
    pub(super) target_allowlist: Option<String>,
    #[serde(default)]
    pub(super) target_deny_private: bool,
    #[serde(default = "default_response_max_bytes")]
    pub(super) response_max_bytes: u64,
    #[serde(default)]
    pub(super) api_token: Option<String>,
    #[serde(default)]
    pub(super) metrics_require_token: bool,
    #[serde(default = "default_true")]
    pub(super) metrics_per_enrollment: bool,
    #[serde(default = "default_true")]
    pub(super) target_direct_http1: bool,
    #[serde(default)]
    pub(super) cors_origins: Option<String>,
    #[serde(default = "default_api_rate_limit_per_min")]
    pub(super) api_rate_limit_per_min: u32,
    #[serde(default)]
    pub(super) amqp_connection_pool: usize,
    #[serde(default = "default_amqp_links_per_session")]
    pub(super) amqp_links_per_session: usize,
    #[serde(default = "default_amqp_max_message_bytes")]
    pub(super) amqp_max_message_bytes: u64,
    #[serde(default = "default_settle_batch_max")]
    pub(super) settle_batch_max: usize,
    #[serde(default = "default_settle_batch_delay_us")]
    pub(super) settle_batch_delay_us: u64,
    #[serde(default)]
    pub(super) secrets_key: Option<RawSecret>,
    #[serde(default)]
    pub(super) secrets_key_previous: Option<RawSecret>,
    #[serde(default = "default_api_header_timeout_ms")]
    pub(super) api_header_timeout_ms: u64,
    #[serde(default = "default_api_request_timeout_ms")]
    pub(super) api_request_timeout_ms: u64,
    #[serde(default = "default_api_max_connections")]
    pub(super) api_max_connections: usize,
    #[serde(default = "default_ready_probe_interval_ms")]
    pub(super) ready_probe_interval_ms: u64,
    #[serde(default)]
    pub(super) trusted_proxies: Option<String>,
    #[serde(default)]
    pub(super) database_url: Option<RawDatabaseUrl>,
    #[serde(default = "default_lease_ttl_ms")]
    pub(super) lease_ttl_ms: u64,
    #[serde(default = "default_snapshot_interval_ms")]
    pub(super) snapshot_interval_ms: u64,
    #[serde(default)]
    pub(super) replica_name: Option<String>,
    #[serde(default = "default_publish_max_bytes")]
    pub(super) publish_max_bytes: u64,
    #[serde(default)]
    pub(super) publish_addresses: Option<String>,
    #[serde(default)]
    pub(super) reply_address: Option<String>,
}

fn default_publish_max_bytes() -> u64 {
    1024 * 1024
}

fn default_amqp_url() -> String {
    "amqp://localhost:5672".into()
}
fn default_http_host() -> String {
    "127.0.0.1".into()
}
fn default_http_port() -> u16 {
    8080
}
fn default_sqlite_path() -> PathBuf {
    "hotpotato.sqlite".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_delivery_timeout_ms() -> u64 {
    10_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_prefetch() -> u32 {
    // Measured: a bare receiver drained a local quorum queue 27 % faster at 1000 than at 200
    // (README, Configuration).
    1000
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    30_000
}
fn default_amqp_connect_timeout_ms() -> u64 {
    10_000
}
fn default_amqp_max_message_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_settle_batch_max() -> usize {
    64
}
fn default_settle_batch_delay_us() -> u64 {
    500
}

fn default_response_max_bytes() -> u64 {
    64 * 1024
}

fn default_max_in_flight() -> u32 {
    1
}
fn default_retry_max_attempts() -> u32 {
    5
}
fn default_retry_base_ms() -> u64 {
    1_000
}
fn default_retry_max_ms() -> u64 {
    30_000
}
fn default_api_rate_limit_per_min() -> u32 {
    120
}
fn default_true() -> bool {
    true
}
fn default_breaker_failure_threshold() -> u32 {
    5
}
fn default_breaker_open_ms() -> u64 {
    5_000
}
fn default_api_header_timeout_ms() -> u64 {
    10_000
}
fn default_api_request_timeout_ms() -> u64 {
    30_000
}
fn default_api_max_connections() -> usize {
    512
}
fn default_ready_probe_interval_ms() -> u64 {
    5_000
}
fn default_lease_ttl_ms() -> u64 {
    10_000
}
fn default_snapshot_interval_ms() -> u64 {
    2_000
}

fn default_amqp_links_per_session() -> usize {
    1
}
