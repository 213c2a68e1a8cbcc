//! The other direction, the mirror of [`crate::delivery::request`]: an HTTP request as the
//! message it becomes (`POST /publish`, `POST /request`), a target's answer as the reply
//! message (`delivery.reply`), and a reply message as the HTTP answer of `POST /request`.
//! Pure mappings.
//!
//! Headers map back as the push mapping maps forward: `Content-Type` → content-type,
//! `amqp-message-id`, `amqp-correlation-id`, `amqp-subject`, `amqp-reply-to` → properties
//! (strings), `amqp-app-<name>` → application property `<name>` (a string; HTTP header names
//! arrive in lower case, as the push mapping sends them).

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Value};
use reqwest::header::{CONTENT_TYPE, HeaderMap};

use crate::delivery::post::Answer;
use crate::delivery::request::{APP_PROPERTY_PREFIX, MAX_PROPERTY_HEADERS, body_bytes};

/// The application property that carries the target's status on a reply.
pub const HTTP_STATUS_PROPERTY: &str = "http-status";
/// Set (true) on a reply whose body was cut at `RESPONSE_MAX_BYTES`.
pub const TRUNCATED_PROPERTY: &str = "http-body-truncated";

/// An HTTP request's message, and the message-id it carries.
#[derive(Debug)]
pub struct Outgoing {
    pub message: Message<Data>,
    pub message_id: String,
}

/// Builds the message of `POST /publish` from its headers and body. `fresh_id` gives the
/// message-id when the request names none; `reply_to` (for `POST /request`) replaces any
/// `amqp-reply-to`, and then the message-id is always `fresh_id`'s. The error names the
/// header at fault.
pub fn message_from_http(
    headers: &HeaderMap,
    body: Bytes,
    fresh_id: impl FnOnce() -> String,
    reply_to: Option<&str>,
) -> Result<Outgoing, String> {
    let text = |name: &str| -> Result<Option<String>, String> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.to_string()))
                .map_err(|_| format!("header `{name}` is not visible ASCII")),
        }
    };
    let given_id = if reply_to.is_some() {
        None
    } else {
        text("amqp-message-id")?
    };
    let message_id = given_id.unwrap_or_else(fresh_id);
    let mut properties = Properties::builder().message_id(message_id.clone());
    if let Some(ct) = text(CONTENT_TYPE.as_str())? {
        properties = properties.content_type(ct);
    }
    if let Some(id) = text("amqp-correlation-id")? {
        properties = properties.correlation_id(id);
    }
    if let Some(subject) = text("amqp-subject")? {
        properties = properties.subject(subject);
    }
    match reply_to {
        Some(address) => properties = properties.reply_to(address.to_string()),
        None => {
            if let Some(address) = text("amqp-reply-to")? {
                properties = properties.reply_to(address);
            }
        }
    }
    let mut application = ApplicationProperties::default();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(APP_PROPERTY_PREFIX) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        if application.0.len() >= MAX_PROPERTY_HEADERS {
            return Err(format!(
                "more than {MAX_PROPERTY_HEADERS} `{APP_PROPERTY_PREFIX}*` headers"
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| format!("header `{name}` is not visible ASCII"))?;
        application
            .0
            .insert(key.to_string(), SimpleValue::String(value.to_string()));
    }
    let builder = Message::builder().properties(properties.build());
    let builder = if application.0.is_empty() {
        builder
    } else {
        builder.application_properties(application)
    };
    Ok(Outgoing {
        message: builder.data(Binary::from(body.to_vec())).build(),
        message_id,
    })
}

/// The reply to a pushed message: the answer's body and `Content-Type`, correlation-id
/// `correlation`, application property [`HTTP_STATUS_PROPERTY`] (int), each header named in
/// `reply_headers` the answer carries (as a string property under its lower-case name), and
/// [`TRUNCATED_PROPERTY`] when the body was cut.
pub fn reply_message(
    answer: &Answer,
    correlation: Option<MessageId>,
    reply_headers: &[String],
) -> Message<Data> {
    let mut properties = Properties::builder();
    if let Some(id) = correlation {
        properties = properties.correlation_id(id);
    }
    if let Some(ct) = answer
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        properties = properties.content_type(ct.to_string());
    }
    let mut application = ApplicationProperties::default();
    application.0.insert(
        HTTP_STATUS_PROPERTY.to_string(),
        SimpleValue::Int(i32::from(answer.status)),
    );
    for name in reply_headers {
        let name = name.to_ascii_lowercase();
        if let Some(value) = answer.headers.get(&name).and_then(|v| v.to_str().ok()) {
            application
                .0
                .insert(name, SimpleValue::String(value.to_string()));
        }
    }
    if answer.truncated {
        application
            .0
            .insert(TRUNCATED_PROPERTY.to_string(), SimpleValue::Bool(true));
    }
    Message::builder()
        .properties(properties.build())
        .application_properties(application)
        .data(Binary::from(answer.body.to_vec()))
        .build()
}

