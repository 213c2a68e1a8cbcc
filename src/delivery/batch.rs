//! A batch of messages as one POST (`delivery.batch`): the body the target gets, and what its
//! answer says of each message.
//!
//! Body: `{"messages": [{"id", "content_type", "headers", "body" | "body_base64"}]}`. `body`
//! is the message's JSON as it is when its content type is JSON (`application/json` or
//! `…+json`) and it parses, else its text when it is UTF-8; any other body goes as
//! `body_base64`. `headers` are the `amqp-*` (and `hot-potato-skipped-*`) headers the single
//! POST would carry. `id` is the message-id when every message of the batch has a distinct
//! one not starting with `#`, else `#` and the message's position (`#0`, `#1`…).
//!
//! Answer: a 2xx with an empty body accepts every message; a 2xx with
//! `{"statuses": [{"id", "status": "accepted" | "retry" | "reject" | "drop"}]}` settles each
//! as named, and a message it leaves out is retried. Any other answer (or a 2xx whose body
//! does not parse) goes through the normal failure path for the whole batch.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::delivery::request::{ENROLLMENT_HEADER, HEADER_PREFIX, PushRequest};
use crate::delivery::signing::derived_webhook_id;

/// The header that tells the target how many messages the batch holds.
pub const BATCH_SIZE_HEADER: &str = "hot-potato-batch-size";
const SKIPPED_PREFIX: &str = "hot-potato-skipped-";

/// What the target's answer says of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberStatus {
    Accepted,
    Retry,
    Reject,
    Drop,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchAnswerError {
    #[error("the target's batch answer is not {{\"statuses\": [{{\"id\", \"status\"}}]}}: {0}")]
    Malformed(String),
    #[error("the target's batch answer names an id not in the batch: {0}")]
    UnknownId(String),
}

/// The ids the messages of a batch go by, in order.
pub fn member_ids(requests: &[PushRequest]) -> Vec<String> {
    let mut seen = HashSet::with_capacity(requests.len());
    let distinct = requests.iter().all(|r| {
        r.message_id
            .as_deref()
            .is_some_and(|id| !id.starts_with('#') && seen.insert(id))
    });
    requests
        .iter()
        .enumerate()
        .map(|(i, r)| match (&r.message_id, distinct) {
            (Some(id), true) => id.clone(),
            _ => format!("#{i}"),
        })
        .collect()
}

#[derive(Serialize)]
struct Entry<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    headers: HashMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<EntryBody<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EntryBody<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

#[derive(Serialize)]
struct Body<'a> {
    messages: Vec<Entry<'a>>,
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

fn entry<'a>(id: &'a str, request: &'a PushRequest) -> Entry<'a> {
    let content_type = request
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let headers = request
        .headers
        .iter()
        .filter(|(name, _)| {
            name.as_str().starts_with(HEADER_PREFIX) || name.as_str().starts_with(SKIPPED_PREFIX)
        })
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)))
        .collect();
    let raw = &request.body[..];
    let json = content_type
        .filter(|ct| is_json(ct))
        .and_then(|_| serde_json::from_slice::<&RawValue>(raw).ok());
    let (body, body_base64) = match (json, std::str::from_utf8(raw)) {
        (Some(json), _) => (Some(EntryBody::Json(json)), None),
        (None, Ok(text)) => (Some(EntryBody::Text(text)), None),
        (None, Err(_)) => (None, Some(BASE64.encode(raw))),
    };
    Entry {
        id,
        content_type,
        headers,
        body,
        body_base64,
    }
}

/// The one POST a batch becomes. Its `webhook-id` (when signing) is derived from the body,
/// so every attempt of this batch carries the same one.
pub fn batch_request(
    requests: &[PushRequest],
    ids: &[String],
    enrollment_header: &HeaderValue,
    needs_webhook_id: bool,
) -> PushRequest {
    let messages = ids
        .iter()
        .zip(requests)
        .map(|(id, request)| entry(id, request))
        .collect();
    // Serialising string maps, strings and already-valid JSON cannot fail.
    let body = serde_json::to_vec(&Body { messages }).unwrap_or_default();
    let mut headers = HeaderMap::with_capacity(3);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ENROLLMENT_HEADER, enrollment_header.clone());
    headers.insert(BATCH_SIZE_HEADER, HeaderValue::from(requests.len()));
    let webhook_id = if needs_webhook_id {
        derived_webhook_id(&[b"batch", &body])
    } else {
        String::new()
    };
    PushRequest {
        body: Bytes::from(body),
        headers,
        message_id: None,
        created_at_ms: None,
        skipped_properties: 0,
        webhook_id,
    }
}

#[derive(Deserialize)]
struct Answer {
    statuses: Vec<AnswerEntry>,
}

