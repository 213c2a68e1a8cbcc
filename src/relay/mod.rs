//! HTTP → queue and HTTP → queue → HTTP: `POST /publish` and `POST /request` as the API
//! calls them, on the shared [`Publisher`], and the correlation of requests with their
//! replies on the daemon's one reply link.
//!
//! A request gets a fresh message-id and `reply-to` = the reply link's address; the reply
//! whose correlation-id is that id answers it, whatever order replies come in. A reply nobody
//! waits for (the request timed out, or was made before a restart) is dropped and counted.
//!
//! - [`replies`]: the reply link's task: attach, take replies, reconnect with backoff.

pub mod replies;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{Data, Message};
use reqwest::header::HeaderMap;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::amqp::publish::{PublishError, Publisher};
use crate::delivery::publish::{HttpReply, message_from_http};
use crate::enrollment::address_glob::AddressPatterns;
use crate::telemetry::Metrics;
use crate::telemetry::relay::PublishOutcome;

/// `timeout_ms` of `POST /request` when not given, and its largest value.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a request waits for the reply link to come up (right after start, or while it
/// reconnects) before answering 503.
const REPLY_LINK_WAIT: Duration = Duration::from_secs(5);

/// Why a publish or request got no answer of its own.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("`address` is required and must not be empty")]
    NoAddress,
    #[error("address `{0}` is not allowed by PUBLISH_ADDRESSES")]
    NotAllowed(String),
    #[error("{0}")]
    BadHeaders(String),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("no reply link to the broker yet: {0}")]
    NoReplyLink(String),
    #[error("no reply within {0} ms")]
    TimedOut(u128),
    #[error("the reply's http-status is not a status from 100 to 599")]
    BadReply,
    #[error("the daemon is shutting down")]
    Stopping,
}

/// What the publish routes reach.
pub struct Relay {
    publisher: Arc<Publisher>,
    metrics: Metrics,
    allowed: AddressPatterns,
    max_bytes: usize,
    waiters: Mutex<HashMap<String, oneshot::Sender<HttpReply>>>,
    /// The reply link's address while it is attached.
    reply_address: watch::Sender<Option<String>>,
    /// Set by the first `POST /request`: the reply link attaches only then, so a daemon that
    /// never serves a request holds no reply link (and, on a broker without dynamic nodes and
    /// without `REPLY_ADDRESS`, does not retry a refused attach for ever).
    reply_wanted: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Relay {
    pub fn new(
        publisher: Arc<Publisher>,
        metrics: Metrics,
        allowed: AddressPatterns,
        max_bytes: usize,
        stop: CancellationToken,
    ) -> Self {
        Self {
            publisher,
            metrics,
            allowed,
            max_bytes,
            waiters: Mutex::default(),
            reply_address: watch::Sender::new(None),
            reply_wanted: watch::Sender::new(false),
            stop,
        }
    }

    /// `PUBLISH_MAX_BYTES`.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Refuses an empty address, or one `PUBLISH_ADDRESSES` does not allow.
    pub fn check(&self, address: Option<&str>) -> Result<String, RelayError> {
        let address = address.map(str::trim).unwrap_or("");
        if address.is_empty() {
            return Err(RelayError::NoAddress);
        }
        if !self.allowed.allows(address) {
            return Err(RelayError::NotAllowed(address.to_string()));
        }
        Ok(address.to_string())
    }

    /// `POST /publish`: the message-id it was sent with.
    pub async fn publish(
        &self,
        address: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<String, RelayError> {
        let fresh = || uuid::Uuid::new_v4().to_string();
        let outgoing =
            message_from_http(headers, body, fresh, None).map_err(RelayError::BadHeaders)?;
        self.send(address, outgoing.message).await?;
        Ok(outgoing.message_id)
    }

    /// `POST /request`: publishes with `reply-to` = the reply link and waits for the reply.
    pub async fn request(
        &self,
        address: &str,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpReply, RelayError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let reply_to = self.reply_address(deadline).await?;
        let id = uuid::Uuid::new_v4().to_string();
        let outgoing = message_from_http(headers, body, || id.clone(), Some(&reply_to))
            .map_err(RelayError::BadHeaders)?;
        let (tx, rx) = oneshot::channel();
        self.waiters().insert(id.clone(), tx);
        // Removes the waiter however this ends: answered, timed out, or the caller gone.
        let _waiting = Waiting { relay: self, id };
        let answered = async {
            self.send(address, outgoing.message).await?;
            rx.await.map_err(|_| RelayError::Stopping)
        };
        let reply = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(RelayError::Stopping),
            _ = tokio::time::sleep_until(deadline) => {
                self.metrics.relay().request_timed_out();
                return Err(RelayError::TimedOut(timeout.as_millis()));
            }
            reply = answered => reply?,
        };
        self.metrics.relay().request_answered(started.elapsed());
        if reply.status.is_none() {
            return Err(RelayError::BadReply);
        }
        Ok(reply)
    }

    /// The reply link's address, waiting a little (never past `deadline`) for it to attach.
    async fn reply_address(&self, deadline: tokio::time::Instant) -> Result<String, RelayError> {
        self.reply_wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
        let mut watching = self.reply_address.subscribe();
        let wait = tokio::time::Instant::now() + REPLY_LINK_WAIT;
        let until = wait.min(deadline);
        let ready = tokio::time::timeout_at(until, watching.wait_for(Option::is_some)).await;
        match ready {
            Ok(Ok(address)) => Ok(address.clone().unwrap_or_default()),
            _ if self.stop.is_cancelled() => Err(RelayError::Stopping),
            _ => Err(RelayError::NoReplyLink(
                "the reply link is not attached (see the log; on RabbitMQ 3.x set REPLY_ADDRESS)"
                    .into(),
            )),
        }
    }

    async fn send(&self, address: &str, message: Message<Data>) -> Result<(), RelayError> {
        let sent = self.publisher.publish(address, message).await;
        self.metrics.relay().publish(match &sent {
            Ok(()) => PublishOutcome::Accepted,
            Err(PublishError::Refused(_)) => PublishOutcome::Refused,
            Err(PublishError::Unreachable(_)) => PublishOutcome::Unreachable,
            Err(PublishError::TooLarge(_)) => PublishOutcome::TooLarge,
        });
        Ok(sent?)
    }

    fn waiters(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<HttpReply>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a reply to the request it answers; counts and drops it when none waits.
    pub(crate) fn take(&self, correlation_id: Option<String>, reply: HttpReply) {
        let waiter = correlation_id.and_then(|id| self.waiters().remove(&id));
        match waiter.map(|w| w.send(reply)) {
            Some(Ok(())) => {}
            _ => self.metrics.relay().late_reply(),
        }
    }

    pub(crate) fn set_reply_address(&self, address: Option<String>) {
        self.reply_address.send_replace(address);
    }

    /// Returns once a request has wanted the reply link (at once if one has).
    pub(crate) async fn reply_wanted(&self) {
        let mut wanted = self.reply_wanted.subscribe();
        // The sender lives as long as `self`, so the wait cannot fail.
        let _ = wanted.wait_for(|w| *w).await;
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiters().len()
    }
}

struct Waiting<'a> {
    relay: &'a Relay,
    id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.relay.waiters().remove(&self.id);
    }
}
