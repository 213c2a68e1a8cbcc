//! Many calls at once, at most N at a time (declaring, enrolling or deleting many queues).

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Runs `f` on every item, at most `limit` at once; the first error wins. The results come in
/// the order the calls finished.
pub async fn for_each<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let semaphore = Arc::new(Semaphore::new(limit.max(1)));
    let mut set = JoinSet::new();
    for item in items {
        let semaphore = Arc::clone(&semaphore);
        let f = f.clone();
        set.spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            f(item).await
        });
    }
    let mut out = Vec::new();
    // Dropping `set` on an early return aborts the calls still running.
    while let Some(joined) = set.join_next().await {
        out.push(joined.context("a parallel task panicked")??);
    }
    Ok(out)
}
