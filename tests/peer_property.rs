//! A seeded property test of the whole receive → deliver → settle path: the daemon's real
//! worker (fe2o3-amqp link code, dispatcher, breaker, credit) against the test kit's in-memory
//! AMQP peer and an HTTP target in this file whose answers the test draws.
//!
//! Each case draws, from its seed, an enrollment (`max_in_flight` 1/2/4/8, prefetch, retry and
//! breaker settings with short timings, `drop_on: [404]` or not, `max_hold_ms`), the failure
//! outcome style of the broker (RabbitMQ 3.x → `released`, Artemis → `modified`), pooled or
//! own connections, 10–40 messages with ids sent in up to four bursts, and a schedule of
//! outages and link drops. Then:
//! 1. chaos (1.0–1.6 s): the target answers each POST with a random pick of 200, 500 (retry
//!    class, counted), 400 (fails at once), 503 and 429 (unavailable: held, uncounted), 404
//!    (only with `drop_on`, accepted as dropped), a hang past the POST timeout, or a dropped
//!    connection, each after 0–50 ms; during an outage (0–2 of 100–400 ms) only the
//!    unavailable ones, so the breaker opens; meanwhile the peer drops the link up to eight
//!    times (killed connections mostly, also `end`, `close` and `detach` from the broker's
//!    side; now and then twice in a row, while the worker reconnects); one case in four has no
//!    link drop;
//! 2. calm: every answer is 200 until every message is accepted (deadline [`CALM_DEADLINE`]),
//!    the worker must then be idle and healthy, and one more message must go through.
//!
//! The properties, checked from the peer's own records (frames received, transfers sent,
//! settlements) and the worker's status; see [`check_settlements`], [`check_frames`] and
//! [`check_counters`] for the exact invariants. The peer has no delivery limit: a message
//! handed back with the failure outcome is redelivered, however often, as a broker without a
//! dead-letter policy would; so the rule is that at the end every message is accepted exactly
//! once, whatever it went through.
//!
//! Replay one seed: `HOT_POTATO_PROPERTY_SEED=0x… cargo test --test peer_property`; draw fresh
//! seeds (printed, for soak runs): `HOT_POTATO_PROPERTY_FRESH=1`. A failing case prints its seed
//! and its drawn settings. The interleaving of the tasks is not replayed, only the draws.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use fe2o3_amqp::types::definitions::{self, AmqpError, Role};
use fe2o3_amqp::types::messaging::{DeliveryState, MessageId};
use hot_potato::amqp::connection::{BrokerSettings, ConnectionPool, Dialer};
use hot_potato::backoff::BackoffSettings;
use hot_potato::config::Config;
use hot_potato::enrollment::live::LiveEnrollment;
use hot_potato::enrollment::outcome::FailureOutcomePolicy;
use hot_potato::enrollment::record::NewEnrollment;
use hot_potato::enrollment::status::{BreakerState, StatusSnapshot, WorkerState};
use hot_potato::pipeline::link::AmqpOpener;
use hot_potato::pipeline::settle::SettleBatching;
use hot_potato::pipeline::worker::{WorkerContext, WorkerEnd, run};
use hot_potato::shutdown::StopSignals;
use hot_potato::telemetry::metrics::Metrics;
use hot_potato_testkit::peer::{
    ClientFrame, FrameBody, Peer, PeerConfig, PeerMessage, Sent, Settled, SourceAnswer,
    TestMessage, summary,
};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const QUEUE: &str = "property";
/// Cases per run, spread over [`SHARDS`] test functions (which run in parallel by default).
const CASES: u64 = 16;
const SHARDS: u64 = 4;
/// The default seeds are derived from this, so every run draws the same cases.
const BASE_SEED: u64 = 0x0005_eed0_f407_a70e;
const SEED_VAR: &str = "HOT_POTATO_PROPERTY_SEED";
const FRESH_VAR: &str = "HOT_POTATO_PROPERTY_FRESH";
/// How long the calm phase may take to get every message accepted: past it, the enrollment
/// stalled.
const CALM_DEADLINE: Duration = Duration::from_secs(20);
/// How long the one message sent after the calm may take.
const TAIL_DEADLINE: Duration = Duration::from_secs(5);
/// How long the status may take to show an idle, healthy worker once everything is accepted.
const IDLE_DEADLINE: Duration = Duration::from_secs(3);
/// The enrollment's POST timeout. Far above the 0–50 ms answer delays, so only a hang times
/// out, even on a loaded machine.
const TIMEOUT_MS: u64 = 800;
/// How long a hanging answer sleeps before it answers (the daemon gave up long before).
const HANG: Duration = Duration::from_millis(2 * TIMEOUT_MS);
const WAIT: Duration = Duration::from_secs(10);
/// The message sent after the calm.
const TAIL_ID: &str = "tail";

// ---------------------------------------------------------------------------------------------
// The drawn case
// ---------------------------------------------------------------------------------------------

