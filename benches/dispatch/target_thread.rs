//! The HTTP target's own thread: a current-thread tokio runtime that serves every target the
//! scenarios start (`BENCH_TARGET_THREAD=1`, the default), and stops when the settings drop.
//!
//! On the benchmark's two-worker runtime, a request woke one worker from epoll and tokio woke
//! the other to take the connection task: two switches per request at `max_in_flight` 1, CPU
//! the daemon shares. A real target runs elsewhere; here it only needs to answer cheaply.

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct TargetThread {
    runtime: Handle,
    /// Ends the runtime's `block_on`, and the thread that runs it.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TargetThread {
    pub fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the target's runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-target".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .context("cannot start the target's thread")?;
        Ok(Self {
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> Handle {
        self.runtime.clone()
    }
}

impl Drop for TargetThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("dispatch: the target's thread panicked");
        }
    }
}
