//! Batched POSTs (`delivery.batch`): gathering messages into batches as the receive loop takes
//! them, and delivering a batch (one POST through the dispatcher, retries, breaker and signing
//! included) into one outcome per message.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::batch::{MemberStatus, batch_request, member_ids, member_statuses};
use crate::delivery::dispatcher::{DeliveryOutcome, Dispatcher};
use crate::delivery::post::age_since;
use crate::delivery::request::PushRequest;
use crate::enrollment::batch::BatchPolicy;
use crate::pipeline::settle::Finished;
use crate::pipeline::timer::KeptTimer;
use crate::shutdown::StopSignals;

/// Messages sealed into one POST.
pub struct Batch<D> {
    deliveries: Vec<D>,
    requests: Vec<PushRequest>,
}

impl<D> Batch<D> {
    fn with_capacity(n: usize) -> Self {
        Self {
            deliveries: Vec::with_capacity(n),
            requests: Vec::with_capacity(n),
        }
    }

    fn len(&self) -> usize {
        self.deliveries.len()
    }

    /// The deliveries, for handing them back unsent.
    pub fn into_deliveries(self) -> Vec<D> {
        self.deliveries
    }
}

/// The batch being gathered, and the sealed batches waiting for a free POST slot, oldest
/// first (so batches leave in the order their messages came). All of it is bounded by the
/// link credit: the broker sends no more than that unsettled.
pub struct Gathering<D> {
    policy: BatchPolicy,
    current: Batch<D>,
    bytes: u64,
    due_at: Option<Instant>,
    /// `due_at`'s timer, kept across the loop's turns (see [`KeptTimer`]).
    timer: KeptTimer,
    sealed: VecDeque<Batch<D>>,
}

impl<D> Gathering<D> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            policy,
            current: Batch::with_capacity(policy.max_messages as usize),
            bytes: 0,
            due_at: None,
            timer: KeptTimer::default(),
            sealed: VecDeque::new(),
        }
    }

    fn current_full(&self) -> bool {
        self.current.len() >= self.policy.max_messages as usize
            || (!self.current.deliveries.is_empty() && self.bytes >= self.policy.max_bytes)
    }

    fn seal(&mut self) {
        let capacity = self.policy.max_messages as usize;
        let batch = std::mem::replace(&mut self.current, Batch::with_capacity(capacity));
        self.bytes = 0;
        self.due_at = None;
        self.timer.disarm();
        self.sealed.push_back(batch);
    }

    pub fn push(&mut self, delivery: D, request: PushRequest) {
        let len = request.body.len() as u64;
        // A message that would take the batch over `max_bytes` starts the next one.
        if !self.current.deliveries.is_empty()
            && self.bytes.saturating_add(len) > self.policy.max_bytes
        {
            self.seal();
        }
        if self.current.deliveries.is_empty() {
            self.due_at = Some(Instant::now() + Duration::from_millis(self.policy.max_wait_ms));
        }
        self.current.deliveries.push(delivery);
        self.current.requests.push(request);
        self.bytes = self.bytes.saturating_add(len);
        if self.current_full() {
            self.seal();
        }
    }

    /// When the batch being gathered must go; `None` while it is empty.
    pub fn due_at(&self) -> Option<Instant> {
        self.due_at
    }

    /// Resolves when the batch being gathered is due; never while it is empty. Cancel-safe.
    pub async fn due(&mut self) {
        self.timer.until(self.due_at).await
    }

    /// The next batch ready to be sent: a sealed one, else the current one when it is full or
    /// due.
    pub fn next_ready(&mut self, now: Instant) -> Option<Batch<D>> {
        if self.sealed.is_empty()
            && !self.current.deliveries.is_empty()
            && self.due_at.is_some_and(|due| due <= now)
        {
            self.seal();
        }
        self.sealed.pop_front()
    }

    /// Everything gathered and not sent, for handing back on stop.
    pub fn drain(&mut self) -> Vec<D> {
        let mut out: Vec<D> = self
            .sealed
            .drain(..)
            .flat_map(Batch::into_deliveries)
            .collect();
        out.append(&mut self.current.deliveries);
        self.current.requests.clear();
        self.bytes = 0;
        self.due_at = None;
        self.timer.disarm();
        out
    }
}

