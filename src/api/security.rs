//! Who may call the API and how much: the bearer token (constant-time compare), the routes
//! that stay open, the per-client rate limit on changes, CORS, and bounds on request JSON.

use std::net::IpAddr;
use std::num::NonZeroU32;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};
use utoipa::Modify;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::api::error::ApiError;
use crate::api::forwarded;

/// Deepest JSON nesting a request may have; enrollment bodies need 4.
const MAX_JSON_DEPTH: usize = 32;

/// Routes that never need the token: liveness and readiness probes, and the static pages,
/// which carry no data and ask for the token in the browser.
const OPEN_PATHS: [&str; 4] = ["/health", "/ready", "/", "/docs"];

pub struct ApiSecurity {
    token: Option<String>,
    metrics_require_token: bool,
    cors_origins: Vec<String>,
    /// Changes per client IP; `None` when `API_RATE_LIMIT_PER_MIN=0`.
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// `TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    trusted_proxies: Vec<IpNet>,
}

impl ApiSecurity {
    pub fn new(
        token: Option<String>,
        metrics_require_token: bool,
        cors_origins: Vec<String>,
        changes_per_minute: u32,
    ) -> Self {
        Self {
            token,
            metrics_require_token,
            cors_origins,
            limiter: NonZeroU32::new(changes_per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n))),
            trusted_proxies: Vec::new(),
        }
    }

    /// Believes `X-Forwarded-For` from these peers (see [`crate::api::forwarded`]).
    pub fn with_trusted_proxies(mut self, trusted: Vec<IpNet>) -> Self {
        self.trusted_proxies = trusted;
        self
    }

    /// The client the change limit counts this request against.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        forwarded::client_ip(peer, headers, &self.trusted_proxies)
    }

    pub fn needs_token(&self, path: &str) -> bool {
        if OPEN_PATHS.contains(&path) {
            return false;
        }
        path != "/metrics" || self.metrics_require_token
    }

    pub fn token_ok(&self, request: &Request) -> bool {
        self.headers_token_ok(request.headers())
    }

    /// Whether these headers carry the token (always true when no token is configured).
    pub fn headers_token_ok(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.token else {
            return true;
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time over the token's bytes, so timing does not reveal a matching prefix.
        presented.as_bytes().ct_eq(expected.as_bytes()).into()
    }

    pub fn within_rate(&self, client: IpAddr) -> bool {
        let Some(limiter) = &self.limiter else {
            return true;
        };
        // Forget idle clients now and then so the table stays small.
        if limiter.len() > 10_000 {
            limiter.retain_recent();
        }
        limiter.check_key(&client).is_ok()
    }

    pub fn cors_layer(&self) -> Option<CorsLayer> {
        if self.cors_origins.is_empty() {
            return None;
        }
        let origins: Vec<HeaderValue> = self
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        Some(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        )
    }
}

/// Parses a request body as JSON and bounds its nesting.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    if depth(&value) > MAX_JSON_DEPTH {
        return Err(ApiError::BadRequest(format!(
            "JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    Ok(value)
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Declares the bearer scheme in the OpenAPI document.
pub struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "api_token",
            Vec::<String>::new(),
        )]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_is_bounded() {
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert!(parse_json(deep.as_bytes()).is_err());
        assert!(parse_json(br#"{"a": {"b": [1, {"c": 2}]}}"#).is_ok());
    }

    #[test]
    fn open_paths_and_metrics_switch() {
        let open_metrics = ApiSecurity::new(Some("x".repeat(16)), false, vec![], 10);
        assert!(!open_metrics.needs_token("/health"));
        assert!(!open_metrics.needs_token("/metrics"));
        assert!(open_metrics.needs_token("/enrollments"));
        assert!(open_metrics.needs_token("/stats"));
        let closed_metrics = ApiSecurity::new(Some("x".repeat(16)), true, vec![], 10);
        assert!(closed_metrics.needs_token("/metrics"));
    }
}
