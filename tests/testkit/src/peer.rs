//! An in-memory AMQP 1.0 peer that plays the broker for tests: it accepts a client's
//! connection (optionally after SASL PLAIN/ANONYMOUS), sessions and links, delivers queued
//! messages on the client's receiver links as credit allows, takes back released/modified
//! messages like a broker does, and records every frame the client sends.
//!
//! It is a hand-written AMQP 1.0 endpoint over a byte stream (the frames are decoded with
//! `serde_amqp` into `fe2o3_amqp::types::performatives`), not fe2o3-amqp's `acceptor`: the
//! acceptor's engines answer `end` and `close` by themselves and its link acceptor builds the
//! attach answer from the client's source (no way to advertise `outcomes`), so it could not
//! play the [`Fault`]s or the broker answers below.
//!
//! # Pieces
//! - [`Peer::start`] with a [`PeerConfig`] (its [`SourceAnswer`] is what the attach answer
//!   advertises), then [`Peer::dial`] for an in-memory stream or [`Peer::listen`] for TCP.
//! - [`Peer::send`] queues a message ([`TestMessage`] builds simple ones).
//! - The frame log: [`Peer::frames`] and its filters, [`Peer::wait_for`] /
//!   [`Peer::wait_until`] (always bounded); what happened to each delivered message:
//!   [`Peer::settled`]; the transfers the peer itself sent: [`Peer::sent`].
//! - Faults: [`Peer::arm`] a [`Fault`] for a later client action; act now with
//!   [`Peer::kill_connections`], [`Peer::end_sessions`], [`Peer::close_connections`],
//!   [`Peer::detach_links`].
//! - Dropping the [`Peer`] aborts all its tasks (and so drops every connection). `Peer` is
//!   `Send + Sync`; share it with `Arc` if a spawned task needs it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use fe2o3_amqp::{Connection, Receiver, Session};
//! use hot_potato_testkit::peer::{Peer, PeerConfig, SourceAnswer, TestMessage};
//!
//! let peer = Peer::start(PeerConfig::default().with_source(SourceAnswer::rabbitmq_3()));
//! peer.send("q", TestMessage::text("hello").id("m1"));
//! let mut connection = Connection::builder()
//!     .container_id("client")
//!     .open_with_stream(peer.dial())
//!     .await?;
//! let mut session = Session::begin(&mut connection).await?;
//! let mut receiver = Receiver::attach(&mut session, "link", "q").await?;
//! let delivery = receiver.recv::<fe2o3_amqp::types::messaging::Body<
//!     fe2o3_amqp::types::primitives::Value,
//! >>().await?;
//! receiver.accept(&delivery).await?;
//! peer.wait_for(Duration::from_secs(5), |frames| {
//!     frames.iter().any(|f| f.as_disposition().is_some())
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! # Broker behaviour it imitates
//! - Every address is a queue, created on first use. Links on one address compete for its
//!   messages.
//! - Deliveries are sent unsettled (settled if the client attached with `snd-settle-mode
//!   settled`); a disposition with `settled = false` and a terminal state is answered with a
//!   settled disposition (receiver-settle-mode `second`).
//! - `accepted` and `rejected` remove the message (a `rejected` one is what a broker would
//!   dead-letter); `released` puts it back at the front of its queue as it was; `modified`
//!   puts it back with `delivery-failed` adding 1 to its delivery count and its
//!   `message-annotations` merged in (`undeliverable-here` is recorded but, with no other
//!   consumer to prefer, the message still comes back here). A redelivered message carries a
//!   `header` whose `delivery-count` is that count. A disposition settled without a state
//!   takes the source's `default-outcome` (released when none).
//! - Deliveries left unsettled when their link detaches, their session ends or their
//!   connection goes are put back like `released`.
//! - A client sender link is answered as a receiver with credit; each message it sends is
//!   accepted and appended to the queue of its target address.

mod codec;
mod conn;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fe2o3_amqp::types::definitions;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Batch, Body, Data, DeliveryState, Message, MessageId, Modified, Outcome,
    Properties, Released,
};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, Close, Detach, Disposition, End, Flow, Open, Transfer,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::types::sasl::SaslInit;
use tokio::io::DuplexStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use conn::Control;

