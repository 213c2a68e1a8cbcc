//! The reply step (`delivery.reply`): when a pushed message names a `reply-to` and its POST
//! reached a final answer (2xx, or a status in `reject_on` / `drop_on`), the answer is
//! published there before the message is settled. Only once the broker accepted the reply is
//! the message settled as its answer says; a reply that cannot be published turns the
//! outcome into a failure, so the message is handed back (released or modified) and nothing
//! answered is lost silently. Retries publish nothing: only the final answer is kept.

use std::sync::Arc;

use fe2o3_amqp::types::messaging::{Body, Message, MessageId};
use fe2o3_amqp::types::primitives::Value;

use crate::amqp::publish::{PublishError, Publisher};
use crate::delivery::dispatcher::{DeliveryOutcome, Dispatcher};
use crate::delivery::publish::reply_message;
use crate::delivery::request::PushRequest;
use crate::shutdown::StopSignals;
use crate::telemetry::Metrics;
use crate::telemetry::relay::PublishOutcome;

/// What publishes replies; one for all workers.
#[derive(Clone)]
pub struct Replier {
    pub publisher: Arc<Publisher>,
    pub metrics: Metrics,
}

/// Where one message's reply goes, and the correlation-id it carries: the message's
/// message-id, else its correlation-id (a message with neither gets a reply without one).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyPlan {
    pub address: String,
    pub correlation: Option<MessageId>,
}

/// The reply plan of a message, when the enrollment replies and the message asks for one.
pub fn plan(replies: bool, message: &Message<Body<Value>>) -> Option<ReplyPlan> {
    if !replies {
        return None;
    }
    let properties = message.properties.as_ref()?;
    let address = properties.reply_to.as_ref().filter(|a| !a.is_empty())?;
    let correlation = properties
        .message_id
        .clone()
        .or_else(|| properties.correlation_id.clone());
    Some(ReplyPlan {
        address: address.clone(),
        correlation,
    })
}

/// Delivers one message and, with a plan, publishes the final answer as its reply.
pub async fn deliver(
    dispatcher: &Dispatcher,
    request: &PushRequest,
    plan: Option<&ReplyPlan>,
    replier: Option<&Replier>,
    signals: &StopSignals,
) -> DeliveryOutcome {
    match plan {
        None => dispatcher.deliver(request, signals).await,
        // Boxed: a publish under way is ~11 KB of future; inline, every delivery would carry
        // it, replying or not, and the runtime copies a task's future several times per spawn
        // (profiled: memcpy was over half of the daemon's instructions per message).
        Some(plan) => {
            Box::pin(deliver_and_reply(
                dispatcher, request, plan, replier, signals,
            ))
            .await
        }
    }
}

async fn deliver_and_reply(
    dispatcher: &Dispatcher,
    request: &PushRequest,
    plan: &ReplyPlan,
    replier: Option<&Replier>,
    signals: &StopSignals,
) -> DeliveryOutcome {
    let (outcome, answer) = dispatcher.deliver_keeping(request, true, signals).await;
    let final_answer = matches!(
        outcome,
        DeliveryOutcome::Delivered { .. }
            | DeliveryOutcome::Dropped { .. }
            | DeliveryOutcome::Rejected { .. }
    );
    let Some(answer) = answer.filter(|_| final_answer) else {
        return outcome;
    };
    let failed = |reason: String| DeliveryOutcome::Failed {
        reason,
        message_id: request.message_id.clone(),
    };
    let Some(replier) = replier else {
        return failed("the reply could not be published: no publisher".into());
    };
    let message = reply_message(
        &answer,
        plan.correlation.clone(),
        &dispatcher.policy().reply_headers,
    );
    let published = tokio::select! {
        biased;
        // Removal and the shutdown deadline abandon the reply as they abandon a POST.
        _ = signals.abandon.cancelled() => return DeliveryOutcome::HandedBack,
        published = replier.publisher.publish(&plan.address, message) => published,
    };
    let relay = replier.metrics.relay();
    match published {
        Ok(()) => {
            relay.reply(PublishOutcome::Accepted);
            outcome
        }
        Err(e) => {
            relay.reply(match e {
                PublishError::Refused(_) => PublishOutcome::Refused,
                PublishError::Unreachable(_) => PublishOutcome::Unreachable,
                PublishError::TooLarge(_) => PublishOutcome::TooLarge,
            });
            tracing::warn!(reply_to = %plan.address, error = %e, "the reply could not be published; handing the message back");
            failed(format!(
                "the target answered {}, but the reply to {} could not be published: {e}",
                answer.status, plan.address
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp::types::messaging::Properties;

    fn message(properties: Properties) -> Message<Body<Value>> {
        Message::builder()
            .properties(properties)
            .body(Body::Value(fe2o3_amqp::types::messaging::AmqpValue(
                Value::String("x".into()),
            )))
            .build()
    }

    #[test]
    fn a_plan_needs_reply_on_a_reply_to_and_an_id() {
        let full = message(
            Properties::builder()
                .message_id("m".to_string())
                .correlation_id("c".to_string())
                .reply_to("/queue/r")
                .build(),
        );
        assert_eq!(
            plan(true, &full),
            Some(ReplyPlan {
                address: "/queue/r".into(),
                correlation: Some(MessageId::String("m".into()))
            })
        );
        assert_eq!(plan(false, &full), None);
        let correlated = message(
            Properties::builder()
                .correlation_id(MessageId::Ulong(7))
                .reply_to("/queue/r")
                .build(),
        );
        assert_eq!(
            plan(true, &correlated).and_then(|p| p.correlation),
            Some(MessageId::Ulong(7))
        );
        let no_reply_to = message(Properties::builder().message_id("m".to_string()).build());
        assert_eq!(plan(true, &no_reply_to), None);
    }

    /// A delivery that replies boxes its publish: the future every delivery task carries stays
    /// the size of a plain POST's, so a replying enrollment's feature costs nothing to the rest
    /// (a publish under way inline made every delivery ~8× larger, and memcpy over half of the
    /// daemon's instructions per message).
    #[test]
    fn a_delivery_future_carries_no_reply_publish_inline() {
        use crate::pipeline::tests::live;
        use crate::telemetry::EnrollmentTelemetry;

        let live = live(
            "http://127.0.0.1:9/hook",
            serde_json::json!({"reply": true}),
        );
        let telemetry = Arc::new(EnrollmentTelemetry::new(
            live.enrollment.id,
            Arc::clone(&live.status),
            &Metrics::new(false),
            0,
        ));
        let dispatcher = Dispatcher::new(reqwest::Client::new().into(), &live, telemetry)
            .expect("a valid target URL");
        let message = message(Properties::default());
        let request = PushRequest::from_message(&message, dispatcher.enrollment_header(), 0);
        let plan = ReplyPlan {
            address: "/queues/replies".into(),
            correlation: None,
        };
        let signals = StopSignals::default();
        let plain = std::mem::size_of_val(&dispatcher.deliver(&request, &signals));
        let replying =
            std::mem::size_of_val(&deliver(&dispatcher, &request, Some(&plan), None, &signals));
        assert!(
            replying <= plain + 128,
            "a replying delivery's future is {replying} bytes, a plain one's {plain}"
        );
    }
}
