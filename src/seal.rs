//! Sealing of secret strings at rest: the key (`SECRETS_KEY`, `SECRETS_KEY_PREVIOUS`), and a
//! string sealed with XChaCha20-Poly1305 under a random 24-byte nonce, bound to its place
//! (associated data) so that it cannot be moved to another row or field. Imports nothing from
//! the crate: the store decides which fields are secret, this module only seals and opens.
//!
//! A sealed value is `hp-sealed.v1.<key id>.<base64url(nonce || ciphertext)>`: only letters,
//! digits, `-`, `_` and `.`, so it survives as the password of a URL unchanged. The key id is
//! the first 8 hex digits of the key's SHA-256, enough to pick the right key and to name it
//! in an error without revealing it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const PREFIX: &str = "hp-sealed.v1.";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// A 32-byte sealing key. Its bytes never leave this module except into the cipher.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey {
    bytes: [u8; KEY_LEN],
    id: String,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, ***)", self.id)
    }
}

/// Why a key setting was refused; the caller names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("is not standard base64 (make one with `openssl rand -base64 32`)")]
    NotBase64,
    #[error(
        "decodes to {0} bytes; it must be 32 random bytes (make one with `openssl rand -base64 32`)"
    )]
    WrongLength(usize),
}

impl SecretKey {
    /// Reads a key written as standard base64 of exactly 32 bytes (surrounding spaces ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let decoded = STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::NotBase64)?;
        let bytes: [u8; KEY_LEN] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(decoded.len()))?;
        Ok(Self::from_bytes(bytes))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let digest = Sha256::digest(bytes);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Self { bytes, id }
    }

    /// The key's public fingerprint, written into every value it seals.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.bytes.into())
    }
}

/// The keys the daemon holds: `current` seals (absent: values are stored in clear), and both
/// open.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    pub current: Option<SecretKey>,
    pub previous: Option<SecretKey>,
}

/// What a stored value turned out to be once opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Not sealed: written before a key was set.
    Clear(String),
    /// Sealed with the current key: nothing to rewrite.
    Current(String),
    /// Sealed with the previous key: to be sealed again with the current one.
    Previous(String),
}

impl Opened {
    pub fn value(&self) -> &str {
        match self {
            Self::Clear(v) | Self::Current(v) | Self::Previous(v) => v,
        }
    }
    /// Whether the stored form should be rewritten with `current` (when there is one).
    pub fn is_stale(&self) -> bool {
        !matches!(self, Self::Current(_))
    }
}

/// Why a stored value could not be sealed or opened. Never carries the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("sealed with key {0}, which is neither SECRETS_KEY nor SECRETS_KEY_PREVIOUS")]
    UnknownKey(String),
    #[error("does not open with key {0}: altered, or moved from another enrollment or field")]
    Rejected(String),
    #[error("is not a well-formed sealed value")]
    Malformed,
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("the cipher refused the value")]
    Cipher,
}

/// Whether a stored string is in the sealed form (whatever key sealed it).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(PREFIX)
}

