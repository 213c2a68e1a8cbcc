//! One AMQP message as the POST it becomes: body by section kind, `Content-Type`, and the
//! message's properties as `amqp-*` headers. A pure mapping, benchmarked on its own.
//!
//! The message is input from anyone who can publish to the queue, so every step here is
//! bounded: a mapping that panicked or overflowed the stack would do so again on each
//! redelivery, and burn the healthy messages behind it into the dead-letter queue.

use bytes::Bytes;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Body, Message, MessageAnnotations};
use fe2o3_amqp::types::primitives::Value;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::delivery::amqp_json::{json_at, message_id_text, simple_value_text, value_to_json};
use crate::delivery::signing;

/// Prefix of the headers that carry the AMQP properties; application properties get
/// [`APP_PROPERTY_PREFIX`] followed by the property name in lower case.
pub const HEADER_PREFIX: &str = "amqp-";
pub const APP_PROPERTY_PREFIX: &str = "amqp-app-";
pub const ENROLLMENT_HEADER: &str = "hot-potato-enrollment-id";
/// The number of application properties that were not sent as headers, present only when
/// some were not. Outside `amqp-app-` so no property name can collide with it.
pub const SKIPPED_PROPERTIES_HEADER: &str = "hot-potato-skipped-properties";
/// Message annotations (the broker's: RabbitMQ 4's `x-opt-deaths` and `x-first-death-*` on a
/// dead letter, Artemis' `x-opt-ORIG-ADDRESS`...) become headers under this prefix.
pub const ANNOTATION_PREFIX: &str = "amqp-annotation-";
/// The number of message annotations that were not sent as headers, only when some were not.
pub const SKIPPED_ANNOTATIONS_HEADER: &str = "hot-potato-skipped-annotations";
/// At most this many message annotations become headers, their names and values within
/// [`MAX_ANNOTATION_HEADER_BYTES`]: a budget of their own, so neither annotations nor
/// application properties can crowd the other out.
pub const MAX_ANNOTATION_HEADERS: usize = 16;
pub const MAX_ANNOTATION_HEADER_BYTES: usize = 8 * 1024;

/// At most this many application properties become headers. Common HTTP servers refuse a
/// request with more than 100 header lines (hyper, Apache httpd); 64 leaves room for the
/// `amqp-*`, signing, static and transport headers. Past 32,768 headers `http::HeaderMap`
/// itself panics.
pub const MAX_PROPERTY_HEADERS: usize = 64;
/// At most this many bytes of names and values of the property headers together: Node.js
/// refuses more than 16 KiB of headers in all, Apache httpd a line over 8 KiB.
pub const MAX_PROPERTY_HEADER_BYTES: usize = 8 * 1024;

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
    /// Application properties not sent as headers: over [`MAX_PROPERTY_HEADERS`] or
    /// [`MAX_PROPERTY_HEADER_BYTES`], or not representable in HTTP. Also sent as
    /// [`SKIPPED_PROPERTIES_HEADER`] when not 0.
    pub skipped_properties: usize,
    /// The Standard Webhooks `webhook-id`: the message-id when it is usable as one (see
    /// [`signing::usable_webhook_id`]), else derived from the message's content, so every
    /// attempt and every redelivery of one message carries the same id. Empty when the
    /// request was mapped without one (an unsigned enrollment sends no `webhook-id`).
    pub webhook_id: String,
}

impl PushRequest {
    /// Maps a message to a POST:
    /// - body: Data sections' bytes verbatim (concatenated when there are several); an
    ///   AmqpValue string as UTF-8; any other AmqpValue, or the AmqpSequence sections'
    ///   items as one JSON array, as JSON; no body section → empty body;
    /// - `Content-Type`: the message's `content-type`, else a default for the body kind;
    /// - AMQP metadata as `amqp-*` headers and application properties as `amqp-app-*`,
    ///   within [`MAX_PROPERTY_HEADERS`] and [`MAX_PROPERTY_HEADER_BYTES`].
    pub fn from_message(
        message: &Message<Body<Value>>,
        enrollment_header: &HeaderValue,
        delivery_count: u32,
    ) -> Self {
        Self::from_message_with(message, enrollment_header, delivery_count, true)
    }