/// What the target answers one POST with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok200,
    /// Retry class: every attempt counted.
    Error500,
    /// No class: the failure outcome at once.
    Fail400,
    /// Unavailable: held, uncounted.
    Busy503,
    Busy429,
    /// Accepted as dropped (only drawn when the enrollment has `drop_on: [404]`).
    Gone404,
    /// No answer within the POST timeout: unavailable.
    Hang,
    /// The connection dropped without an answer: unavailable.
    Drop,
}

const ANSWERS: [Answer; 8] = [
    Answer::Ok200,
    Answer::Error500,
    Answer::Fail400,
    Answer::Busy503,
    Answer::Busy429,
    Answer::Gone404,
    Answer::Hang,
    Answer::Drop,
];

/// The weights of [`ANSWERS`] during an outage: unavailable only.
const OUTAGE_WEIGHTS: [u32; 8] = [0, 0, 0, 6, 2, 0, 1, 2];

impl Answer {
    fn index(self) -> usize {
        ANSWERS.iter().position(|a| *a == self).unwrap_or(0)
    }

    fn unavailable(self) -> bool {
        matches!(
            self,
            Answer::Busy503 | Answer::Busy429 | Answer::Hang | Answer::Drop
        )
    }
}

/// How the peer drops the link during the chaos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkDrop {
    /// Every connection dropped without a word (a broker crash, a network cut).
    Kill,
    /// `end{error}` on every session.
    EndSessions,
    /// `close{error}` on every connection.
    Close,
    /// `detach{closed: false, error}` on the queue's links.
    Detach,
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    /// RabbitMQ 3.x (no `modified`: failures are `released`) or Artemis (`modified`).
    rabbitmq: bool,
    /// One shared pooled connection instead of one connection per link.
    pooled: bool,
    /// With `pooled`: the link on a session links share (`AMQP_LINKS_PER_SESSION` 4), which
    /// outlives each of its links, so every reattach after a link drop goes on the same session.
    shared_session: bool,
    max_in_flight: u32,
    /// The worker's default prefetch; the link credit is the larger of it and `max_in_flight`.
    prefetch: u32,
    max_attempts: u32,
    backoff: &'static str,
    base_ms: u64,
    max_ms: u64,
    jitter: bool,
    failure_threshold: u32,
    open_ms: u64,
    drop_404: bool,
    max_hold_ms: Option<u64>,
    messages: usize,
    chaos: Duration,
    /// Weights of [`ANSWERS`] during the chaos.
    weights: [u32; 8],
    /// When (from the start of the chaos) and how the link is dropped.
    link_drops: Vec<(Duration, LinkDrop)>,
    /// When (from the start of the chaos) how many more messages are sent: a first burst at
    /// once, the rest later, so the link drops also find messages in hand.
    bursts: Vec<(Duration, usize)>,
    /// Outages within the chaos (start, length): the target answers only "unavailable"
    /// (503, 429, a hang, a dropped connection), long enough for the breaker to open.
    outages: Vec<(Duration, Duration)>,
}

/// What the test does at a point of the chaos.
#[derive(Debug, Clone, Copy)]
enum Move {
    Drop(LinkDrop),
    /// Send this many more messages.
    Send(usize),
    /// An outage starts (`true`) or ends.
    Outage(bool),
}

impl Case {
    fn draw(seed: u64) -> Case {
        let mut rng = fastrand::Rng::with_seed(seed);
        let max_in_flight = [1, 2, 4, 8][rng.usize(..4)];
        let base_ms = rng.u64(5..=20);
        let drop_404 = rng.bool();
        let max_hold_ms = match rng.u32(0..10) {
            0 => Some(0),
            1 | 2 => Some(rng.u64(150..=400)),
            _ => None,
        };
        let weights = [
            rng.u32(10..=50),                           // 200
            rng.u32(5..=20),                            // 500
            rng.u32(0..=5),                             // 400
            rng.u32(5..=15),                            // 503
            rng.u32(0..=10),                            // 429
            if drop_404 { rng.u32(3..=10) } else { 0 }, // 404
            rng.u32(0..=3),                             // hang
            rng.u32(0..=6),                             // connection dropped
        ];
        let chaos = Duration::from_millis(rng.u64(1000..=1600));
        // One case in four without link drops: there the counters must match exactly.
        let drops = if rng.u32(0..4) == 0 {
            0
        } else {
            rng.usize(1..=4)
        };
        let mut link_drops = Vec::new();
        for _ in 0..drops {
            let at = Duration::from_millis(rng.u64(100..chaos.as_millis() as u64 - 100));
            link_drops.push((at, link_drop(&mut rng)));
            // Now and then a second drop right after, while the worker reconnects.
            if rng.u32(0..3) == 0 {
                let then = at + Duration::from_millis(rng.u64(1..=40));
                link_drops.push((then, link_drop(&mut rng)));
            }
        }
        link_drops.sort_by_key(|(at, _)| *at);
        let messages = rng.usize(10..=40);
        let first = rng.usize(1..=messages);
        let mut bursts = vec![(Duration::ZERO, first)];
        let mut left = messages - first;
        while left > 0 {
            let n = if bursts.len() == 3 {
                left
            } else {
                rng.usize(1..=left)
            };
            let at = Duration::from_millis(rng.u64(50..chaos.as_millis() as u64 - 200));
            bursts.push((at, n));
            left -= n;
        }
        bursts.sort_by_key(|(at, _)| *at);
        let outages = (0..rng.usize(0..=2))
            .map(|_| {
                let at = rng.u64(0..chaos.as_millis() as u64 - 400);
                (
                    Duration::from_millis(at),
                    Duration::from_millis(rng.u64(100..=400)),
                )
            })
            .collect();
        Case {
            seed,
            rabbitmq: rng.bool(),
            pooled: rng.u32(0..10) < 3,
            max_in_flight,
            prefetch: [1, 3, 10, 25][rng.usize(..4)],
            max_attempts: rng.u32(1..=5),
            backoff: ["fixed", "linear", "exponential"][rng.usize(..3)],
            base_ms,
            max_ms: base_ms * rng.u64(1..=8),
            jitter: rng.bool(),
            // 0 (never opens) now and then; mostly a breaker that can open.
            failure_threshold: if rng.u32(0..8) == 0 {
                0
            } else {
                rng.u32(1..=5)
            },
            open_ms: rng.u64(50..=200),
            drop_404,
            max_hold_ms,
            messages,
            chaos,
            weights,
            link_drops,
            bursts,
            outages,
            // Drawn last, so every earlier seed still draws the case it always did.
            shared_session: rng.bool(),
        }
    }