/// Outcome symbols as brokers list them in a source's `outcomes` (AMQP 1.0 §3.4).
pub mod outcomes {
    /// `amqp:accepted:list`
    pub const ACCEPTED: &str = "amqp:accepted:list";
    /// `amqp:rejected:list`
    pub const REJECTED: &str = "amqp:rejected:list";
    /// `amqp:released:list`
    pub const RELEASED: &str = "amqp:released:list";
    /// `amqp:modified:list`
    pub const MODIFIED: &str = "amqp:modified:list";
}

/// Buffer of each in-memory connection, each way.
const DUPLEX_BUFFER: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How the peer behaves; [`Default`] is a plain broker whose attach answers advertise no
/// outcomes.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// `container-id` of the peer's `open`.
    pub container_id: String,
    /// `max-frame-size` of the peer's `open`; larger client frames end the connection.
    pub max_frame_size: u32,
    /// `channel-max` of the peer's `open`.
    pub channel_max: u16,
    /// `idle-time-out` (ms) of the peer's `open`. The peer does not enforce it; it only makes
    /// the client send heartbeats (logged as [`FrameBody::Empty`]). The peer itself sends
    /// heartbeats at half the client's `idle-time-out`, whatever this is.
    pub idle_time_out: Option<u32>,
    /// What the peer answers for the source of a client receiver link.
    pub source: SourceAnswer,
    /// Record client frames in the log (on by default). A benchmark moving many messages
    /// may turn it off; see also [`Peer::clear_frames`].
    pub log_frames: bool,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            container_id: "hot-potato-testkit-peer".into(),
            max_frame_size: 64 * 1024,
            channel_max: 1023,
            idle_time_out: None,
            source: SourceAnswer::default(),
            log_frames: true,
        }
    }
}

impl PeerConfig {
    /// The same configuration with another [`SourceAnswer`].
    pub fn with_source(mut self, source: SourceAnswer) -> Self {
        self.source = source;
        self
    }
}

/// The source the peer answers when a client attaches a receiver link. The client's address,
/// durability, expiry policy, timeout, dynamic flag and distribution mode are always echoed,
/// as brokers do; the fields below are what differs between brokers.
#[derive(Debug, Clone)]
pub struct SourceAnswer {
    /// `outcomes` of the answer; `None` leaves the field out (every outcome supported).
    pub outcomes: Option<Vec<Symbol>>,
    /// `default-outcome` of the answer. Also what the peer applies to a delivery settled
    /// without a state.
    pub default_outcome: Option<Outcome>,
    /// Echo the client's `filter` (a broker that applies it); `false` answers without a
    /// filter (a broker that ignores it; fe2o3 then fails the attach with
    /// `DesiredFilterNotSupported`).
    pub echo_filter: bool,
    /// `capabilities` of the answer: `None` echoes the client's; `Some(list)` answers `list`
    /// (`Some(vec![])` answers none).
    pub capabilities: Option<Vec<Symbol>>,
}

impl Default for SourceAnswer {
    fn default() -> Self {
        Self {
            outcomes: None,
            default_outcome: None,
            echo_filter: true,
            capabilities: None,
        }
    }
}

impl SourceAnswer {
    /// Like RabbitMQ 3.x's AMQP 1.0 plugin: `outcomes = [accepted, rejected, released]`
    /// (no `modified`), `default-outcome = released`.
    pub fn rabbitmq_3() -> Self {
        Self {
            outcomes: Some(symbols(&[
                outcomes::ACCEPTED,
                outcomes::REJECTED,
                outcomes::RELEASED,
            ])),
            default_outcome: Some(Outcome::Released(Released {})),
            ..Self::default()
        }
    }

    /// Like ActiveMQ Artemis: all four outcomes, including `modified`; everything else of
    /// the client's source echoed. (`default-outcome` left out; set it if a test needs it.)
    pub fn artemis() -> Self {
        Self {
            outcomes: Some(symbols(&[
                outcomes::ACCEPTED,
                outcomes::REJECTED,
                outcomes::RELEASED,
                outcomes::MODIFIED,
            ])),
            ..Self::default()
        }
    }
}

fn symbols(list: &[&str]) -> Vec<Symbol> {
    list.iter().map(|s| Symbol::from(*s)).collect()
}

/// How long the peer holds back an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delay {
    /// Answer after this long.
    For(Duration),
    /// Never answer (until the connection goes).
    Never,
}

