//! What an enrollment is: the stored record, its validated creation request, and the
//! subscription arguments that shape its AMQP source. Validation lives here so that the API,
//! the store and the worker share one definition of "valid".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;
use uuid::Uuid;

use crate::enrollment::error::EnrollmentError;
use crate::enrollment::settings::{DeliverySettings, MAX_PREFETCH};

/// A stored enrollment: which queue is pushed to which URL.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrollment {
    pub id: Uuid,
    /// The AMQP source address, passed to the broker verbatim.
    pub queue: String,
    pub target_url: String,
    pub subscription_args: SubscriptionArgs,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Delivery settings as given; the daemon's defaults fill the rest when a worker starts.
    #[serde(default)]
    pub delivery: DeliverySettings,
    /// Paused through the API; survives restarts.
    #[serde(default)]
    pub paused: bool,
}

/// Options of the AMQP source. Absent keys are `None` so that the stored JSON and the API
/// answer show exactly what the user asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriptionArgs {
    /// Durable source terminus (`unsettled-state`, expiry `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    /// JMS-style selector, sent as `apache.org:selector-filter:string`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Source capabilities, e.g. `["topic"]` on Artemis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Link credit; `DEFAULT_PREFETCH` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<u32>,
}

/// A validated `POST /enroll` body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEnrollment {
    pub queue: String,
    pub target_url: String,
    pub subscription_args: SubscriptionArgs,
    pub delivery: DeliverySettings,
}

use EnrollmentError::{Invalid, Malformed};

const SUBSCRIPTION_KEYS: [&str; 4] = ["durable", "selector", "capabilities", "prefetch"];
const TOP_LEVEL_KEYS: [&str; 4] = ["queue", "target_url", "subscription_args", "delivery"];

impl NewEnrollment {
    /// The enrollment this request creates, under `id`, created at `created_at` (RFC 3339),
    /// not paused.
    pub fn into_enrollment(self, id: uuid::Uuid, created_at: String) -> Enrollment {
        Enrollment {
            id,
            queue: self.queue,
            target_url: self.target_url,
            subscription_args: self.subscription_args,
            created_at,
            delivery: self.delivery,
            paused: false,
        }
    }

    /// Validates a parsed JSON body. Separates type errors (400) from refused values (422)
    /// and names the field in every message, which serde's derive cannot do.
    pub fn from_json(body: Value) -> Result<Self, EnrollmentError> {
        let Value::Object(mut fields) = body else {
            return Err(Malformed("the body must be a JSON object".into()));
        };
        if let Some(unknown) = fields
            .keys()
            .find(|k| !TOP_LEVEL_KEYS.contains(&k.as_str()))
        {
            return Err(Invalid(format!(
                "unknown field `{unknown}`; expected one of: {}",
                TOP_LEVEL_KEYS.join(", ")
            )));
        }
        let queue = required_string(&mut fields, "queue")?;
        if queue.trim().is_empty() {
            return Err(Invalid("`queue` must not be empty".into()));
        }
        let target_url = required_string(&mut fields, "target_url")?;
        validate_target_url(&target_url)?;
        let subscription_args = match fields.remove("subscription_args") {
            None | Some(Value::Null) => SubscriptionArgs::default(),
            Some(Value::Object(args)) => SubscriptionArgs::from_json(args)?,
            Some(_) => {
                return Err(Malformed(
                    "`subscription_args` must be a JSON object".into(),
                ));
            }
        };
        let delivery = match fields.remove("delivery") {
            None | Some(Value::Null) => DeliverySettings::default(),
            Some(v @ Value::Object(_)) => DeliverySettings::from_json(v)?,
            Some(_) => return Err(Malformed("`delivery` must be a JSON object".into())),
        };
        Ok(Self {
            queue,
            target_url,
            subscription_args,
            delivery,
        })
    }
}

/// Shows `target_url` with its password redacted (the settings redact their own secrets).
impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .field("target_url", &self.target_url_shown())
            .field("subscription_args", &self.subscription_args)
            .field("created_at", &self.created_at)
            .field("delivery", &self.delivery)
            .field("paused", &self.paused)
            .finish()
    }
}

