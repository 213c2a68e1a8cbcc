//! One AMQP message as the POST it becomes: body by section kind, `Content-Type`, and the
//! message's properties as `amqp-*` headers. A pure mapping, benchmarked on its own.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use uuid::Uuid;

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
