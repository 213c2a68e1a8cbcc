//! AMQP values as text and JSON, for headers and bodies: ids as text, simple values as header
//! text, any value as JSON with its nesting bounded (the rendering recurses once per level, on
//! the worker's stack, and a message is input from anyone who can publish).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fe2o3_amqp::types::messaging::MessageId;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use uuid::Uuid;

/// Lists, arrays, maps and described values nested deeper than this in a JSON body are
/// replaced by [`TOO_DEEP`]: the mapping recurses once per level, and its stack is the
/// worker's.
pub const MAX_JSON_DEPTH: usize = 64;
/// What stands in for a value nested deeper than [`MAX_JSON_DEPTH`].
pub const TOO_DEEP: &str = "<nested deeper than 64 levels>";

pub fn message_id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => Uuid::from_bytes(u.clone().into_inner()).to_string(),
        MessageId::Binary(b) => BASE64.encode(b),
    }
}

/// A property's header text: strings as they are, anything else, `null` included, as JSON
/// text (an empty header would read as the empty string).
pub fn simple_value_text(v: &SimpleValue) -> String {
    match value_to_json(&Value::from(v.clone())) {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// An AMQP value as JSON: numbers as numbers, binary as base64, timestamps as epoch
/// milliseconds, maps as objects (non-string keys rendered as text), described values as
/// their value. A list, array, map or described value inside [`MAX_JSON_DEPTH`] others
/// becomes the string [`TOO_DEEP`].
pub fn value_to_json(v: &Value) -> serde_json::Value {
    json_at(v, 0)
}

/// `v` as JSON, `depth` being the number of lists, arrays, maps and described values
/// around it.
pub fn json_at(v: &Value, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    let nests = matches!(
        v,
        Value::Described(_) | Value::List(_) | Value::Array(_) | Value::Map(_)
    );
    if nests && depth >= MAX_JSON_DEPTH {
        return J::String(TOO_DEEP.to_owned());
    }
    let inner = |v: &Value| json_at(v, depth + 1);
    match v {
        Value::Described(d) => inner(&d.value),
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
        Value::List(items) => J::Array(items.iter().map(inner).collect()),
        Value::Array(items) => J::Array(items.0.iter().map(inner).collect()),
        Value::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match inner(k) {
                        J::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, inner(v))
                })
                .collect(),
        ),
    }
}
