//! Polling a condition until it holds, never longer than a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// Polls `check` every `every` until it yields `Some`, or fails naming `what` after `limit`.
/// An error from `check` does not end the wait (the thing may not be up yet); the last one is
/// named in the timeout error.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            let detail = last_error
                .map(|e| format!(" (last error: {e:#})"))
                .unwrap_or_default();
            bail!("timed out after {limit:?} waiting for {what}{detail}");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gives_the_value_once_the_check_holds() {
        let mut calls = 0;
        let got = wait_for(
            "three calls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                calls += 1;
                let n = calls;
                async move { Ok((n == 3).then_some(n)) }
            },
        )
        .await;
        assert_eq!(got.ok(), Some(3));
    }

    #[tokio::test]
    async fn names_what_it_waited_for_and_the_last_error() {
        let err = wait_for::<(), _, _>("nothing", Duration::ZERO, Duration::ZERO, || async {
            bail!("still down")
        })
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("waiting for nothing"), "{err}");
        assert!(err.contains("still down"), "{err}");
    }
}