/// Misbehaviour to play on a later client action; see [`Peer::arm`].
#[derive(Debug, Clone)]
pub enum Fault {
    /// Refuse a receiver-link attach (on `address`, or any when `None`) the way brokers do
    /// for a missing queue: answer the attach with a null source, then
    /// `detach{closed: true, error}`.
    RefuseAttach {
        /// Only attaches on this source address; `None` for any.
        address: Option<String>,
        /// The error of the detach, e.g. `amqp:not-found`.
        error: definitions::Error,
    },
    /// Hold back the answer to the client's `detach`.
    DelayDetachAnswer(Delay),
    /// Hold back the answer to the client's `end`.
    DelayEndAnswer(Delay),
    /// Hold back the answer to the client's `close` (the connection stays up meanwhile).
    DelayCloseAnswer(Delay),
    /// Answer the SASL exchange with `sasl-outcome{code: auth}` and drop the connection.
    FailSasl,
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// The message type the peer queues and delivers.
pub type PeerMessage = Message<Body<Value>>;

/// A small builder for the messages tests send: a body, a message-id, application
/// properties. Anything else: build a [`PeerMessage`] with fe2o3's `Message::builder()`.
#[derive(Debug, Clone)]
pub struct TestMessage {
    body: Body<Value>,
    id: Option<String>,
    properties: Vec<(String, SimpleValue)>,
}

impl TestMessage {
    /// A message whose body is one `amqp-value` section holding a string.
    pub fn text(text: impl Into<String>) -> Self {
        Self::with_body(Body::from(Value::String(text.into())))
    }

    /// A message whose body is one `data` section.
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self::with_body(Body::Data(Batch::new(vec![Data(Binary::from(
            bytes.into(),
        ))])))
    }

    fn with_body(body: Body<Value>) -> Self {
        Self {
            body,
            id: None,
            properties: Vec::new(),
        }
    }

    /// Sets `properties.message-id` (a string id).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds an application property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<SimpleValue>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// The fe2o3 message.
    pub fn build(self) -> PeerMessage {
        let mut message = Message::builder().body(self.body).build();
        if let Some(id) = self.id {
            message.properties = Some(
                Properties::builder()
                    .message_id(MessageId::String(id))
                    .build(),
            );
        }
        if !self.properties.is_empty() {
            let mut builder = ApplicationProperties::builder();
            for (key, value) in self.properties {
                builder = builder.insert(key, value);
            }
            message.application_properties = Some(builder.build());
        }
        message
    }
}

impl From<TestMessage> for PeerMessage {
    fn from(message: TestMessage) -> Self {
        message.build()
    }
}

/// A message the client settled, or that came back because its link, session or connection
/// went. (Deliveries sent pre-settled, to a link attached with `snd-settle-mode settled`, are
/// not recorded.)
#[derive(Debug, Clone)]
pub struct Settled {
    /// The address (queue) the message was delivered from.
    pub address: String,
    /// The message as it was queued (without the delivery-count header the peer adds).
    pub message: PeerMessage,
    /// The message's delivery count when it was delivered (0 the first time).
    pub delivery_count: u32,
    /// The state the client settled with; `None` for a settlement without a state, and for
    /// a delivery that came back because its link, session or connection went.
    pub state: Option<DeliveryState>,
    /// `false` when the delivery came back because its link, session or connection went.
    pub by_client: bool,
    /// When the peer processed it.
    pub at: Instant,
}

/// A delivery the peer sent on a client receiver link: where it went and under which
/// delivery id, so a test can check the client's dispositions against what it was actually
/// given (a disposition for an id never sent, or for one settled before). Kept with the frame
/// log: not recorded when [`PeerConfig::log_frames`] is off, emptied by
/// [`Peer::clear_frames`].
#[derive(Debug, Clone)]
pub struct Sent {
    /// When the peer sent it.
    pub at: Instant,
    /// The connection, numbered as in [`ClientFrame::connection`].
    pub connection: u64,
    /// The client's channel of the session (the channel of the client's frames for it, as
    /// in [`ClientFrame::channel`]).
    pub channel: u16,
    /// The client's handle of the link.
    pub handle: u32,
    /// The session's delivery id.
    pub delivery_id: u32,
    /// The address (queue) it came from.
    pub address: String,
    /// The message as it was queued.
    pub message: PeerMessage,
    /// Its delivery count (0 the first time).
    pub delivery_count: u32,
    /// Sent settled (the client attached with `snd-settle-mode settled`).
    pub settled: bool,
}

