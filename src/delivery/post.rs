//! One POST to a target, bounded in time, and what came back.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use url::Url;

use crate::delivery::request::PushRequest;
use crate::delivery::resolver::blocked_in;

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
    /// The target rules refused every address the target's name resolved to: no connection
    /// was made, and none will be until the name or the rules change.
    Blocked(String),
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
            Self::Blocked(reason) => reason.clone(),
        }
    }
}

/// A target's answer kept whole for a reply: status, headers and at most `max_body` bytes
/// of the body (`truncated` when there was more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    pub truncated: bool,
}

/// The message's headers with the attempt's (static, signature) on top.
pub fn request_headers(request: &PushRequest, extra_headers: HeaderMap) -> HeaderMap {
    let mut headers = request.headers.clone();
    merge(&mut headers, extra_headers);
    headers
}

/// Sends one POST through reqwest, bounded by `timeout` from connect to the end of the
/// response body, of which at most `max_body` bytes are read.
/// With `keep`, the answer is kept too (status, headers, body up to the bound), for a reply.
pub async fn post(
    client: &reqwest::Client,
    target_url: &Url,
    headers: HeaderMap,
    body: Bytes,
    (timeout, max_body): (Duration, usize),
    keep: bool,
) -> (PostResult, Option<Answer>) {
    let sent = client
        .post(target_url.clone())
        .headers(headers)
        .body(body)
        .timeout(timeout)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let code = response.status().as_u16();
            let retry_after = retry_after(code, response.headers());
            let headers = keep.then(|| response.headers().clone());
            let (body, truncated) = drain(response, max_body, keep).await;
            let answer = headers.map(|headers| Answer {
                status: code,
                headers,
                body: Bytes::from(body),
                truncated,
            });
            (PostResult::Status { code, retry_after }, answer)
        }
        Err(e) if e.is_timeout() => (PostResult::Timeout, None),
        Err(e) if blocked_in(&e).is_some() => (
            PostResult::Blocked(blocked_in(&e).map(ToString::to_string).unwrap_or_default()),
            None,
        ),
        // The URL may carry credentials: keep it out of the error text.
        Err(e) => (PostResult::Network(error_chain(&e.without_url())), None),
    }
}

