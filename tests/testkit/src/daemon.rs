//! The hot-potato binary as a child process: the environment it needs, a free port, killed
//! (and reaped) when its handle is dropped, so no daemon outlives the test or benchmark that
//! started it.
//!
//! Every child spawned here is also on a process-wide list until it is reaped; a time limit
//! that must end the whole process calls [`kill_watched`] first. Other children (a browser
//! driver, a daemon started by hand) can join the list with [`watch_child`].

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};

/// Processes (or process groups, as `-pgid`) started and not yet reaped.
static WATCHED: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watched() -> MutexGuard<'static, Vec<String>> {
    WATCHED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `kill` is given for `pid`: the pid, or `-pid` for its whole process group.
fn kill_target(pid: u32, group: bool) -> String {
    if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    }
}

/// Puts `pid` (its whole group when `group`) on the list [`kill_watched`] kills.
pub fn watch_child(pid: u32, group: bool) {
    watched().push(kill_target(pid, group));
}

/// Takes `pid` off the list, once it has been reaped, so its number is never signalled after
/// reuse.
pub fn unwatch_child(pid: u32, group: bool) {
    let target = kill_target(pid, group);
    watched().retain(|t| *t != target);
}

/// SIGKILLs every process (group) on the list, for a time limit about to end this process.
pub fn kill_watched() {
    for target in watched().iter() {
        let _ = Command::new("kill")
            .args(["-KILL", "--", target])
            .stderr(Stdio::null())
            .status();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok(listener.local_addr()?.port())
}

/// The variables every daemon needs: its broker, its API address and its SQLite file.
pub fn base_env(amqp_url: &str, db: &Path, port: u16) -> Vec<(String, String)> {
    [
        ("AMQP_URL", amqp_url.to_string()),
        ("HTTP_HOST", "127.0.0.1".into()),
        ("HTTP_PORT", port.to_string()),
        ("SQLITE_BACKUP_PATH", db.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Starts `bin` with exactly `env` (a later entry overrides an earlier one of the same name;
/// nothing is inherited, so no `.env` or `RUST_LOG` of the caller leaks in) in `dir`, its
/// output to `log` when given, else stdout discarded and stderr inherited.
pub fn spawn(
    bin: &Path,
    env: &[(String, String)],
    dir: &Path,
    log: Option<&Path>,
) -> Result<DaemonProcess> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null());
    match log {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            cmd.stdout(file.try_clone()?).stderr(file);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    watch_child(child.id(), false);
    Ok(DaemonProcess(child))
}

/// A daemon child process, SIGKILLed and reaped when dropped (also on a failed assertion or an
/// early return), then taken off the kill list.
pub struct DaemonProcess(pub Child);

impl DaemonProcess {
    /// Sends signal `name` (`TERM`, `KILL`…) with `kill`.
    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.0.id().to_string())
            .status()
            .context("cannot run kill")?;
        ensure!(status.success(), "kill -{name} {} failed", self.0.id());
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; `None` when it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl std::ops::Deref for DaemonProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for DaemonProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        unwatch_child(self.0.id(), false);
    }
}