/// A queued message and the number of times it was delivered and failed.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub message: PeerMessage,
    pub delivery_count: u32,
}

// ---------------------------------------------------------------------------------------------
// Frame log
// ---------------------------------------------------------------------------------------------

/// One entry of the frame log: a frame the client sent, decoded.
#[derive(Debug, Clone)]
pub struct ClientFrame {
    /// When the peer read it.
    pub at: Instant,
    /// Which connection: 1 for the first [`Peer::dial`] (or accepted TCP connection), 2 for
    /// the next, and so on.
    pub connection: u64,
    /// The frame's channel (the client's session channel; 0 for connection frames).
    pub channel: u16,
    /// What it was.
    pub body: FrameBody,
}

/// What the client sent.
#[derive(Debug, Clone)]
pub enum FrameBody {
    /// A protocol header, `AMQP` + this id (0 AMQP, 2 TLS, 3 SASL) + version.
    Header {
        /// The protocol id.
        protocol_id: u8,
        /// The three version bytes, `[1, 0, 0]` for AMQP 1.0.
        version: [u8; 3],
    },
    /// `sasl-init` (its `initial-response` holds the PLAIN credentials).
    SaslInit(SaslInit),
    /// Any other SASL frame.
    SaslOther(String),
    /// `open`
    Open(Open),
    /// `begin`
    Begin(Begin),
    /// `attach`
    Attach(Attach),
    /// `flow`
    Flow(Flow),
    /// `transfer` and its payload
    Transfer {
        /// The performative.
        transfer: Transfer,
        /// The bytes after it.
        payload: Vec<u8>,
    },
    /// `disposition`
    Disposition(Disposition),
    /// `detach`
    Detach(Detach),
    /// `end`
    End(End),
    /// `close`
    Close(Close),
    /// An empty frame (a heartbeat).
    Empty,
    /// Bytes the peer could not make sense of, and why.
    Undecodable {
        /// What was wrong.
        reason: String,
        /// The bytes (at most 256).
        bytes: Vec<u8>,
    },
    /// Not a frame: the client's end of the connection closed (end of stream).
    Eof,
}

impl ClientFrame {
    /// The attach, if this is one.
    pub fn as_attach(&self) -> Option<&Attach> {
        match &self.body {
            FrameBody::Attach(attach) => Some(attach),
            _ => None,
        }
    }

    /// The flow, if this is one.
    pub fn as_flow(&self) -> Option<&Flow> {
        match &self.body {
            FrameBody::Flow(flow) => Some(flow),
            _ => None,
        }
    }

    /// The disposition, if this is one.
    pub fn as_disposition(&self) -> Option<&Disposition> {
        match &self.body {
            FrameBody::Disposition(disposition) => Some(disposition),
            _ => None,
        }
    }

    /// The detach, if this is one.
    pub fn as_detach(&self) -> Option<&Detach> {
        match &self.body {
            FrameBody::Detach(detach) => Some(detach),
            _ => None,
        }
    }

    /// The end, if this is one.
    pub fn as_end(&self) -> Option<&End> {
        match &self.body {
            FrameBody::End(end) => Some(end),
            _ => None,
        }
    }