    /// [`Self::from_message`], deriving the `webhook-id` only when `needs_webhook_id`: the
    /// derivation encodes the properties and hashes the whole message, work an unsigned
    /// enrollment would throw away on every message.
    pub fn from_message_with(
        message: &Message<Body<Value>>,
        enrollment_header: &HeaderValue,
        delivery_count: u32,
        needs_webhook_id: bool,
    ) -> Self {
        let (body, default_type) = body_bytes(&message.body);
        // Room for the usual dozen without growing; the map grows past it when it must.
        let mut headers = HeaderMap::with_capacity(16);
        let props = message.properties.as_ref();
        let content_type = props
            .and_then(|p| p.content_type.as_ref())
            .map(|s| s.as_str().to_owned())
            .or_else(|| default_type.map(str::to_owned));
        if let Some(ct) = content_type {
            insert_named(&mut headers, CONTENT_TYPE, &ct);
        }
        let message_id = props
            .and_then(|p| p.message_id.as_ref())
            .map(message_id_text);
        if let Some(id) = &message_id {
            insert_named(&mut headers, names::MESSAGE_ID, id);
        }
        if let Some(p) = props {
            if let Some(id) = &p.correlation_id {
                insert_named(&mut headers, names::CORRELATION_ID, &message_id_text(id));
            }
            if let Some(subject) = &p.subject {
                insert_named(&mut headers, names::SUBJECT, subject);
            }
            if let Some(reply_to) = &p.reply_to {
                insert_named(&mut headers, names::REPLY_TO, reply_to);
            }
            if let Some(ts) = &p.creation_time {
                insert_named(
                    &mut headers,
                    names::CREATION_TIME,
                    &ts.milliseconds().to_string(),
                );
            }
        }
        insert_named(
            &mut headers,
            names::DELIVERY_COUNT,
            &delivery_count.to_string(),
        );
        if headers
            .try_insert(names::ENROLLMENT, enrollment_header.clone())
            .is_err()
        {
            tracing::debug!("no room for the enrollment header");
        }
        let skipped_properties = message
            .application_properties
            .as_ref()
            .map_or(0, |app| add_properties(&mut headers, app));
        if skipped_properties > 0 {
            insert(
                &mut headers,
                SKIPPED_PROPERTIES_HEADER,
                &skipped_properties.to_string(),
            );
        }
        if let Some(annotations) = &message.message_annotations {
            let skipped = add_annotations(&mut headers, annotations);
            if skipped > 0 {
                insert(
                    &mut headers,
                    SKIPPED_ANNOTATIONS_HEADER,
                    &skipped.to_string(),
                );
            }
        }
        let webhook_id = match message_id.as_deref() {
            _ if !needs_webhook_id => String::new(),
            Some(id) if signing::usable_webhook_id(id) => id.to_owned(),
            _ => content_id(message, &body),
        };
        Self {
            body,
            headers,
            message_id,
            created_at_ms: props
                .and_then(|p| p.creation_time.as_ref())
                .map(|t| t.milliseconds()),
            skipped_properties,
            webhook_id,
        }
    }
}

/// Adds the application properties as `amqp-app-*` headers, in the message's order, each
/// one that HTTP can carry and that fits what is left of both caps; returns how many were
/// not added.
fn add_properties(headers: &mut HeaderMap, app: &ApplicationProperties) -> usize {
    let entries = app.0.iter().map(|(key, value)| {
        (
            format!("{APP_PROPERTY_PREFIX}{}", key.to_ascii_lowercase()),
            simple_value_text(value),
        )
    });
    let added = add_capped(
        headers,
        entries,
        MAX_PROPERTY_HEADERS,
        MAX_PROPERTY_HEADER_BYTES,
    );
    let skipped = app.0.len() - added;
    if skipped > 0 {
        tracing::debug!(skipped, "application properties not sent as headers");
    }
    skipped
}

