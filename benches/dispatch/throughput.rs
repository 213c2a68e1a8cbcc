//! Throughput: hot-potato draining preloaded quorum queues into a target that answers 200 at
//! once, timed from the first `POST /enroll` to the target's Nth request. Each row is preceded
//! by a bare drain of as many queues (`BENCH_BESIDE`), its nearest reference in time.

use std::time::Instant;

use anyhow::Result;
use hot_potato_testkit::management::Management;
use hot_potato_testkit::target::Target;

use crate::DEPTH_LIMIT;
use crate::ceiling::bare_beside;
use crate::load::preload;
use crate::process::{Daemon, drain_limit, wait_goal};
use crate::procstat::{Steal, Usage, broker_pid, mib};
use crate::report::{Measured, ProcessCosts, Report};
use crate::settings::Settings;

/// How an enrollment of a row is set up.
#[derive(Clone, Copy)]
enum Setup {
    /// `subscription_args.prefetch` = BENCH_PREFETCH, `max_in_flight` as given.
    Prefetch(u32),
    /// Only `max_in_flight`: the daemon's default credit and settlement batching.
    Defaults(u32),
    /// `delivery.batch` of this many messages, `max_in_flight` 4, BENCH_PREFETCH.
    Batched(u32),
}

/// (label, queues, setup) of each row.
const CASES: [(&str, usize, Setup); 7] = [
    ("single-mif1", 1, Setup::Prefetch(1)),
    ("single-mif16", 1, Setup::Prefetch(16)),
    ("single-mif32", 1, Setup::Prefetch(32)),
    ("single-defaults-mif32", 1, Setup::Defaults(32)),
    ("single-batched", 1, Setup::Batched(100)),
    ("eight-mif1", 8, Setup::Prefetch(1)),
    ("eight-mif16", 8, Setup::Prefetch(16)),
];

/// The most queues a wanted row drains at once, when a row drains more than one: the ceiling
/// then drains that many too.
pub fn wanted_many_queues(s: &Settings) -> Option<usize> {
    CASES
        .iter()
        .filter(|(label, queues, _)| *queues > 1 && s.wants_case(label))
        .map(|(_, queues, _)| *queues)
        .max()
}

impl Setup {
    fn describe(self) -> String {
        match self {
            Setup::Prefetch(mif) => format!("max_in_flight {mif}"),
            Setup::Defaults(mif) => format!("max_in_flight {mif}, default prefetch"),
            Setup::Batched(n) => format!("batches of {n}, max_in_flight 4"),
        }
    }

    fn enrollment(self, s: &Settings, queue: &str, url: &str) -> serde_json::Value {
        match self {
            Setup::Prefetch(mif) => s.enrollment(queue, url, mif),
            Setup::Defaults(mif) => {
                let mut e = s.enrollment(queue, url, mif);
                e["subscription_args"] = serde_json::json!({});
                e
            }
            Setup::Batched(n) => {
                let mut e = s.enrollment(queue, url, 4);
                e["delivery"]["batch"] = serde_json::json!({"max_messages": n, "max_wait_ms": 5});
                e
            }
        }
    }
}

/// Every case, one table row each.
pub async fn run(s: &Settings, mgmt: &Management, report: &mut Report) {
    for (label, queues, setup) in CASES {
        if !s.wants_case(label) {
            continue;
        }
        let name = if queues == 1 {
            format!("hot-potato, 1 enrollment, {}", setup.describe())
        } else {
            format!(
                "hot-potato, {queues} enrollments on {queues} queues, {} each",
                setup.describe()
            )
        };
        println!("\n== {name}");
        let outcome = throughput(s, mgmt, report, label, queues, setup).await;
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
    setup: Setup,
) -> Result<Measured> {
    let beside = if s.beside {
        match bare_beside(s, mgmt, queues).await {
            Ok(rate) => Some(rate),
            Err(e) => {
                report
                    .notes
                    .push(format!("{label}: the bare drain just before failed: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let names: Vec<String> = (0..queues)
        .map(|i| s.queue(&format!("{label}-{i}")))
        .collect();
    for name in &names {
        mgmt.declare_quorum(name).await?;
    }
    preload(s, &names, s.messages).await?;
    mgmt.wait_depths(&names, s.messages, DEPTH_LIMIT).await?;
    let target = Target::counting_on(s.target_runtime(), false).await?;
    let total = s.messages * queues as u64;
    target.reset(total as usize);
    let mut daemon = Daemon::start(s, label).await?;
    let broker = broker_pid();
    let broker0 = broker.as_deref().and_then(|p| Usage::of(p).ok());
    let daemon0 = daemon.usage()?;
    // The target runs in this process: its CPU is this process's while the daemon drains.
    let target0 = Usage::of("self")?;
    let steal = Steal::start();
    let started = Instant::now();
    for name in &names {
        daemon
            .api
            .enroll_id(&setup.enrollment(s, name, &target.url()))
            .await?;
    }
    let done = wait_goal(&mut daemon, &target, total, drain_limit(total)).await?;
    let daemon1 = daemon.usage()?;
    let target1 = Usage::of("self")?;
    let broker1 = broker.as_deref().and_then(|p| Usage::of(p).ok());
    let steal_pct = steal.pct();
    let broker_both = broker0.zip(broker1);
    let costs = ProcessCosts {
        broker: broker_both.and_then(|(b0, b1)| b1.costs_since(&b0, total)),
        daemon: daemon1.costs_since(&daemon0, total),
        target: target1.costs_since(&target0, total),
    };
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
    let posted = target.count() as u64;
    if delivered != total || failed != 0 || retries != 0 || posted != total {
        report.notes.push(format!(
            "{label}: {posted} messages POSTed for {total}; daemon counted delivered {delivered}, failed {failed}, retries {retries}"
        ));
    }
    report.note_log(&daemon);
    daemon.stop().await?;
    mgmt.delete_queues(names).await?;

    let cpu = s.cpu_secs(daemon1.ticks_since(&daemon0));
    let broker_secs = broker_both.map(|(b0, b1)| s.cpu_secs(b1.ticks_since(&b0)));
    let broker_cpu = broker_secs.map_or(String::new(), |b| format!(", broker {b:.2} CPU s"));
    let target_secs = s.cpu_secs(target1.ticks_since(&target0));
    println!(
        "  {total} messages in {elapsed:.2} s: {:.0} msg/s; daemon {cpu:.2} CPU s{broker_cpu}, peak RSS {:.1} MiB",
        total as f64 / elapsed,
        mib(peak)
    );
    let per_message_us = |secs: f64| secs / total as f64 * 1e6;
    Ok(Measured {
        rate: total as f64 / elapsed,
        cpu_per_10k: cpu / total as f64 * 10_000.0,
        peak_rss_mib: mib(peak),
        broker_us: broker_secs.map(per_message_us),
        target_us: Some(per_message_us(target_secs)),
        steal_pct,
        beside,
        costs,
    })
}