    /// The close, if this is one.
    pub fn as_close(&self) -> Option<&Close> {
        match &self.body {
            FrameBody::Close(close) => Some(close),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
pub(crate) struct State {
    frames: Vec<ClientFrame>,
    sent: Vec<Sent>,
    queues: HashMap<String, VecDeque<Queued>>,
    settled: Vec<Settled>,
    /// Armed faults and whether each stays armed after it fired.
    faults: Vec<(Fault, bool)>,
    connections: HashMap<u64, mpsc::UnboundedSender<Control>>,
    next_connection: u64,
}

/// What the peer's tasks share.
pub(crate) struct Shared {
    pub config: PeerConfig,
    state: Mutex<State>,
    /// Bumped when a queue gets messages: connection tasks then deliver.
    work: watch::Sender<u64>,
    /// Bumped on anything a waiter may look at.
    events: watch::Sender<u64>,
    tasks: Mutex<JoinSet<()>>,
}

fn bump(tx: &watch::Sender<u64>) {
    tx.send_modify(|n| *n = n.wrapping_add(1));
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not turn every later lock into a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn subscribe_work(&self) -> watch::Receiver<u64> {
        self.work.subscribe()
    }

    pub fn log(&self, connection: u64, channel: u16, body: FrameBody) {
        if !self.config.log_frames {
            return;
        }
        self.state().frames.push(ClientFrame {
            at: Instant::now(),
            connection,
            channel,
            body,
        });
        bump(&self.events);
    }

    /// Records a delivery the peer sent (with the frame log, when it is on).
    pub fn log_sent(&self, sent: Sent) {
        if !self.config.log_frames {
            return;
        }
        self.state().sent.push(sent);
        bump(&self.events);
    }

    /// Takes the first armed fault `pick` accepts (leaving it armed if it was armed always).
    pub fn take_fault<T>(&self, mut pick: impl FnMut(&Fault) -> Option<T>) -> Option<T> {
        let mut state = self.state();
        for index in 0..state.faults.len() {
            if let Some(picked) = pick(&state.faults[index].0) {
                if !state.faults[index].1 {
                    state.faults.remove(index);
                }
                return Some(picked);
            }
        }
        None
    }

    pub fn ensure_queue(&self, address: &str) {
        self.state().queues.entry(address.to_owned()).or_default();
    }

    pub fn pop(&self, address: &str) -> Option<Queued> {
        self.state().queues.get_mut(address)?.pop_front()
    }

    pub fn queue_len(&self, address: &str) -> usize {
        self.state().queues.get(address).map_or(0, VecDeque::len)
    }

    pub fn push_back(&self, address: &str, queued: Queued) {
        self.state()
            .queues
            .entry(address.to_owned())
            .or_default()
            .push_back(queued);
        bump(&self.work);
        bump(&self.events);
    }

    /// Records settlements and puts `requeue` (in delivery order) back at the front of their
    /// queues.
    pub fn settle(&self, settled: Vec<Settled>, requeue: Vec<(String, Queued)>) {
        if settled.is_empty() && requeue.is_empty() {
            return;
        }
        let mut state = self.state();
        state.settled.extend(settled);
        let any_requeued = !requeue.is_empty();
        for (address, queued) in requeue.into_iter().rev() {
            state.queues.entry(address).or_default().push_front(queued);
        }
        drop(state);
        if any_requeued {
            bump(&self.work);
        }
        bump(&self.events);
    }

    fn register(&self, control: mpsc::UnboundedSender<Control>) -> u64 {
        let mut state = self.state();
        state.next_connection += 1;
        let id = state.next_connection;
        state.connections.insert(id, control);
        id
    }

    pub fn unregister(&self, id: u64) {
        self.state().connections.remove(&id);
        bump(&self.events);
    }

    fn broadcast(&self, control: impl Fn() -> Control) {
        for tx in self.state().connections.values() {
            let _ = tx.send(control());
        }
    }

    /// Serves `stream` as a new connection in a task the peer owns.
    fn serve<S>(self: &Arc<Self>, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let id = self.register(control_tx);
        let shared = Arc::clone(self);
        let mut tasks = self.tasks();
        // Reap the tasks of finished connections so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(conn::serve(id, stream, shared, control_rx));
    }
}

// ---------------------------------------------------------------------------------------------
// The peer
// ---------------------------------------------------------------------------------------------

/// The in-memory AMQP 1.0 peer. Dropping it aborts every task it spawned, which drops every
/// connection.
pub struct Peer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shared.tasks().abort_all();
    }
}

impl Peer {
    /// A peer with `config`. Spawns nothing until [`Peer::dial`] or [`Peer::listen`].
    pub fn start(config: PeerConfig) -> Peer {
        Peer {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State::default()),
                work: watch::Sender::new(0),
                events: watch::Sender::new(0),
                tasks: Mutex::new(JoinSet::new()),
            }),
        }
    }

    /// A new in-memory connection: the client's end of a `tokio::io::duplex`, for fe2o3's
    /// `Connection::builder()...open_with_stream(..)` (scheme `amqp`; with a SASL profile the
    /// peer runs SASL PLAIN/ANONYMOUS and accepts any credentials). The peer serves the other
    /// end in a task. Must be called within a Tokio runtime.
    pub fn dial(&self) -> DuplexStream {
        let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
        self.shared.serve(server);
        client
    }

    /// Listens on `127.0.0.1` (an ephemeral port) and serves every TCP connection like a
    /// [`Peer::dial`]ed one, for code that connects by URL (`amqp://127.0.0.1:{port}`).
    pub async fn listen(&self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the peer's TCP listener")?;
        let addr = listener.local_addr()?;
        let shared = Arc::downgrade(&self.shared);
        self.shared.tasks().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                shared.serve(stream);
            }
        });
        Ok(addr)
    }

    /// Queues `message` at the end of `address`'s queue; it is delivered as soon as a link on
    /// `address` has credit.
    pub fn send(&self, address: &str, message: impl Into<PeerMessage>) {
        self.shared.push_back(
            address,
            Queued {
                message: message.into(),
                delivery_count: 0,
            },
        );
    }

    /// Messages waiting in `address`'s queue (neither delivered nor in flight).
    pub fn queued(&self, address: &str) -> usize {
        self.shared.queue_len(address)
    }

    /// Every settlement so far, in order.
    pub fn settled(&self) -> Vec<Settled> {
        self.shared.state().settled.clone()
    }

    /// The frame log: every frame the clients sent, in order.
    pub fn frames(&self) -> Vec<ClientFrame> {
        self.shared.state().frames.clone()
    }

    /// Every delivery the peer sent on a client receiver link, in order (see [`Sent`]).
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.state().sent.clone()
    }

    /// Empties the frame log (and the log of [`Peer::sent`] deliveries).
    pub fn clear_frames(&self) {
        let mut state = self.shared.state();
        state.frames.clear();
        state.sent.clear();
    }

    fn collect<T: Clone>(&self, pick: impl Fn(&ClientFrame) -> Option<&T>) -> Vec<T> {
        self.shared
            .state()
            .frames
            .iter()
            .filter_map(|f| pick(f).cloned())
            .collect()
    }

    /// The `attach` frames of the log.
    pub fn attaches(&self) -> Vec<Attach> {
        self.collect(ClientFrame::as_attach)
    }

    /// The `flow` frames of the log.
    pub fn flows(&self) -> Vec<Flow> {
        self.collect(ClientFrame::as_flow)
    }

    /// The `disposition` frames of the log.
    pub fn dispositions(&self) -> Vec<Disposition> {
        self.collect(ClientFrame::as_disposition)
    }

    /// The `detach` frames of the log.
    pub fn detaches(&self) -> Vec<Detach> {
        self.collect(ClientFrame::as_detach)
    }

    /// Connections being served now.
    pub fn live_connections(&self) -> usize {
        self.shared.state().connections.len()
    }

    /// Waits until `predicate` holds for the frame log, at most `timeout`; returns the log it
    /// held for. The error lists the frames seen.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&[ClientFrame]) -> bool,
    ) -> anyhow::Result<Vec<ClientFrame>> {
        let mut frames = Vec::new();
        let waited = self
            .wait_until(timeout, |peer| {
                frames = peer.frames();
                predicate(&frames)
            })
            .await;
        match waited {
            Ok(()) => Ok(frames),
            Err(e) => Err(e.context(format!("frames seen: {}", summary(&frames)))),
        }
    }

    /// Waits until `predicate` holds for the peer (its log, queues, settlements, connections),
    /// at most `timeout`. `predicate` runs again after every change.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&Peer) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut events = self.shared.events.subscribe();
        loop {
            events.mark_unchanged();
            if predicate(self) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("the peer stopped"),
                Err(_) => bail!("condition not met within {timeout:?}"),
            }
        }
    }

    /// Arms `fault` for the next client action it applies to, once.
    pub fn arm(&self, fault: Fault) {
        self.shared.state().faults.push((fault, false));
    }

    /// Arms `fault` for every client action it applies to, until [`Peer::disarm`].
    pub fn arm_always(&self, fault: Fault) {
        self.shared.state().faults.push((fault, true));
    }

    /// Disarms every fault.
    pub fn disarm(&self) {
        self.shared.state().faults.clear();
    }

    /// Drops every connection at once, without `close` (like a broker crash or a network
    /// cut): the client reads end-of-stream. Their unsettled deliveries go back to the queues.
    pub fn kill_connections(&self) {
        self.shared.broadcast(|| Control::Kill);
    }

    /// Ends every session of every connection from the peer's side with `end{error}`.
    pub fn end_sessions(&self, error: Option<definitions::Error>) {
        self.shared
            .broadcast(|| Control::EndSessions(error.clone()));
    }

    /// Closes every connection from the peer's side with `close{error}`; each goes away
    /// when the client answers.
    pub fn close_connections(&self, error: Option<definitions::Error>) {
        self.shared.broadcast(|| Control::Close(error.clone()));
    }

    /// Detaches, from the peer's side, every link on `address` (every link when `None`) with
    /// `detach{closed, error}` (e.g. a queue deleted under its consumers).
    pub fn detach_links(
        &self,
        address: Option<&str>,
        closed: bool,
        error: Option<definitions::Error>,
    ) {
        let address = address.map(str::to_owned);
        self.shared.broadcast(|| Control::Detach {
            address: address.clone(),
            closed,
            error: error.clone(),
        });
    }
}

