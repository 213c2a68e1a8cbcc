//! Publish: 16 concurrent HTTP clients on `POST /publish` into one quorum queue, against the
//! broker's own publish ceiling in the same run (the bench's publisher: one fe2o3-amqp
//! connection, pipelined with a window of outcomes). msg/s, and each POST's latency p50/p99.
//! Then request/reply: the same clients on `POST /request`, the queue enrolled with
//! `"reply": true` for a target answering 200 at once, replies on `REPLY_ADDRESS`.

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
    let n = n.min(10_000);
    println!("\n== request: {CLIENTS} HTTP clients on POST /request, {n} round trips");
    let outcome = request(s, mgmt, report, n).await;
    report.line("request", outcome);
}

/// `clients` tasks each POSTing `per_client` bodies to `url`, expecting `status`; every
/// POST's latency, and the time it all took.
async fn hammer(url: &str, n: u64, status: u16) -> Result<(Vec<Duration>, Duration)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?;
    let started = Instant::now();
    let per_client = n / CLIENTS as u64;
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (http, url) = (http.clone(), url.to_string());
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
                    res.status().as_u16() == status,
                    "{url} answered {}",
                    res.status()
                );
                res.bytes().await?;
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
    latencies.sort();
    Ok((latencies, elapsed))
}

fn quantile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0
}

async fn request(s: &Settings, mgmt: &Management, report: &mut Report, n: u64) -> Result<String> {
    let queue = s.queue("request");
    let replies = s.queue("request-replies");
    mgmt.declare_quorum(&queue).await?;
    mgmt.declare_classic(&replies).await?;
    let target = hot_potato_testkit::target::Target::counting_on(s.target_runtime(), false).await?;
    let daemon = Daemon::start_with(s, "request", &[("REPLY_ADDRESS", address(&replies))]).await?;
    let body = serde_json::json!({"queue": address(&queue), "target_url": target.url(),
        "delivery": {"reply": true, "max_in_flight": CLIENTS}});
    let id = daemon.api.enroll_id(&body).await?;
    daemon
        .api
        .wait_state(&id, "active", crate::process::ACTIVE_LIMIT)
        .await?;
    let url = format!(
        "{}/request?address={}&timeout_ms=30000",
        daemon.api.base,
        address(&queue)
    );
    let ticks0 = daemon.cpu_ticks()?;
    let (latencies, elapsed) = hammer(&url, n, 200).await?;
    let sent = latencies.len() as u64;
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(vec![queue, replies]).await?;
    let line = format!(
        "request: {CLIENTS} HTTP clients on POST /request (publish, push to the target, reply, answer): {:.0} round trips/s, latency p50 {:.2} ms, p99 {:.2} ms, daemon CPU {:.2} s per 10k",
        sent as f64 / elapsed.as_secs_f64(),
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        cpu / sent as f64 * 10_000.0,
    );
    println!("  {line}");
    Ok(line)
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
    let ticks0 = daemon.cpu_ticks()?;
    let (latencies, elapsed) = hammer(&url, n, 201).await?;
    let sent = latencies.len() as u64;
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.wait_depth(&queue, sent, DEPTH_LIMIT).await?;
    mgmt.delete_queues(vec![queue]).await?;
    let rate = sent as f64 / elapsed.as_secs_f64();
    let line = format!(
        "publish: {CLIENTS} HTTP clients on POST /publish: {rate:.0} msg/s, latency p50 {:.2} ms, p99 {:.2} ms, daemon CPU {:.2} s per 10k; the broker's publish ceiling (the bench's publisher, window {}) {ceiling:.0} msg/s, ratio {:.2}",
        quantile(&latencies, 0.50),
        quantile(&latencies, 0.99),
        cpu / sent as f64 * 10_000.0,
        crate::load::PUBLISH_WINDOW,
        rate / ceiling
    );
    println!("  {line}");
    Ok(line)
}
