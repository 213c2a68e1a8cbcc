//! Isolation: a healthy enrollment's rate alone, then beside an enrollment whose target
//! accepts connections and never answers (its 8 POSTs already hanging).

use std::time::{Duration, Instant};

use anyhow::Result;
use hot_potato_testkit::management::Management;
use hot_potato_testkit::target::{HangingTarget, Target};
use hot_potato_testkit::wait::wait_for;
use serde_json::json;

use crate::DEPTH_LIMIT;
use crate::load::preload;
use crate::process::{ACTIVE_LIMIT, Daemon, drain_limit, wait_goal};
use crate::report::Report;
use crate::settings::Settings;

/// Messages queued for the enrollment whose target never answers.
const HANG_MESSAGES: u64 = 2_000;

pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    println!("\n== isolation");
    let outcome = isolation(s, mgmt, report).await;
    report.line("isolation", outcome);
}

/// One healthy enrollment (max_in_flight 1) draining `n` messages, timed from its enroll.
async fn healthy_run(
    daemon: &mut Daemon,
    target: &Target,
    s: &Settings,
    queue: &str,
    n: u64,
) -> Result<f64> {
    target.reset(n as usize);
    let started = Instant::now();
    daemon
        .api
        .enroll_id(&s.enrollment(queue, &target.url(), 1))
        .await?;
    let done = wait_goal(daemon, target, n, drain_limit(n)).await?;
    Ok(n as f64 / done.duration_since(started).as_secs_f64())
}

async fn isolation(s: &Settings, mgmt: &Management, report: &mut Report) -> Result<String> {
    let n = (s.messages / 5).max(10);
    let alone_q = s.queue("iso-alone");
    let beside_q = s.queue("iso-beside");
    let hang_q = s.queue("iso-hanging");
    for q in [&alone_q, &beside_q, &hang_q] {
        mgmt.declare_quorum(q).await?;
    }
    preload(s, &[alone_q.clone(), beside_q.clone()], n).await?;
    preload(s, std::slice::from_ref(&hang_q), HANG_MESSAGES).await?;
    mgmt.wait_depths(&[alone_q.clone(), beside_q.clone()], n, DEPTH_LIMIT)
        .await?;
    mgmt.wait_depth(&hang_q, HANG_MESSAGES, DEPTH_LIMIT).await?;
    let target = Target::counting_on(s.target_runtime(), false).await?;
    let hanging = HangingTarget::start().await?;

    // Alone.
    let mut daemon = Daemon::start(s, "isolation-alone").await?;
    let alone = healthy_run(&mut daemon, &target, s, &alone_q, n).await?;
    report.note_log(&daemon);
    daemon.stop().await?;
    println!("  alone: {n} messages, {alone:.0} msg/s");

    // Beside an enrollment whose target never answers, its 8 POSTs already hanging.
    let mut daemon = Daemon::start(s, "isolation-beside").await?;
    let mut hang = s.enrollment(&hang_q, &hanging.url, 8);
    hang["delivery"]["timeout_ms"] = json!(30000);
    let hang_id = daemon.api.enroll_id(&hang).await?;
    wait_for(
        "the hanging enrollment to have 8 POSTs in flight",
        ACTIVE_LIMIT,
        Duration::from_millis(50),
        || async {
            let view = daemon.api.enrollment(&hang_id).await?;
            Ok((view["in_flight"].as_u64() == Some(8)).then_some(()))
        },
    )
    .await?;
    let beside = healthy_run(&mut daemon, &target, s, &beside_q, n).await?;
    let hang_view = daemon.api.enrollment(&hang_id).await?;
    report.note_log(&daemon);
    daemon.stop().await?;
    println!(
        "  beside a hanging target: {n} messages, {beside:.0} msg/s (hanging enrollment: in_flight {}, state {})",
        hang_view["in_flight"], hang_view["state"]
    );
    mgmt.delete_queues(vec![alone_q, beside_q, hang_q]).await?;
    let drop_pct = (alone - beside) / alone * 100.0;
    Ok(format!(
        "Isolation (max_in_flight 1, {n} msgs): {alone:.0} msg/s alone, {beside:.0} msg/s beside an enrollment whose target never answers (max_in_flight 8, timeout_ms 30000, {HANG_MESSAGES} msgs queued): {drop_pct:.1} % drop"
    ))
}