/// One line per frame, for error messages.
pub fn summary(frames: &[ClientFrame]) -> String {
    let mut out = String::new();
    for f in frames {
        let what = match &f.body {
            FrameBody::Header { protocol_id, .. } => format!("header({protocol_id})"),
            FrameBody::SaslInit(init) => format!("sasl-init({})", init.mechanism.as_str()),
            FrameBody::SaslOther(s) => format!("sasl({s})"),
            FrameBody::Open(_) => "open".into(),
            FrameBody::Begin(_) => "begin".into(),
            FrameBody::Attach(a) => format!("attach({}, {:?})", a.name, a.role),
            FrameBody::Flow(fl) => format!(
                "flow(handle {:?}, credit {:?}, drain {})",
                fl.handle.as_ref().map(|h| h.0),
                fl.link_credit,
                fl.drain
            ),
            FrameBody::Transfer { transfer, .. } => {
                format!("transfer(delivery {:?})", transfer.delivery_id)
            }
            FrameBody::Disposition(d) => format!(
                "disposition({}..={:?}, settled {}, {:?})",
                d.first, d.last, d.settled, d.state
            ),
            FrameBody::Detach(d) => format!("detach(closed {}, {:?})", d.closed, d.error),
            FrameBody::End(e) => format!("end({:?})", e.error),
            FrameBody::Close(c) => format!("close({:?})", c.error),
            FrameBody::Empty => "empty".into(),
            FrameBody::Undecodable { reason, .. } => format!("undecodable({reason})"),
            FrameBody::Eof => "eof".into(),
        };
        out.push_str(&format!(
            "\n  [conn {} ch {}] {what}",
            f.connection, f.channel
        ));
    }
    out
}