/// Adds the message annotations as `amqp-annotation-*` headers, like [`add_properties`]:
/// strings and symbols as they are, anything else (`x-opt-deaths`, an array of maps) as JSON
/// text; returns how many were not added.
fn add_annotations(headers: &mut HeaderMap, annotations: &MessageAnnotations) -> usize {
    let entries = annotations.0.iter().map(|(key, value)| {
        let key = match key {
            OwnedKey::Symbol(s) => s.0.to_ascii_lowercase(),
            OwnedKey::Ulong(n) => n.to_string(),
        };
        let text = match value_to_json(value) {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        (format!("{ANNOTATION_PREFIX}{key}"), text)
    });
    let added = add_capped(
        headers,
        entries,
        MAX_ANNOTATION_HEADERS,
        MAX_ANNOTATION_HEADER_BYTES,
    );
    annotations.0.len() - added
}

/// Adds `(name, text)` headers in order, each that HTTP can carry and that fits what is left
/// of `max_bytes` (names and values together), until `max_count` are added; returns how many
/// were. The entries past the count are not even rendered: a message may carry tens of
/// thousands.
fn add_capped(
    headers: &mut HeaderMap,
    mut entries: impl Iterator<Item = (String, String)>,
    max_count: usize,
    max_bytes: usize,
) -> usize {
    let (mut added, mut bytes) = (0usize, 0usize);
    while added < max_count {
        let Some((name, text)) = entries.next() else {
            break;
        };
        let size = name.len() + text.len();
        // `bytes` never exceeds the cap, so the subtraction cannot underflow.
        if size <= max_bytes - bytes && insert(headers, &name, &text) {
            added += 1;
            bytes += size;
        }
    }
    added
}

/// Adds a header, skipping names or values HTTP cannot carry (a property named with a space,
/// a value with a newline): losing one header beats never delivering the message. Says
/// whether the header was added.
fn insert(headers: &mut HeaderMap, name: &str, value: &str) -> bool {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(n) => insert_named(headers, n, value),
        Err(_) => {
            tracing::debug!(header = name, "skipped a header HTTP cannot carry");
            false
        }
    }
}

/// [`insert`] for a name already known to be valid (the fixed `amqp-*` names).
fn insert_named(headers: &mut HeaderMap, name: HeaderName, value: &str) -> bool {
    match HeaderValue::from_str(value) {
        Ok(v) => headers.try_append(name, v).is_ok(),
        Err(_) => {
            tracing::debug!(header = name.as_str(), "skipped a header HTTP cannot carry");
            false
        }
    }
}

/// The fixed header names, checked once at compile time rather than parsed per message.
mod names {
    use reqwest::header::HeaderName;

    pub const MESSAGE_ID: HeaderName = HeaderName::from_static("amqp-message-id");
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("amqp-correlation-id");
    pub const SUBJECT: HeaderName = HeaderName::from_static("amqp-subject");
    pub const REPLY_TO: HeaderName = HeaderName::from_static("amqp-reply-to");
    pub const CREATION_TIME: HeaderName = HeaderName::from_static("amqp-creation-time");
    pub const DELIVERY_COUNT: HeaderName = HeaderName::from_static("amqp-delivery-count");
    pub const ENROLLMENT: HeaderName = HeaderName::from_static(super::ENROLLMENT_HEADER);
}

/// `msg_` and 32 hex digits of SHA-256 over what makes the message itself: the kind and
/// bytes of its body as POSTed, its properties and its application properties as AMQP
/// encodes them. The header and annotations are left out: the broker changes them between
/// redeliveries.
fn content_id(message: &Message<Body<Value>>, body: &[u8]) -> String {
    let kind: &[u8] = match &message.body {
        Body::Data(_) => b"data",
        Body::Value(_) => b"value",
        Body::Sequence(_) => b"sequence",
        Body::Empty => b"empty",
    };
    // Neither section nests, so encoding them recurses only a fixed few levels; an encoding
    // failure leaves the part out rather than the message undelivered.
    let properties = message
        .properties
        .as_ref()
        .and_then(|p| serde_amqp::to_vec(p).ok())
        .unwrap_or_default();
    let application = message
        .application_properties
        .as_ref()
        .and_then(|a| serde_amqp::to_vec(a).ok())
        .unwrap_or_default();
    signing::derived_webhook_id(&[kind, body, &properties, &application])
}

pub fn body_bytes(body: &Body<Value>) -> (Bytes, Option<&'static str>) {
    match body {
        Body::Data(sections) => {
            // Slice by slice: a byte iterator here showed in the hot path's profile.
            let mut bytes = Vec::with_capacity(sections.iter().map(|d| d.0.len()).sum());
            for d in sections.iter() {
                bytes.extend_from_slice(&d.0);
            }
            (Bytes::from(bytes), Some(OCTET_STREAM))
        }
        Body::Value(v) => match &v.0 {
            Value::String(s) => (Bytes::from(s.clone()), Some(TEXT_PLAIN)),
            other => (json_bytes(&value_to_json(other)), Some(JSON)),
        },
        Body::Sequence(sections) => {
            // The items sit one level down, inside the array.
            let items: Vec<serde_json::Value> = sections
                .iter()
                .flat_map(|s| s.0.iter().map(|item| json_at(item, 1)))
                .collect();
            (json_bytes(&serde_json::Value::Array(items)), Some(JSON))
        }
        Body::Empty => (Bytes::new(), None),
    }
}