    fn enrollment_body(&self, target_url: &str) -> serde_json::Value {
        let mut delivery = json!({
            "max_in_flight": self.max_in_flight,
            "timeout_ms": TIMEOUT_MS,
            "retry": {
                "max_attempts": self.max_attempts,
                "backoff": self.backoff,
                "base_ms": self.base_ms,
                "max_ms": self.max_ms,
                "jitter": self.jitter,
            },
            "circuit_breaker": {
                "failure_threshold": self.failure_threshold,
                "open_ms": self.open_ms,
            },
        });
        if self.drop_404 {
            delivery["drop_on"] = json!([404]);
        }
        if let Some(ms) = self.max_hold_ms {
            delivery["max_hold_ms"] = json!(ms);
        }
        json!({"queue": QUEUE, "target_url": target_url, "delivery": delivery})
    }

    /// The link credit the worker asks for while its breaker is closed.
    fn credit(&self) -> u32 {
        self.prefetch.max(self.max_in_flight)
    }
}

fn link_drop(rng: &mut fastrand::Rng) -> LinkDrop {
    match rng.u32(0..10) {
        0 => LinkDrop::EndSessions,
        1 => LinkDrop::Close,
        2 => LinkDrop::Detach,
        _ => LinkDrop::Kill,
    }
}

/// splitmix64: spreads consecutive numbers into unrelated seeds.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => text.parse().ok(),
    }
}

/// The seeds shard `shard` runs: one replayed seed (shard 0 only), fresh ones, or the fixed
/// ones.
fn seeds_for(shard: u64) -> Vec<u64> {
    if let Ok(text) = std::env::var(SEED_VAR) {
        let seed = parse_seed(&text)
            .unwrap_or_else(|| panic!("{SEED_VAR}={text:?} is not a number (decimal or 0x…)"));
        return if shard == 0 { vec![seed] } else { Vec::new() };
    }
    let fresh = std::env::var_os(FRESH_VAR).is_some();
    (0..CASES)
        .filter(|i| i % SHARDS == shard)
        .map(|i| {
            if fresh {
                fastrand::u64(..)
            } else {
                splitmix(BASE_SEED.wrapping_add(i))
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The target
// ---------------------------------------------------------------------------------------------

/// The panic payload that makes the target drop a connection: axum does not catch a
/// handler's panic, so the connection's task ends and the client sees the connection go
/// without an answer. [`quiet_drops`] keeps these panics out of the output.
struct DropConnection;

fn quiet_drops() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<DropConnection>() {
                previous(info);
            }
        }));
    });
}

/// The HTTP target: answers from the case's weights during the chaos, 200 once calm; counts
/// every answer by kind and every POST by message id.
struct Target {
    calm: AtomicBool,
    outage: AtomicBool,
    weights: [u32; 8],
    rng: Mutex<fastrand::Rng>,
    answered: [AtomicU64; 8],
    posts: Mutex<HashMap<String, u32>>,
}

impl Target {
    fn new(case: &Case) -> Self {
        Self {
            calm: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            weights: case.weights,
            rng: Mutex::new(fastrand::Rng::with_seed(case.seed ^ 0x007a_46e7)),
            answered: std::array::from_fn(|_| AtomicU64::new(0)),
            posts: Mutex::new(HashMap::new()),
        }
    }

