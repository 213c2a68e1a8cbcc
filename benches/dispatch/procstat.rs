//! What /proc says about a process (CPU ticks, resident memory) and about the machine.

use anyhow::{Context as _, Result, anyhow};

fn read_proc(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))
}

/// utime + stime of a process (`self` for this one), in clock ticks.
pub fn cpu_ticks(pid: &str) -> Result<u64> {
    let (utime, stime) = user_and_system(pid)?;
    Ok(utime + stime)
}

/// (utime, stime) of a process, in clock ticks.
fn user_and_system(pid: &str) -> Result<(u64, u64)> {
    let stat = read_proc(&format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields restart after ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .context("utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .context("stime")?;
    Ok((utime, stime))
}

/// What a process has used so far: CPU ticks in user and in kernel mode, and the context
/// switches of its threads. Read before and after a drain, it says where that process's CPU
/// went: on loopback, much of it goes to the kernel's socket path and to sleeping and waking.
#[derive(Clone, Copy)]
pub struct Usage {
    user: u64,
    system: u64,
    /// Voluntary and involuntary, summed over /proc/PID/task/*/status; `None` when unreadable.
    switches: Option<u64>,
}

impl Usage {
    pub fn of(pid: &str) -> Result<Self> {
        let (user, system) = user_and_system(pid)?;
        Ok(Self {
            user,
            system,
            switches: context_switches(pid),
        })
    }

    /// CPU ticks (user + kernel) used since `earlier`.
    pub fn ticks_since(&self, earlier: &Self) -> u64 {
        (self.user + self.system).saturating_sub(earlier.user + earlier.system)
    }

    /// The kernel's share of the CPU used since `earlier`, and context switches per message;
    /// `None` when nothing was used. A thread that ended meanwhile took its switches with it.
    pub fn costs_since(&self, earlier: &Self, messages: u64) -> Option<Costs> {
        let user = self.user.saturating_sub(earlier.user);
        let system = self.system.saturating_sub(earlier.system);
        let ticks = user + system;
        (ticks > 0 && messages > 0).then(|| Costs {
            kernel_pct: system as f64 / ticks as f64 * 100.0,
            switches_per_msg: self
                .switches
                .zip(earlier.switches)
                .map(|(now, then)| now.saturating_sub(then) as f64 / messages as f64),
        })
    }
}

/// Where one process's CPU went over a drain (see [`Usage`]).
#[derive(Clone, Copy)]
pub struct Costs {
    pub kernel_pct: f64,
    pub switches_per_msg: Option<f64>,
}

/// Context switches of every thread of `pid` so far.
fn context_switches(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        // A thread may end between the listing and the read: it counts as none.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for field in ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"] {
            total += number_line(&status, field).unwrap_or(0);
        }
    }
    Some(total)
}

/// The number of a `Field: N` or `Field: N kB` line.
fn number_line(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS), in kB.
pub fn status_kb(pid: &str, field: &str) -> Result<u64> {
    let status = read_proc(&format!("/proc/{pid}/status"))?;
    number_line(&status, field).ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// The share of the machine's CPU time the hypervisor took (steal) between `start` and now,
/// from /proc/stat's `cpu` line: on a shared VM it explains a run that is slow throughout.
pub struct Steal {
    start: Option<(u64, u64)>,
}

impl Steal {
    pub fn start() -> Self {
        Self {
            start: machine_ticks(),
        }
    }

    /// Percent of all CPU time since `start`; `None` when /proc/stat cannot be read.
    pub fn pct(&self) -> Option<f64> {
        let (total0, steal0) = self.start?;
        let (total1, steal1) = machine_ticks()?;
        let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
        Some(steal1.saturating_sub(steal0) as f64 / total as f64 * 100.0)
    }
}

/// (all CPU ticks, steal ticks) so far: the first eight fields of the `cpu` line (user to
/// steal; guest time is already inside user).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))?
        .split_whitespace()
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let steal = *fields.get(7)?;
    Some((fields.iter().sum(), steal))
}

pub fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The benchmarked broker's OS pid, as its management API reported it (see `preflight`).
static BROKER_PID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Remembers the broker's pid: two RabbitMQ nodes may run here (3.10 and 4.0), and only the
/// one the bench talks to may be counted.
pub fn set_broker_pid(pid: String) {
    let _ = BROKER_PID.set(pid);
}

/// The RabbitMQ node's process, to show its CPU beside the daemon's: the one the management
/// API named, else the first `beam.smp` found.
pub fn broker_pid() -> Option<String> {
    if let Some(pid) = BROKER_PID.get() {
        return Some(pid.clone());
    }
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPUs, model, memory and load average, for the report's first line.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = number_line(&meminfo, "MemTotal").map_or("?".into(), |kb| {
        format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{nproc} CPU(s) (nproc), {model}, {mem} RAM; load average {}",
        load.join(" ")
    )
}
