//! One connection served by the peer: the AMQP 1.0 state machine of the broker side.
//!
//! The task reads the client's bytes, logs every frame, answers, and delivers queued
//! messages. Writes go through a writer task and an unbounded channel, so the state machine
//! never blocks on a client that does not read.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::frames::sasl::Frame as SaslFrame;
use fe2o3_amqp::types::definitions::{
    self, AmqpError, ConnectionError, DeliveryTag, Handle, ReceiverSettleMode, Role,
    SenderSettleMode,
};
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::message::DecodeIntoMessage;
use fe2o3_amqp::types::messaging::{
    Accepted, Body, DeliveryState, Header, Rejected, Source, Target,
};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open,
    Performative, Transfer,
};
use fe2o3_amqp::types::primitives::{Array, Symbol, Value};
use fe2o3_amqp::types::sasl::{SaslCode, SaslMechanisms, SaslOutcome};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::codec::{self, Cut};
use super::{
    Delay, Fault, FrameBody, Queued, Sent, Settled, Shared, SourceAnswer, apply_outcome,
    default_state,
};

/// Session windows the peer advertises (incoming and outgoing).
const WINDOW: u32 = 1 << 20;
/// Link credit the peer grants a client sender link, topped up at half.
const RECEIVE_CREDIT: u32 = 1000;
/// Bytes of an undecodable frame kept in the log.
const LOGGED_BYTES: usize = 256;
/// How long a graceful ending may take to flush the last frames to the client.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// A window or credit computed above this is a negative value that wrapped around.
const SERIAL_HALF: u32 = 1 << 31;

/// What the [`super::Peer`] asks of a connection task.
pub(crate) enum Control {
    /// Drop the connection without a word.
    Kill,
    /// `end{error}` on every session.
    EndSessions(Option<definitions::Error>),
    /// `close{error}`.
    Close(Option<definitions::Error>),
    /// `detach{closed, error}` on the links of `address` (all when `None`).
    Detach {
        address: Option<String>,
        closed: bool,
        error: Option<definitions::Error>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Flush what was written, then shut the stream down.
    Graceful,
    /// Drop the stream now.
    Abrupt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a protocol header.
    Header,
    /// Inside the SASL exchange.
    Sasl,
    /// AMQP frames.
    Amqp,
}

/// An answer held back by a [`Delay`], and what to do once it is sent.
struct Timer {
    at: Instant,
    bytes: Vec<u8>,
    then: Then,
}

enum Then {
    RemoveLink { channel: u16, handle: u32 },
    RemoveSession(u16),
    Exit,
}

/// The peer's role on a link (the opposite of the client's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkRole {
    /// The client receives: the peer delivers the address's queue.
    Sender,
    /// The client sends: the peer appends to the address's queue.
    Receiver,
}

struct Link {
    our_handle: u32,
    address: String,
    role: LinkRole,
    delivery_count: u32,
    credit: u32,
    drain: bool,
    /// The client attached with `snd-settle-mode settled`: deliveries go out settled.
    send_settled: bool,
    /// Detached by either side; kept until the answer is sent so its handle stays taken.
    gone: bool,
    /// The peer sent `detach` and waits for the client's.
    we_detached: bool,
    /// A multi-frame delivery being received from a client sender.
    partial: Option<Partial>,
    next_tag: u64,
}

struct Partial {
    delivery_id: Option<u32>,
    settled: bool,
    payload: Vec<u8>,
}

/// A delivery the client has not settled.
struct InFlight {
    client_handle: u32,
    address: String,
    queued: Queued,
}

struct Session {
    our_channel: u16,
    next_outgoing_id: u32,
    next_delivery_id: u32,
    next_incoming_id: u32,
    remote_incoming_window: u32,
    /// By the client's handle.
    links: BTreeMap<u32, Link>,
    /// By delivery id.
    unsettled: BTreeMap<u32, InFlight>,
    /// Either side sent `end`: nothing more is delivered.
    ending: bool,
    /// The peer sent `end` and waits for the client's.
    we_ended: bool,
}

/// The write side: encodes and queues bytes for the writer task.
struct Wire {
    out: mpsc::UnboundedSender<Vec<u8>>,
}

impl Wire {
    fn bytes(&self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            // The writer task is gone only when the connection is.
            let _ = self.out.send(bytes);
        }
    }

    /// The frame, or nothing if it cannot be encoded (it is always the peer's own).
    fn frame(channel: u16, performative: Performative) -> Vec<u8> {
        codec::amqp_frame(channel, &performative, &[]).unwrap_or_default()
    }

    fn send(&self, channel: u16, performative: Performative) {
        self.bytes(Self::frame(channel, performative));
    }
}

