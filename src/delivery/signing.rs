//! Shaping a POST for its target: static headers, credentials, and Standard Webhooks
//! signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};

use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::settings::Auth;

/// The longest message-id used as a `webhook-id` as it is.
pub const MAX_WEBHOOK_ID_BYTES: usize = 256;

/// Whether a message-id can be the `webhook-id` as it is: 1 to [`MAX_WEBHOOK_ID_BYTES`]
/// visible ASCII characters. Anything else could not be sent as a header (CR/LF, control
/// characters, non-ASCII), or could not be carried or compared alike by every receiver's
/// Standard Webhooks library (empty, space, very long).
pub fn usable_webhook_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_WEBHOOK_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `msg_` and 32 hex digits: the first 16 bytes of SHA-256 over `parts`, each preceded by its
/// length so that moving bytes from one part to the next changes the id. The same parts give
/// the same id, so each delivery of one message carries the id a receiver de-duplicates on.
pub fn derived_webhook_id(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"hot-potato webhook-id v1");
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    let mut id = String::with_capacity(4 + 32);
    id.push_str("msg_");
    for byte in &digest[..16] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Static headers and credentials, added to every POST of the enrollment. Names and values
/// were validated at enroll time; anything invalid here is skipped.
pub fn static_headers(policy: &DeliveryPolicy) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &policy.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) && headers.try_insert(n, v).is_err()
        {
            tracing::warn!("too many static headers; the rest are left out");
            break;
        }
    }
    let credential = match &policy.auth {
        None => None,
        Some(Auth::Bearer { token }) => Some((AUTHORIZATION, format!("Bearer {token}"))),
        Some(Auth::Basic { username, password }) => Some((
            AUTHORIZATION,
            format!("Basic {}", BASE64.encode(format!("{username}:{password}"))),
        )),
        Some(Auth::Header { name, value }) => HeaderName::from_bytes(name.as_bytes())
            .ok()
            .map(|n| (n, value.clone())),
    };
    if let Some((name, value)) = credential
        && let Ok(mut v) = HeaderValue::from_str(&value)
    {
        v.set_sensitive(true);
        if headers.try_insert(name, v).is_err() {
            tracing::warn!("too many static headers; the credential is left out");
        }
    }
    headers
}

/// The three Standard Webhooks headers for one attempt.
pub fn webhook_headers(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let sig = signature(key, id, timestamp, body);
    for (name, value) in [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", sig),
    ] {
        // Three entries in a fresh map: far below the map's limit.
        if let Ok(v) = HeaderValue::from_str(&value) {
            let _ = headers.try_insert(HeaderName::from_static(name), v);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrollment::settings::Signing;

    fn signing_key(secret: &str) -> Option<Vec<u8>> {
        Signing {
            secret: secret.into(),
        }
        .key()
    }

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's example.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("base64");
        let sig = signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn only_short_visible_ascii_ids_are_used_as_they_are() {
        for ok in [
            "order-42",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "a.b/c=",
            &"x".repeat(256),
        ] {
            assert!(usable_webhook_id(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\r\nb",
            "tab\t",
            "nul\0",
            "héllo",
            &"x".repeat(257),
        ] {
            assert!(!usable_webhook_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn derived_ids_are_stable_and_framed() {
        let id = derived_webhook_id(&[b"ab", b"c"]);
        assert_eq!(id, derived_webhook_id(&[b"ab", b"c"]));
        assert_ne!(id, derived_webhook_id(&[b"a", b"bc"]));
        assert_eq!(id.len(), 4 + 32);
        assert!(usable_webhook_id(&id));
    }

    #[test]
    fn secrets_without_prefix_are_raw_bytes() {
        assert_eq!(signing_key("abc"), Some(b"abc".to_vec()));
        assert_eq!(signing_key("whsec_!!!"), None);
    }
}
