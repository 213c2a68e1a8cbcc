//! Putting messages on the queues before a scenario starts its clock.

use std::time::Instant;

use anyhow::Result;
use hot_potato_testkit::publisher::Publisher;
use tokio::task::JoinSet;

use crate::settings::Settings;

/// Bytes in each Data message of the throughput scenarios.
pub const BODY_LEN: usize = 256;
/// Unsettled messages a preloading publisher keeps outstanding.
pub const PUBLISH_WINDOW: usize = 500;

pub fn body() -> Vec<u8> {
    (0..BODY_LEN).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Fills each queue with `n` messages, one publisher per queue, all at once.
pub async fn preload(s: &Settings, queues: &[String], n: u64) -> Result<()> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for queue in queues {
        let (url, queue) = (s.amqp_url.clone(), queue.clone());
        set.spawn(async move {
            let mut p = Publisher::connect(&url, &[queue]).await?;
            p.send_data(n, &body(), PUBLISH_WINDOW).await?;
            p.close().await;
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let total = n * queues.len() as u64;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  preloaded {total} messages into {} queue(s) in {secs:.1} s ({:.0} msg/s)",
        queues.len(),
        total as f64 / secs
    );
    Ok(())
}
