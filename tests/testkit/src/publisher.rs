//! Publishing over AMQP 1.0 with fe2o3-amqp: one connection and session, a sender per queue,
//! every message confirmed (accepted) by the broker.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use fe2o3_amqp::link::SendError;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::types::messaging::{Message, Outcome, SerializableBody};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Sendable, Sender, Session};

use crate::address;

/// The broker's outcome of a message sent with [`Publisher::send_batchable`].
pub type Confirm = DeliveryFut<Result<Outcome, SendError>>;

/// How long one close step (link, session, connection) may wait for the broker.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// Unsettled messages [`Publisher::send_numbered`] keeps outstanding.
const NUMBERED_WINDOW: usize = 200;

/// Waits for the broker's outcome; anything but accepted is an error.
pub async fn confirmed(fut: Confirm) -> Result<()> {
    let outcome = fut.await.context("no outcome from the broker")?;
    outcome
        .accepted_or("not accepted")
        .map_err(|e| anyhow!("the broker did not accept a message: {e:?}"))?;
    Ok(())
}

/// Pipelined sends: at most `size` outcomes outstanding, the oldest awaited first.
struct Window {
    pending: VecDeque<Confirm>,
    size: usize,
}

impl Window {
    fn new(size: usize) -> Self {
        Self {
            pending: VecDeque::with_capacity(size),
            size: size.max(1),
        }
    }

    async fn push(&mut self, fut: Confirm) -> Result<()> {
        self.pending.push_back(fut);
        if self.pending.len() >= self.size
            && let Some(oldest) = self.pending.pop_front()
        {
            confirmed(oldest).await?;
        }
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        for fut in self.pending {
            confirmed(fut).await?;
        }
        Ok(())
    }
}

pub struct Publisher {
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: fe2o3_amqp::session::SessionHandle<()>,
    /// One per queue, in the order given to `connect`.
    senders: Vec<Sender>,
}

impl Publisher {
    /// One connection to `url` and one session, with a sender attached to each queue.
    pub async fn connect<Q: AsRef<str>>(url: &str, queues: &[Q]) -> Result<Self> {
        let mut connection =
            Connection::open(format!("testkit-publisher-{}", uuid::Uuid::new_v4()), url)
                .await
                .context("cannot connect the publisher to the broker")?;
        let mut session = Session::begin(&mut connection)
            .await
            .context("cannot begin the publisher's session")?;
        let mut senders = Vec::with_capacity(queues.len());
        for (i, queue) in queues.iter().enumerate() {
            let queue = queue.as_ref();
            let sender =
                Sender::attach(&mut session, format!("testkit-sender-{i}"), address(queue))
                    .await
                    .with_context(|| format!("attaching a sender to {queue}"))?;
            senders.push(sender);
        }
        Ok(Self {
            connection,
            session,
            senders,
        })
    }

    fn first(&mut self) -> Result<&mut Sender> {
        self.senders
            .first_mut()
            .ok_or_else(|| anyhow!("the publisher has no queue"))
    }

    /// Sends one message to the first queue and waits until the broker accepted it.
    pub async fn send<T: SerializableBody>(
        &mut self,
        message: impl Into<Sendable<T>>,
    ) -> Result<()> {
        let fut = self.send_batchable(message).await?;
        confirmed(fut).await
    }

    /// Sends one message to the first queue without waiting for its outcome; await the
    /// returned [`Confirm`] with [`confirmed`].
    pub async fn send_batchable<T: SerializableBody>(
        &mut self,
        message: impl Into<Sendable<T>>,
    ) -> Result<Confirm> {
        self.send_batchable_to(0, message).await
    }

    /// Sends one message to the `index`th queue given to `connect` without waiting for its
    /// outcome.
    pub async fn send_batchable_to<T: SerializableBody>(
        &mut self,
        index: usize,
        message: impl Into<Sendable<T>>,
    ) -> Result<Confirm> {
        let count = self.senders.len();
        let sender = self
            .senders
            .get_mut(index)
            .ok_or_else(|| anyhow!("the publisher has {count} queues, not {}", index + 1))?;
        Ok(sender.send_batchable(message).await?)
    }

    /// Sends `"prefix-0"`, `"prefix-1"`… as AmqpValue strings to the first queue, pipelined.
    pub async fn send_numbered(&mut self, prefix: &str, range: Range<usize>) -> Result<()> {
        let sender = self.first()?;
        let mut window = Window::new(NUMBERED_WINDOW);
        for i in range {
            window
                .push(sender.send_batchable(format!("{prefix}-{i}")).await?)
                .await?;
        }
        window.finish().await
    }

    /// Sends `per_queue` Data messages carrying `body` to each queue in turn, with at most
    /// `window` outcomes outstanding.
    pub async fn send_data(&mut self, per_queue: u64, body: &[u8], window: usize) -> Result<()> {
        let mut pending = Window::new(window);
        for sender in &mut self.senders {
            for _ in 0..per_queue {
                let message = Message::builder().data(Binary::from(body.to_vec())).build();
                pending.push(sender.send_batchable(message).await?).await?;
            }
        }
        pending.finish().await
    }

    /// Closes the senders, the session and the connection, each step bounded: fe2o3 0.18 now
    /// and then never sees RabbitMQ 3.10's answer to an End, and closing the connection ends it
    /// all. A step left unanswered is reported on stderr.
    pub async fn close(mut self) {
        for sender in self.senders.drain(..) {
            if tokio::time::timeout(CLOSE_LIMIT, sender.close())
                .await
                .is_err()
            {
                eprintln!("publisher: sender close unanswered within {CLOSE_LIMIT:?}");
            }
        }
        if tokio::time::timeout(CLOSE_LIMIT, self.session.end())
            .await
            .is_err()
        {
            eprintln!("publisher: session end unanswered within {CLOSE_LIMIT:?}");
        }
        if tokio::time::timeout(CLOSE_LIMIT, self.connection.close())
            .await
            .is_err()
        {
            eprintln!("publisher: connection close unanswered within {CLOSE_LIMIT:?}");
        }
    }
}
