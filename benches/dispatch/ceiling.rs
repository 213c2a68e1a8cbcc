//! The ceiling: a bare fe2o3-amqp receiver (`recv` + `accept` per message) draining a quorum
//! queue with the same credit, once over `Connection::open` and once over a TCP_NODELAY
//! connection as hot-potato opens it. The throughput rows are read against the faster. With
//! the rows of several enrollments, as many queues drained at once, a connection each.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use hot_potato_testkit::address;
use hot_potato_testkit::management::Management;
use tokio::task::JoinSet;

use crate::DEPTH_LIMIT;
use crate::load::preload;
use crate::process::drain_limit;
use crate::procstat::{Steal, Usage, broker_pid};
use crate::report::{ProcessCosts, Report, Row};
use crate::settings::Settings;
use crate::throughput::wanted_many_queues;

/// How long one AMQP close step (link, session, connection) may wait for the broker.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// What one bare drain measured.
struct Drained {
    rate: f64,
    /// This process's CPU seconds per 10k messages.
    cpu_per_10k: f64,
    broker_us: Option<f64>,
    steal_pct: Option<f64>,
    costs: ProcessCosts,
}

impl Drained {
    fn row(self, name: String, round: usize) -> Row {
        Row {
            name,
            round,
            rate: self.rate,
            cpu_per_10k: Some(self.cpu_per_10k),
            peak_rss_mib: None,
            broker_us: self.broker_us,
            target_us: None,
            steal_pct: self.steal_pct,
            beside: None,
            costs: self.costs,
        }
    }
}

/// Both bare receivers, as two table rows; the faster is the report's ceiling. When a
/// throughput row of several enrollments runs (8), a third row drains as many queues the same
/// way, each on its own connection as those enrollments' are: what the broker hands out from
/// that many queues.
pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<()> {
    println!(
        "\n== ceiling: bare fe2o3-amqp receiver, {} msgs, credit {}",
        s.messages, s.prefetch
    );
    let open = bare_drain(s, mgmt, false, 1).await.context("ceiling")?;
    println!("  Connection::open: {:.0} msg/s", open.rate);
    let nodelay = bare_drain(s, mgmt, true, 1)
        .await
        .context("ceiling, TCP_NODELAY")?;
    println!(
        "  TCP_NODELAY (as hot-potato connects): {:.0} msg/s",
        nodelay.rate
    );
    report.ceilings.push(open.rate.max(nodelay.rate));
    let round = report.round;
    report.rows.push(open.row(
        format!(
            "bare fe2o3-amqp receiver, `Connection::open`, credit {}",
            s.prefetch
        ),
        round,
    ));
    report.rows.push(nodelay.row(
        format!(
            "bare fe2o3-amqp receiver, TCP_NODELAY like hot-potato, credit {}",
            s.prefetch
        ),
        round,
    ));
    if let Some(queues) = wanted_many_queues(s) {
        let many = bare_drain(s, mgmt, true, queues)
            .await
            .with_context(|| format!("ceiling, {queues} queues"))?;
        println!(
            "  {queues} queues, a connection each: {:.0} msg/s",
            many.rate
        );
        report.rows.push(many.row(
            format!(
                "bare fe2o3-amqp receivers, {queues} queues, a TCP_NODELAY connection each, credit {}",
                s.prefetch
            ),
            round,
        ));
    }
    Ok(())
}

/// msg/s of bare receivers draining `queues` queues as hot-potato connects (TCP_NODELAY, a
/// connection each): the reference a throughput row is also read against, measured just
/// before it.
pub async fn bare_beside(s: &Settings, mgmt: &Management, queues: usize) -> Result<f64> {
    let drained = bare_drain(s, mgmt, true, queues).await?;
    println!(
        "  bare drain just before, {queues} queue(s): {:.0} msg/s",
        drained.rate
    );
    Ok(drained.rate)
}

/// A bare receiver on `queue`: credit topped up automatically, settled by hand.
pub async fn attach_bare(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    queue: &str,
    credit: u32,
) -> Result<Receiver> {
    Ok(Receiver::builder()
        .name(name)
        .source(address(queue))
        .credit_mode(CreditMode::Auto(credit))
        .auto_accept(false)
        .attach(session)
        .await?)
}

/// A connection like hot-potato opens its own: TCP_NODELAY on (fe2o3 leaves Nagle on), SASL
/// PLAIN from the URL.
async fn open_nodelay(
    url: &str,
    container_id: &str,
) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>> {
    let url = url::Url::parse(url)?;
    let host = url.host_str().context("no host in the AMQP URL")?;
    let stream = tokio::net::TcpStream::connect((host, url.port().unwrap_or(5672))).await?;
    stream.set_nodelay(true)?;
    let mut builder = Connection::builder()
        .container_id(container_id.to_string())
        .scheme(url.scheme())
        .hostname(host)
        .domain(url.domain());
    if !url.username().is_empty() {
        builder = builder.sasl_profile(fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: url.username().to_string(),
            password: url.password().unwrap_or("").to_string(),
        });
    }
    Ok(builder.open_with_stream(stream).await?)
}

