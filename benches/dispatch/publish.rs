//! Publish: 16 concurrent HTTP clients on `POST /publish` into one quorum queue, against the
//! broker's own publish ceiling in the same run (the bench's publisher: one fe2o3-amqp
//! connection, pipelined with a window of outcomes). msg/s, and each POST's latency p50/p99.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use hot_potato_testkit::address;
use hot_potato_testkit::management::Management;

use crate::DEPTH_LIMIT;
use crate::load::{BODY_LEN, body, preload};
use crate::process::Daemon;
use crate::report::Report;
use crate::settings::Settings;

/// Concurrent HTTP clients.
pub const CLIENTS: usize = 16;

pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    let n = s.messages.min(20_000);
    println!("\n== publish: {CLIENTS} HTTP clients on POST /publish, {n} msgs of {BODY_LEN} bytes");
    let outcome = publish(s, mgmt, report, n).await;
    report.line("publish", outcome);
}

async fn publish(s: &Settings, mgmt: &Management, report: &mut Report, n: u64) -> Result<String> {
    // The broker's own ceiling: the bench's publisher into a queue of the same kind.
    let ceiling_queue = s.queue("publish-ceiling");
    mgmt.declare_quorum(&ceiling_queue).await?;
    let started = Instant::now();
    preload(s, std::slice::from_ref(&ceiling_queue), n).await?;
    let ceiling = n as f64 / started.elapsed().as_secs_f64();
    mgmt.delete_queues(vec![ceiling_queue]).await?;

    let queue = s.queue("publish");
    mgmt.declare_quorum(&queue).await?;
    let daemon = Daemon::start(s, "publish").await?;
    let url = format!("{}/publish?address={}", daemon.api.base, address(&queue));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let ticks0 = daemon.cpu_ticks()?;
    let started = Instant::now();
    let per_client = n / CLIENTS as u64;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (http, url) = (http.clone(), url.clone());
        clients.spawn(async move {
            let mut took = Vec::with_capacity(per_client as usize);
            for _ in 0..per_client {
                let sent = Instant::now();
                let res = http
                    .post(&url)
                    .header("content-type", "application/octet-stream")
                    .body(body())
                    .send()
                    .await?;
                ensure!(
                    res.status().as_u16() == 201,
                    "POST /publish answered {}",
                    res.status()
                );
                took.push(sent.elapsed());
            }
            anyhow::Ok(took)
        });
    }
    let mut latencies = Vec::with_capacity(n as usize);
    while let Some(joined) = clients.join_next().await {
        latencies.extend(joined??);
    }
    let elapsed = started.elapsed();
    let sent = latencies.len() as u64;
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.wait_depth(&queue, sent, DEPTH_LIMIT).await?;
    mgmt.delete_queues(vec![queue]).await?;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize];
    let rate = sent as f64 / elapsed.as_secs_f64();
    let line = format!(
        "publish: {CLIENTS} HTTP clients on POST /publish: {rate:.0} msg/s, latency p50 {:.2} ms, p99 {:.2} ms, daemon CPU {:.2} s per 10k; the broker's publish ceiling (the bench's publisher, window {}) {ceiling:.0} msg/s, ratio {:.2}",
        at(0.50).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        cpu / sent as f64 * 10_000.0,
        crate::load::PUBLISH_WINDOW,
        rate / ceiling
    );
    println!("  {line}");
    Ok(line)
}
