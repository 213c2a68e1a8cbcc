//! The reply link's task: once the first request wants it, attach (a dynamic node, else
//! `REPLY_ADDRESS`), hand every reply to its request, and on any broker error let the link go
//! and attach again with backoff, until the daemon stops.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::amqp::connection::BrokerSettings;
use crate::amqp::error::LinkError;
use crate::amqp::reply_link::{ReplyLink, refuses_dynamic};
use crate::backoff::{Backoff, BackoffSettings};
use crate::delivery::amqp_json::message_id_text;
use crate::delivery::publish::http_from_reply;
use crate::relay::Relay;

/// A link that stayed up this long resets the backoff.
const HEALTHY_LINK_AGE: Duration = Duration::from_secs(10);

/// Runs the reply link until the relay's stop token fires.
pub async fn run(
    relay: Arc<Relay>,
    broker: Arc<BrokerSettings>,
    fallback: Option<String>,
    reconnect: BackoffSettings,
) {
    let container_id = format!("hot-potato-replies-{}", uuid::Uuid::new_v4());
    let mut backoff = Backoff::new(reconnect);
    let stop = relay.stop.clone();
    // Set once the broker said it makes no dynamic nodes: REPLY_ADDRESS from then on.
    let mut no_dynamic = false;
    let mut warned = false;
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = relay.reply_wanted() => {}
    }
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => break,
            opened = open(&broker, &container_id, fallback.as_deref(), &mut no_dynamic) => opened,
        };
        match opened {
            Ok(mut link) => {
                tracing::info!(address = link.address(), "reply link attached");
                relay.set_reply_address(Some(link.address().to_string()));
                let attached = Instant::now();
                let failed = loop {
                    tokio::select! {
                        _ = stop.cancelled() => break None,
                        received = link.recv() => match received {
                            Ok(message) => {
                                let correlation = message
                                    .properties
                                    .as_ref()
                                    .and_then(|p| p.correlation_id.as_ref())
                                    .map(message_id_text);
                                relay.take(correlation, http_from_reply(&message));
                            }
                            Err(e) => break Some(e),
                        }
                    }
                };
                relay.set_reply_address(None);
                link.close().await;
                let Some(e) = failed else { break };
                tracing::warn!(error = %e, "reply link failed; attaching again");
                if attached.elapsed() >= HEALTHY_LINK_AGE {
                    backoff.reset();
                }
            }
            Err(e) if no_dynamic && fallback.is_none() => {
                if !warned {
                    tracing::warn!(error = %e, "the broker makes no dynamic reply node and REPLY_ADDRESS is not set: POST /request answers 503 until it is");
                }
                warned = true;
            }
            Err(e) => tracing::warn!(error = %e, "cannot attach the reply link"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    relay.set_reply_address(None);
}

/// A dynamic node unless the broker refused one before; else `REPLY_ADDRESS`.
async fn open(
    broker: &BrokerSettings,
    container_id: &str,
    fallback: Option<&str>,
    no_dynamic: &mut bool,
) -> Result<ReplyLink, LinkError> {
    if !*no_dynamic {
        match ReplyLink::dynamic(broker, container_id).await {
            Ok(link) => return Ok(link),
            Err(e) if refuses_dynamic(&e) => {
                tracing::info!(error = %e, "the broker makes no dynamic reply node; using REPLY_ADDRESS");
                *no_dynamic = true;
            }
            Err(e) if fallback.is_none() => return Err(e),
            Err(e) => tracing::debug!(error = %e, "no dynamic reply node; trying REPLY_ADDRESS"),
        }
    }
    match fallback {
        Some(address) => ReplyLink::fixed(broker, container_id, address).await,
        None => Err(LinkError::NoReplyNode),
    }
}
