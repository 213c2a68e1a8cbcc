//! Replica benchmark: failover time and duplicates over several `kill -9` runs, and the CPU
//! cost of the owners' snapshots at 1,000 enrollments. Two daemon processes on one PostgreSQL
//! database (a fresh database per run), the local RabbitMQ and an HTTP target in this process.
//!
//! Run it with `scripts/bench-replicas.sh` (PostgreSQL and broker checks, release build, then
//! `cargo bench --bench replicas`). Under `cargo test --all-targets` the binary is started
//! without `--bench` and exits at once.
//!
//! Settings (environment):
//! - `HOT_POTATO_TEST_DATABASE`: a server and a role that may create databases (printed by
//!   `scripts/ensure-postgres.sh`).
//! - `BENCH_FAILOVER_RUNS` (5), `BENCH_LEASE_TTL_MS` (10000): failover runs and the lease.
//! - `BENCH_SNAPSHOT_ENROLLMENTS` (1000), `BENCH_SNAPSHOT_SECS` (20): the snapshot scenario.
//! - `BENCH_AMQP_URL`, `BENCH_MANAGEMENT_URL`, `HOT_POTATO_BIN` as in the dispatch benchmark.

#[path = "../tests/common/postgres.rs"]
#[allow(dead_code)]
mod postgres;
#[path = "dispatch/procstat.rs"]
#[allow(dead_code)]
mod procstat;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, ensure};
use hot_potato_testkit::api::Api;
use hot_potato_testkit::daemon::{DaemonProcess, base_env, free_port, spawn};
use hot_potato_testkit::management::Management;
use hot_potato_testkit::publisher::Publisher;
use hot_potato_testkit::target::Target;
use hot_potato_testkit::wait::wait_for;
use serde_json::json;

use crate::postgres::TestDatabase;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Bench {
    bin: PathBuf,
    amqp: String,
    mgmt: Management,
    dir: tempfile::TempDir,
}

impl Bench {
    /// A replica process on `db` with `extra` settings; its API once it answers.
    async fn replica(
        &self,
        db: &str,
        name: &str,
        extra: &[(&str, String)],
    ) -> Result<(DaemonProcess, Api)> {
        let port = free_port()?;
        let mut env = base_env(&self.amqp, &self.dir.path().join("unused.sqlite"), port);
        for (k, v) in [
            ("DATABASE_URL", db.to_string()),
            ("REPLICA_NAME", name.to_string()),
            ("LOG_LEVEL", "warn".to_string()),
            ("API_RATE_LIMIT_PER_MIN", "0".to_string()),
            ("AMQP_CONNECTION_POOL", "4".to_string()),
        ]
        .into_iter()
        .chain(extra.iter().map(|(k, v)| (*k, v.clone())))
        {
            env.push((k.to_string(), v));
        }
        let log = self.dir.path().join(format!("{name}-{port}.log"));
        let process = spawn(&self.bin, &env, self.dir.path(), Some(&log))?;
        let api = Api::new(&format!("http://127.0.0.1:{port}"))?;
        api.wait_healthy(Duration::from_secs(30)).await?;
        Ok((process, api))
    }
}

/// Who runs each enrollment, as `/enrollments` on `api` shows, once all are active.
async fn owners(api: &Api, n: usize) -> Result<Vec<(String, String)>> {
    wait_for(
        "every enrollment active",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || async {
            let list = api.enrollments().await?;
            let all = list.len() == n
                && list
                    .iter()
                    .all(|e| e["state"] == "active" && e["replica"].is_string());
            Ok(all.then(|| {
                list.iter()
                    .map(|e| {
                        let queue = e["queue"].as_str().unwrap_or_default();
                        let queue = queue.rsplit('/').next().unwrap_or_default().to_string();
                        (queue, e["replica"].as_str().unwrap_or_default().to_string())
                    })
                    .collect()
            }))
        },
    )
    .await
}