/// A reply as the answer of `POST /request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// [`HTTP_STATUS_PROPERTY`], 200 when absent; `None` when present but not a status.
    pub status: Option<u16>,
    pub content_type: Option<String>,
    pub body: Bytes,
}

pub fn http_from_reply(message: &Message<Body<Value>>) -> HttpReply {
    let (body, default_type) = body_bytes(&message.body);
    let status = match message
        .application_properties
        .as_ref()
        .and_then(|a| a.0.get(HTTP_STATUS_PROPERTY))
    {
        None => Some(200),
        Some(value) => status_of(value),
    };
    let content_type = message
        .properties
        .as_ref()
        .and_then(|p| p.content_type.as_ref())
        .map(|s| s.as_str().to_string())
        .or_else(|| default_type.map(str::to_string));
    HttpReply {
        status,
        content_type,
        body,
    }
}

/// An integer property (of any width, or a string of digits) from 100 to 599.
fn status_of(value: &SimpleValue) -> Option<u16> {
    let n: i64 = match value {
        SimpleValue::Ubyte(n) => i64::from(*n),
        SimpleValue::Ushort(n) => i64::from(*n),
        SimpleValue::Uint(n) => i64::from(*n),
        SimpleValue::Ulong(n) => i64::try_from(*n).ok()?,
        SimpleValue::Byte(n) => i64::from(*n),
        SimpleValue::Short(n) => i64::from(*n),
        SimpleValue::Int(n) => i64::from(*n),
        SimpleValue::Long(n) => *n,
        SimpleValue::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|n| (100..=599).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn headers_map_back_to_properties() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/csv"));
        headers.insert("amqp-message-id", HeaderValue::from_static("m-1"));
        headers.insert("amqp-correlation-id", HeaderValue::from_static("c-1"));
        headers.insert("amqp-subject", HeaderValue::from_static("s"));
        headers.insert("amqp-reply-to", HeaderValue::from_static("/queue/r"));
        headers.insert("amqp-app-colour", HeaderValue::from_static("red"));
        let out = message_from_http(&headers, Bytes::from_static(b"a,b"), || "x".into(), None)
            .expect("maps");
        assert_eq!(out.message_id, "m-1");
        let p = out.message.properties.as_ref().expect("properties");
        assert_eq!(
            p.content_type.as_ref().map(|s| s.as_str()),
            Some("text/csv")
        );
        assert_eq!(p.subject.as_deref(), Some("s"));
        assert_eq!(p.reply_to.as_deref(), Some("/queue/r"));
        assert_eq!(p.correlation_id, Some(MessageId::String("c-1".into())));
        let app = out.message.application_properties.as_ref().expect("app");
        assert_eq!(
            app.0.get("colour"),
            Some(&SimpleValue::String("red".into()))
        );
        assert_eq!(out.message.body.0.as_slice(), b"a,b");

        let request =
            message_from_http(&headers, Bytes::new(), || "fresh".into(), Some("/r")).expect("maps");
        assert_eq!(
            request.message_id, "fresh",
            "a request always gets a fresh id"
        );
        let p = request.message.properties.as_ref().expect("properties");
        assert_eq!(p.reply_to.as_deref(), Some("/r"));
    }

    #[test]
    fn a_reply_carries_status_headers_and_correlation() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("x-trace", HeaderValue::from_static("t-9"));
        let answer = Answer {
            status: 201,
            headers,
            body: Bytes::from_static(b"{}"),
            truncated: true,
        };
        let reply = reply_message(
            &answer,
            Some(MessageId::String("m-1".into())),
            &["X-Trace".into(), "x-absent".into()],
        );
        let app = reply.application_properties.as_ref().expect("app");
        assert_eq!(
            app.0.get(HTTP_STATUS_PROPERTY),
            Some(&SimpleValue::Int(201))
        );
        assert_eq!(
            app.0.get("x-trace"),
            Some(&SimpleValue::String("t-9".into()))
        );
        assert!(app.0.get("x-absent").is_none());
        assert_eq!(
            app.0.get(TRUNCATED_PROPERTY),
            Some(&SimpleValue::Bool(true))
        );
        let back: Message<Body<Value>> = Message::builder()
            .properties(reply.properties.clone().expect("properties"))
            .application_properties(app.clone())
            .body(Body::Data(vec![reply.body.clone()].into()))
            .build();
        let http = http_from_reply(&back);
        assert_eq!(http.status, Some(201));
        assert_eq!(http.content_type.as_deref(), Some("application/json"));
        assert_eq!(&http.body[..], b"{}");
    }

    #[test]
    fn statuses_are_read_from_any_integer() {
        assert_eq!(status_of(&SimpleValue::Long(404)), Some(404));
        assert_eq!(status_of(&SimpleValue::Ushort(204)), Some(204));
        assert_eq!(status_of(&SimpleValue::String("503".into())), Some(503));
        assert_eq!(status_of(&SimpleValue::Int(42)), None);
        assert_eq!(status_of(&SimpleValue::Bool(true)), None);
    }
}