#[derive(Deserialize)]
struct AnswerEntry {
    id: String,
    status: MemberStatus,
}

/// What a 2xx answer says of each message, in the batch's order: all accepted for an empty
/// (or blank) body; else as `statuses` names them, `retry` for one left out.
pub fn member_statuses(body: &[u8], ids: &[String]) -> Result<Vec<MemberStatus>, BatchAnswerError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![MemberStatus::Accepted; ids.len()]);
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| BatchAnswerError::Malformed(e.to_string()))?;
    let position: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut statuses = vec![MemberStatus::Retry; ids.len()];
    for entry in answer.statuses {
        let Some(&i) = position.get(entry.id.as_str()) else {
            return Err(BatchAnswerError::UnknownId(entry.id));
        };
        statuses[i] = entry.status;
    }
    Ok(statuses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn request(body: &[u8], content_type: Option<&str>, id: Option<&str>) -> PushRequest {
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(ct).expect("ct"));
        }
        headers.insert("amqp-delivery-count", HeaderValue::from_static("0"));
        headers.insert("amqp-app-k", HeaderValue::from_static("v"));
        headers.insert(ENROLLMENT_HEADER, HeaderValue::from_static("e"));
        headers.insert("x-other", HeaderValue::from_static("no"));
        PushRequest {
            body: Bytes::copy_from_slice(body),
            headers,
            message_id: id.map(str::to_owned),
            created_at_ms: None,
            skipped_properties: 0,
            webhook_id: String::new(),
        }
    }

    #[test]
    fn the_body_carries_each_message_as_json_text_or_base64() {
        let requests = [
            request(br#"{"n": 1}"#, Some("application/json"), Some("a")),
            request(b"plain", Some("text/plain"), Some("b")),
            request(&[0xff, 0x00], Some("application/octet-stream"), Some("c")),
            request(b"not json", Some("application/cloudevents+json"), Some("d")),
        ];
        let ids = member_ids(&requests);
        assert_eq!(ids, ["a", "b", "c", "d"]);
        let batch = batch_request(&requests, &ids, &HeaderValue::from_static("e"), true);
        assert_eq!(batch.headers[BATCH_SIZE_HEADER], "4");
        assert_eq!(batch.headers[CONTENT_TYPE], "application/json");
        assert!(batch.webhook_id.starts_with("msg_"));
        let body: Value = serde_json::from_slice(&batch.body).expect("json");
        let m = &body["messages"];
        assert_eq!(m[0]["body"], json!({"n": 1}));
        assert_eq!(m[0]["id"], "a");
        assert_eq!(m[0]["content_type"], "application/json");
        assert_eq!(
            m[0]["headers"],
            json!({"amqp-delivery-count": "0", "amqp-app-k": "v"})
        );
        assert_eq!(m[1]["body"], "plain");
        assert_eq!(m[2]["body_base64"], "/wA=");
        assert!(m[2].get("body").is_none());
        assert_eq!(
            m[3]["body"], "not json",
            "JSON that does not parse goes as text"
        );
    }

    #[test]
    fn ids_fall_back_to_positions_unless_every_message_id_is_distinct() {
        let dup = [request(b"", None, Some("x")), request(b"", None, Some("x"))];
        assert_eq!(member_ids(&dup), ["#0", "#1"]);
        let missing = [request(b"", None, Some("x")), request(b"", None, None)];
        assert_eq!(member_ids(&missing), ["#0", "#1"]);
        let hash = [
            request(b"", None, Some("#1")),
            request(b"", None, Some("y")),
        ];
        assert_eq!(member_ids(&hash), ["#0", "#1"]);
    }

    #[test]
    fn the_answer_settles_each_message_as_named() {
        use MemberStatus::*;
        let ids: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        assert_eq!(member_statuses(b"", &ids), Ok(vec![Accepted; 5]));
        assert_eq!(member_statuses(b" \n", &ids), Ok(vec![Accepted; 5]));
        let answer = br#"{"statuses": [{"id": "a", "status": "accepted"},
            {"id": "b", "status": "retry"}, {"id": "c", "status": "reject"},
            {"id": "d", "status": "drop"}]}"#;
        assert_eq!(
            member_statuses(answer, &ids),
            Ok(vec![Accepted, Retry, Reject, Drop, Retry])
        );
        assert!(matches!(
            member_statuses(br#"{"statuses": [{"id": "z", "status": "accepted"}]}"#, &ids),
            Err(BatchAnswerError::UnknownId(id)) if id == "z"
        ));
        for bad in [
            &br#"{"statuses": [{"id": "a", "status": "ok"}]}"#[..],
            b"[",
            b"{}",
        ] {
            assert!(matches!(
                member_statuses(bad, &ids),
                Err(BatchAnswerError::Malformed(_))
            ));
        }
    }
}