fn json_bytes(v: &serde_json::Value) -> Bytes {
    // Serialising a serde_json::Value cannot fail (string keys only), and its recursion is
    // bounded by MAX_JSON_DEPTH.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::amqp_json::{MAX_JSON_DEPTH, TOO_DEEP};
    use fe2o3_amqp::types::messaging::MessageId;
    use fe2o3_amqp::types::messaging::{
        AmqpSequence, AmqpValue, ApplicationProperties, Data, Properties,
    };
    use fe2o3_amqp::types::primitives::Binary;
    use fe2o3_amqp::types::primitives::SimpleValue;
    use serde_amqp::described::Described;
    use serde_amqp::descriptor::Descriptor;
    use uuid::Uuid;

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

    fn text(body: &str) -> Message<Body<Value>> {
        message(Body::Value(AmqpValue(Value::String(body.into()))), None)
    }

    fn with_id(id: MessageId) -> Option<Properties> {
        Some(Properties {
            message_id: Some(id),
            ..Default::default()
        })
    }

    fn request(m: &Message<Body<Value>>) -> PushRequest {
        PushRequest::from_message(m, &hv(Uuid::nil()), 0)
    }

    fn app_headers(r: &PushRequest) -> usize {
        r.headers
            .keys()
            .filter(|k| k.as_str().starts_with(APP_PROPERTY_PREFIX))
            .map(|k| r.headers.get_all(k).iter().count())
            .sum()
    }

    #[test]
    fn data_sections_are_posted_joined_in_order() {
        let sections = vec![
            Data(Binary::from(b"ab".to_vec())),
            Data(Binary::from(Vec::new())),
            Data(Binary::from(b"cde".to_vec())),
        ];
        let (body, content_type) = body_bytes(&Body::Data(sections.into()));
        assert_eq!(&body[..], b"abcde");
        assert_eq!(content_type, Some(OCTET_STREAM));
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

        let r = PushRequest::from_message(&text("héllo"), &hv(id), 0);
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
        app.0.insert("gone".into(), SimpleValue::Null);
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
        assert_eq!(h["amqp-app-gone"], "null", "null is not the empty string");
        assert_eq!(r.message_id.as_deref(), Some("m-1"));
        assert_eq!(r.webhook_id, "m-1");
        assert!(h.keys().all(|k| !k.as_str().contains(' ')));
        // The property named with a space cannot be a header: counted, and said so.
        assert_eq!(r.skipped_properties, 1);
        assert_eq!(h[SKIPPED_PROPERTIES_HEADER], "1");
    }

    #[test]
    fn message_annotations_become_headers_within_their_budget() {
        use fe2o3_amqp::types::messaging::MessageAnnotations;
        use fe2o3_amqp::types::primitives::{Array, OrderedMap, Symbol};
        let mut death = OrderedMap::new();
        death.insert(
            Value::from(Symbol::from("reason")),
            Value::from(Symbol::from("rejected")),
        );
        death.insert(Value::from(Symbol::from("count")), Value::Ulong(1));
        let mut annotations = MessageAnnotations::default();
        annotations.insert(
            Symbol::from("x-opt-deaths").into(),
            Value::Array(Array(vec![Value::Map(death)])),
        );
        annotations.insert(
            Symbol::from("x-first-death-reason").into(),
            Value::from(Symbol::from("rejected")),
        );
        annotations.insert(OwnedKey::Ulong(7), Value::Int(1));
        let mut m = text("dead");
        m.message_annotations = Some(annotations);
        let r = request(&m);
        let h = &r.headers;
        assert_eq!(
            h["amqp-annotation-x-opt-deaths"],
            r#"[{"count":1,"reason":"rejected"}]"#
        );
        assert_eq!(h["amqp-annotation-x-first-death-reason"], "rejected");
        assert_eq!(h["amqp-annotation-7"], "1");
        assert!(h.get(SKIPPED_ANNOTATIONS_HEADER).is_none());

        // Many annotations: the first ones that fit are sent, the rest counted.
        let mut many = MessageAnnotations::default();
        for i in 0..40 {
            many.insert(Symbol::from(format!("x-{i}")).into(), Value::Int(i));
        }
        many.insert(
            Symbol::from("x-big").into(),
            Value::String("v".repeat(9000)),
        );
        m.message_annotations = Some(many);
        let h = request(&m).headers;
        assert_eq!(h["amqp-annotation-x-0"], "0");
        assert!(h.get("amqp-annotation-x-16").is_none());
        assert_eq!(h[SKIPPED_ANNOTATIONS_HEADER], "25");
    }

    #[test]
    fn uuid_and_binary_ids_map_as_text_and_broken_ids_are_left_out() {
        let uuid = Uuid::new_v4();
        let m = message(
            Body::Empty,
            with_id(MessageId::Uuid(uuid.into_bytes().into())),
        );
        let r = request(&m);
        assert_eq!(r.headers["amqp-message-id"], uuid.to_string().as_str());
        assert_eq!(r.webhook_id, uuid.to_string());

        let m = message(
            Body::Empty,
            with_id(MessageId::Binary(Binary::from(vec![0xff, 0, 1]))),
        );
        let r = request(&m);
        assert_eq!(r.headers["amqp-message-id"], "/wAB");
        assert_eq!(r.webhook_id, "/wAB");

        let mut props = with_id(MessageId::String("a\r\nx-injected: 1".into()));
        if let Some(p) = props.as_mut() {
            p.correlation_id = Some(MessageId::String("c\nd".into()));
        }
        let r = request(&message(Body::Empty, props));
        assert!(r.headers.get("amqp-message-id").is_none());
        assert!(r.headers.get("amqp-correlation-id").is_none());
        assert!(r.headers.get("x-injected").is_none());
        assert_eq!(r.message_id.as_deref(), Some("a\r\nx-injected: 1"));
        assert!(r.webhook_id.starts_with("msg_"), "{}", r.webhook_id);
    }

    #[test]
    fn thirty_thousand_properties_are_capped_not_a_panic() {
        let mut m = text("big");
        let mut app = ApplicationProperties::default();
        for i in 0..30_000 {
            app.0.insert(format!("p{i}"), SimpleValue::Int(i));
        }
        m.application_properties = Some(app);
        let r = request(&m);
        assert_eq!(app_headers(&r), MAX_PROPERTY_HEADERS);
        assert_eq!(r.skipped_properties, 30_000 - MAX_PROPERTY_HEADERS);
        assert_eq!(
            r.headers[SKIPPED_PROPERTIES_HEADER],
            (30_000 - MAX_PROPERTY_HEADERS).to_string().as_str()
        );
        // The first ones, in the message's order.
        assert_eq!(r.headers["amqp-app-p0"], "0");
        assert_eq!(r.headers["amqp-app-p63"], "63");
        assert!(r.headers.get("amqp-app-p64").is_none());
    }

    #[test]
    fn property_headers_stay_within_the_byte_cap() {
        let mut m = text("wide");
        let mut app = ApplicationProperties::default();
        // 12 + 1000 bytes each: 8 fit in 8 KiB, the ninth does not; a short one after it
        // still does.
        for i in 0..20 {
            app.0
                .insert(format!("w{i:02}"), SimpleValue::String("v".repeat(1000)));
        }
        app.0.insert("z".into(), SimpleValue::Bool(false));
        app.0
            .insert("huge".into(), SimpleValue::String("v".repeat(100_000)));
        m.application_properties = Some(app);
        let r = request(&m);
        let sent: usize = r
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with(APP_PROPERTY_PREFIX))
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        assert!(sent <= MAX_PROPERTY_HEADER_BYTES, "{sent} bytes");
        assert_eq!(app_headers(&r), 9);
        assert_eq!(r.headers["amqp-app-z"], "false");
        assert_eq!(r.skipped_properties, 22 - 9);
    }

    /// `levels` lists around a 1, built without recursion.
    fn nested_lists(levels: usize) -> Value {
        let mut v = Value::Int(1);
        for _ in 0..levels {
            v = Value::List(vec![v]);
        }
        v
    }

    /// Takes a nested value apart level by level: dropping it whole recurses once per level.
    fn unnest(mut v: Value) {
        loop {
            v = match v {
                Value::List(mut items) => items.pop().unwrap_or(Value::Null),
                Value::Described(d) => d.value,
                _ => return,
            };
        }
    }

    fn depth_of(json: &serde_json::Value) -> (usize, &serde_json::Value) {
        let mut levels = 0;
        let mut at = json;
        while let serde_json::Value::Array(items) = at {
            levels += 1;
            at = &items[0];
        }
        (levels, at)
    }

    #[test]
    fn nesting_is_rendered_up_to_the_bound_and_replaced_below_it() {
        let fits = nested_lists(MAX_JSON_DEPTH);
        let json = value_to_json(&fits);
        assert_eq!(depth_of(&json), (MAX_JSON_DEPTH, &serde_json::json!(1)));
        unnest(fits);

        let deeper = nested_lists(MAX_JSON_DEPTH + 1);
        let json = value_to_json(&deeper);
        assert_eq!(
            depth_of(&json),
            (MAX_JSON_DEPTH, &serde_json::json!(TOO_DEEP))
        );
        unnest(deeper);
        assert!(TOO_DEEP.contains(&MAX_JSON_DEPTH.to_string()));
    }

    #[test]
    fn a_body_nested_ten_thousand_levels_is_bounded() {
        // Built, mapped and taken apart on the test thread's own stack: only the mapping's
        // recursion could overflow it, and it stops at MAX_JSON_DEPTH.
        let m = message(Body::Value(AmqpValue(nested_lists(10_000))), None);
        let r = request(&m);
        assert_eq!(r.headers[CONTENT_TYPE], JSON);
        let json: serde_json::Value = serde_json::from_slice(&r.body).expect("valid JSON");
        assert_eq!(
            depth_of(&json),
            (MAX_JSON_DEPTH, &serde_json::json!(TOO_DEEP))
        );
        if let Body::Value(AmqpValue(v)) = m.body {
            unnest(v);
        }

        let mut described = Value::Int(1);
        for _ in 0..10_000 {
            described = Value::Described(Box::new(Described {
                descriptor: Descriptor::Code(7),
                value: described,
            }));
        }
        let seq = message(
            Body::Sequence(vec![AmqpSequence(vec![described])].into()),
            None,
        );
        let r = request(&seq);
        assert_eq!(&r.body[..], format!("[\"{TOO_DEEP}\"]").as_bytes());
        if let Body::Sequence(mut sections) = seq.body
            && let Some(mut section) = sections.pop()
            && let Some(v) = section.0.pop()
        {
            unnest(v);
        }
    }

    #[test]
    fn an_unsigned_mapping_derives_no_webhook_id() {
        let m = text("no id here");
        let r = PushRequest::from_message_with(&m, &hv(Uuid::nil()), 0, false);
        assert_eq!(r.webhook_id, "");
        assert!(r.headers.get("webhook-id").is_none());
        assert!(
            PushRequest::from_message(&m, &hv(Uuid::nil()), 0)
                .webhook_id
                .starts_with("msg_")
        );
    }

    #[test]
    fn a_message_without_a_usable_id_gets_one_from_its_content() {
        let a = request(&text("same"));
        let again = request(&text("same"));
        let other = request(&text("different"));
        assert_eq!(a.webhook_id, again.webhook_id, "stable across redeliveries");
        assert_ne!(a.webhook_id, other.webhook_id);
        assert!(signing::usable_webhook_id(&a.webhook_id));
        let hex = a.webhook_id.strip_prefix("msg_").expect("msg_ prefix");
        assert_eq!(hex.len(), 32);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));

        // The same bytes as another body kind, or with other properties, are another message.
        let data = message(
            Body::Data(vec![Data(Binary::from(b"same".to_vec()))].into()),
            None,
        );
        assert_ne!(request(&data).webhook_id, a.webhook_id);
        let mut tagged = text("same");
        let mut app = ApplicationProperties::default();
        app.0.insert("k".into(), SimpleValue::Int(1));
        tagged.application_properties = Some(app);
        assert_ne!(request(&tagged).webhook_id, a.webhook_id);

        // A redelivery differs only in its delivery count.
        let crlf = message(Body::Empty, with_id(MessageId::String("bad\r\nid".into())));
        let first = PushRequest::from_message(&crlf, &hv(Uuid::nil()), 0);
        let second = PushRequest::from_message(&crlf, &hv(Uuid::nil()), 4);
        assert!(first.webhook_id.starts_with("msg_"));
        assert_eq!(first.webhook_id, second.webhook_id);
        let other_bad = message(Body::Empty, with_id(MessageId::String("bad\nid2".into())));
        assert_ne!(request(&other_bad).webhook_id, first.webhook_id);
    }
}