/// One `kill -9` run: (kill → first delivery of a dead replica's queue by the survivor,
/// duplicates, enrollments moved).
async fn failover(b: &Bench, ttl_ms: u64) -> Result<(Duration, usize, usize)> {
    let db = TestDatabase::create()
        .await
        .context("HOT_POTATO_TEST_DATABASE is not set")?;
    let ttl = [
        ("LEASE_TTL_MS", ttl_ms.to_string()),
        ("SNAPSHOT_INTERVAL_MS", "500".into()),
    ];
    let (a, api_a) = b.replica(&db.url, "a", &ttl).await?;
    let (_b, api_b) = b.replica(&db.url, "b", &ttl).await?;
    let (_, me) = api_a.get("/replicas").await?;
    let a_id = me["this_replica"].as_str().unwrap_or_default().to_string();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let queues: Vec<String> = (0..4)
        .map(|i| format!("bench-{}-failover{i}", &run[..8]))
        .collect();
    let target = Target::start().await?;
    target.set_delay(Duration::from_millis(5));
    for q in &queues {
        b.mgmt.declare_classic(q).await?;
        api_a
            .enroll_id(
                &json!({"queue": hot_potato_testkit::address(q), "target_url": target.url()}),
            )
            .await?;
    }
    let on_a: Vec<String> = owners(&api_b, queues.len())
        .await?
        .into_iter()
        .filter(|(_, owner)| *owner == a_id)
        .map(|(q, _)| q)
        .collect();
    ensure!(!on_a.is_empty(), "A runs none of the enrollments");
    // A drains about 150 a second per queue: plenty left in its queues when it dies.
    let per_queue = 1000;
    for q in &queues {
        let mut p = Publisher::connect(&b.amqp, &[q]).await?;
        p.send_numbered(q, 0..per_queue).await?;
        p.close().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.signal("KILL")?;
    let killed = Instant::now();
    let total = per_queue * queues.len();
    wait_for(
        "every message accepted",
        Duration::from_millis(ttl_ms) + Duration::from_secs(180),
        Duration::from_millis(100),
        || async {
            let mut bodies = target.accepted_bodies();
            bodies.sort();
            bodies.dedup();
            Ok((bodies.len() == total).then_some(()))
        },
    )
    .await?;
    let first = target
        .received()
        .iter()
        .filter(|r| r.at > killed + Duration::from_millis(200))
        .filter(|r| on_a.iter().any(|q| r.text().starts_with(q.as_str())))
        .map(|r| r.at.duration_since(killed))
        .min()
        .ok_or_else(|| anyhow!("the survivor delivered none of A's queues"))?;
    let duplicates = target.accepted_bodies().len() - total;
    for q in &queues {
        let _ = b.mgmt.delete_queue(q).await;
    }
    Ok((first, duplicates, on_a.len()))
}

/// CPU seconds the daemon `pid` uses over `secs`.
async fn cpu_over(pid: u32, secs: u64) -> Result<f64> {
    let ticks = env_or("BENCH_CLK_TCK", 100u64) as f64;
    let before = procstat::cpu_ticks(&pid.to_string())?;
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = procstat::cpu_ticks(&pid.to_string())?;
    Ok((after - before) as f64 / ticks)
}

/// CPU of one replica owning `n` paused enrollments, snapshots every 2 s, then every 60 s:
/// (with, without) in CPU seconds over `secs`.
async fn snapshot_cost(b: &Bench, n: usize, secs: u64) -> Result<(f64, f64)> {
    let db = TestDatabase::create()
        .await
        .context("HOT_POTATO_TEST_DATABASE is not set")?;
    // The schema comes from a first start; the enrollments are written straight into it,
    // paused, so no worker runs and only the replica's own work is measured.
    let (mut first, _) = b.replica(&db.url, "schema", &[]).await?;
    first.signal("TERM")?;
    first.wait_exit(Duration::from_secs(20)).await?;
    db.execute(&format!(
        "INSERT INTO enrollments (id, queue, target_url, subscription_args, created_at, delivery, paused)
         SELECT gen_random_uuid()::text, '/amq/queue/bench-snapshot-' || i, 'http://127.0.0.1:9/x',
                '{{}}', to_char(now() AT TIME ZONE 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '{{}}', true
         FROM generate_series(1, {n}) AS i"
    ))
    .await
    .map_err(|e| anyhow!(e))?;
    let mut out = Vec::new();
    for interval in ["2000", "60000"] {
        let (process, api) = b
            .replica(
                &db.url,
                "snap",
                &[("SNAPSHOT_INTERVAL_MS", interval.to_string())],
            )
            .await?;
        wait_for(
            "every lease taken",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || async {
                let (_, body) = api.get("/replicas").await?;
                let held: i64 = body["replicas"]
                    .as_array()
                    .map(|r| r.iter().filter_map(|x| x["enrollments"].as_i64()).sum())
                    .unwrap_or(0);
                Ok((held == i64::try_from(n).unwrap_or(i64::MAX)).then_some(()))
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        out.push(cpu_over(process.id(), secs).await?);
        drop(process);
    }
    Ok((out[0], out[1]))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn run() -> Result<()> {
    let target_dir = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bench = Bench {
        bin: std::env::var("HOT_POTATO_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(&target_dir).join("release/hot-potato")),
        amqp: std::env::var("BENCH_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into()),
        mgmt: Management::new(
            &std::env::var("BENCH_MANAGEMENT_URL")
                .unwrap_or_else(|_| "http://127.0.0.1:15672".into()),
        )?,
        dir: tempfile::tempdir()?,
    };
    ensure!(
        bench.bin.exists(),
        "no daemon at {} (cargo build --release)",
        bench.bin.display()
    );
    let runs = env_or("BENCH_FAILOVER_RUNS", 5usize);
    let ttl_ms = env_or("BENCH_LEASE_TTL_MS", 10_000u64);
    println!(
        "failover: {runs} runs, LEASE_TTL_MS={ttl_ms}, 4 enrollments on 2 replicas, kill -9 of one mid-stream"
    );
    let (mut times, mut dups) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (first, duplicates, moved) = failover(&bench, ttl_ms).await?;
        println!(
            "  run {}: first delivery by the survivor {:.2} s after kill -9, {duplicates} duplicates, {moved} enrollments moved",
            i + 1,
            first.as_secs_f64()
        );
        times.push(first.as_secs_f64());
        dups.push(duplicates as f64);
    }
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "  failover: median {:.2} s, max {max:.2} s; duplicates: median {}, max {}",
        median(times),
        median(dups.clone()),
        dups.iter().copied().fold(0.0, f64::max)
    );
    let n = env_or("BENCH_SNAPSHOT_ENROLLMENTS", 1000usize);
    let secs = env_or("BENCH_SNAPSHOT_SECS", 20u64);
    let (with, without) = snapshot_cost(&bench, n, secs).await?;
    let rounds = secs as f64 / 2.0;
    println!(
        "snapshots: {n} enrollments on one replica: {with:.2} CPU s over {secs} s with a snapshot every 2 s, {without:.2} without; {:.1} CPU ms per snapshot round ({:.2} % of a core)",
        (with - without) * 1000.0 / rounds,
        (with - without) * 100.0 / secs as f64
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "replicas: a benchmark against PostgreSQL and a live broker; run it with `scripts/bench-replicas.sh`"
        );
        return ExitCode::SUCCESS;
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicas: {e:#}");
            ExitCode::FAILURE
        }
    }
}