impl Enrollment {
    /// The target URL safe to show: any password in it replaced by `***`. Only URLs that carry
    /// a password are rewritten, since parsing normalises the text otherwise.
    pub fn target_url_shown(&self) -> String {
        match Url::parse(&self.target_url) {
            Ok(url) if url.password().is_some() => redact_url(&url),
            _ => self.target_url.clone(),
        }
    }
}

/// A URL with its password (if any) replaced by `***`.
pub fn redact_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Only fails for URLs that cannot carry a password, which then have none to hide.
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

fn required_string(fields: &mut Map<String, Value>, name: &str) -> Result<String, EnrollmentError> {
    match fields.remove(name) {
        None | Some(Value::Null) => Err(Invalid(format!("`{name}` is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Malformed(format!("`{name}` must be a string"))),
    }
}

fn validate_target_url(raw: &str) -> Result<(), EnrollmentError> {
    let url =
        Url::parse(raw).map_err(|e| Invalid(format!("`target_url` is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Invalid("`target_url` must be an http or https URL".into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Invalid("`target_url` must name a host".into()));
    }
    Ok(())
}

impl SubscriptionArgs {
    /// Reads `subscription_args` as the store holds it. An unknown key is an error, not
    /// ignored: the API refuses unknown keys, so one in the store was written by a newer
    /// version (or by hand), and every key here shapes what the link takes from the broker (a
    /// selector, durability, capabilities). Attaching without it could consume messages that
    /// were not meant for this target; not starting the enrollment loses nothing.
    pub fn from_stored(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Some(keys) = value.as_object() else {
            return Err("not a JSON object".into());
        };
        if let Some(unknown) = keys
            .keys()
            .find(|k| !SUBSCRIPTION_KEYS.contains(&k.as_str()))
        {
            return Err(format!(
                "unknown key `{unknown}`; understood keys: {}",
                SUBSCRIPTION_KEYS.join(", ")
            ));
        }
        serde_json::from_value(value).map_err(|e| e.to_string())
    }

    fn from_json(mut args: Map<String, Value>) -> Result<Self, EnrollmentError> {
        if let Some(unknown) = args
            .keys()
            .find(|k| !SUBSCRIPTION_KEYS.contains(&k.as_str()))
        {
            return Err(Invalid(format!(
                "unknown key `subscription_args.{unknown}`; understood keys: {}",
                SUBSCRIPTION_KEYS.join(", ")
            )));
        }
        let durable = match args.remove("durable") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(b),
            Some(_) => {
                return Err(Malformed(
                    "`subscription_args.durable` must be a boolean".into(),
                ));
            }
        };
        let selector = match args.remove("selector") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(Invalid(
                    "`subscription_args.selector` must not be empty".into(),
                ));
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                return Err(Malformed(
                    "`subscription_args.selector` must be a string".into(),
                ));
            }
        };
        let capabilities = match args.remove("capabilities") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => {
                let mut symbols = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) if !s.trim().is_empty() => symbols.push(s),
                        Value::String(_) => {
                            return Err(Invalid(
                                "`subscription_args.capabilities` must not contain empty strings"
                                    .into(),
                            ));
                        }
                        _ => {
                            return Err(Malformed(
                                "`subscription_args.capabilities` must be an array of strings"
                                    .into(),
                            ));
                        }
                    }
                }
                Some(symbols)
            }
            Some(_) => {
                return Err(Malformed(
                    "`subscription_args.capabilities` must be an array of strings".into(),
                ));
            }
        };
        let prefetch = match args.remove("prefetch") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(p) if (1..=u64::from(MAX_PREFETCH)).contains(&p) => u32::try_from(p).ok(),
                _ => {
                    return Err(Invalid(format!(
                        "`subscription_args.prefetch` must be an integer from 1 to {MAX_PREFETCH}"
                    )));
                }
            },
            Some(_) => {
                return Err(Malformed(
                    "`subscription_args.prefetch` must be an integer".into(),
                ));
            }
        };
        Ok(Self {
            durable,
            selector,
            capabilities,
            prefetch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_bodies_are_accepted() {
        let e = NewEnrollment::from_json(json!({
            "queue": "/amq/queue/orders",
            "target_url": "http://127.0.0.1:9000/hook",
            "subscription_args": {"durable": true, "selector": "a = 1",
                                   "capabilities": ["topic"], "prefetch": 10}
        }))
        .expect("valid");
        assert_eq!(e.queue, "/amq/queue/orders");
        assert_eq!(e.subscription_args.prefetch, Some(10));
        assert_eq!(e.subscription_args.durable, Some(true));
        let bare = NewEnrollment::from_json(json!({"queue": "q", "target_url": "https://x.test"}))
            .expect("valid");
        assert_eq!(bare.subscription_args, SubscriptionArgs::default());
    }

    #[test]
    fn debug_output_hides_the_target_password() {
        let e = Enrollment {
            id: Uuid::nil(),
            queue: "q".into(),
            target_url: "http://ann:pw-debug-9c1f@127.0.0.1:1/x".into(),
            subscription_args: SubscriptionArgs::default(),
            created_at: String::new(),
            delivery: DeliverySettings::default(),
            paused: false,
        };
        let shown = format!("{e:?}");
        assert!(!shown.contains("pw-debug-9c1f"), "{shown}");
        assert!(shown.contains("http://ann:***@127.0.0.1:1/x"), "{shown}");
    }

    #[test]
    fn stored_subscription_args_are_read_strictly() {
        let args = SubscriptionArgs {
            durable: Some(true),
            selector: Some("a = 1".into()),
            capabilities: Some(vec!["topic".into()]),
            prefetch: Some(5),
        };
        let stored = serde_json::to_string(&args).expect("serialises");
        assert_eq!(SubscriptionArgs::from_stored(&stored), Ok(args));
        assert_eq!(
            SubscriptionArgs::from_stored("{}"),
            Ok(SubscriptionArgs::default())
        );
        for bad in [
            r#"{"shared": true}"#,
            r#"{"prefetch": "x"}"#,
            "[]",
            "not json",
        ] {
            let err = SubscriptionArgs::from_stored(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
        let unknown = SubscriptionArgs::from_stored(r#"{"durable": true, "shared": true}"#)
            .expect_err("unknown key");
        assert!(unknown.contains("`shared`"), "{unknown}");
    }

    #[test]
    fn each_bad_body_gets_its_class_and_names_its_field() {
        let cases = [
            (json!([1]), "object", true),
            (json!({"target_url": "http://x"}), "queue", false),
            (json!({"queue": 5, "target_url": "http://x"}), "queue", true),
            (
                json!({"queue": " ", "target_url": "http://x"}),
                "queue",
                false,
            ),
            (json!({"queue": "q"}), "target_url", false),
            (
                json!({"queue": "q", "target_url": "ftp://x"}),
                "target_url",
                false,
            ),
            (
                json!({"queue": "q", "target_url": "nope"}),
                "target_url",
                false,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "extra": 1}),
                "extra",
                false,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": 3}),
                "subscription_args",
                true,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"bogus": 1}}),
                "bogus",
                false,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"durable": "yes"}}),
                "durable",
                true,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"prefetch": 0}}),
                "prefetch",
                false,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"prefetch": "1"}}),
                "prefetch",
                true,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"capabilities": [1]}}),
                "capabilities",
                true,
            ),
            (
                json!({"queue": "q", "target_url": "http://x", "subscription_args": {"selector": ""}}),
                "selector",
                false,
            ),
        ];
        for (body, field, malformed) in cases {
            let err = NewEnrollment::from_json(body.clone()).expect_err("must be refused");
            assert!(err.to_string().contains(field), "{body}: {err}");
            assert_eq!(matches!(err, Malformed(_)), malformed, "{body}: {err:?}");
        }
    }
}