/// The bare receiver: `recv` + `accept` per message, credit `BENCH_PREFETCH`, on each of
/// `queues` queues of `BENCH_MESSAGES` at once, a connection each. `nodelay` opens the
/// connections as hot-potato does instead of with `Connection::open`.
async fn bare_drain(
    s: &Settings,
    mgmt: &Management,
    nodelay: bool,
    queues: usize,
) -> Result<Drained> {
    let names: Vec<String> = (0..queues)
        .map(|i| {
            let base = if nodelay {
                "ceiling-nodelay"
            } else {
                "ceiling"
            };
            if queues == 1 {
                s.queue(base)
            } else {
                s.queue(&format!("{base}-{queues}-{i}"))
            }
        })
        .collect();
    for name in &names {
        mgmt.declare_quorum(name).await?;
    }
    preload(s, &names, s.messages).await?;
    mgmt.wait_depths(&names, s.messages, DEPTH_LIMIT).await?;
    let total = s.messages * queues as u64;

    let broker = broker_pid();
    let broker0 = broker.as_deref().and_then(|p| Usage::of(p).ok());
    let receiver0 = Usage::of("self")?;
    let steal = Steal::start();
    let started = Instant::now();
    let mut drains = JoinSet::new();
    for (i, queue) in names.iter().enumerate() {
        let (url, queue, messages) = (s.amqp_url.clone(), queue.clone(), s.messages);
        let (container_id, prefetch) = (format!("bench-ceiling-{}-{i}", s.run_id), s.prefetch);
        drains.spawn(drain(
            started,
            url,
            container_id,
            queue,
            messages,
            prefetch,
            nodelay,
        ));
    }
    let drained = tokio::time::timeout(drain_limit(total), async {
        let mut last = Duration::ZERO;
        while let Some(done) = drains.join_next().await {
            last = last.max(done??);
        }
        anyhow::Ok(last)
    })
    .await
    .map_err(|_| {
        anyhow!(
            "the bare receivers did not drain {} within {:?}",
            names.join(", "),
            drain_limit(total)
        )
    })??;
    let receiver1 = Usage::of("self")?;
    let steal_pct = steal.pct();
    let broker1 = broker.as_deref().and_then(|p| Usage::of(p).ok());
    let broker_both = broker0.zip(broker1);
    let cpu = s.cpu_secs(receiver1.ticks_since(&receiver0));
    let broker_us =
        broker_both.map(|(b0, b1)| s.cpu_secs(b1.ticks_since(&b0)) / total as f64 * 1e6);
    let costs = ProcessCosts {
        broker: broker_both.and_then(|(b0, b1)| b1.costs_since(&b0, total)),
        daemon: receiver1.costs_since(&receiver0, total),
        target: None,
    };
    mgmt.wait_depths(&names, 0, DEPTH_LIMIT).await?;
    mgmt.delete_queues(names).await?;
    Ok(Drained {
        rate: total as f64 / drained.as_secs_f64(),
        cpu_per_10k: cpu / total as f64 * 10_000.0,
        broker_us,
        steal_pct,
        costs,
    })
}

/// One bare receiver draining `messages` from `queue` on its own connection; returns the time
/// from `started` until its last accept (the clock starts before connecting, as hot-potato's
/// starts before `POST /enroll`).
async fn drain(
    started: Instant,
    url: String,
    container_id: String,
    queue: String,
    messages: u64,
    prefetch: u32,
    nodelay: bool,
) -> Result<Duration> {
    let mut connection = if nodelay {
        open_nodelay(&url, &container_id).await?
    } else {
        Connection::open(container_id, url.as_str()).await?
    };
    let mut session = Session::begin(&mut connection).await?;
    let mut receiver = attach_bare(&mut session, "bench-ceiling", &queue, prefetch).await?;
    for _ in 0..messages {
        let delivery = receiver.recv::<Body<Value>>().await?;
        receiver.accept(&delivery).await?;
    }
    let elapsed = started.elapsed();
    let _ = tokio::time::timeout(CLOSE_LIMIT, receiver.close()).await;
    let _ = tokio::time::timeout(CLOSE_LIMIT, session.end()).await;
    let _ = tokio::time::timeout(CLOSE_LIMIT, connection.close()).await;
    Ok(elapsed)
}