    fn draw(&self) -> (Answer, Duration) {
        if self.calm.load(Ordering::SeqCst) {
            return (Answer::Ok200, Duration::ZERO);
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let weights = if self.outage.load(Ordering::SeqCst) {
            OUTAGE_WEIGHTS
        } else {
            self.weights
        };
        let total: u32 = weights.iter().sum();
        let mut pick = rng.u32(0..total.max(1));
        let delay = Duration::from_millis(rng.u64(0..=50));
        for (answer, weight) in ANSWERS.iter().zip(weights) {
            if pick < weight {
                return (*answer, delay);
            }
            pick -= weight;
        }
        (Answer::Ok200, delay)
    }

    fn answered(&self, answer: Answer) -> u64 {
        self.answered[answer.index()].load(Ordering::SeqCst)
    }

    fn tally(&self) -> String {
        ANSWERS
            .iter()
            .map(|a| format!("{a:?} {}", self.answered(*a)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn answer(State(target): State<Arc<Target>>, headers: HeaderMap) -> StatusCode {
    let id = headers
        .get("amqp-message-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *target
        .posts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(id)
        .or_default() += 1;
    let (answer, delay) = target.draw();
    // Counted before it is given: the invariants only need "at most this many answers".
    target.answered[answer.index()].fetch_add(1, Ordering::SeqCst);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match answer {
        Answer::Ok200 => StatusCode::OK,
        Answer::Error500 => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Fail400 => StatusCode::BAD_REQUEST,
        Answer::Busy503 => StatusCode::SERVICE_UNAVAILABLE,
        Answer::Busy429 => StatusCode::TOO_MANY_REQUESTS,
        Answer::Gone404 => StatusCode::NOT_FOUND,
        Answer::Hang => {
            tokio::time::sleep(HANG).await;
            StatusCode::OK
        }
        Answer::Drop => std::panic::panic_any(DropConnection),
    }
}

async fn serve_target(target: Arc<Target>) -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the target");
    let addr = listener.local_addr().expect("target address");
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(answer))
        .with_state(target);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), server)
}

// ---------------------------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------------------------

struct Running {
    case: Case,
    peer: Arc<Peer>,
    live: Arc<LiveEnrollment>,
    signals: StopSignals,
    worker: JoinHandle<WorkerEnd>,
    target: Arc<Target>,
    server: JoinHandle<()>,
}

async fn start(case: &Case) -> Running {
    let source = if case.rabbitmq {
        SourceAnswer::rabbitmq_3()
    } else {
        SourceAnswer::artemis()
    };
    let peer = Arc::new(Peer::start(PeerConfig::default().with_source(source)));
    let target = Arc::new(Target::new(case));
    let (url, server) = serve_target(Arc::clone(&target)).await;
    let new = NewEnrollment::from_json(case.enrollment_body(&url)).expect("a valid enrollment");
    let config = Config::from_vars(Vec::<(String, String)>::new()).expect("default config");
    let enrollment = new.into_enrollment(uuid::Uuid::new_v4(), "2026-01-01T00:00:00Z".into());
    let live = Arc::new(LiveEnrollment::new(enrollment, &config.delivery_defaults));
    let dial = Arc::clone(&peer);
    let broker = Arc::new(BrokerSettings {
        url: url::Url::parse("amqp://in-memory-peer").expect("url"),
        connect_timeout: WAIT,
        pool: case
            .pooled
            .then(|| ConnectionPool::new(1, if case.shared_session { 4 } else { 1 })),
        dialer: Dialer::Stream(Arc::new(move || dial.dial())),
        max_message_size: config.amqp_max_message_bytes,
    });
    let ctx = WorkerContext {
        opener: Arc::new(AmqpOpener {
            broker,
            failure_policy: FailureOutcomePolicy::Auto,
        }),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("http client")
            .into(),
        default_prefetch: case.prefetch,
        // The defaults: accepts gathered into ranges, so the checks see ranged dispositions.
        settle_batching: SettleBatching {
            max: config.settle_batch_max,
            delay: config.settle_batch_delay,
        },
        reconnect: BackoffSettings {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        },
        metrics: Metrics::new(false),
        replier: None,
    };
    let signals = StopSignals::default();
    let generation = live.status.next_generation();
    let worker = tokio::spawn(run(ctx, Arc::clone(&live), signals.clone(), generation));
    Running {
        case: case.clone(),
        peer,
        live,
        signals,
        worker,
        target,
        server,
    }
}

fn message_id(message: &PeerMessage) -> String {
    match message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
    {
        Some(MessageId::String(s)) => s.clone(),
        other => format!("{other:?}"),
    }
}

fn accepted(settled: &Settled) -> bool {
    settled.by_client && matches!(settled.state, Some(DeliveryState::Accepted(_)))
}

/// Ids accepted by the client, with how often.
fn accepted_ids(settled: &[Settled]) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for s in settled.iter().filter(|s| accepted(s)) {
        *ids.entry(message_id(&s.message)).or_default() += 1;
    }
    ids
}

/// What a case ends with, for its checks and its report line.
struct Outcome {
    snapshot_idle: StatusSnapshot,
    snapshot_end: StatusSnapshot,
    frames: Vec<ClientFrame>,
    sent: Vec<Sent>,
    settled: Vec<Settled>,
    /// Settlement records when the worker was told to stop (nothing may come after).
    settled_before_stop: usize,
    calm_took: Duration,
}

impl Running {
    fn drop_link(&self, how: LinkDrop) {
        let error = || {
            Some(definitions::Error::new(
                AmqpError::InternalError,
                Some("property test: link dropped".to_string()),
                None,
            ))
        };
        match how {
            LinkDrop::Kill => self.peer.kill_connections(),
            LinkDrop::EndSessions => self.peer.end_sessions(error()),
            LinkDrop::Close => self.peer.close_connections(error()),
            LinkDrop::Detach => self.peer.detach_links(Some(QUEUE), false, error()),
        }
    }

