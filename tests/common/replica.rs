//! A replica as a process (so `kill -9` and SIGTERM are real) on a test's PostgreSQL database.

use std::path::Path;

use super::{Api, DaemonProcess, free_port, spawn_daemon};

pub struct Replica {
    pub process: DaemonProcess,
    pub api: Api,
    /// The id it answers in `GET /replicas` (`this_replica`).
    pub id: String,
}

/// Starts a replica process on `db` (its log in `dir/NAME.log`) and waits for its id.
pub async fn replica(
    db: &str,
    dir: &Path,
    name: &str,
    ttl_ms: u64,
    extra: &[(&str, &str)],
) -> Replica {
    let port = free_port();
    let ttl = ttl_ms.to_string();
    let mut env = vec![
        ("DATABASE_URL", db),
        ("LEASE_TTL_MS", ttl.as_str()),
        ("SNAPSHOT_INTERVAL_MS", "300"),
        ("REPLICA_NAME", name),
        ("LOG_LEVEL", "hot_potato=info"),
        ("AMQP_CONNECTION_POOL", "4"),
    ];
    env.extend_from_slice(extra);
    let log = dir.join(format!("{name}.log"));
    let process = spawn_daemon(&dir.join("unused.sqlite"), port, Some(&log), &env);
    let api = Api::new(&format!("http://127.0.0.1:{port}"));
    api.wait_healthy().await;
    let (_, replicas) = api.get("/replicas").await;
    let id = replicas["this_replica"]
        .as_str()
        .unwrap_or_else(|| panic!("no replica id: {replicas}"))
        .to_string();
    Replica { process, api, id }
}
