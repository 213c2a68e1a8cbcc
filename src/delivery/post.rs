//! One POST to a target, bounded in time, and what came back.

use std::time::Duration;

use reqwest::header::HeaderMap;
use url::Url;

use crate::delivery::request::PushRequest;

/// What came back from one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostResult {
    /// The target answered; `retry_after` is its `Retry-After` on a 429 or 503.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    Timeout,
    /// Connection refused, reset, DNS failure, TLS failure…
    Network(String),
}

impl PostResult {
    pub fn code(&self) -> Option<u16> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Status { code, .. } => format!("target answered {code}"),
            Self::Timeout => "target timed out".to_string(),
            Self::Network(e) => format!("target unreachable: {e}"),
        }
    }
}

/// Sends one POST, bounded by `timeout` from connect to the end of the response body.
pub async fn post(
    client: &reqwest::Client,
    target_url: &Url,
    request: &PushRequest,
    extra_headers: HeaderMap,
    timeout: Duration,
) -> PostResult {
    let mut headers = request.headers.clone();
    headers.extend(extra_headers);
    let sent = client
        .post(target_url.clone())
        .headers(headers)
        .body(request.body.clone())
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let code = response.status().as_u16();
            let retry_after = if code == 429 || code == 503 {
                response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after)
            } else {
                None
            };
            // Drain the body so the pooled connection can be reused; its content is ignored.
            let _ = response.bytes().await;
            PostResult::Status { code, retry_after }
        }
        Err(e) if e.is_timeout() => PostResult::Timeout,
        // The URL may carry credentials: keep it out of the error text.
        Err(e) => PostResult::Network(error_chain(&e.without_url())),
    }
}

/// Time since an epoch-milliseconds instant; `None` for one in the future (clock skew).
pub fn age_since(created_ms: i64) -> Option<Duration> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    u64::try_from(now_ms - created_ms)
        .ok()
        .map(Duration::from_millis)
}

/// `Retry-After` as delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
