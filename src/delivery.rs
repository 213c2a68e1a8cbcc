//! Turning one AMQP message into an HTTP POST, sending it (with retries, the circuit breaker
//! and the rate limit of its enrollment), and deciding from the answers what the broker is
//! told. The message mapping is a pure function; the status decision is [`crate::policy::verdict`].

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::amqp_link::Settlement;
use crate::breaker::{BreakerState, CircuitBreaker, Health, Permit};
use crate::metrics::{EnrollmentMetrics, Metrics, status_class};
use crate::policy::{DeliveryPolicy, Verdict, verdict};
use crate::registry::{EnrollmentStatus, Entry};
use crate::signing;
use crate::worker::StopSignals;
use url::Url;

/// Prefix of the headers that carry the AMQP properties; application properties get
/// [`APP_PROPERTY_PREFIX`] followed by the property name in lower case.
pub const HEADER_PREFIX: &str = "amqp-";
pub const APP_PROPERTY_PREFIX: &str = "amqp-app-";
pub const ENROLLMENT_HEADER: &str = "hot-potato-enrollment-id";

const OCTET_STREAM: &str = "application/octet-stream";
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

/// The POST a message becomes.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub body: Bytes,
    pub headers: HeaderMap,
    /// Kept for logs; never the body.
    pub message_id: Option<String>,
    /// The message's creation-time (epoch ms), for the end-to-end age metric.
    pub created_at_ms: Option<i64>,
}

impl PushRequest {
    /// Maps a message to a POST:
    /// - body: Data sections' bytes verbatim (concatenated when there are several); an
    ///   AmqpValue string as UTF-8; any other AmqpValue, or the AmqpSequence sections'
    ///   items as one JSON array, as JSON; no body section → empty body;
    /// - `Content-Type`: the message's `content-type`, else a default for the body kind;
    /// - AMQP metadata as `amqp-*` headers and application properties as `amqp-app-*`.
    pub fn from_message(
        message: &Message<Body<Value>>,
        enrollment_header: &HeaderValue,
        delivery_count: u32,
    ) -> Self {
        let (body, default_type) = body_bytes(&message.body);
        let mut headers = HeaderMap::new();
        let props = message.properties.as_ref();
        let content_type = props
            .and_then(|p| p.content_type.as_ref())
            .map(|s| s.as_str().to_owned())
            .or_else(|| default_type.map(str::to_owned));
        if let Some(ct) = content_type {
            insert(&mut headers, CONTENT_TYPE.as_str(), &ct);
        }
        let message_id = props
            .and_then(|p| p.message_id.as_ref())
            .map(message_id_text);
        if let Some(id) = &message_id {
            insert(&mut headers, "amqp-message-id", id);
        }
        if let Some(p) = props {
            if let Some(id) = &p.correlation_id {
                insert(&mut headers, "amqp-correlation-id", &message_id_text(id));
            }
            if let Some(subject) = &p.subject {
                insert(&mut headers, "amqp-subject", subject);
            }
            if let Some(reply_to) = &p.reply_to {
                insert(&mut headers, "amqp-reply-to", reply_to);
            }
            if let Some(ts) = &p.creation_time {
                insert(
                    &mut headers,
                    "amqp-creation-time",
                    &ts.milliseconds().to_string(),
                );
            }
        }
        insert(
            &mut headers,
            "amqp-delivery-count",
            &delivery_count.to_string(),
        );
        headers.insert(ENROLLMENT_HEADER, enrollment_header.clone());
        if let Some(app) = &message.application_properties {
            for (key, value) in app.0.iter() {
                let name = format!("{APP_PROPERTY_PREFIX}{}", key.to_ascii_lowercase());
                insert(&mut headers, &name, &simple_value_text(value));
            }
        }
        Self {
            body,
            headers,
            message_id,
            created_at_ms: props
                .and_then(|p| p.creation_time.as_ref())
                .map(|t| t.milliseconds()),
        }
    }
}

/// Adds a header, skipping names or values HTTP cannot carry (a property named with a space,
/// a value with a newline): losing one header beats never delivering the message.
fn insert(headers: &mut HeaderMap, name: &str, value: &str) {
    match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => {
            headers.append(n, v);
        }
        _ => tracing::debug!(header = name, "skipped a header HTTP cannot carry"),
    }
}

