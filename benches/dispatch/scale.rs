//! Scale: many enrollments on as many classic queues in one daemon: time until all are
//! active, idle RSS and CPU, then a few messages into every queue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hot_potato_testkit::management::Management;
use hot_potato_testkit::parallel;
use hot_potato_testkit::publisher::Publisher;
use hot_potato_testkit::target::Target;
use tokio::task::JoinSet;

use crate::load::{PUBLISH_WINDOW, body};
use crate::process::{Daemon, drain_limit, wait_goal};
use crate::procstat::mib;
use crate::report::Report;
use crate::settings::Settings;
use crate::{DEPTH_LIMIT, PARALLEL_CALLS};

/// Broker sockets left for everybody else when the scale scenario checks the broker's room.
const SOCKET_MARGIN: u64 = 40;
/// Publisher connections of the scale scenario.
const SCALE_PUBLISHERS: usize = 4;
const SCALE_MESSAGES_PER_QUEUE: u64 = 20;

pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    if !s.scale {
        report
            .lines
            .push("Scale: skipped (BENCH_SCALE=0 or --no-scale)".into());
        return;
    }
    let mut rows = vec![(s.scale_enrollments, s.scale_pool, 1)];
    if s.scale_pooled_enrollments > 0 {
        rows.push((
            s.scale_pooled_enrollments,
            s.scale_pooled_pool.max(1),
            s.scale_pooled_links.max(1),
        ));
    }
    for (e, pool, links) in rows {
        println!("\n== scale: {e} enrollments");
        let outcome = scale(s, Row { e, pool, links }, mgmt, report).await;
        report.line(&format!("scale ({e} enrollments)"), outcome);
    }
}

/// How the daemon connects, and how many connections that takes; fails (unless
/// `BENCH_SCALE_FORCE`) when the broker has not the sockets for them.
/// One scale row: enrollments, `AMQP_CONNECTION_POOL` (0: a connection each) and
/// `AMQP_LINKS_PER_SESSION`.
#[derive(Clone, Copy)]
struct Row {
    e: usize,
    pool: usize,
    links: usize,
}

async fn check_room(s: &Settings, row: Row, mgmt: &Management) -> Result<String> {
    let Row { e, pool, links } = row;
    // hot-potato opens one AMQP connection per enrollment unless it pools them: make sure the
    // broker has room, without taking the last sockets from whoever else uses it.
    let connections = if pool > 0 { pool.min(e) } else { e };
    let how = if pool > 0 {
        format!(
            "sharing {connections} AMQP connection(s), AMQP_CONNECTION_POOL={pool}, AMQP_LINKS_PER_SESSION={links}"
        )
    } else {
        "one AMQP connection each".to_string()
    };
    let nodes = mgmt.get("/api/nodes").await?;
    let node = &nodes[0];
    let (total, used) = (
        node["sockets_total"].as_u64().unwrap_or(0),
        node["sockets_used"].as_u64().unwrap_or(0),
    );
    let needed = (connections + SCALE_PUBLISHERS) as u64 + SOCKET_MARGIN;
    if total > 0 && total.saturating_sub(used) < needed {
        let msg = format!(
            "the broker allows {total} sockets ({used} in use; set by its file-descriptor limit, fd_total {}), and {e} enrollments ({how}) need {connections} AMQP connections plus {SCALE_PUBLISHERS} publishers and a margin of {SOCKET_MARGIN}. Raise RabbitMQ's open-file limit (e.g. LimitNOFILE=65536 for rabbitmq-server, then restart it), lower BENCH_SCALE_ENROLLMENTS to at most {}, or share connections with BENCH_SCALE_POOL=N (AMQP_CONNECTION_POOL); BENCH_SCALE_FORCE=1 runs it anyway",
            node["fd_total"],
            total
                .saturating_sub(used)
                .saturating_sub((SCALE_PUBLISHERS as u64) + SOCKET_MARGIN)
        );
        if !s.scale_force {
            bail!("not run: {msg}");
        }
        println!("  warning: {msg}");
    }
    Ok(how)
}