/// Sends one batch and says what became of each message.
pub async fn deliver<D>(
    dispatcher: &Dispatcher,
    batch: Batch<D>,
    signals: &StopSignals,
) -> Vec<Finished<D>> {
    let ids = member_ids(&batch.requests);
    let request = batch_request(
        &batch.requests,
        &ids,
        dispatcher.enrollment_header(),
        dispatcher.signs(),
    );
    let (outcome, answer) = dispatcher.deliver_keeping(&request, true, signals).await;
    let statuses = match (&outcome, answer) {
        (DeliveryOutcome::Delivered { .. }, Some(answer)) if answer.truncated => Err(format!(
            "the target's batch answer is longer than RESPONSE_MAX_BYTES ({} bytes read)",
            answer.body.len()
        )),
        (DeliveryOutcome::Delivered { .. }, Some(answer)) => {
            member_statuses(&answer.body, &ids).map_err(|e| e.to_string())
        }
        (DeliveryOutcome::Delivered { .. }, None) => Ok(vec![MemberStatus::Accepted; ids.len()]),
        _ => Ok(Vec::new()),
    };
    let Batch {
        deliveries,
        requests,
    } = batch;
    deliveries
        .into_iter()
        .zip(requests)
        .enumerate()
        .map(|(i, (delivery, request))| {
            let message_id = request.message_id;
            let member = match (&outcome, &statuses) {
                (DeliveryOutcome::Delivered { .. }, Ok(statuses)) => match statuses.get(i) {
                    Some(MemberStatus::Accepted) => DeliveryOutcome::Delivered {
                        age: request.created_at_ms.and_then(age_since),
                    },
                    Some(MemberStatus::Drop) => DeliveryOutcome::Dropped {
                        reason: "the target's batch answer said drop".into(),
                        message_id,
                    },
                    Some(MemberStatus::Reject) => DeliveryOutcome::Rejected {
                        reason: "the target's batch answer said reject".into(),
                        message_id,
                    },
                    Some(MemberStatus::Retry) | None => DeliveryOutcome::Failed {
                        reason: "the target's batch answer said retry".into(),
                        message_id,
                    },
                },
                (DeliveryOutcome::Delivered { .. }, Err(reason)) => DeliveryOutcome::Failed {
                    reason: reason.clone(),
                    message_id,
                },
                (DeliveryOutcome::Dropped { reason, .. }, _) => DeliveryOutcome::Dropped {
                    reason: reason.clone(),
                    message_id,
                },
                (DeliveryOutcome::Rejected { reason, .. }, _) => DeliveryOutcome::Rejected {
                    reason: reason.clone(),
                    message_id,
                },
                (DeliveryOutcome::Failed { reason, .. }, _) => DeliveryOutcome::Failed {
                    reason: reason.clone(),
                    message_id,
                },
                (DeliveryOutcome::HandedBack, _) => DeliveryOutcome::HandedBack,
            };
            (delivery, member)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(len: usize) -> PushRequest {
        PushRequest {
            body: Bytes::from(vec![b'x'; len]),
            headers: Default::default(),
            message_id: None,
            created_at_ms: None,
            skipped_properties: 0,
            webhook_id: String::new(),
        }
    }

    fn policy(max_messages: u32, max_bytes: u64, max_wait_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_messages,
            max_bytes,
            max_wait_ms,
        }
    }

    #[test]
    fn a_batch_goes_when_full_by_count_by_bytes_or_by_time() {
        let now = Instant::now();
        let mut g = Gathering::new(policy(3, 1000, 60_000));
        for i in 0..2 {
            g.push(i, request(10));
            assert!(g.next_ready(now).is_none(), "not full, not due");
        }
        g.push(2, request(10));
        let batch = g.next_ready(now).expect("full by count");
        assert_eq!(batch.into_deliveries(), [0, 1, 2]);

        // 600 + 600 > 1000: the second message starts the next batch.
        g.push(3, request(600));
        assert!(g.next_ready(now).is_none());
        g.push(4, request(600));
        assert_eq!(g.next_ready(now).expect("sealed").into_deliveries(), [3]);
        // A message over max_bytes goes alone.
        g.push(5, request(2000));
        assert_eq!(g.next_ready(now).expect("sealed").into_deliveries(), [4]);
        assert_eq!(g.next_ready(now).expect("full").into_deliveries(), [5]);

        let mut g = Gathering::new(policy(100, 1000, 5));
        g.push(6, request(1));
        let due = g.due_at().expect("due");
        assert!(g.next_ready(due - Duration::from_millis(1)).is_none());
        assert_eq!(g.next_ready(due).expect("due").into_deliveries(), [6]);
        assert!(g.due_at().is_none());
    }

    #[test]
    fn sealed_batches_leave_oldest_first_and_drain_hands_back_everything() {
        let now = Instant::now();
        let mut g = Gathering::new(policy(1, 1000, 60_000));
        for i in 0..3 {
            g.push(i, request(1));
        }
        assert_eq!(g.next_ready(now).expect("first").into_deliveries(), [0]);
        g.push(3, request(1));
        assert_eq!(g.drain(), [1, 2, 3]);
        assert!(g.next_ready(now).is_none() && g.due_at().is_none());
    }
}
