//! `SECRETS_KEY` and `SECRETS_KEY_PREVIOUS`: the keys that seal stored secrets, read from
//! standard base64 of 32 bytes, refused at start otherwise (naming the variable). The raw text
//! is never shown: its `Debug` is redacted, and so is the key's.

use std::fmt;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::seal::{Keyring, SecretKey};

/// A key as it comes from the environment, before it is read.
#[derive(Deserialize)]
#[serde(transparent)]
pub(super) struct RawSecret(String);

impl fmt::Debug for RawSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The keyring from the two variables. An empty variable counts as unset, as `.env.example`
/// leaves it; `SECRETS_KEY_PREVIOUS` alone is refused, since nothing would seal the rows it
/// opens and they would be rewritten in clear.
pub(super) fn from_raw(
    key: Option<RawSecret>,
    previous: Option<RawSecret>,
) -> Result<Keyring, ConfigError> {
    let read = |var: &'static str, raw: Option<RawSecret>| match raw {
        Some(RawSecret(text)) if !text.trim().is_empty() => SecretKey::from_base64(&text)
            .map(Some)
            .map_err(|e| invalid(var, e.to_string())),
        _ => Ok(None),
    };
    let keys = Keyring {
        current: read("SECRETS_KEY", key)?,
        previous: read("SECRETS_KEY_PREVIOUS", previous)?,
    };
    if keys.current.is_none() && keys.previous.is_some() {
        return Err(invalid(
            "SECRETS_KEY_PREVIOUS",
            "is set without SECRETS_KEY; set SECRETS_KEY to the new key when rotating",
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, String> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .map_err(|e| e.to_string())
    }

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const OTHER: &str = "HxwdGhsYGRYXFBUSExAREA4PDA0KCwgJBgcEBQIDAAE=";

    #[test]
    fn keys_are_read_and_never_shown() {
        let c = cfg(&[("SECRETS_KEY", KEY), ("SECRETS_KEY_PREVIOUS", OTHER)]).expect("valid");
        let (current, previous) = (
            c.secrets.current.as_ref().expect("current"),
            c.secrets.previous.as_ref().expect("previous"),
        );
        assert_ne!(current.id(), previous.id());
        let shown = format!("{c:?}");
        assert!(!shown.contains(KEY) && !shown.contains(OTHER), "{shown}");
        assert!(shown.contains(current.id()), "{shown}");
        for unset in [vec![], vec![("SECRETS_KEY", "")]] {
            let c = cfg(&unset).expect("valid");
            assert!(c.secrets.current.is_none() && c.secrets.previous.is_none());
        }
    }

    #[test]
    fn bad_keys_are_refused_naming_the_variable() {
        let short = "AAECAwQFBgcICQoLDA0ODw=="; // 16 bytes
        let cases = [
            (
                vec![("SECRETS_KEY", "not base64!")],
                "SECRETS_KEY:",
                "base64",
            ),
            (vec![("SECRETS_KEY", short)], "SECRETS_KEY:", "16 bytes"),
            (
                vec![("SECRETS_KEY", KEY), ("SECRETS_KEY_PREVIOUS", "%%%")],
                "SECRETS_KEY_PREVIOUS:",
                "base64",
            ),
            (
                vec![("SECRETS_KEY", KEY), ("SECRETS_KEY_PREVIOUS", short)],
                "SECRETS_KEY_PREVIOUS:",
                "16 bytes",
            ),
            (
                vec![("SECRETS_KEY_PREVIOUS", KEY)],
                "SECRETS_KEY_PREVIOUS:",
                "without SECRETS_KEY",
            ),
        ];
        for (vars, var, why) in cases {
            let err = cfg(&vars).expect_err("refused");
            assert!(err.contains(var) && err.contains(why), "{vars:?}: {err}");
            assert!(!err.contains(KEY), "{err}");
        }
    }
}
