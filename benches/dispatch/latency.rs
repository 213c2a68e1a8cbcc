//! Latency: publish → POST at the target for one enrollment at `max_in_flight` 1, messages
//! published at a steady rate, each carrying its publish time; and, side by side in the same
//! seconds, the broker alone: publish → `recv` at a bare fe2o3-amqp receiver on a second queue
//! fed by the same publisher with the same timestamps. Run one after the other, the broker's
//! own p99 moved 1.9 → 29.6 ms between passes on this machine, more than the 1 ms the target
//! allows hot-potato; side by side, a broker or machine stall lands in both tails.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use fe2o3_amqp::types::messaging::{Body, Message};
use fe2o3_amqp::types::primitives::Value;
use fe2o3_amqp::{Connection, Receiver, Session};
use hot_potato_testkit::management::Management;
use hot_potato_testkit::publisher::{Confirm, Publisher, confirmed};
use hot_potato_testkit::target::{Target, now_nanos};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::ceiling::attach_bare;
use crate::process::{Daemon, wait_goal};
use crate::procstat::Steal;
use crate::report::Report;
use crate::settings::Settings;

pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    println!(
        "\n== latency: {} msg/s for {} s",
        s.latency_rate, s.latency_secs
    );
    let outcome = latency(s, mgmt, report).await;
    report.line("latency", outcome);
}

/// The `p`th percentile of sorted nanoseconds, in ms.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

async fn latency(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<String> {
    let queue = s.queue("latency");
    let floor_queue = s.queue("latency-floor");
    mgmt.declare_quorum(&queue).await?;
    mgmt.declare_quorum(&floor_queue).await?;
    let target = Target::counting_on(s.target_runtime(), true).await?;
    let total = s.latency_rate * s.latency_secs;
    target.reset(total as usize);
    let mut daemon = Daemon::start(s, "latency").await?;
    let id = daemon
        .api
        .enroll_id(&s.enrollment(&queue, &target.url(), 1))
        .await?;
    daemon.wait_active(&id).await?;

    let container_id = format!("bench-latency-floor-{}", s.run_id);
    let mut connection = Connection::open(container_id, s.amqp_url.as_str()).await?;
    let mut session = Session::begin(&mut connection).await?;
    let receiver = attach_bare(&mut session, "bench-latency-floor", &floor_queue, 1000).await?;
    // Aborted, not left receiving, when the scenario fails before it is joined.
    let receiving = AbortOnDropHandle::new(tokio::spawn(receive_stamped(receiver, total)));

    let ticks0 = daemon.cpu_ticks()?;
    let steal = Steal::start();
    let started = tokio::time::Instant::now();
    let publish_secs = publish_steady(s, &[&queue, &floor_queue], total).await?;
    wait_goal(&mut daemon, &target, total, Duration::from_secs(120)).await?;
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    let cpu_pct = cpu / started.elapsed().as_secs_f64() * 100.0;
    let steal_pct = steal.pct().map_or("?".into(), |p| format!("{p:.1}"));
    let mut floor = tokio::time::timeout(Duration::from_secs(60), receiving)
        .await
        .map_err(|_| anyhow!("the bare receiver did not get every latency message in 60 s"))???;
    let _ = session.end().await;
    let _ = connection.close().await;
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(vec![queue, floor_queue]).await?;

    let mut lat = target.latencies();
    ensure!(
        lat.len() as u64 >= total,
        "only {} of {total} POSTs carried a publish time",
        lat.len()
    );
    ensure!(
        floor.len() as u64 >= total,
        "only {} of {total} messages at the bare receiver carried a publish time",
        floor.len()
    );
    lat.sort_unstable();
    floor.sort_unstable();
    let (p99, floor_p99) = (percentile(&lat, 99.0), percentile(&floor, 99.0));
    Ok(format!(
        "Latency (publish → POST at the target, 1 enrollment, max_in_flight 1, {} msg/s for {} s, {total} msgs, published in {publish_secs:.1} s): p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms; daemon CPU {cpu_pct:.1} % of one core. Broker alone (publish → recv at a bare receiver on a second queue, same publisher and timestamps, side by side): p50 {:.2} ms, p99 {floor_p99:.2} ms, max {:.2} ms; hot-potato's p99 is the broker's + {:.2} ms; CPU steal {steal_pct} % of the machine's CPU time",
        s.latency_rate,
        s.latency_secs,
        percentile(&lat, 50.0),
        percentile(&lat, 100.0),
        percentile(&floor, 50.0),
        percentile(&floor, 100.0),
        p99 - floor_p99,
    ))
}

/// Publishes `total` ticks at `BENCH_LATENCY_RATE`; each tick sends its publish time to every
/// queue, the first queue first on even ticks and last on odd ones, so neither side always
/// waits behind the other. Returns how long publishing took, in seconds, once the broker
/// confirmed every message.
async fn publish_steady(s: &Settings, queues: &[&str], total: u64) -> Result<f64> {
    let mut publisher = Publisher::connect(&s.amqp_url, queues).await?;
    // Outcomes are awaited aside, so the publish rate does not wait on the broker.
    let (tx, mut rx) = mpsc::unbounded_channel::<Confirm>();
    let confirms = AbortOnDropHandle::new(tokio::spawn(async move {
        while let Some(fut) = rx.recv().await {
            confirmed(fut).await?;
        }
        anyhow::Ok(())
    }));
    let interval = Duration::from_secs_f64(1.0 / s.latency_rate as f64);
    let started = tokio::time::Instant::now();
    let sides = queues.len();
    for i in 0..total {
        tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        let stamp = now_nanos().to_string();
        for k in 0..sides {
            let index = if i % 2 == 0 { k } else { sides - 1 - k };
            let message = Message::builder().value(stamp.clone()).build();
            let fut = publisher.send_batchable_to(index, message).await?;
            tx.send(fut)
                .map_err(|_| anyhow!("the confirm task ended early"))?;
        }
    }
    drop(tx);
    let publish_secs = started.elapsed().as_secs_f64();
    tokio::time::timeout(Duration::from_secs(60), confirms)
        .await
        .map_err(|_| anyhow!("the broker did not confirm the latency messages within 60 s"))???;
    publisher.close().await;
    Ok(publish_secs)
}

/// The broker's own publish → deliver latency: a bare receiver (credit 1000, accept each)
/// takes `total` stamped messages; nanoseconds per message.
async fn receive_stamped(mut receiver: Receiver, total: u64) -> Result<Vec<u64>> {
    let mut lat = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let delivery = receiver.recv::<Body<Value>>().await?;
        let now = now_nanos();
        if let Body::Value(v) = delivery.body()
            && let Value::String(sent) = &v.0
            && let Ok(sent) = sent.parse::<u128>()
        {
            lat.push(u64::try_from(now.saturating_sub(sent)).unwrap_or(u64::MAX));
        }
        receiver.accept(&delivery).await?;
    }
    let _ = receiver.close().await;
    Ok(lat)
}