/// The state a delivery settled without one takes: the source's default outcome, else
/// `released`.
pub(crate) fn default_state(config: &PeerConfig) -> DeliveryState {
    match &config.source.default_outcome {
        Some(Outcome::Accepted(a)) => DeliveryState::Accepted(a.clone()),
        Some(Outcome::Rejected(r)) => DeliveryState::Rejected(r.clone()),
        Some(Outcome::Modified(m)) => DeliveryState::Modified(m.clone()),
        _ => DeliveryState::Released(Released {}),
    }
}

/// What a terminal state does to the message: `None` removes it, `Some(m)` puts `m` back.
pub(crate) fn apply_outcome(state: &DeliveryState, mut queued: Queued) -> Option<Queued> {
    match state {
        DeliveryState::Released(_) => Some(queued),
        DeliveryState::Modified(Modified {
            delivery_failed,
            message_annotations,
            ..
        }) => {
            if *delivery_failed == Some(true) {
                queued.delivery_count = queued.delivery_count.saturating_add(1);
            }
            if let Some(fields) = message_annotations {
                use fe2o3_amqp::types::messaging::{MessageAnnotations, annotations::OwnedKey};
                let annotations = queued
                    .message
                    .message_annotations
                    .get_or_insert_with(|| MessageAnnotations(Default::default()));
                for (key, value) in fields.iter() {
                    annotations
                        .0
                        .insert(OwnedKey::Symbol(key.clone()), value.clone());
                }
            }
            Some(queued)
        }
        _ => None,
    }
}
