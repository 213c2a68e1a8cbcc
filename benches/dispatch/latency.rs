//! Latency: publish → POST at the target for one enrollment at `max_in_flight` 1, messages
//! published at a steady rate, each carrying its publish time.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use fe2o3_amqp::types::messaging::Message;
use hot_potato_testkit::management::Management;
use hot_potato_testkit::publisher::{Confirm, Publisher, confirmed};
use hot_potato_testkit::target::{Target, now_nanos};
use tokio::sync::mpsc;

use crate::process::{Daemon, wait_goal};
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
    mgmt.declare_quorum(&queue).await?;
    let target = Target::counting(true).await?;
    let total = s.latency_rate * s.latency_secs;
    target.reset(total as usize);
    let mut daemon = Daemon::start(s, "latency").await?;
    let id = daemon
        .api
        .enroll_id(&s.enrollment(&queue, &target.url(), 1))
        .await?;
    daemon.wait_active(&id).await?;
    let mut publisher = Publisher::connect(&s.amqp_url, std::slice::from_ref(&queue)).await?;

    // Outcomes are awaited aside, so the publish rate does not wait on the broker.
    let (tx, mut rx) = mpsc::unbounded_channel::<Confirm>();
    let confirms = tokio::spawn(async move {
        while let Some(fut) = rx.recv().await {
            confirmed(fut).await?;
        }
        anyhow::Ok(())
    });
    let ticks0 = daemon.cpu_ticks()?;
    let interval = Duration::from_secs_f64(1.0 / s.latency_rate as f64);
    let started = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        let message = Message::builder().value(now_nanos().to_string()).build();
        let fut = publisher.send_batchable(message).await?;
        tx.send(fut)
            .map_err(|_| anyhow!("the confirm task ended early"))?;
    }
    drop(tx);
    let publish_secs = started.elapsed().as_secs_f64();
    tokio::time::timeout(Duration::from_secs(60), confirms)
        .await
        .map_err(|_| anyhow!("the broker did not confirm the latency messages within 60 s"))???;
    wait_goal(&mut daemon, &target, total, Duration::from_secs(120)).await?;
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    let cpu_pct = cpu / started.elapsed().as_secs_f64() * 100.0;
    publisher.close().await;
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(vec![queue]).await?;

    let mut lat = target.latencies();
    ensure!(
        lat.len() as u64 >= total,
        "only {} of {total} POSTs carried a publish time",
        lat.len()
    );
    lat.sort_unstable();
    Ok(format!(
        "Latency (publish → POST at the target, 1 enrollment, max_in_flight 1, {} msg/s for {} s, {total} msgs, published in {publish_secs:.1} s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; daemon CPU {cpu_pct:.1} % of one core",
        s.latency_rate,
        s.latency_secs,
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 100.0),
    ))
}