impl Keyring {
    /// `value` sealed with the current key and bound to `place`; unchanged without a key.
    pub fn seal(&self, value: &str, place: &str) -> Result<String, SealError> {
        let Some(key) = &self.current else {
            return Ok(value.to_string());
        };
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
        let sealed = key
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| SealError::Cipher)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + sealed.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(format!(
            "{PREFIX}{}.{}",
            key.id(),
            URL_SAFE_NO_PAD.encode(blob)
        ))
    }

    /// Opens a stored value bound to `place`; a value not in the sealed form passes through.
    pub fn open(&self, stored: &str, place: &str) -> Result<Opened, SealError> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(Opened::Clear(stored.to_string()));
        };
        let (id, payload) = rest.split_once('.').ok_or(SealError::Malformed)?;
        let (key, is_current) = match (&self.current, &self.previous) {
            (Some(k), _) if k.id() == id => (k, true),
            (_, Some(k)) if k.id() == id => (k, false),
            _ => return Err(SealError::UnknownKey(id.to_string())),
        };
        let blob = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| SealError::Malformed)?;
        if blob.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Malformed)?;
        let plain = key
            .cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| SealError::Rejected(id.to_string()))?;
        let value = String::from_utf8(plain).map_err(|_| SealError::Malformed)?;
        Ok(if is_current {
            Opened::Current(value)
        } else {
            Opened::Previous(value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SecretKey {
        SecretKey::from_bytes([byte; KEY_LEN])
    }

    fn ring(current: Option<u8>, previous: Option<u8>) -> Keyring {
        Keyring {
            current: current.map(key),
            previous: previous.map(key),
        }
    }

    #[test]
    fn a_sealed_value_opens_to_itself_and_does_not_show_it() {
        let keys = ring(Some(1), None);
        let secret = "pw-3f9a-round-trip";
        let sealed = keys
            .seal(secret, "id-1:delivery.auth.password")
            .expect("seal");
        assert!(is_sealed(&sealed), "{sealed}");
        assert!(!sealed.contains(secret), "{sealed}");
        assert!(sealed.contains(key(1).id()), "{sealed}");
        assert!(
            sealed
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "only URL-safe characters: {sealed}"
        );
        // A fresh nonce per value: the same secret never seals to the same text.
        let again = keys
            .seal(secret, "id-1:delivery.auth.password")
            .expect("seal");
        assert_ne!(sealed, again);
        assert_eq!(
            keys.open(&sealed, "id-1:delivery.auth.password"),
            Ok(Opened::Current(secret.into()))
        );
    }

    #[test]
    fn a_wrong_or_missing_key_is_refused_and_named() {
        let sealed = ring(Some(1), None).seal("tok", "p").expect("seal");
        let id = key(1).id().to_string();
        for other in [
            ring(Some(2), None),
            ring(Some(2), Some(3)),
            ring(None, None),
        ] {
            let err = other.open(&sealed, "p").expect_err("no key opens it");
            assert_eq!(err, SealError::UnknownKey(id.clone()));
            let text = err.to_string();
            assert!(
                text.contains(&id) && text.contains("SECRETS_KEY_PREVIOUS"),
                "{text}"
            );
        }
        // A key whose fingerprint matches but whose bytes differ is refused by the cipher.
        let at = sealed.len() - 10;
        let flipped = if &sealed[at..=at] == "A" { "B" } else { "A" };
        let forged = format!("{}{flipped}{}", &sealed[..at], &sealed[at + 1..]);
        assert_eq!(
            ring(Some(1), None).open(&forged, "p"),
            Err(SealError::Rejected(id))
        );
    }

    #[test]
    fn a_value_moved_to_another_place_is_refused() {
        let keys = ring(Some(1), None);
        let sealed = keys.seal("tok", "row-a:delivery.auth.token").expect("seal");
        for place in ["row-b:delivery.auth.token", "row-a:delivery.signing.secret"] {
            assert!(
                matches!(keys.open(&sealed, place), Err(SealError::Rejected(_))),
                "{place}"
            );
        }
    }

    #[test]
    fn the_previous_key_opens_and_marks_the_value_stale() {
        let sealed = ring(Some(1), None).seal("old", "p").expect("seal");
        let rotated = ring(Some(2), Some(1));
        let opened = rotated.open(&sealed, "p").expect("previous key opens");
        assert_eq!(opened, Opened::Previous("old".into()));
        assert!(opened.is_stale());
        let resealed = rotated.seal(opened.value(), "p").expect("seal");
        assert_eq!(
            ring(Some(2), None).open(&resealed, "p"),
            Ok(Opened::Current("old".into()))
        );
    }

    #[test]
    fn a_clear_value_passes_through_and_no_key_stores_in_clear() {
        let opened = ring(Some(1), None).open("plain", "p").expect("clear");
        assert_eq!(opened, Opened::Clear("plain".into()));
        assert!(opened.is_stale());
        assert_eq!(ring(None, None).seal("plain", "p"), Ok("plain".into()));
        assert_eq!(
            ring(Some(1), None).open("hp-sealed.v1.nodot", "p"),
            Err(SealError::Malformed)
        );
    }

    #[test]
    fn keys_are_read_from_32_bytes_of_base64_only() {
        let good = STANDARD.encode([7u8; 32]);
        let k = SecretKey::from_base64(&format!(" {good}\n")).expect("valid");
        assert_eq!(k, key(7));
        assert_eq!(k.id().len(), 8);
        assert!(!format!("{k:?}").contains(&good));
        assert_eq!(
            SecretKey::from_base64("not base64!"),
            Err(KeyError::NotBase64)
        );
        assert_eq!(
            SecretKey::from_base64(&STANDARD.encode([7u8; 16])),
            Err(KeyError::WrongLength(16))
        );
        assert_eq!(
            SecretKey::from_base64(&URL_SAFE_NO_PAD.encode([0xffu8; 32])),
            Err(KeyError::NotBase64),
            "URL-safe base64 is not the standard form"
        );
    }
}