/// The answer's `Retry-After`, read on a 429 or 503 only.
pub fn retry_after(code: u16, headers: &HeaderMap) -> Option<Duration> {
    if code != 429 && code != 503 {
        return None;
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

/// Reads the answer's body to its end, so the pooled connection can be reused, unless it is
/// longer than `max_body`: then the response is dropped unread, which closes the connection,
/// and a target streaming without end costs at most one chunk beyond the bound.
/// With `keep`, the bytes read (at most `max_body`) are returned, and whether there were more.
async fn drain(mut response: reqwest::Response, max_body: usize, keep: bool) -> (Vec<u8>, bool) {
    let mut body = BoundedBody::new(max_body, keep);
    while let Ok(Some(chunk)) = response.chunk().await {
        if !body.add(&chunk) {
            return (body.kept, true);
        }
    }
    (body.kept, false)
}

/// An answer's body as it is read: counted against `max_body` and, with `keep`, kept up to it.
pub struct BoundedBody {
    read: usize,
    pub kept: Vec<u8>,
    max_body: usize,
    keep: bool,
}

impl BoundedBody {
    pub fn new(max_body: usize, keep: bool) -> Self {
        Self {
            read: 0,
            kept: Vec::new(),
            max_body,
            keep,
        }
    }

    /// Counts (and keeps) one chunk; `false` once the body is longer than the bound, when
    /// the caller stops reading and drops the connection.
    pub fn add(&mut self, chunk: &[u8]) -> bool {
        self.read = self.read.saturating_add(chunk.len());
        if self.keep {
            let room = self.max_body.saturating_sub(self.kept.len());
            self.kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if self.read > self.max_body {
            tracing::debug!(
                max_body = self.max_body,
                "target's answer is longer than RESPONSE_MAX_BYTES; dropping the connection"
            );
            return false;
        }
        true
    }
}

/// Time since an epoch-milliseconds instant; `None` for one in the future (clock skew) or
/// one no clock could mean.
pub fn age_since(created_ms: i64) -> Option<Duration> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    age_at(i64::try_from(now.as_millis()).ok()?, created_ms)
}

/// `now_ms - created_ms`. The creation-time is the publisher's word: anything before the
/// epoch is taken as no creation-time, and the checked subtraction covers the rest.
fn age_at(now_ms: i64, created_ms: i64) -> Option<Duration> {
    if created_ms < 0 {
        return None;
    }
    let age = now_ms.checked_sub(created_ms)?;
    u64::try_from(age).ok().map(Duration::from_millis)
}

/// Adds `extra` to `headers`, each of its names replacing that name's values (as
/// `HeaderMap::extend` does), without `extend`'s panic should the map be full: the mapping
/// bounds the message's headers and enrollment validation the static ones, so a header left
/// out here only means one of those bounds was lifted.
fn merge(headers: &mut HeaderMap, extra: HeaderMap) {
    let mut current = None;
    for (name, value) in extra {
        if let Some(name) = name {
            headers.remove(&name);
            current = Some(name);
        }
        if let Some(name) = &current
            && headers.try_append(name, value).is_err()
        {
            tracing::warn!(header = %name, "request headers full; header left out");
        }
    }
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

pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn absurd_creation_times_have_no_age() {
        let now = 1_700_000_000_000;
        assert_eq!(age_at(now, now - 1500), Some(Duration::from_millis(1500)));
        assert_eq!(age_at(now, now + 1), None, "in the future");
        assert_eq!(age_at(now, i64::MAX), None);
        assert_eq!(age_at(now, i64::MIN), None);
        assert_eq!(age_at(now, -1), None);
        assert_eq!(
            age_at(i64::MAX, 0),
            Some(Duration::from_millis(i64::MAX as u64))
        );
        assert_eq!(age_since(i64::MIN), None);
        assert_eq!(age_since(i64::MAX), None);
        assert!(age_since(0).is_some());
    }

    #[test]
    fn merged_names_replace_and_repeat() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("old"));
        headers.append("x-a", HeaderValue::from_static("older"));
        headers.append("x-keep", HeaderValue::from_static("k"));
        let mut extra = HeaderMap::new();
        extra.append("x-a", HeaderValue::from_static("new1"));
        extra.append("x-a", HeaderValue::from_static("new2"));
        extra.append("x-b", HeaderValue::from_static("b"));
        merge(&mut headers, extra);
        let a: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["new1", "new2"]);
        assert_eq!(headers["x-b"], "b");
        assert_eq!(headers["x-keep"], "k");
    }

    /// The vendored reqwest skips parsing a request's URL back when no redirect was followed
    /// (vendor/reqwest/PATCHES.md); a client that follows redirects must still see where one
    /// led and still drop the credentials on the way to another host.
    #[tokio::test]
    async fn the_patched_client_still_follows_redirects_as_before() {
        use axum::http::{HeaderMap as Headers, StatusCode, header};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = axum::Router::new()
            .route(
                "/from",
                axum::routing::post(move || async move {
                    let to = format!("http://localhost:{port}/to");
                    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)])
                }),
            )
            .route(
                "/to",
                axum::routing::post(|headers: Headers| async move {
                    if headers.contains_key(header::AUTHORIZATION) {
                        "auth"
                    } else {
                        "none"
                    }
                }),
            );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let direct = Url::parse(&format!("http://127.0.0.1:{port}/to")).expect("url");
        let answer = client.post(direct.clone()).send().await.expect("answer");
        assert_eq!(answer.url(), &direct);
        let redirected = client
            .post(format!("http://127.0.0.1:{port}/from"))
            .header(header::AUTHORIZATION, "Bearer secret")
            .body("x")
            .send()
            .await
            .expect("answer");
        assert_eq!(
            redirected.url().as_str(),
            format!("http://localhost:{port}/to")
        );
        assert_eq!(redirected.text().await.expect("body"), "none");
        server.abort();
    }
}