    /// Chaos, calm, the tail message, the idle status. An error is a stall.
    async fn drive(&self) -> Result<(StatusSnapshot, Duration), String> {
        let case = &self.case;
        let started = Instant::now();
        let mut moves: Vec<(Duration, Move)> = case
            .link_drops
            .iter()
            .map(|(at, how)| (*at, Move::Drop(*how)))
            .chain(case.bursts.iter().map(|(at, n)| (*at, Move::Send(*n))))
            .chain(case.outages.iter().flat_map(|(at, length)| {
                [
                    (*at, Move::Outage(true)),
                    (*at + *length, Move::Outage(false)),
                ]
            }))
            .collect();
        moves.sort_by_key(|(at, _)| *at);
        let mut next = 0;
        let mut outages = 0i32;
        for (at, what) in moves {
            tokio::time::sleep_until(started + at).await;
            match what {
                Move::Drop(how) => self.drop_link(how),
                Move::Send(burst) => {
                    for i in next..next + burst {
                        let id = format!("m{i}");
                        self.peer.send(QUEUE, TestMessage::text(id.clone()).id(id));
                    }
                    next += burst;
                }
                // Outages may overlap: the target is down while any is on.
                Move::Outage(on) => {
                    outages += if on { 1 } else { -1 };
                    self.target.outage.store(outages > 0, Ordering::SeqCst);
                }
            }
        }
        tokio::time::sleep_until(started + case.chaos).await;
        self.target.calm.store(true, Ordering::SeqCst);
        let calm = Instant::now();

        let all = case.messages;
        self.peer
            .wait_until(CALM_DEADLINE, |peer| {
                accepted_ids(&peer.settled()).len() >= all
            })
            .await
            .map_err(|e| {
                let ids = accepted_ids(&self.peer.settled());
                let missing: Vec<String> = (0..all)
                    .map(|i| format!("m{i}"))
                    .filter(|id| !ids.contains_key(id))
                    .collect();
                format!(
                    "stalled: not every message accepted within {CALM_DEADLINE:?} of calm \
                     ({e}); missing {missing:?}; queued at the peer {}",
                    self.peer.queued(QUEUE)
                )
            })?;
        let calm_took = calm.elapsed();
        self.idle("every message was accepted").await?;

        self.peer
            .send(QUEUE, TestMessage::text(TAIL_ID).id(TAIL_ID));
        self.peer
            .wait_until(TAIL_DEADLINE, |peer| {
                accepted_ids(&peer.settled()).contains_key(TAIL_ID)
            })
            .await
            .map_err(|e| {
                format!(
                    "stalled: a message sent after the calm was not accepted within \
                     {TAIL_DEADLINE:?} ({e}); queued at the peer {}",
                    self.peer.queued(QUEUE)
                )
            })?;
        Ok((
            self.idle("the message after the calm was accepted").await?,
            calm_took,
        ))
    }

