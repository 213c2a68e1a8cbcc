//! A fake link and opener for unit tests of the worker, the supervisor and the registry: a
//! broker in a mutex that hands out queued messages while credit allows, and records every
//! call the worker makes (settlements, credit, how the link ended).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fe2o3_amqp::types::messaging::{Body, Data, Header, Message, Properties};
use fe2o3_amqp::types::primitives::{Binary, Value};
use tokio::sync::Notify;

use crate::amqp::error::LinkError;
use crate::amqp::link::Incoming;
use crate::amqp::outcome::Disposition;
use crate::enrollment::outcome::FailureOutcome;
use crate::enrollment::record::Enrollment;
use crate::pipeline::link::{Link, LinkOpener};

/// One call the worker made on a fake link, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Open,
    Settle(u64, Disposition),
    AcceptAll(Vec<u64>),
    SetCredit(u32),
    Detach,
    Close,
    Abandon,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Incoming<u64>>,
    calls: Vec<Call>,
    /// Credit the link has now; messages flow only while it is above zero.
    credit: u32,
    /// The next `recv` fails (the broker dropped the link), once.
    fail_next_recv: bool,
    /// Opens that fail before one succeeds.
    failing_opens: u32,
    /// The next open panics (a worker crash for the supervisor to catch).
    panic_next_open: bool,
    next_id: u64,
}

/// The broker side of every fake link one opener hands out.
#[derive(Clone)]
pub struct FakeBroker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    failure_outcome: FailureOutcome,
}

impl FakeBroker {
    pub fn new(failure_outcome: FailureOutcome) -> Self {
        Self {
            state: Arc::default(),
            changed: Arc::new(Notify::new()),
            failure_outcome,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message with `body` (a Data section); returns its delivery id.
    pub fn push(&self, body: &str) -> u64 {
        self.push_message(message(body))
    }

    pub fn push_message(&self, message: Message<Body<Value>>) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Incoming::Message {
            delivery: id,
            message: Box::new(message),
        });
        drop(state);
        self.changed.notify_waiters();
        id
    }

    pub fn push_undecodable(&self, reason: &str) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.queue.push_back(Incoming::Undecodable {
            delivery: id,
            reason: reason.into(),
        });
        drop(state);
        self.changed.notify_waiters();
        id
    }

    pub fn fail_next_recv(&self) {
        self.lock().fail_next_recv = true;
        self.changed.notify_waiters();
    }

    pub fn fail_opens(&self, n: u32) {
        self.lock().failing_opens = n;
    }

    pub fn panic_next_open(&self) {
        self.lock().panic_next_open = true;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Waits until the calls satisfy `done`, at most `limit`; the calls either way. Looks
    /// again on every call and every 10 ms, so `done` may watch other things too.
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            let calls = self.calls();
            if done(&calls) || tokio::time::Instant::now() >= deadline {
                return calls;
            }
            let next_look = (tokio::time::Instant::now() + Duration::from_millis(10)).min(deadline);
            let _ = tokio::time::timeout_at(next_look, notified).await;
        }
    }

    fn record(&self, call: Call) {
        self.lock().calls.push(call);
        self.changed.notify_waiters();
    }
}

/// An AMQP message with a Data body and a message-id.
pub fn message(body: &str) -> Message<Body<Value>> {
    Message {
        header: Some(Header::default()),
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(Properties {
            message_id: Some(body.to_string().into()),
            ..Default::default()
        }),
        application_properties: None,
        body: Body::Data(vec![Data(Binary::from(body.as_bytes().to_vec()))].into()),
        footer: None,
    }
}

pub struct FakeOpener(pub FakeBroker);

pub struct FakeLink(FakeBroker);

impl LinkOpener for FakeOpener {
    type Link = FakeLink;

    async fn open(&self, _enrollment: &Enrollment, credit: u32) -> Result<FakeLink, LinkError> {
        let broker = &self.0;
        let opened = {
            let mut state = broker.lock();
            state.calls.push(Call::Open);
            if std::mem::take(&mut state.panic_next_open) {
                drop(state);
                broker.changed.notify_waiters();
                panic!("the fake opener was told to panic");
            }
            if state.failing_opens > 0 {
                state.failing_opens -= 1;
                Err(LinkError::BadUrl)
            } else {
                state.credit = credit;
                Ok(FakeLink(broker.clone()))
            }
        };
        broker.changed.notify_waiters();
        opened
    }
}

impl Link for FakeLink {
    type Delivery = u64;

    fn failure_outcome(&self) -> FailureOutcome {
        self.0.failure_outcome
    }

    async fn recv(&mut self) -> Result<Incoming<u64>, LinkError> {
        loop {
            let notified = self.0.changed.notified();
            {
                let mut state = self.0.lock();
                if std::mem::take(&mut state.fail_next_recv) {
                    return Err(LinkError::Credit("the fake broker dropped the link".into()));
                }
                if state.credit > 0
                    && let Some(next) = state.queue.pop_front()
                {
                    return Ok(next);
                }
            }
            notified.await;
        }
    }

    async fn settle(&mut self, delivery: u64, disposition: Disposition) -> Result<(), LinkError> {
        self.0.record(Call::Settle(delivery, disposition));
        Ok(())
    }

    async fn accept_all(&mut self, deliveries: Vec<u64>) -> Result<(), LinkError> {
        self.0.record(Call::AcceptAll(deliveries));
        Ok(())
    }

    async fn set_credit(&mut self, credit: u32) -> Result<(), LinkError> {
        self.0.lock().credit = credit;
        self.0.record(Call::SetCredit(credit));
        Ok(())
    }

    async fn detach(self) {
        self.0.record(Call::Detach);
    }

    async fn close(self) {
        self.0.record(Call::Close);
    }

    async fn abandon(self) {
        self.0.record(Call::Abandon);
    }
}

/// The settled dispositions by delivery id, accept-all batches expanded.
pub fn settlements(calls: &[Call]) -> Vec<(u64, Disposition)> {
    let mut out = Vec::new();
    for call in calls {
        match call {
            Call::Settle(id, d) => out.push((*id, d.clone())),
            Call::AcceptAll(ids) => out.extend(ids.iter().map(|id| (*id, Disposition::Accept))),
            _ => {}
        }
    }
    out
}
