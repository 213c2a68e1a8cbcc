//! The ceiling: a bare fe2o3-amqp receiver (`recv` + `accept` per message) draining a quorum
//! queue with the same credit, once over `Connection::open` and once over a TCP_NODELAY
//! connection as hot-potato opens it. The throughput rows are read against the faster.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use hot_potato_testkit::address;
use hot_potato_testkit::management::Management;

use crate::DEPTH_LIMIT;
use crate::load::preload;
use crate::process::drain_limit;
use crate::procstat::{Steal, broker_pid, cpu_ticks};
use crate::report::{Report, Row};
use crate::settings::Settings;

/// How long one AMQP close step (link, session, connection) may wait for the broker.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Both bare receivers, as two table rows; the faster is the report's ceiling.
pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<()> {
    println!(
        "\n== ceiling: bare fe2o3-amqp receiver, {} msgs, credit {}",
        s.messages, s.prefetch
    );
    let (rate, cpu, broker_us, steal_pct) = ceiling(s, mgmt, false).await.context("ceiling")?;
    println!("  Connection::open: {rate:.0} msg/s");
    let (rate_nd, cpu_nd, broker_us_nd, steal_pct_nd) = ceiling(s, mgmt, true)
        .await
        .context("ceiling, TCP_NODELAY")?;
    println!("  TCP_NODELAY (as hot-potato connects): {rate_nd:.0} msg/s");
    report.ceilings.push(rate.max(rate_nd));
    report.rows.push(Row {
        name: format!(
            "bare fe2o3-amqp receiver, `Connection::open`, credit {}",
            s.prefetch
        ),
        round: report.round,
        rate,
        cpu_per_10k: Some(cpu),
        peak_rss_mib: None,
        broker_us,
        target_us: None,
        steal_pct,
    });
    report.rows.push(Row {
        name: format!(
            "bare fe2o3-amqp receiver, TCP_NODELAY like hot-potato, credit {}",
            s.prefetch
        ),
        round: report.round,
        rate: rate_nd,
        cpu_per_10k: Some(cpu_nd),
        peak_rss_mib: None,
        broker_us: broker_us_nd,
        target_us: None,
        steal_pct: steal_pct_nd,
    });
    Ok(())
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

/// The bare receiver: `recv` + `accept` per message, credit `BENCH_PREFETCH`. `nodelay`
/// opens the connection as hot-potato does instead of with `Connection::open`. Returns the
/// rate, this process's CPU seconds per 10k messages, the broker's CPU µs per message and the
/// CPU steal over the drain.
async fn ceiling(
    s: &Settings,
    mgmt: &Management,
    nodelay: bool,
) -> Result<(f64, f64, Option<f64>, Option<f64>)> {
    let queue = s.queue(if nodelay {
        "ceiling-nodelay"
    } else {
        "ceiling"
    });
    mgmt.declare_quorum(&queue).await?;
    preload(s, std::slice::from_ref(&queue), s.messages).await?;
    mgmt.wait_depth(&queue, s.messages, DEPTH_LIMIT).await?;

    let broker = broker_pid();
    let broker0 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());
    let ticks0 = cpu_ticks("self")?;
    let steal = Steal::start();
    let started = Instant::now();
    let drained = tokio::time::timeout(drain_limit(s.messages), async {
        let container_id = format!("bench-ceiling-{}", s.run_id);
        let mut connection = if nodelay {
            open_nodelay(&s.amqp_url, &container_id).await?
        } else {
            Connection::open(container_id, s.amqp_url.as_str()).await?
        };
        let mut session = Session::begin(&mut connection).await?;
        let mut receiver = attach_bare(&mut session, "bench-ceiling", &queue, s.prefetch).await?;
        for _ in 0..s.messages {
            let delivery = receiver.recv::<Body<Value>>().await?;
            receiver.accept(&delivery).await?;
        }
        let elapsed = started.elapsed();
        let _ = tokio::time::timeout(CLOSE_LIMIT, receiver.close()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, session.end()).await;
        let _ = tokio::time::timeout(CLOSE_LIMIT, connection.close()).await;
        anyhow::Ok(elapsed)
    })
    .await
    .map_err(|_| {
        anyhow!(
            "the bare receiver did not drain {queue} within {:?}",
            drain_limit(s.messages)
        )
    })??;
    let cpu = s.cpu_secs(cpu_ticks("self")? - ticks0);
    let steal_pct = steal.pct();
    let broker1 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());
    let broker_us = broker0
        .zip(broker1)
        .map(|(a, b)| s.cpu_secs(b - a) / s.messages as f64 * 1e6);
    mgmt.wait_depth(&queue, 0, DEPTH_LIMIT).await?;
    mgmt.delete_queues(vec![queue]).await?;
    let rate = s.messages as f64 / drained.as_secs_f64();
    Ok((
        rate,
        cpu / s.messages as f64 * 10_000.0,
        broker_us,
        steal_pct,
    ))
}