    /// Waits (bounded) for the status of an idle, healthy worker: active, nothing in flight
    /// or held, breaker closed. The status follows the dispositions by a hair.
    async fn idle(&self, when: &str) -> Result<StatusSnapshot, String> {
        let deadline = Instant::now() + IDLE_DEADLINE;
        loop {
            let s = self.live.status.snapshot();
            if s.state == WorkerState::Active
                && s.in_flight == 0
                && s.held == 0
                && s.breaker_state == BreakerState::Closed
            {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{when}, but the worker is not idle and healthy after {IDLE_DEADLINE:?}: \
                     want state active, in_flight 0, held 0, breaker closed; status {s:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the worker (bounded) and collects what the case ended with.
    async fn finish(
        self,
        driven: Result<(StatusSnapshot, Duration), String>,
    ) -> Result<Outcome, String> {
        let settled_before_stop = self.peer.settled().len();
        self.signals.stop.cancel();
        let abort = self.worker.abort_handle();
        let ended = tokio::time::timeout(WAIT, self.worker).await;
        self.server.abort();
        let snapshot_end = self.live.status.snapshot();
        let frames = self.peer.frames();
        let context = |why: String| {
            format!(
                "{why}\n  target answers: {}\n  status at the end: {snapshot_end:?}\n  \
                 last frames: {}",
                self.target.tally(),
                summary(&frames[frames.len().saturating_sub(60)..])
            )
        };
        let (snapshot_idle, calm_took) = driven.map_err(context)?;
        match ended {
            Ok(Ok(WorkerEnd::Stopped)) => {}
            Ok(other) => return Err(context(format!("the worker ended with {other:?}"))),
            Err(_) => {
                abort.abort();
                return Err(context(format!("the worker did not stop within {WAIT:?}")));
            }
        }
        Ok(Outcome {
            snapshot_idle,
            snapshot_end,
            sent: self.peer.sent(),
            settled: self.peer.settled(),
            frames,
            settled_before_stop,
            calm_took,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(why()) }
}

/// Every message (the case's and the tail) accepted exactly once by the client as the peer
/// saw it; nothing else accepted; nothing rejected (no answer here rejects); every other
/// settlement by the client is the failure outcome of the broker's style; nothing given back
/// or settled once the worker was idle and stopped.
fn check_settlements(case: &Case, out: &Outcome) -> Result<(), String> {
    let ids = accepted_ids(&out.settled);
    let mut want: HashSet<String> = (0..case.messages).map(|i| format!("m{i}")).collect();
    want.insert(TAIL_ID.to_string());
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n != 1).collect();
    ensure(twice.is_empty(), || {
        format!("accepted more than once: {twice:?}")
    })?;
    let got: HashSet<String> = ids.keys().cloned().collect();
    ensure(got == want, || {
        format!(
            "accepted ids differ: missing {:?}, unexpected {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        )
    })?;
    for s in out.settled.iter().filter(|s| s.by_client && !accepted(s)) {
        let fine = match &s.state {
            Some(DeliveryState::Released(_)) => case.rabbitmq,
            Some(DeliveryState::Modified(m)) => {
                !case.rabbitmq
                    && m.delivery_failed == Some(true)
                    && m.undeliverable_here == Some(false)
            }
            _ => false,
        };
        ensure(fine, || {
            format!(
                "{} settled with {:?}; the broker's failure outcome is {}",
                message_id(&s.message),
                s.state,
                if case.rabbitmq {
                    "released"
                } else {
                    "modified"
                }
            )
        })?;
    }
    ensure(out.settled.len() == out.settled_before_stop, || {
        format!(
            "settlements after the worker was idle: {:?}",
            &out.settled[out.settled_before_stop..]
        )
    })
}

/// A delivery as the frame log knows it: connection, client channel, the session on that
/// channel (the number of `begin`s on it before), delivery id.
type DeliveryKey = (u64, u16, usize, u32);

/// From the frames the peer received and the transfers it sent: every disposition is the
/// client's (role receiver), settled in one frame (receiver-settle-mode first), with a
/// terminal state; covers only delivery ids the peer sent on that session; and no delivery id
/// is covered twice. On the link alive at the end, every delivery sent was settled.
fn check_frames(out: &Outcome) -> Result<(), String> {
    // Sessions by (connection, channel): the `at` of each `begin`, in order.
    let mut begins: HashMap<(u64, u16), Vec<Instant>> = HashMap::new();
    for f in &out.frames {
        if let FrameBody::Begin(_) = f.body {
            begins
                .entry((f.connection, f.channel))
                .or_default()
                .push(f.at);
        }
    }
    // A transfer belongs to the last session begun on its channel before it was sent.
    let mut sent: HashMap<DeliveryKey, &Sent> = HashMap::new();
    for s in &out.sent {
        let session = begins
            .get(&(s.connection, s.channel))
            .map_or(0, |b| b.iter().filter(|at| **at <= s.at).count());
        ensure(!s.settled, || format!("a transfer was sent settled: {s:?}"))?;
        let key = (s.connection, s.channel, session, s.delivery_id);
        ensure(sent.insert(key, s).is_none(), || {
            format!("the peer sent delivery {key:?} twice")
        })?;
    }
    let mut settled: HashSet<DeliveryKey> = HashSet::new();
    let mut session_of: HashMap<(u64, u16), usize> = HashMap::new();
    for f in &out.frames {
        let channel = (f.connection, f.channel);
        if let FrameBody::Begin(_) = f.body {
            *session_of.entry(channel).or_default() += 1;
            continue;
        }
        let Some(d) = f.as_disposition() else {
            continue;
        };
        let session = session_of.get(&channel).copied().unwrap_or(0);
        let last = d.last.unwrap_or(d.first);
        ensure(
            d.role == Role::Receiver && d.settled && last >= d.first,
            || format!("a disposition not settled in one frame by the receiver: {d:?}"),
        )?;
        ensure(
            matches!(
                d.state,
                Some(
                    DeliveryState::Accepted(_)
                        | DeliveryState::Released(_)
                        | DeliveryState::Modified(_)
                )
            ),
            || format!("a disposition without an accepted/released/modified state: {d:?}"),
        )?;
        ensure(last - d.first < 10_000, || {
            format!("a disposition over a silly range: {d:?}")
        })?;
        for id in d.first..=last {
            let key = (f.connection, f.channel, session, id);
            ensure(sent.contains_key(&key), || {
                format!(
                    "a disposition for delivery {id}, which the peer never sent on connection \
                     {} channel {} (session {session}): {d:?}",
                    f.connection, f.channel
                )
            })?;
            ensure(settled.insert(key), || {
                format!(
                    "delivery {id} ({}) on connection {} channel {} settled twice: {d:?}",
                    message_id(&sent[&key].message),
                    f.connection,
                    f.channel
                )
            })?;
        }
    }
    // The link alive at the end: the last attach, on the session begun before it.
    let last_attach = out
        .frames
        .iter()
        .rev()
        .find(|f| f.as_attach().is_some_and(|a| a.role == Role::Receiver))
        .ok_or("no attach at all")?;
    let channel = (last_attach.connection, last_attach.channel);
    let session = begins
        .get(&channel)
        .map_or(0, |b| b.iter().filter(|at| **at <= last_attach.at).count());
    // Sent after that attach: on a shared session, deliveries of an earlier link of the same
    // session went back to the queue with that link's detach.
    let unsettled: Vec<String> = sent
        .iter()
        .filter(|(k, _)| (k.0, k.1, k.2) == (channel.0, channel.1, session))
        .filter(|(_, s)| s.at >= last_attach.at)
        .filter(|(k, _)| !settled.contains(*k))
        .map(|(k, s)| format!("{} (delivery {})", message_id(&s.message), k.3))
        .collect();
    ensure(unsettled.is_empty(), || {
        format!("left unsettled on the live link: {unsettled:?}")
    })
}

/// The counters against the peer's records and the target's answers.
///
/// The worker counts a settlement (`delivered`, `dropped` and `failed` in
/// `src/pipeline/settle.rs`) only after `link.settle` / `link.accept_all` returned `Ok`, which
/// means the disposition was handed to the session, not that it reached the broker. So with
/// - `A` the client's accepts the peer recorded (exactly one per message, checked above),
///   `F` its released/modified settlements by the client,
/// - `G` the deliveries the peer took back because their link, session or connection went,
/// - `L` the links that failed (receiver attaches but the last one): each failure can cut at
///   most one settle call short after part of it went out (one batch: at most
///   `max_in_flight` deliveries),
///
/// the invariants are
/// - `A − L·max_in_flight ≤ delivered + dropped ≤ A + G`: an accept counted but lost with its
///   connection, or arriving after its link went, leaves its delivery to be taken back: one
///   `G` each; an accept seen but not counted needs a settle call that failed;
/// - `F − L·max_in_flight ≤ failed ≤ F + G`, for the same reasons;
/// - `rejected = 0` (no answer rejects, nothing panicked);
/// - each counted accept needs a success answer of its own: `delivered ≤ n200`,
///   `dropped ≤ n404`; and each success answer ends its delivery, which the peer then saw
///   accepted or took back: `n200 + n404 ≤ A + G` (a message is POSTed again after a success
///   only when that delivery was lost with its link);
/// - `retries ≤ n500` (only a retry-class answer schedules a retry);
/// - every 500 answer ends in one retry (`retries`) or one failure, every 400 answer in one
///   failure, and without `max_hold_ms` nothing unavailable fails; some answers may not be
///   seen (a POST abandoned with its link) or counted (a failure whose settle failed), so
///   `retries + failed ≤ n500 + n400 (+ n_unavailable with max_hold_ms)`;
/// - with no link failure (`L = 0`, hence `G = 0`) all of these are equalities:
///   `delivered + dropped = A`, `failed = F`, `delivered = n200` and `dropped = n404` (so
///   every message got exactly one success answer: no duplicate POST), and
///   `retries + failed = n500 + n400` (plus every unavailable answer when `max_hold_ms` is 0,
///   which hands back at once).
fn check_counters(case: &Case, out: &Outcome, target: &Target) -> Result<(), String> {
    let s = &out.snapshot_end;
    let a = out.settled.iter().filter(|x| accepted(x)).count() as u64;
    let f = out
        .settled
        .iter()
        .filter(|x| x.by_client && !accepted(x))
        .count() as u64;
    let g = out.settled.iter().filter(|x| !x.by_client).count() as u64;
    let attaches = out
        .frames
        .iter()
        .filter(|x| x.as_attach().is_some_and(|a| a.role == Role::Receiver))
        .count() as u64;
    let l = attaches.saturating_sub(1);
    let slack = l * u64::from(case.max_in_flight);
    let counted_accepts = s.delivered + s.dropped;
    let facts = || {
        format!(
            "delivered {} dropped {} failed {} retries {} rejected {}; peer: accepted {a}, \
             failed {f}, taken back {g}; link failures {l}; target: {}",
            s.delivered,
            s.dropped,
            s.failed,
            s.retries,
            s.rejected,
            target.tally()
        )
    };
    ensure(s.rejected == 0, || format!("rejected: {}", facts()))?;
    ensure(
        counted_accepts + slack >= a && counted_accepts <= a + g,
        || {
            format!(
                "A − L·max_in_flight ≤ delivered + dropped ≤ A + G broken: {}",
                facts()
            )
        },
    )?;
    ensure(s.failed + slack >= f && s.failed <= f + g, || {
        format!("F − L·max_in_flight ≤ failed ≤ F + G broken: {}", facts())
    })?;
    if !case.drop_404 {
        ensure(s.dropped == 0, || {
            format!("dropped without drop_on: {}", facts())
        })?;
    }
    let n200 = target.answered(Answer::Ok200);
    let n404 = target.answered(Answer::Gone404);
    let n500 = target.answered(Answer::Error500);
    let n400 = target.answered(Answer::Fail400);
    ensure(s.delivered <= n200 && s.dropped <= n404, || {
        format!(
            "accepts counted without a success answer of their own: {}",
            facts()
        )
    })?;
    ensure(n200 + n404 <= a + g, || {
        format!(
            "more success answers than deliveries accepted or taken back (a POST repeated \
             after its success on a live link): {}",
            facts()
        )
    })?;
    ensure(s.retries <= n500, || {
        format!("more retries than retry-class answers: {}", facts())
    })?;
    let unavailable: u64 = ANSWERS
        .iter()
        .filter(|x| x.unavailable())
        .map(|x| target.answered(*x))
        .sum();
    let answers = n500
        + n400
        + if case.max_hold_ms.is_some() {
            unavailable
        } else {
            0
        };
    ensure(s.retries + s.failed <= answers, || {
        format!(
            "retries + failed ≤ counted-failure answers broken: {}",
            facts()
        )
    })?;
    if l == 0 {
        ensure(
            g == 0
                && counted_accepts == a
                && s.failed == f
                && (s.delivered, s.dropped) == (n200, n404),
            || {
                format!(
                    "no link failure, yet the counters and the peer differ: {}",
                    facts()
                )
            },
        )?;
        let exact = match case.max_hold_ms {
            None => Some(n500 + n400),
            Some(0) => Some(n500 + n400 + unavailable),
            Some(_) => None,
        };
        if let Some(exact) = exact {
            ensure(s.retries + s.failed == exact, || {
                format!(
                    "no link failure, yet retries + failed ≠ the answers that count ({exact}): {}",
                    facts()
                )
            })?;
        }
    }
    let i = &out.snapshot_idle;
    ensure(
        (i.delivered, i.dropped, i.failed, i.retries)
            == (s.delivered, s.dropped, s.failed, s.retries),
        || format!("counters moved after the worker was idle: idle {i:?}, end {s:?}"),
    )
}

async fn run_case(case: &Case) -> Result<String, String> {
    let running = start(case).await;
    let target = Arc::clone(&running.target);
    let driven = running.drive().await;
    let out = running.finish(driven).await?;
    check_settlements(case, &out)?;
    check_frames(&out)?;
    check_counters(case, &out, &target)?;
    let s = &out.snapshot_end;
    let posts = target
        .posts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let connections: HashSet<u64> = out.frames.iter().map(|f| f.connection).collect();
    // Credit taken away (the breaker opened, or the link attached under an open breaker),
    // not counting the flow of the final detach.
    let zero_credit = out
        .frames
        .iter()
        .filter_map(|f| f.as_flow())
        .filter(|f| f.handle.is_some() && f.link_credit == Some(0))
        .count()
        .saturating_sub(1);
    Ok(format!(
        "{} msgs, in flight {}, credit {}, attempts {}, threshold {}, open {} ms, hold {:?}, \
         {}{}{}; bursts {:?}; outages {:?}; drops {:?}; {} POSTs ({}), {} connections, {} settlements ({} \
         taken back), credit 0 {} times, delivered {} dropped {} failed {} retries {}, accepts \
         counted − seen {}; calm took {:?}",
        case.messages,
        case.max_in_flight,
        case.credit(),
        case.max_attempts,
        case.failure_threshold,
        case.open_ms,
        case.max_hold_ms,
        if case.rabbitmq { "rabbitmq" } else { "artemis" },
        if case.drop_404 { ", drop_on 404" } else { "" },
        match (case.pooled, case.shared_session) {
            (true, true) => ", pooled, shared session",
            (true, false) => ", pooled",
            _ => "",
        },
        case.bursts.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        case.outages.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        case.link_drops
            .iter()
            .map(|(_, how)| *how)
            .collect::<Vec<_>>(),
        posts.values().sum::<u32>(),
        target.tally(),
        connections.len(),
        out.settled.len(),
        out.settled.iter().filter(|x| !x.by_client).count(),
        zero_credit,
        s.delivered,
        s.dropped,
        s.failed,
        s.retries,
        (s.delivered + s.dropped) as i64
            - out.settled.iter().filter(|x| accepted(x)).count() as i64,
        out.calm_took,
    ))
}

async fn shard(index: u64) {
    quiet_drops();
    let mut failures = Vec::new();
    for seed in seeds_for(index) {
        let case = Case::draw(seed);
        let started = std::time::Instant::now();
        match run_case(&case).await {
            Ok(report) => eprintln!(
                "seed {seed:#018x} ok in {:.1?}: {report}",
                started.elapsed()
            ),
            Err(why) => {
                let failure = format!(
                    "seed {seed:#018x} FAILED after {:.1?}: {why}\n  case: {case:?}\n  replay: \
                     {SEED_VAR}={seed:#018x} cargo test --test peer_property",
                    started.elapsed()
                );
                eprintln!("{failure}");
                failures.push(failure);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_then_calm_every_message_accepted_once_shard_0() {
    shard(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_then_calm_every_message_accepted_once_shard_1() {
    shard(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_then_calm_every_message_accepted_once_shard_2() {
    shard(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_then_calm_every_message_accepted_once_shard_3() {
    shard(3).await;
}
