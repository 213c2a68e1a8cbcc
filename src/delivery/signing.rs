//! Shaping a POST for its target: static headers, credentials, and Standard Webhooks
//! signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use sha2::Sha256;

use crate::enrollment::policy::DeliveryPolicy;
use crate::enrollment::settings::Auth;

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
        ) {
            headers.insert(n, v);
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
        headers.insert(name, v);
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
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
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
    fn secrets_without_prefix_are_raw_bytes() {
        assert_eq!(signing_key("abc"), Some(b"abc".to_vec()));
        assert_eq!(signing_key("whsec_!!!"), None);
    }
}