fn body_bytes(body: &Body<Value>) -> (Bytes, Option<&'static str>) {
    match body {
        Body::Data(sections) => {
            let bytes: Vec<u8> = sections.iter().flat_map(|d| d.0.iter().copied()).collect();
            (Bytes::from(bytes), Some(OCTET_STREAM))
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => (Bytes::from(s.clone()), Some(TEXT_PLAIN)),
            other => (json_bytes(&value_to_json(other)), Some(JSON)),
        },
        Body::Sequence(sections) => {
            let items: Vec<serde_json::Value> = sections
                .iter()
                .flat_map(|s| s.0.iter().map(value_to_json))
                .collect();
            (json_bytes(&serde_json::Value::Array(items)), Some(JSON))
        }
        Body::Empty => (Bytes::new(), None),
    }
}

fn json_bytes(v: &serde_json::Value) -> Bytes {
    // Serialising a serde_json::Value cannot fail (string keys only).
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => Uuid::from_bytes(u.clone().into_inner()).to_string(),
        MessageId::Binary(b) => BASE64.encode(b),
    }
}

fn simple_value_text(v: &SimpleValue) -> String {
    match value_to_json(&Value::from(v.clone())) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An AMQP value as JSON: numbers as numbers, binary as base64, timestamps as epoch
/// milliseconds, maps as objects (non-string keys rendered as text), described values as
/// their value.
pub fn value_to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Described(d) => value_to_json(&d.value),
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Ubyte(n) => J::from(*n),
        Value::Ushort(n) => J::from(*n),
        Value::Uint(n) => J::from(*n),
        Value::Ulong(n) => J::from(*n),
        Value::Byte(n) => J::from(*n),
        Value::Short(n) => J::from(*n),
        Value::Int(n) => J::from(*n),
        Value::Long(n) => J::from(*n),
        Value::Float(f) => J::from(f64::from(f.0)),
        Value::Double(f) => J::from(f.0),
        Value::Decimal32(d) => J::String(format!("{d:?}")),
        Value::Decimal64(d) => J::String(format!("{d:?}")),
        Value::Decimal128(d) => J::String(format!("{d:?}")),
        Value::Char(c) => J::String(c.to_string()),
        Value::Timestamp(t) => J::from(t.milliseconds()),
        Value::Uuid(u) => J::String(Uuid::from_bytes(u.clone().into_inner()).to_string()),
        Value::Binary(b) => J::String(BASE64.encode(b)),
        Value::String(s) => J::String(s.clone()),
        Value::Symbol(s) => J::String(s.0.clone()),
        Value::List(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Array(items) => J::Array(items.0.iter().map(value_to_json).collect()),
        Value::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match value_to_json(k) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, value_to_json(v))
                })
                .collect(),
        ),
    }
}

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

    fn describe(&self) -> String {
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
fn age_since(created_ms: i64) -> Option<Duration> {
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

/// One enrollment's delivery machinery, shared by its in-flight messages: the policy, the
/// headers every POST carries, the circuit breaker and the rate limiter. It lives as long as
/// the worker, across reconnects, so breaker and limiter state survive a broker hiccup.
pub struct Dispatcher {
    http: reqwest::Client,
    /// Parsed once: reqwest would otherwise parse (and IDNA-map) the string per request.
    target_url: Url,
    /// `hot-potato-enrollment-id`, built once.
    enrollment_header: HeaderValue,
    policy: DeliveryPolicy,
    static_headers: HeaderMap,
    signing_key: Option<Vec<u8>>,
    pub breaker: CircuitBreaker,
    limiter: Option<DefaultDirectRateLimiter>,
    status: Arc<EnrollmentStatus>,
    metrics: EnrollmentMetrics,
}

impl Dispatcher {
    pub fn new(
        http: reqwest::Client,
        entry: &Entry,
        metrics: &Metrics,
    ) -> Result<Self, url::ParseError> {
        let policy = entry.policy.clone();
        let limiter = policy.rate_limit_per_sec.and_then(|rate| {
            Quota::with_period(Duration::from_secs_f64(1.0 / rate)).map(RateLimiter::direct)
        });
        let target_url = Url::parse(&entry.enrollment.target_url)?;
        let enrollment_header = HeaderValue::from_str(&entry.enrollment.id.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        Ok(Self {
            http,
            target_url,
            enrollment_header,
            static_headers: signing::static_headers(&policy),
            signing_key: policy
                .signing
                .as_ref()
                .and_then(|s| signing::signing_key(&s.secret)),
            breaker: CircuitBreaker::new(policy.circuit_breaker),
            limiter,
            status: Arc::clone(&entry.status),
            metrics: metrics.for_enrollment(entry.enrollment.id),
            policy,
        })
    }

    pub fn metrics(&self) -> &EnrollmentMetrics {
        &self.metrics
    }

    /// The POST for one message (see [`PushRequest::from_message`]).
    pub fn request_for(&self, message: &Message<Body<Value>>, delivery_count: u32) -> PushRequest {
        PushRequest::from_message(message, &self.enrollment_header, delivery_count)
    }

    pub fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn headers_for(&self, request: &PushRequest, webhook_id: &str) -> HeaderMap {
        let mut headers = self.static_headers.clone();
        if let Some(key) = &self.signing_key {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            headers.extend(signing::webhook_headers(
                key,
                webhook_id,
                now,
                &request.body,
            ));
        }
        headers
    }

    /// Delivers one message: POSTs it, retries locally with backoff while its answers are
    /// in the retry class and attempts remain, waits while the breaker is open (the message
    /// stays unsettled in hand, its delivery count unused), and returns what the broker is
    /// to be told. Counters and `last_error` are updated here.
    pub async fn deliver(&self, request: &PushRequest, signals: &StopSignals) -> Settlement {
        // Stable across attempts so a receiver can de-duplicate on it.
        let webhook_id = request
            .message_id
            .clone()
            .unwrap_or_else(|| format!("msg_{}", Uuid::new_v4().simple()));
        let message_id = request.message_id.as_deref().unwrap_or("");
        let max_attempts = self.policy.retry.max_attempts;
        let mut counted_attempts = 0u32;
        loop {
            let permit = tokio::select! {
                biased;
                _ = signals.stop.cancelled() => return Settlement::HandBack,
                permit = self.breaker.acquire() => permit,
            };
            if let Some(limiter) = &self.limiter {
                tokio::select! {
                    biased;
                    _ = signals.stop.cancelled() => {
                        self.breaker.abandon(permit);
                        return Settlement::HandBack;
                    }
                    _ = limiter.until_ready() => {}
                }
            }
            let headers = self.headers_for(request, &webhook_id);
            // Shutdown lets a POST finish; removal abandons it.
            let result = tokio::select! {
                biased;
                _ = signals.remove.cancelled() => {
                    self.breaker.abandon(permit);
                    return Settlement::HandBack;
                }
                result = self.timed_post(request, headers) => result,
            };
            if permit == Permit::Normal {
                counted_attempts += 1;
            }
            let verdict = verdict(result.code(), &self.policy);
            self.breaker.record(
                permit,
                match verdict {
                    Verdict::Success => Health::Up,
                    Verdict::Retry => Health::Down,
                    Verdict::Reject | Verdict::Drop | Verdict::Fail => Health::Answered,
                },
            );
            match verdict {
                Verdict::Success => {
                    self.status.record_delivered();
                    tracing::debug!(message_id, outcome = "accepted", "delivered");
                    if let Some(age) = request.created_at_ms.and_then(age_since) {
                        self.metrics.shared().message_age(age);
                    }
                    return Settlement::Accept;
                }
                Verdict::Drop => {
                    self.status.record_dropped();
                    tracing::info!(message_id, outcome = "dropped", result = %result.describe(), "dropped: answer is in drop_on");
                    return Settlement::Drop;
                }
                Verdict::Reject => {
                    let reason = result.describe();
                    self.status.record_rejected();
                    self.status.set_last_error(format!("{reason} (rejected)"));
                    tracing::warn!(message_id, outcome = "rejected", %reason, "rejected: answer is in reject_on; the broker dead-letters it");
                    return Settlement::Reject(reason);
                }
                Verdict::Fail => return self.fail(message_id, &result),
                Verdict::Retry => {
                    self.status.set_last_error(result.describe());
                    if self.breaker.state() != BreakerState::Closed {
                        // Held in hand; the next attempt waits for the breaker's probe slot.
                        tracing::debug!(message_id, "breaker not closed; holding the message");
                        continue;
                    }
                    if counted_attempts >= max_attempts {
                        return self.fail(message_id, &result);
                    }
                    let retry_after = match &result {
                        PostResult::Status { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let delay = retry_after
                        .map(|d| d.min(Duration::from_millis(self.policy.retry.max_ms)))
                        .unwrap_or_else(|| {
                            self.policy.retry.delay(counted_attempts, fastrand::f64())
                        });
                    self.status.record_retry();
                    self.metrics.shared().retry();
                    tracing::debug!(message_id, attempt = counted_attempts, delay_ms = delay.as_millis() as u64, result = %result.describe(), "retrying");
                    tokio::select! {
                        biased;
                        _ = signals.stop.cancelled() => return Settlement::HandBack,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn timed_post(&self, request: &PushRequest, headers: HeaderMap) -> PostResult {
        let started = std::time::Instant::now();
        let result = post(
            &self.http,
            &self.target_url,
            request,
            headers,
            self.policy.timeout(),
        )
        .await;
        let class = status_class(result.code(), result == PostResult::Timeout);
        self.metrics.post_attempt(class, started.elapsed());
        result
    }

    fn fail(&self, message_id: &str, result: &PostResult) -> Settlement {
        let reason = result.describe();
        self.status.record_failed();
        self.status.set_last_error(reason.clone());
        let outcome = self
            .status
            .failure_outcome()
            .map_or("released", |o| match o {
                crate::amqp_link::FailureOutcome::Released => "released",
                crate::amqp_link::FailureOutcome::Modified => "modified",
            });
        tracing::warn!(message_id, outcome, %reason, "delivery failed; handing the message back");
        Settlement::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Data, Properties};
    use fe2o3_amqp::types::primitives::Binary;

    fn hv(id: Uuid) -> HeaderValue {
        HeaderValue::from_str(&id.to_string()).expect("uuid is a header value")
    }

    fn message(body: Body<Value>, props: Option<Properties>) -> Message<Body<Value>> {
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: props,
            application_properties: None,
            body,
            footer: None,
        }
    }

    #[test]
    fn bodies_map_by_kind() {
        let id = Uuid::new_v4();
        let data = message(
            Body::Data(vec![Data(Binary::from(vec![0u8, 1, 2]))].into()),
            None,
        );
        let r = PushRequest::from_message(&data, &hv(id), 0);
        assert_eq!(&r.body[..], &[0, 1, 2]);
        assert_eq!(r.headers[CONTENT_TYPE], OCTET_STREAM);

        let text = message(Body::Value(AmqpValue(Value::String("héllo".into()))), None);
        let r = PushRequest::from_message(&text, &hv(id), 0);
        assert_eq!(&r.body[..], "héllo".as_bytes());
        assert_eq!(r.headers[CONTENT_TYPE], TEXT_PLAIN);

        let list = message(
            Body::Value(AmqpValue(Value::List(vec![
                Value::Int(1),
                Value::Bool(true),
            ]))),
            None,
        );
        let r = PushRequest::from_message(&list, &hv(id), 0);
        assert_eq!(&r.body[..], b"[1,true]");
        assert_eq!(r.headers[CONTENT_TYPE], JSON);

        let empty = message(Body::Empty, None);
        let r = PushRequest::from_message(&empty, &hv(id), 0);
        assert!(r.body.is_empty());
        assert!(r.headers.get(CONTENT_TYPE).is_none());
    }

    #[test]
    fn metadata_becomes_headers() {
        let id = Uuid::new_v4();
        let props = Properties {
            message_id: Some(MessageId::String("m-1".into())),
            correlation_id: Some(MessageId::Ulong(42)),
            subject: Some("greeting".into()),
            reply_to: Some("/queue/replies".into()),
            content_type: Some("application/vnd.test+json".into()),
            ..Default::default()
        };
        let mut m = message(
            Body::Value(AmqpValue(Value::String("{}".into()))),
            Some(props),
        );
        let mut app = ApplicationProperties::default();
        app.0
            .insert("Tenant".into(), SimpleValue::String("acme".into()));
        app.0.insert("priority".into(), SimpleValue::Int(7));
        app.0.insert("bad value".into(), SimpleValue::Bool(true));
        m.application_properties = Some(app);
        let r = PushRequest::from_message(&m, &hv(id), 3);
        let h = &r.headers;
        assert_eq!(h[CONTENT_TYPE], "application/vnd.test+json");
        assert_eq!(h["amqp-message-id"], "m-1");
        assert_eq!(h["amqp-correlation-id"], "42");
        assert_eq!(h["amqp-subject"], "greeting");
        assert_eq!(h["amqp-reply-to"], "/queue/replies");
        assert_eq!(h["amqp-delivery-count"], "3");
        assert_eq!(h[ENROLLMENT_HEADER], id.to_string().as_str());
        assert_eq!(h["amqp-app-tenant"], "acme");
        assert_eq!(h["amqp-app-priority"], "7");
        assert_eq!(r.message_id.as_deref(), Some("m-1"));
        assert!(h.keys().all(|k| !k.as_str().contains(' ')));
    }
}