/// Polls until all `e` enrollments are active; seconds since `first_enroll`. On a timeout,
/// names the states and the errors of those not active.
async fn wait_all_active(daemon: &mut Daemon, e: usize, first_enroll: Instant) -> Result<f64> {
    let limit = Duration::from_secs(60) + Duration::from_millis(200 * e as u64);
    let deadline = Instant::now() + limit;
    loop {
        daemon.check_alive()?;
        let views = daemon.api.enrollments().await?;
        let mut states: BTreeMap<String, usize> = BTreeMap::new();
        for v in &views {
            *states
                .entry(v["state"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        if states.get("active").copied() == Some(e) && views.len() == e {
            return Ok(first_enroll.elapsed().as_secs_f64());
        }
        if Instant::now() >= deadline {
            let errors: BTreeMap<String, usize> = views
                .iter()
                .filter(|v| v["state"] != "active")
                .filter_map(|v| v["last_error"].as_str())
                .fold(BTreeMap::new(), |mut m, err| {
                    *m.entry(err.to_string()).or_default() += 1;
                    m
                });
            bail!(
                "timed out after {limit:?} waiting for {e} enrollments to be active: states {states:?}, errors of the others {errors:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn scale(s: &Settings, row: Row, mgmt: &Management, report: &mut Report) -> Result<String> {
    let Row { e, pool, links } = row;
    let how = check_room(s, row, mgmt).await?;

    let prefix = s.queue(&format!("scale{e}-"));
    let names: Vec<String> = (0..e).map(|i| format!("{prefix}{i:05}")).collect();
    let started = Instant::now();
    let m = mgmt.clone();
    parallel::for_each(names.clone(), PARALLEL_CALLS, move |name| {
        let m = m.clone();
        async move { m.declare_classic(&name).await }
    })
    .await?;
    println!(
        "  declared {e} classic queues in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let target = Target::counting_on(s.target_runtime(), false).await?;
    let extra = if pool > 0 {
        vec![
            ("AMQP_CONNECTION_POOL", pool.to_string()),
            ("AMQP_LINKS_PER_SESSION", links.to_string()),
        ]
    } else {
        Vec::new()
    };
    let mut daemon = Daemon::start_with(s, "scale", &extra).await?;
    let ticks_start = daemon.cpu_ticks()?;

    let first_enroll = Instant::now();
    let (api, settings, target_url) = (daemon.api.clone(), s.clone(), target.url());
    parallel::for_each(names.clone(), PARALLEL_CALLS, move |name| {
        let (api, body) = (api.clone(), settings.enrollment(&name, &target_url, 1));
        async move { api.enroll_id(&body).await }
    })
    .await?;
    let enrolled = first_enroll.elapsed().as_secs_f64();
    let all_active = wait_all_active(&mut daemon, e, first_enroll).await?;
    println!(
        "  {e} enrollments: API calls took {enrolled:.1} s, all active after {all_active:.1} s"
    );
    let attach_cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks_start);

    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle0 = daemon.cpu_ticks()?;
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = s.cpu_secs(daemon.cpu_ticks()? - idle0);
    let idle_pct = idle_cpu / idle_started.elapsed().as_secs_f64() * 100.0;
    let idle_rss = daemon.rss_kb()?;
    println!("  idle: RSS {:.1} MiB, CPU {idle_pct:.2} %", mib(idle_rss));

    // Senders attached before the clock starts; SCALE_PUBLISHERS connections share the queues.
    let per_publisher = e.div_ceil(SCALE_PUBLISHERS);
    let mut publishers = Vec::new();
    for chunk in names.chunks(per_publisher) {
        publishers.push(connect_publisher(&s.amqp_url, chunk).await?);
    }
    let total = SCALE_MESSAGES_PER_QUEUE * e as u64;
    target.reset(total as usize);
    let ticks0 = daemon.cpu_ticks()?;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut p in publishers {
        set.spawn(async move {
            p.send_data(SCALE_MESSAGES_PER_QUEUE, &body(), PUBLISH_WINDOW)
                .await?;
            anyhow::Ok(p)
        });
    }
    let mut publishers = Vec::new();
    while let Some(r) = set.join_next().await {
        publishers.push(r??);
    }
    let published = started.elapsed().as_secs_f64();
    let done = wait_goal(&mut daemon, &target, total, drain_limit(total)).await?;
    let elapsed = done.duration_since(started).as_secs_f64();
    let cpu = s.cpu_secs(daemon.cpu_ticks()? - ticks0);
    let peak = daemon.peak_rss_kb()?;
    for p in publishers {
        p.close().await;
    }
    mgmt.wait_all_empty(&prefix, e, DEPTH_LIMIT).await?;
    let posts = target.count();
    if posts as u64 != total {
        report
            .notes
            .push(format!("scale: {posts} POSTs for {total} messages"));
    }
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(names).await?;
    println!(
        "  {total} messages over {e} queues: published in {published:.2} s, all POSTed after {elapsed:.2} s"
    );
    Ok(format!(
        "Scale ({e} enrollments on {e} classic queues, {how}): all active {all_active:.1} s after the first enroll (daemon {attach_cpu:.1} CPU s); idle after 10 s: RSS {:.1} MiB, CPU {idle_pct:.2} % of one core over 10 s; {SCALE_MESSAGES_PER_QUEUE} msgs into each queue: {:.0} msg/s until all {total} POSTed (daemon {:.2} CPU s / 10k msgs); peak RSS {:.1} MiB",
        mib(idle_rss),
        total as f64 / elapsed,
        cpu / total as f64 * 10_000.0,
        mib(peak)
    ))
}

/// A publisher with a sender on every queue of `chunk`. RabbitMQ 3.10's AMQP 1.0 plugin now and
/// then ends a session mid-way through thousands of attaches (`internal_error` 541, `noproc` of
/// the short-lived channel it opens per attach; seen anywhere from sender 279 to 1357 of 2,500
/// in otherwise identical runs), so a failed attach is tried again on a fresh connection. On a
/// bad day three tries in a row fail too; then the row reports the error.
async fn connect_publisher(url: &str, chunk: &[String]) -> Result<Publisher> {
    const TRIES: u32 = 3;
    let mut tried = 1;
    loop {
        match Publisher::connect(url, chunk).await {
            Ok(publisher) => return Ok(publisher),
            Err(e) if tried < TRIES => {
                println!("  publisher attach failed ({e:#}); trying again on a new connection");
                tried += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
