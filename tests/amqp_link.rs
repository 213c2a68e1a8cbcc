//! The receiver link and its session, opened by the daemon's real code (`AmqpLink::open`)
//! against brokers that misbehave on purpose: a pooled connection that cannot take one more
//! session, a broker that would pre-settle every message, and a message larger than the
//! link's `max-message-size`. The in-memory peer of the test kit plays the broker, except for
//! the pre-settling one, which is scripted frame by frame below (the peer echoes the client's
//! settle mode, as brokers normally do).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fe2o3_amqp::types::definitions::{Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp::types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, End, MaxFrameSize, Open, Performative,
};
use hot_potato::amqp::connection::{BrokerSettings, ConnectionPool, Dialer};
use hot_potato::amqp::error::LinkError;
use hot_potato::amqp::link::{AmqpLink, Incoming};
use hot_potato::enrollment::outcome::FailureOutcomePolicy;
use hot_potato::enrollment::record::{Enrollment, SubscriptionArgs};
use hot_potato_testkit::peer::{FrameBody, Peer, PeerConfig, TestMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

fn enrollment(queue: &str) -> Enrollment {
    Enrollment {
        id: Uuid::new_v4(),
        queue: queue.into(),
        target_url: "http://127.0.0.1:1/hook".into(),
        subscription_args: SubscriptionArgs::default(),
        created_at: "2026-01-01T00:00:00Z".into(),
        delivery: Default::default(),
        paused: false,
    }
}

fn settings(dialer: Dialer, pool: Option<ConnectionPool>, max_message_size: u64) -> BrokerSettings {
    BrokerSettings {
        url: url::Url::parse("amqp://in-memory-peer").expect("url"),
        connect_timeout: WAIT,
        pool,
        dialer,
        max_message_size,
    }
}

fn peer_dialer(peer: &Arc<Peer>) -> Dialer {
    let peer = Arc::clone(peer);
    Dialer::Stream(Arc::new(move || peer.dial()))
}

async fn open(broker: &BrokerSettings, enrollment: &Enrollment) -> Result<AmqpLink, LinkError> {
    AmqpLink::open(broker, enrollment, 10, FailureOutcomePolicy::Auto).await
}

/// Receives one message and accepts it; its text body.
async fn receive_one(link: &mut AmqpLink) -> String {
    let incoming = tokio::time::timeout(WAIT, link.recv())
        .await
        .expect("a message in time")
        .expect("receives");
    let Incoming::Message { delivery, message } = incoming else {
        panic!("undecodable: {incoming:?}");
    };
    link.accept_all(vec![delivery]).await.expect("accept");
    format!("{:?}", message.body)
}

/// The peer advertises channel-max 0, so a pooled connection carries one session. The second
/// enrollment of the slot gets a second connection of its own (`hot-potato-pool-0-1`) instead of
/// a `begin` the broker never agreed to; the first enrollment goes on receiving on its connection,
/// which is neither closed nor replaced.
#[tokio::test]
async fn a_full_pooled_connection_leaves_its_sessions_alone_and_the_slot_grows() {
    let peer = Arc::new(Peer::start(PeerConfig {
        channel_max: 0,
        ..PeerConfig::default()
    }));
    let broker = settings(peer_dialer(&peer), Some(ConnectionPool::new(1, 1)), 1 << 20);
    let (a, b) = (enrollment("a"), enrollment("b"));
    let mut first = open(&broker, &a)
        .await
        .expect("the first enrollment's link");
    peer.send("a", TestMessage::text("before"));
    assert!(receive_one(&mut first).await.contains("before"));

    let mut second = open(&broker, &b)
        .await
        .expect("the second enrollment's link, on a second connection");
    peer.send("b", TestMessage::text("to b"));
    assert!(receive_one(&mut second).await.contains("to b"));

    peer.send("a", TestMessage::text("after"));
    assert!(receive_one(&mut first).await.contains("after"));
    let frames = peer.frames();
    let opens: Vec<(u64, String)> = frames
        .iter()
        .filter_map(|f| match &f.body {
            FrameBody::Open(open) => Some((f.connection, open.container_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        opens,
        [
            (1, "hot-potato-pool-0".to_string()),
            (2, "hot-potato-pool-0-1".to_string())
        ]
    );
    let attach_connections: Vec<u64> = frames
        .iter()
        .filter(|f| f.as_attach().is_some())
        .map(|f| f.connection)
        .collect();
    assert_eq!(attach_connections, [1, 2], "one link on each connection");
    assert!(
        frames.iter().all(|f| f.as_close().is_none()),
        "no pooled connection was closed"
    );
    assert_eq!(peer.live_connections(), 2);
    first.detach().await;
    second.detach().await;
    broker.close_pool().await;
}

/// The attach asks for unsettled deliveries and carries the configured `max-message-size`.
#[tokio::test]
async fn the_attach_asks_for_unsettled_deliveries_and_bounds_the_message_size() {
    let peer = Arc::new(Peer::start(PeerConfig::default()));
    let broker = settings(peer_dialer(&peer), None, 4096);
    let link = open(&broker, &enrollment("q")).await.expect("link");
    let attach = peer.attaches()[0].clone();
    assert_eq!(attach.snd_settle_mode, SenderSettleMode::Unsettled);
    assert_eq!(attach.max_message_size, Some(4096));
    link.detach().await;
}

/// A message larger than `max-message-size` (which the test kit's peer, like RabbitMQ 3.10,
/// sends anyway) fails the link with an error naming the limit, and stays on the broker.
#[tokio::test]
async fn a_message_over_the_size_limit_fails_the_link_and_stays_on_the_broker() {
    let peer = Arc::new(Peer::start(PeerConfig::default()));
    let broker = settings(peer_dialer(&peer), None, 1024);
    let mut link = open(&broker, &enrollment("q")).await.expect("link");
    peer.send("q", TestMessage::bytes(vec![7u8; 4096]));
    let failed = tokio::time::timeout(WAIT, link.recv())
        .await
        .expect("an answer in time");
    match failed {
        Err(LinkError::MessageTooLarge { size, max }) => {
            assert!(size > 1024, "{size}");
            assert_eq!(max, 1024);
        }
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    link.abandon().await;
    peer.wait_until(WAIT, |p| p.queued("q") == 1)
        .await
        .expect("the message is back in its queue");
    // The vendored fe2o3-amqp detaches without closing (vendor/fe2o3-amqp/PATCHES.md, 3).
    let detaches = peer.detaches();
    assert!(
        !detaches.is_empty() && detaches.iter().all(|d| !d.closed),
        "one big message must not close a durable subscription: {detaches:?}"
    );
}

/// A broker that answers the attach with `snd-settle-mode = settled` is refused before it
/// gets any credit (so it cannot send, and so lose, a single message), and the link is
/// detached without `closed` (a durable subscription would survive).
#[tokio::test]
async fn a_broker_that_would_presettle_is_refused_before_it_gets_credit() {
    let log: Arc<Mutex<Vec<Performative>>> = Arc::default();
    let seen = Arc::clone(&log);
    let dialer = Dialer::Stream(Arc::new(move || presettling_broker(Arc::clone(&seen))));
    let broker = settings(dialer, None, 1 << 20);
    let refused = open(&broker, &enrollment("q")).await;
    let error = refused.err().expect("the link is refused");
    assert!(matches!(error, LinkError::PreSettled), "{error:?}");
    assert!(error.to_string().contains("lost"), "{error}");

    let log = log.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let attach = log
        .iter()
        .find_map(|p| match p {
            Performative::Attach(a) => Some(a.clone()),
            _ => None,
        })
        .expect("an attach");
    assert_eq!(attach.snd_settle_mode, SenderSettleMode::Unsettled);
    let credit_given = log.iter().any(|p| match p {
        Performative::Flow(flow) => flow.link_credit.is_some_and(|c| c > 0),
        _ => false,
    });
    assert!(!credit_given, "no credit before the refusal: {log:?}");
    let detach = log
        .iter()
        .find_map(|p| match p {
            Performative::Detach(d) => Some(d.clone()),
            _ => None,
        })
        .expect("a detach");
    assert!(!detach.closed, "detached, not closed: {detach:?}");
}

/// A broker scripted frame by frame: open, begin, and a sender attach answering `settled`
/// whatever the client asked for; detach, end and close are answered. Every performative the
/// client sends goes to `log`. Returns the client's end of the stream.
fn presettling_broker(log: Arc<Mutex<Vec<Performative>>>) -> DuplexStream {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let mut header = [0u8; 8];
        if server.read_exact(&mut header).await.is_err()
            || server.write_all(b"AMQP\x00\x01\x00\x00").await.is_err()
        {
            return;
        }
        while let Some((channel, performative)) = read_frame(&mut server).await {
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(performative.clone());
            let answer = match performative {
                Performative::Open(_) => Performative::Open(Open {
                    container_id: "presettling-broker".into(),
                    hostname: None,
                    max_frame_size: MaxFrameSize(64 * 1024),
                    channel_max: ChannelMax(0),
                    idle_time_out: None,
                    outgoing_locales: None,
                    incoming_locales: None,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                }),
                Performative::Begin(begin) => Performative::Begin(Begin {
                    remote_channel: Some(channel),
                    next_outgoing_id: 0,
                    incoming_window: 2048,
                    outgoing_window: 2048,
                    handle_max: begin.handle_max,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                }),
                Performative::Attach(attach) => Performative::Attach(Attach {
                    name: attach.name,
                    handle: Handle(0),
                    role: Role::Sender,
                    snd_settle_mode: SenderSettleMode::Settled,
                    rcv_settle_mode: ReceiverSettleMode::First,
                    source: attach.source,
                    target: attach.target,
                    unsettled: None,
                    incomplete_unsettled: false,
                    initial_delivery_count: Some(0),
                    max_message_size: None,
                    offered_capabilities: None,
                    desired_capabilities: None,
                    properties: None,
                }),
                Performative::Detach(detach) => Performative::Detach(Detach {
                    handle: Handle(0),
                    closed: detach.closed,
                    error: None,
                }),
                Performative::End(_) => Performative::End(End { error: None }),
                Performative::Close(_) => {
                    write_frame(&mut server, 0, &Performative::Close(Close { error: None })).await;
                    return;
                }
                _ => continue,
            };
            write_frame(&mut server, channel, &answer).await;
        }
    });
    client
}

/// The next non-empty frame's channel and performative; `None` at end of stream.
async fn read_frame(stream: &mut DuplexStream) -> Option<(u16, Performative)> {
    loop {
        let mut size = [0u8; 4];
        stream.read_exact(&mut size).await.ok()?;
        let mut frame = vec![
            0u8;
            usize::try_from(u32::from_be_bytes(size))
                .ok()?
                .checked_sub(4)?
        ];
        stream.read_exact(&mut frame).await.ok()?;
        // frame: doff, type, channel (2 bytes), extended header, body.
        let body_at = usize::from(*frame.first()?) * 4 - 4;
        let channel = u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]);
        let body = frame.get(body_at..)?;
        if body.is_empty() {
            continue; // a heartbeat
        }
        let mut reader = body;
        return serde_amqp::from_reader(&mut reader)
            .ok()
            .map(|p| (channel, p));
    }
}

async fn write_frame(stream: &mut DuplexStream, channel: u16, performative: &Performative) {
    let body = serde_amqp::to_vec(performative).expect("encodes");
    let size = u32::try_from(8 + body.len()).expect("small frame");
    let mut frame = Vec::with_capacity(8 + body.len());
    frame.extend_from_slice(&size.to_be_bytes());
    frame.extend_from_slice(&[2, 0]);
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&body);
    let _ = stream.write_all(&frame).await;
}