/// Serves one connection until it ends, then gives its unsettled deliveries back.
pub(crate) async fn serve<S>(
    id: u64,
    stream: S,
    shared: Arc<Shared>,
    control: mpsc::UnboundedReceiver<Control>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Unregisters however the task ends: returned, aborted (peer dropped) or panicked.
    let _registration = Registration {
        shared: Arc::clone(&shared),
        id,
    };
    let (reader, writer) = tokio::io::split(stream);
    let (out, out_rx) = mpsc::unbounded_channel();
    let mut writer_task = JoinSet::new();
    writer_task.spawn(write_loop(writer, out_rx));
    let mut conn = Conn::new(id, Arc::clone(&shared), Wire { out });
    let ending = conn.run(reader, control).await;
    conn.give_back_all();
    drop(conn);
    if ending == Ending::Graceful {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer_task.join_next()).await;
    }
    // Dropping the set aborts the writer if it is still running, which drops the stream.
    drop(writer_task);
}

struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
    }
}

async fn write_loop<W: AsyncWrite>(writer: W, mut rx: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut writer = std::pin::pin!(writer);
    while let Some(bytes) = rx.recv().await {
        if writer.write_all(&bytes).await.is_err() {
            return;
        }
        while let Ok(more) = rx.try_recv() {
            if writer.write_all(&more).await.is_err() {
                return;
            }
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

fn truncated(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len().min(LOGGED_BYTES)].to_vec()
}

/// The source the peer answers for a client receiver link.
fn answer_source(answer: &SourceAnswer, client: Option<&Source>, dynamic_name: String) -> Source {
    let mut source = client.cloned().unwrap_or_default();
    if source.dynamic && source.address.is_none() {
        source.address = Some(dynamic_name);
    }
    if !answer.echo_filter {
        source.filter = None;
    }
    if let Some(capabilities) = &answer.capabilities {
        source.capabilities = (!capabilities.is_empty()).then(|| Array(capabilities.clone()));
    }
    source.outcomes = answer.outcomes.clone().map(Array);
    source.default_outcome = answer.default_outcome.clone();
    source
}

/// Removes and returns the deliveries of `session` that `pick` selects, in delivery order.
fn take_unsettled(session: &mut Session, pick: impl Fn(&InFlight) -> bool) -> Vec<InFlight> {
    let ids: Vec<u32> = session
        .unsettled
        .iter()
        .filter(|(_, f)| pick(f))
        .map(|(id, _)| *id)
        .collect();
    ids.iter()
        .filter_map(|id| session.unsettled.remove(id))
        .collect()
}

/// Puts deliveries whose link, session or connection went back at the front of their queues.
fn give_back(shared: &Shared, inflight: Vec<InFlight>) {
    let at = Instant::now();
    let mut records = Vec::with_capacity(inflight.len());
    let mut requeue = Vec::with_capacity(inflight.len());
    for f in inflight {
        records.push(Settled {
            address: f.address.clone(),
            message: f.queued.message.clone(),
            delivery_count: f.queued.delivery_count,
            state: None,
            by_client: false,
            at,
        });
        requeue.push((f.address, f.queued));
    }
    shared.settle(records, requeue);
}

/// A flow of `link`; `ids` are the session's `(next-incoming-id, next-outgoing-id)`.
fn link_flow(ids: (u32, u32), link: &Link, available: Option<u32>) -> Flow {
    Flow {
        next_incoming_id: Some(ids.0),
        incoming_window: WINDOW,
        next_outgoing_id: ids.1,
        outgoing_window: WINDOW,
        handle: Some(Handle(link.our_handle)),
        delivery_count: Some(link.delivery_count),
        link_credit: Some(link.credit),
        available,
        drain: link.drain,
        echo: false,
        properties: None,
    }
}

struct Conn {
    id: u64,
    shared: Arc<Shared>,
    wire: Wire,
    phase: Phase,
    sasl_done: bool,
    opened: bool,
    /// The client sent `close`: its further bytes are ignored.
    input_closed: bool,
    /// The peer sent `close` and waits for the client's.
    we_closed: bool,
    exit: Option<Ending>,
    remote_max_frame: usize,
    channel_max: u16,
    heartbeat: Option<Duration>,
    /// By the client's channel.
    sessions: BTreeMap<u16, Session>,
    timers: Vec<Timer>,
}

impl Conn {
    fn new(id: u64, shared: Arc<Shared>, wire: Wire) -> Self {
        let channel_max = shared.config.channel_max;
        Self {
            id,
            shared,
            wire,
            phase: Phase::Header,
            sasl_done: false,
            opened: false,
            input_closed: false,
            we_closed: false,
            exit: None,
            remote_max_frame: 512,
            channel_max,
            heartbeat: None,
            sessions: BTreeMap::new(),
            timers: Vec::new(),
        }
    }

    fn log(&self, channel: u16, body: FrameBody) {
        self.shared.log(self.id, channel, body);
    }

    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) -> Ending {
        let mut input = Vec::with_capacity(64 * 1024);
        let mut work = self.shared.subscribe_work();
        let mut heartbeat: Option<Interval> = None;
        loop {
            if let Some(ending) = self.exit {
                return ending;
            }
            if heartbeat.is_none()
                && let Some(period) = self.heartbeat
            {
                let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                heartbeat = Some(interval);
            }
            let next_timer = self.timers.iter().map(|t| t.at).min();
            tokio::select! {
                read = reader.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => {
                        self.log(0, FrameBody::Eof);
                        return Ending::Abrupt;
                    }
                    Ok(_) => self.on_input(&mut input),
                },
                control = control.recv() => match control {
                    None | Some(Control::Kill) => return Ending::Abrupt,
                    Some(control) => self.on_control(control),
                },
                Ok(()) = work.changed() => {}
                () = sleep_until(next_timer) => self.fire_timers(),
                () = tick(&mut heartbeat) => self.wire.bytes(codec::empty_frame()),
            }
            self.pump();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Input
    // -----------------------------------------------------------------------------------------

    fn on_input(&mut self, input: &mut Vec<u8>) {
        let mut pos = 0;
        while self.exit.is_none() && !self.input_closed {
            let rest = &input[pos..];
            match self.phase {
                Phase::Header => {
                    let Some(header) = rest.first_chunk::<8>() else {
                        break;
                    };
                    let header = *header;
                    pos += 8;
                    self.on_header(header);
                }
                Phase::Sasl | Phase::Amqp => {
                    match codec::cut_frame(rest, self.shared.config.max_frame_size) {
                        Cut::Need => break,
                        Cut::Fatal(reason) => {
                            self.log(
                                0,
                                FrameBody::Undecodable {
                                    reason: reason.clone(),
                                    bytes: truncated(rest),
                                },
                            );
                            self.fail(ConnectionError::FramingError, reason);
                            break;
                        }
                        Cut::Skip { len, reason } => {
                            self.log(
                                0,
                                FrameBody::Undecodable {
                                    reason,
                                    bytes: truncated(&rest[..len]),
                                },
                            );
                            pos += len;
                        }
                        Cut::Frame { len, frame } => {
                            self.on_frame(frame.kind, frame.channel, frame.body);
                            pos += len;
                        }
                    }
                }
            }
        }
        if self.input_closed || self.exit.is_some() {
            input.clear();
        } else {
            input.drain(..pos);
        }
    }

    /// Ends the connection over a protocol error: `close{error}` where that is possible.
    fn fail(&mut self, condition: ConnectionError, description: String) {
        if self.opened && !self.we_closed {
            let error = definitions::Error::new(condition, Some(description), None);
            self.wire
                .send(0, Performative::Close(Close { error: Some(error) }));
        }
        self.exit = Some(Ending::Graceful);
    }

    fn on_header(&mut self, header: [u8; 8]) {
        if &header[..4] != b"AMQP" {
            self.log(
                0,
                FrameBody::Undecodable {
                    reason: "not an AMQP protocol header".into(),
                    bytes: header.to_vec(),
                },
            );
            self.wire.bytes(codec::AMQP_HEADER.to_vec());
            self.exit = Some(Ending::Graceful);
            return;
        }
        let protocol_id = header[4];
        let version = [header[5], header[6], header[7]];
        self.log(
            0,
            FrameBody::Header {
                protocol_id,
                version,
            },
        );
        match (protocol_id, version == [1, 0, 0], self.sasl_done) {
            (3, true, false) => {
                self.wire.bytes(codec::SASL_HEADER.to_vec());
                let mechanisms = SaslFrame::Mechanisms(SaslMechanisms {
                    sasl_server_mechanisms: Array(vec![
                        Symbol::from("PLAIN"),
                        Symbol::from("ANONYMOUS"),
                    ]),
                });
                self.wire
                    .bytes(codec::sasl_frame(&mechanisms).unwrap_or_default());
                self.phase = Phase::Sasl;
            }
            (0, true, _) => {
                self.wire.bytes(codec::AMQP_HEADER.to_vec());
                self.phase = Phase::Amqp;
            }
            _ => {
                // Unsupported: answer with the header the peer speaks, and hang up (§2.2).
                self.wire.bytes(codec::AMQP_HEADER.to_vec());
                self.exit = Some(Ending::Graceful);
            }
        }
    }

    fn on_frame(&mut self, kind: u8, channel: u16, body: &[u8]) {
        match (self.phase, kind) {
            (Phase::Sasl, codec::FRAME_TYPE_SASL) => self.on_sasl(body),
            (Phase::Amqp, codec::FRAME_TYPE_AMQP) => match codec::decode_amqp(body) {
                Ok(None) => self.log(channel, FrameBody::Empty),
                Ok(Some((performative, payload))) => {
                    self.log(channel, logged(&performative, payload));
                    self.on_performative(channel, performative, payload);
                }
                Err(reason) => self.log(
                    channel,
                    FrameBody::Undecodable {
                        reason,
                        bytes: truncated(body),
                    },
                ),
            },
            _ => self.log(
                channel,
                FrameBody::Undecodable {
                    reason: format!("frame type {kind} unexpected in phase {:?}", self.phase),
                    bytes: truncated(body),
                },
            ),
        }
    }

    fn on_sasl(&mut self, body: &[u8]) {
        match codec::decode_sasl(body) {
            Ok(SaslFrame::Init(init)) => {
                self.log(0, FrameBody::SaslInit(init));
                let fail = self
                    .shared
                    .take_fault(|f| matches!(f, Fault::FailSasl).then_some(()))
                    .is_some();
                let outcome = SaslFrame::Outcome(SaslOutcome {
                    code: if fail { SaslCode::Auth } else { SaslCode::Ok },
                    additional_data: None,
                });
                self.wire
                    .bytes(codec::sasl_frame(&outcome).unwrap_or_default());
                if fail {
                    self.exit = Some(Ending::Graceful);
                } else {
                    self.sasl_done = true;
                    self.phase = Phase::Header;
                }
            }
            Ok(other) => self.log(0, FrameBody::SaslOther(format!("{other:?}"))),
            Err(reason) => self.log(
                0,
                FrameBody::Undecodable {
                    reason,
                    bytes: truncated(body),
                },
            ),
        }
    }

    fn on_performative(&mut self, channel: u16, performative: Performative, payload: &[u8]) {
        if self.we_closed {
            // After the peer's close only the client's close matters.
            if let Performative::Close(_) = performative {
                self.exit = Some(Ending::Graceful);
            }
            return;
        }
        match performative {
            Performative::Open(open) => self.on_open(open),
            // Everything else needs the connection open.
            _ if !self.opened => {}
            Performative::Begin(begin) => self.on_begin(channel, begin),
            Performative::Attach(attach) => self.on_attach(channel, attach),
            Performative::Flow(flow) => self.on_flow(channel, flow),
            Performative::Transfer(transfer) => self.on_transfer(channel, transfer, payload),
            Performative::Disposition(disposition) => self.on_disposition(channel, disposition),
            Performative::Detach(detach) => self.on_detach(channel, detach),
            Performative::End(end) => self.on_end(channel, end),
            Performative::Close(_) => self.on_close(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Connection and sessions
    // -----------------------------------------------------------------------------------------

    fn on_open(&mut self, open: Open) {
        if self.opened {
            return;
        }
        self.opened = true;
        let config = &self.shared.config;
        self.remote_max_frame = usize::try_from(open.max_frame_size.0.max(512)).unwrap_or(512);
        self.channel_max = config.channel_max.min(open.channel_max.0);
        if let Some(ms) = open.idle_time_out.filter(|ms| *ms > 0) {
            self.heartbeat = Some(Duration::from_millis(u64::from(ms / 2).max(1)));
        }
        let answer = Open {
            container_id: config.container_id.clone(),
            hostname: None,
            max_frame_size: MaxFrameSize(config.max_frame_size),
            channel_max: ChannelMax(config.channel_max),
            idle_time_out: config.idle_time_out,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.wire.send(0, Performative::Open(answer));
    }

    fn on_begin(&mut self, channel: u16, begin: Begin) {
        // The peer never begins a session itself, so a begin with a remote channel is bogus.
        if begin.remote_channel.is_some() || self.sessions.contains_key(&channel) {
            return;
        }
        let taken = |c: u16| self.sessions.values().any(|s| s.our_channel == c);
        let Some(our_channel) = (0..=self.channel_max).find(|c| !taken(*c)) else {
            let error = definitions::Error::new(
                ConnectionError::FramingError,
                Some("no channel left".to_string()),
                None,
            );
            self.wire
                .send(0, Performative::Close(Close { error: Some(error) }));
            self.we_closed = true;
            return;
        };
        self.sessions.insert(
            channel,
            Session {
                our_channel,
                next_outgoing_id: 0,
                next_delivery_id: 0,
                next_incoming_id: begin.next_outgoing_id,
                remote_incoming_window: begin.incoming_window,
                links: BTreeMap::new(),
                unsettled: BTreeMap::new(),
                ending: false,
                we_ended: false,
            },
        );
        let answer = Begin {
            remote_channel: Some(channel),
            next_outgoing_id: 0,
            incoming_window: WINDOW,
            outgoing_window: WINDOW,
            handle_max: Handle::default(),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        self.wire.send(our_channel, Performative::Begin(answer));
    }

    fn on_end(&mut self, channel: u16, _end: End) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        if session.we_ended {
            // The answer to the peer's end.
            self.sessions.remove(&channel);
            return;
        }
        if session.ending {
            return;
        }
        session.ending = true;
        session.links.clear();
        let inflight = take_unsettled(session, |_| true);
        let our_channel = session.our_channel;
        give_back(&self.shared, inflight);
        let bytes = Wire::frame(our_channel, Performative::End(End { error: None }));
        let delay = self.shared.take_fault(|f| match f {
            Fault::DelayEndAnswer(d) => Some(*d),
            _ => None,
        });
        match delay {
            None => {
                self.wire.bytes(bytes);
                self.sessions.remove(&channel);
            }
            Some(Delay::For(after)) => self.timers.push(Timer {
                at: Instant::now() + after,
                bytes,
                then: Then::RemoveSession(channel),
            }),
            Some(Delay::Never) => {}
        }
    }

    fn on_close(&mut self) {
        self.input_closed = true;
        self.give_back_all();
        let bytes = Wire::frame(0, Performative::Close(Close { error: None }));
        let delay = self.shared.take_fault(|f| match f {
            Fault::DelayCloseAnswer(d) => Some(*d),
            _ => None,
        });
        match delay {
            None => {
                self.wire.bytes(bytes);
                self.exit = Some(Ending::Graceful);
            }
            Some(Delay::For(after)) => self.timers.push(Timer {
                at: Instant::now() + after,
                bytes,
                then: Then::Exit,
            }),
            // Keep reading (and ignoring) until the client hangs up.
            Some(Delay::Never) => {}
        }
    }

    fn give_back_all(&mut self) {
        let mut inflight = Vec::new();
        for session in self.sessions.values_mut() {
            inflight.extend(take_unsettled(session, |_| true));
        }
        give_back(&self.shared, inflight);
    }

    // -----------------------------------------------------------------------------------------
    // Links
    // -----------------------------------------------------------------------------------------

    fn on_attach(&mut self, channel: u16, attach: Attach) {
        let connection = self.id;
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        if session.ending || session.links.contains_key(&attach.handle.0) {
            return;
        }
        let Some(our_handle) =
            (0..=u32::MAX).find(|h| !session.links.values().any(|l| l.our_handle == *h))
        else {
            return;
        };
        let mut link = Link {
            our_handle,
            address: String::new(),
            role: LinkRole::Sender,
            delivery_count: 0,
            credit: 0,
            drain: false,
            send_settled: attach.snd_settle_mode == SenderSettleMode::Settled,
            gone: false,
            we_detached: false,
            partial: None,
            next_tag: 0,
        };
        let mut answer = Attach {
            name: attach.name.clone(),
            handle: Handle(our_handle),
            role: Role::Sender,
            snd_settle_mode: attach.snd_settle_mode.clone(),
            rcv_settle_mode: attach.rcv_settle_mode.clone(),
            source: attach.source.clone(),
            target: attach.target.clone(),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: Some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        };
        match attach.role {
            Role::Receiver => {
                let dynamic_name = format!("dynamic-{connection}-{channel}-{}", attach.handle.0);
                let source = answer_source(
                    &self.shared.config.source,
                    attach.source.as_deref(),
                    dynamic_name,
                );
                link.address = source.address.clone().unwrap_or_default();
                let address = link.address.clone();
                let refusal = self.shared.take_fault(|f| match f {
                    Fault::RefuseAttach {
                        address: only,
                        error,
                    } if only.as_deref().is_none_or(|only| only == address) => Some(error.clone()),
                    _ => None,
                });
                match refusal {
                    Some(error) => {
                        answer.source = None;
                        self.wire
                            .send(session.our_channel, Performative::Attach(answer));
                        let detach = Detach {
                            handle: Handle(our_handle),
                            closed: true,
                            error: Some(error),
                        };
                        self.wire
                            .send(session.our_channel, Performative::Detach(detach));
                        link.gone = true;
                        link.we_detached = true;
                    }
                    None => {
                        answer.source = Some(Box::new(source));
                        self.shared.ensure_queue(&link.address);
                        self.wire
                            .send(session.our_channel, Performative::Attach(answer));
                    }
                }
            }
            Role::Sender => {
                link.role = LinkRole::Receiver;
                link.address = attach
                    .target
                    .as_ref()
                    .and_then(|t| Target::try_from((**t).clone()).ok())
                    .and_then(|t| t.address)
                    .unwrap_or_default();
                link.delivery_count = attach.initial_delivery_count.unwrap_or(0);
                link.credit = RECEIVE_CREDIT;
                answer.role = Role::Receiver;
                answer.rcv_settle_mode = ReceiverSettleMode::First;
                answer.initial_delivery_count = None;
                self.wire
                    .send(session.our_channel, Performative::Attach(answer));
                let flow = link_flow(
                    (session.next_incoming_id, session.next_outgoing_id),
                    &link,
                    None,
                );
                self.wire
                    .send(session.our_channel, Performative::Flow(flow));
            }
        }
        session.links.insert(attach.handle.0, link);
    }

    fn on_flow(&mut self, channel: u16, flow: Flow) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        let window = flow
            .next_incoming_id
            .unwrap_or(0)
            .wrapping_add(flow.incoming_window)
            .wrapping_sub(session.next_outgoing_id);
        session.remote_incoming_window = if window >= SERIAL_HALF { 0 } else { window };
        let Some(handle) = flow.handle else {
            if flow.echo {
                let answer = Flow {
                    next_incoming_id: Some(session.next_incoming_id),
                    incoming_window: WINDOW,
                    next_outgoing_id: session.next_outgoing_id,
                    outgoing_window: WINDOW,
                    handle: None,
                    delivery_count: None,
                    link_credit: None,
                    available: None,
                    drain: false,
                    echo: false,
                    properties: None,
                };
                self.wire
                    .send(session.our_channel, Performative::Flow(answer));
            }
            return;
        };
        let Some(link) = session.links.get_mut(&handle.0) else {
            return;
        };
        if link.gone {
            return;
        }
        let mut available = None;
        if link.role == LinkRole::Sender {
            // AMQP 1.0 §2.6.7: credit = delivery-count(rcv) + link-credit(rcv) - delivery-count(snd).
            let limit = flow
                .delivery_count
                .unwrap_or(0)
                .wrapping_add(flow.link_credit.unwrap_or(0))
                .wrapping_sub(link.delivery_count);
            link.credit = if limit >= SERIAL_HALF { 0 } else { limit };
            link.drain = flow.drain;
            let queued = self.shared.queue_len(&link.address);
            available = Some(u32::try_from(queued).unwrap_or(u32::MAX));
        }
        if flow.echo {
            let answer = link_flow(
                (session.next_incoming_id, session.next_outgoing_id),
                link,
                available,
            );
            self.wire
                .send(session.our_channel, Performative::Flow(answer));
        }
        // Deliveries and the end of a drain follow in `pump`.
    }

    fn on_detach(&mut self, channel: u16, detach: Detach) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        let handle = detach.handle.0;
        let Some(link) = session.links.get_mut(&handle) else {
            return;
        };
        if link.we_detached {
            // The answer to the peer's detach.
            session.links.remove(&handle);
            return;
        }
        if link.gone {
            return;
        }
        link.gone = true;
        link.partial = None;
        let our_handle = link.our_handle;
        let our_channel = session.our_channel;
        let inflight = take_unsettled(session, |f| f.client_handle == handle);
        give_back(&self.shared, inflight);
        let answer = Detach {
            handle: Handle(our_handle),
            closed: detach.closed,
            error: None,
        };
        let bytes = Wire::frame(our_channel, Performative::Detach(answer));
        let delay = self.shared.take_fault(|f| match f {
            Fault::DelayDetachAnswer(d) => Some(*d),
            _ => None,
        });
        match delay {
            None => {
                self.wire.bytes(bytes);
                session.links.remove(&handle);
            }
            Some(Delay::For(after)) => self.timers.push(Timer {
                at: Instant::now() + after,
                bytes,
                then: Then::RemoveLink { channel, handle },
            }),
            Some(Delay::Never) => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Deliveries
    // -----------------------------------------------------------------------------------------

    /// Delivers queued messages on every link with credit, and ends drains.
    fn pump(&mut self) {
        if !self.opened || self.input_closed || self.we_closed || self.exit.is_some() {
            return;
        }
        let max_frame = self.remote_max_frame;
        for (client_channel, session) in self.sessions.iter_mut() {
            if session.ending {
                continue;
            }
            for (client_handle, link) in session.links.iter_mut() {
                if link.gone || link.role != LinkRole::Sender {
                    continue;
                }
                while link.credit > 0 && session.remote_incoming_window > 0 {
                    let Some(queued) = self.shared.pop(&link.address) else {
                        break;
                    };
                    let Some(frames) = transfer_frames(
                        session.our_channel,
                        session.next_delivery_id,
                        link,
                        &queued,
                        max_frame,
                    ) else {
                        // Cannot happen for a message that was encoded once already; do not
                        // loop on it.
                        continue;
                    };
                    let count = u32::try_from(frames.len()).unwrap_or(u32::MAX);
                    for frame in frames {
                        self.wire.bytes(frame);
                    }
                    let delivery_id = session.next_delivery_id;
                    session.next_delivery_id = delivery_id.wrapping_add(1);
                    session.next_outgoing_id = session.next_outgoing_id.wrapping_add(count);
                    session.remote_incoming_window =
                        session.remote_incoming_window.saturating_sub(count);
                    link.delivery_count = link.delivery_count.wrapping_add(1);
                    link.credit -= 1;
                    link.next_tag = link.next_tag.wrapping_add(1);
                    self.shared.log_sent(Sent {
                        at: Instant::now(),
                        connection: self.id,
                        channel: *client_channel,
                        handle: *client_handle,
                        delivery_id,
                        address: link.address.clone(),
                        message: queued.message.clone(),
                        delivery_count: queued.delivery_count,
                        settled: link.send_settled,
                    });
                    if !link.send_settled {
                        session.unsettled.insert(
                            delivery_id,
                            InFlight {
                                client_handle: *client_handle,
                                address: link.address.clone(),
                                queued,
                            },
                        );
                    }
                }
                if link.drain {
                    // Nothing (more) to send: use up the credit and tell the client (§2.6.7).
                    link.delivery_count = link.delivery_count.wrapping_add(link.credit);
                    link.credit = 0;
                    let flow = link_flow(
                        (session.next_incoming_id, session.next_outgoing_id),
                        link,
                        Some(0),
                    );
                    link.drain = false;
                    self.wire
                        .send(session.our_channel, Performative::Flow(flow));
                }
            }
        }
    }

    fn on_disposition(&mut self, channel: u16, disposition: Disposition) {
        // Only the client's settlements of what the peer sent; the peer settles what it
        // receives at once.
        if disposition.role != Role::Receiver {
            return;
        }
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        let terminal = matches!(
            disposition.state,
            Some(
                DeliveryState::Accepted(_)
                    | DeliveryState::Rejected(_)
                    | DeliveryState::Released(_)
                    | DeliveryState::Modified(_)
            )
        );
        if !disposition.settled && !terminal {
            return;
        }
        let effective = match &disposition.state {
            Some(state) if terminal => state.clone(),
            _ => default_state(&self.shared.config),
        };
        let first = disposition.first;
        let span = disposition.last.unwrap_or(first).wrapping_sub(first);
        let mut ids: Vec<u32> = session
            .unsettled
            .keys()
            .copied()
            .filter(|id| id.wrapping_sub(first) <= span)
            .collect();
        ids.sort_by_key(|id| id.wrapping_sub(first));
        let at = Instant::now();
        let mut records = Vec::with_capacity(ids.len());
        let mut requeue = Vec::new();
        for id in ids {
            let Some(f) = session.unsettled.remove(&id) else {
                continue;
            };
            records.push(Settled {
                address: f.address.clone(),
                message: f.queued.message.clone(),
                delivery_count: f.queued.delivery_count,
                state: disposition.state.clone(),
                by_client: true,
                at,
            });
            if let Some(back) = apply_outcome(&effective, f.queued) {
                requeue.push((f.address, back));
            }
        }
        let our_channel = session.our_channel;
        self.shared.settle(records, requeue);
        if !disposition.settled {
            let answer = Disposition {
                role: Role::Sender,
                first,
                last: disposition.last,
                settled: true,
                state: disposition.state,
                batchable: false,
            };
            self.wire
                .send(our_channel, Performative::Disposition(answer));
        }
    }

    /// A transfer on a client sender link: collect it, then queue the message.
    fn on_transfer(&mut self, channel: u16, transfer: Transfer, payload: &[u8]) {
        let Some(session) = self.sessions.get_mut(&channel) else {
            return;
        };
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        let Some(link) = session.links.get_mut(&transfer.handle.0) else {
            return;
        };
        if link.gone || link.role != LinkRole::Receiver {
            return;
        }
        let partial = link.partial.get_or_insert_with(|| Partial {
            delivery_id: None,
            settled: false,
            payload: Vec::new(),
        });
        if partial.delivery_id.is_none() {
            partial.delivery_id = transfer.delivery_id;
        }
        partial.settled |= transfer.settled == Some(true);
        partial.payload.extend_from_slice(payload);
        if transfer.aborted {
            link.partial = None;
            return;
        }
        if transfer.more {
            return;
        }
        let Some(done) = link.partial.take() else {
            return;
        };
        link.delivery_count = link.delivery_count.wrapping_add(1);
        link.credit = link.credit.saturating_sub(1);
        let reader = serde_amqp::read::SliceReader::new(&done.payload);
        let state = match Body::<Value>::decode_message_from_reader(reader) {
            Ok(message) => {
                self.shared.push_back(
                    &link.address,
                    Queued {
                        message,
                        delivery_count: 0,
                    },
                );
                DeliveryState::Accepted(Accepted {})
            }
            Err(e) => DeliveryState::Rejected(Rejected {
                error: Some(definitions::Error::new(
                    AmqpError::DecodeError,
                    Some(e.to_string()),
                    None,
                )),
            }),
        };
        if !done.settled
            && let Some(delivery_id) = done.delivery_id
        {
            let answer = Disposition {
                role: Role::Receiver,
                first: delivery_id,
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            };
            self.wire
                .send(session.our_channel, Performative::Disposition(answer));
        }
        if link.credit < RECEIVE_CREDIT / 2 {
            link.credit = RECEIVE_CREDIT;
            let flow = link_flow(
                (session.next_incoming_id, session.next_outgoing_id),
                link,
                None,
            );
            self.wire
                .send(session.our_channel, Performative::Flow(flow));
        }
    }

    // -----------------------------------------------------------------------------------------
    // The peer's own moves
    // -----------------------------------------------------------------------------------------

    fn on_control(&mut self, control: Control) {
        if !self.opened || self.input_closed || self.we_closed {
            if matches!(control, Control::Close(_)) && !self.opened {
                self.exit = Some(Ending::Abrupt);
            }
            return;
        }
        match control {
            Control::Kill => self.exit = Some(Ending::Abrupt),
            Control::EndSessions(error) => {
                let mut inflight = Vec::new();
                for session in self.sessions.values_mut() {
                    if session.ending {
                        continue;
                    }
                    session.ending = true;
                    session.we_ended = true;
                    session.links.clear();
                    inflight.extend(take_unsettled(session, |_| true));
                    let end = End {
                        error: error.clone(),
                    };
                    self.wire.send(session.our_channel, Performative::End(end));
                }
                give_back(&self.shared, inflight);
            }
            Control::Close(error) => {
                self.we_closed = true;
                self.give_back_all();
                self.wire.send(0, Performative::Close(Close { error }));
            }
            Control::Detach {
                address,
                closed,
                error,
            } => {
                let mut inflight = Vec::new();
                for session in self.sessions.values_mut() {
                    if session.ending {
                        continue;
                    }
                    let mut detached = Vec::new();
                    for (client_handle, link) in session.links.iter_mut() {
                        if link.gone || address.as_deref().is_some_and(|a| a != link.address) {
                            continue;
                        }
                        link.gone = true;
                        link.we_detached = true;
                        link.partial = None;
                        detached.push(*client_handle);
                        let detach = Detach {
                            handle: Handle(link.our_handle),
                            closed,
                            error: error.clone(),
                        };
                        self.wire
                            .send(session.our_channel, Performative::Detach(detach));
                    }
                    inflight.extend(take_unsettled(session, |f| {
                        detached.contains(&f.client_handle)
                    }));
                }
                give_back(&self.shared, inflight);
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<Timer>, Vec<Timer>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|t| t.at <= now);
        self.timers = later;
        for timer in due {
            self.wire.bytes(timer.bytes);
            match timer.then {
                Then::RemoveLink { channel, handle } => {
                    if let Some(session) = self.sessions.get_mut(&channel) {
                        session.links.remove(&handle);
                    }
                }
                Then::RemoveSession(channel) => {
                    self.sessions.remove(&channel);
                }
                Then::Exit => self.exit = Some(Ending::Graceful),
            }
        }
    }
}

/// The frames of one delivery of `queued` on `link`, split to the client's max frame size.
fn transfer_frames(
    channel: u16,
    delivery_id: u32,
    link: &Link,
    queued: &Queued,
    max_frame: usize,
) -> Option<Vec<Vec<u8>>> {
    let mut message = queued.message.clone();
    if queued.delivery_count > 0 {
        message
            .header
            .get_or_insert_with(Header::default)
            .delivery_count = queued.delivery_count;
    }
    let payload = serde_amqp::to_vec(&Serializable(&message)).ok()?;
    let mut transfer = Transfer {
        handle: Handle(link.our_handle),
        delivery_id: Some(delivery_id),
        delivery_tag: Some(DeliveryTag::from(link.next_tag.to_be_bytes().to_vec())),
        message_format: Some(0),
        settled: Some(link.send_settled),
        more: false,
        rcv_settle_mode: None,
        state: None,
        resume: false,
        aborted: false,
        batchable: false,
    };
    let whole = codec::encode_performative(&Performative::Transfer(transfer.clone())).ok()?;
    if codec::frame_overhead() + whole.len() + payload.len() <= max_frame {
        return Some(vec![codec::amqp_frame_encoded(channel, &whole, &payload)]);
    }
    transfer.more = true;
    let more = codec::encode_performative(&Performative::Transfer(transfer)).ok()?;
    let chunk = max_frame
        .checked_sub(codec::frame_overhead() + more.len())
        .filter(|c| *c > 0)?;
    let chunks: Vec<&[u8]> = payload.chunks(chunk).collect();
    let last = chunks.len().saturating_sub(1);
    Some(
        chunks
            .iter()
            .enumerate()
            .map(|(i, part)| {
                let encoded = if i == last { &whole } else { &more };
                codec::amqp_frame_encoded(channel, encoded, part)
            })
            .collect(),
    )
}

/// The log entry of a decoded performative.
fn logged(performative: &Performative, payload: &[u8]) -> FrameBody {
    match performative {
        Performative::Open(p) => FrameBody::Open(p.clone()),
        Performative::Begin(p) => FrameBody::Begin(p.clone()),
        Performative::Attach(p) => FrameBody::Attach(p.clone()),
        Performative::Flow(p) => FrameBody::Flow(p.clone()),
        Performative::Transfer(p) => FrameBody::Transfer {
            transfer: p.clone(),
            payload: payload.to_vec(),
        },
        Performative::Disposition(p) => FrameBody::Disposition(p.clone()),
        Performative::Detach(p) => FrameBody::Detach(p.clone()),
        Performative::End(p) => FrameBody::End(p.clone()),
        Performative::Close(p) => FrameBody::Close(p.clone()),
    }
}
