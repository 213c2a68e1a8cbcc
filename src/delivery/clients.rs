//! Which HTTP client carries an enrollment's POSTs: [`PlainHttp`] for a plain-HTTP target it
//! can reach directly, reqwest for every other. Chosen once per enrollment, from its URL.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue};
use url::Url;

use crate::delivery::plain_http::{PlainHttp, PlainTarget};
use crate::delivery::post::{Answer, PostResult, post};
use crate::enrollment::target::TargetPolicy;

/// What both clients send as `User-Agent` unless the enrollment's headers set one.
pub const USER_AGENT: &str = concat!("hot-potato/", env!("CARGO_PKG_VERSION"));

/// The clients every worker shares. Connection pools are per target address, so a slow target
/// only ties up its own connections.
#[derive(Clone)]
pub struct TargetHttp {
    pub general: reqwest::Client,
    /// `None` sends every target through reqwest (`TARGET_DIRECT_HTTP1=false`, or a proxy
    /// set in the environment, which only reqwest honours).
    pub plain: Option<Arc<PlainHttp>>,
}

impl From<reqwest::Client> for TargetHttp {
    /// `general` for `https` and the like, and a direct client for plain HTTP with no target
    /// rules beyond the enrollment's checks (as a default `reqwest::Client` has none).
    fn from(general: reqwest::Client) -> Self {
        Self {
            general,
            plain: Some(Arc::new(PlainHttp::new(
                TargetPolicy::default(),
                HeaderValue::from_static(USER_AGENT),
            ))),
        }
    }
}

impl TargetHttp {
    /// The client for `url` and what it needs to reach it.
    pub fn route(&self, url: Url) -> TargetRoute {
        let direct = self.plain.as_ref().and_then(|client| {
            let target = client.target(&url)?;
            Some(TargetRoute::Direct(Arc::clone(client), Box::new(target)))
        });
        direct.unwrap_or_else(|| TargetRoute::Reqwest(self.general.clone(), url))
    }
}

/// How one enrollment's POSTs go out.
pub enum TargetRoute {
    /// Boxed: an idle enrollment keeps this no wider than reqwest's route.
    Direct(Arc<PlainHttp>, Box<PlainTarget>),
    /// The URL parsed once: reqwest would otherwise parse (and IDNA-map) it per request.
    Reqwest(reqwest::Client, Url),
}

impl TargetRoute {
    /// One POST, bounded by `timeout` from connect to the end of the answer's body, of which
    /// at most `max_body` bytes are read. With `keep`, the answer is kept too, for a reply.
    pub async fn post(
        &self,
        headers: HeaderMap,
        body: Bytes,
        bounds: (Duration, usize),
        keep: bool,
    ) -> (PostResult, Option<Answer>) {
        match self {
            Self::Direct(client, target) => client.post(target, headers, body, bounds, keep).await,
            Self::Reqwest(client, url) => post(client, url, headers, body, bounds, keep).await,
        }
    }
}

/// Whether an environment variable reqwest reads for a proxy is set: then every POST goes
/// through reqwest, which honours it.
pub fn proxy_in_environment() -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}
