//! Throughput: hot-potato draining preloaded quorum queues into a target that answers 200 at
//! once, timed from the first `POST /enroll` to the target's Nth request.

use std::time::Instant;

use anyhow::Result;
use hot_potato_testkit::management::Management;
use hot_potato_testkit::target::Target;

use crate::DEPTH_LIMIT;
use crate::load::preload;
use crate::process::{Daemon, drain_limit, wait_goal};
use crate::procstat::{broker_pid, cpu_ticks, mib};
use crate::report::{Measured, Report};
use crate::settings::Settings;

/// (label, queues, max_in_flight) of each row.
const CASES: [(&str, usize, u32); 4] = [
    ("single-mif1", 1, 1),
    ("single-mif16", 1, 16),
    ("single-mif32", 1, 32),
    ("eight-mif1", 8, 1),
];

/// Every case, one table row each.
pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    for (label, queues, mif) in CASES {
        let name = if queues == 1 {
            format!("hot-potato, 1 enrollment, max_in_flight {mif}")
        } else {
            format!("hot-potato, {queues} enrollments on {queues} queues, max_in_flight {mif} each")
        };
        println!("\n== {name}");
        let outcome = throughput(s, mgmt, report, label, queues, mif).await;
        report.row(name, outcome);
    }
}

/// `queues` enrollments with one `max_in_flight`, each on its own queue of `N` messages.
async fn throughput(
    s: &Settings,
    mgmt: &Management,
    report: &mut Report,
    label: &str,
    queues: usize,
    max_in_flight: u32,
) -> Result<Measured> {
    let names: Vec<String> = (0..queues)
        .map(|i| s.queue(&format!("{label}-{i}")))
        .collect();
    for name in &names {
        mgmt.declare_quorum(name).await?;
    }
    preload(s, &names, s.messages).await?;
    mgmt.wait_depths(&names, s.messages, DEPTH_LIMIT).await?;
    let target = Target::counting(false).await?;
    let total = s.messages * queues as u64;
    target.reset(total as usize);
    let mut daemon = Daemon::start(s, label).await?;
    let broker = broker_pid();
    let broker0 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());

    let ticks0 = daemon.cpu_ticks()?;
    let started = Instant::now();
    for name in &names {
        daemon
            .api
            .enroll_id(&s.enrollment(name, &target.url(), max_in_flight))
            .await?;
    }
    let done = wait_goal(&mut daemon, &target, total, drain_limit(total)).await?;
    let ticks1 = daemon.cpu_ticks()?;
    let broker1 = broker.as_deref().and_then(|p| cpu_ticks(p).ok());
    let elapsed = done.duration_since(started).as_secs_f64();
    let peak = daemon.peak_rss_kb()?;
    mgmt.wait_depths(&names, 0, DEPTH_LIMIT).await?;

    let views = daemon.api.enrollments().await?;
    let sum = |field: &str| {
        views
            .iter()
            .map(|v| v[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let (delivered, failed, retries) = (sum("delivered"), sum("failed"), sum("retries"));
    let posts = target.count() as u64;
    if delivered != total || failed != 0 || retries != 0 || posts != total {
        report.notes.push(format!(
            "{label}: {posts} POSTs for {total} messages; daemon counted delivered {delivered}, failed {failed}, retries {retries}"
        ));
    }
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(names).await?;

    let cpu = s.cpu_secs(ticks1 - ticks0);
    let broker_cpu = match (broker0, broker1) {
        (Some(a), Some(b)) => format!(", broker {:.2} CPU s", s.cpu_secs(b - a)),
        _ => String::new(),
    };
    println!(
        "  {total} messages in {elapsed:.2} s: {:.0} msg/s; daemon {cpu:.2} CPU s{broker_cpu}, peak RSS {:.1} MiB",
        total as f64 / elapsed,
        mib(peak)
    );
    Ok(Measured {
        rate: total as f64 / elapsed,
        cpu_per_10k: cpu / total as f64 * 10_000.0,
        peak_rss_mib: mib(peak),
    })
}
