//! What the scenarios measured, and the results table and lists printed at the end.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::load::BODY_LEN;
use crate::process::Daemon;
use crate::procstat::{Costs, machine};
use crate::settings::Settings;

/// One measurement behind a line of the results table: a row is measured once per round.
pub struct Row {
    pub name: String,
    /// The round it was measured in, which picks the ceiling it is read against.
    pub round: usize,
    pub rate: f64,
    /// Daemon (or, for the ceiling, receiver) CPU seconds per 10,000 messages.
    pub cpu_per_10k: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// The broker's CPU µs per message over the same run (from its /proc entry).
    pub broker_us: Option<f64>,
    /// The HTTP target's CPU µs per message (the bench process while the daemon drains).
    pub target_us: Option<f64>,
    /// The hypervisor's share of the machine's CPU time over the same drain.
    pub steal_pct: Option<f64>,
    /// msg/s of the bare drain of as many queues run just before this row (`BENCH_BESIDE`).
    pub beside: Option<f64>,
    pub costs: ProcessCosts,
}

/// Where each process's CPU went over one drain: kernel share and context switches per
/// message, for the broker, the daemon (or bare receiver) and the target.
#[derive(Clone, Copy, Default)]
pub struct ProcessCosts {
    pub broker: Option<Costs>,
    pub daemon: Option<Costs>,
    pub target: Option<Costs>,
}

/// What one daemon scenario measured.
pub struct Measured {
    pub rate: f64,
    pub cpu_per_10k: f64,
    pub peak_rss_mib: f64,
    pub broker_us: Option<f64>,
    pub target_us: Option<f64>,
    pub steal_pct: Option<f64>,
    /// msg/s of the bare drain run just before it, when there was one.
    pub beside: Option<f64>,
    pub costs: ProcessCosts,
}

#[derive(Default)]
pub struct Report {
    /// The round under way (`BENCH_ROUNDS`): the ceiling and then every throughput row.
    pub round: usize,
    /// Each round's faster bare receiver, which that round's rows are read against.
    pub ceilings: Vec<f64>,
    pub rows: Vec<Row>,
    /// One summary line per scenario that is not a table row (isolation, latency, scale).
    pub lines: Vec<String>,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
    /// Daemon warnings by level and message: where (scenario ×count) and the first line.
    pub logged: BTreeMap<String, (Vec<String>, String)>,
}

impl Report {
    /// Keeps the daemon's grouped warnings, under its name.
    pub fn note_log(&mut self, daemon: &Daemon) {
        for (key, count, example) in daemon.log_groups() {
            let entry = self
                .logged
                .entry(key)
                .or_insert_with(|| (Vec::new(), example));
            entry.0.push(format!("{} ×{count}", daemon.name));
        }
    }

    /// A scenario's summary line, or its failure under `label`.
    pub fn line(&mut self, label: &str, outcome: Result<String>) {
        match outcome {
            Ok(line) => self.lines.push(line),
            Err(e) => self.fail(label, e),
        }
    }

    /// A table row named `name`, or its failure.
    pub fn row(&mut self, name: String, outcome: Result<Measured>) {
        match outcome {
            Ok(m) => self.rows.push(Row {
                name,
                round: self.round,
                rate: m.rate,
                cpu_per_10k: Some(m.cpu_per_10k),
                peak_rss_mib: Some(m.peak_rss_mib),
                broker_us: m.broker_us,
                target_us: m.target_us,
                steal_pct: m.steal_pct,
                beside: m.beside,
                costs: m.costs,
            }),
            Err(e) => self.fail(&name, e),
        }
    }

    fn fail(&mut self, label: &str, e: anyhow::Error) {
        println!("  FAILED: {e:#}");
        self.failures.push(format!("{label}: {e:#}"));
    }

    pub fn print(&self, s: &Settings) {
        println!("\n## Results\n");
        println!(
            "{}; broker, HTTP target, publisher and daemon all on this machine. {} msgs of {BODY_LEN} bytes per queue, prefetch {}; quorum queues.\n",
            machine(),
            s.messages,
            s.prefetch
        );
        if !self.rows.is_empty() {
            self.print_table();
            self.print_costs();
        }
        for line in &self.lines {
            println!("- {line}");
        }
        if !self.notes.is_empty() {
            println!("\nNotes:");
            for note in &self.notes {
                println!("- {note}");
            }
        }
        if !self.logged.is_empty() {
            println!(
                "\nDaemon warnings and errors (LOG_LEVEL=warn; full logs in {}):",
                s.log_dir.display()
            );
            for (key, (places, example)) in &self.logged {
                println!("- {key}: {}", places.join(", "));
                println!("  first: {example}");
            }
        }
        if !self.failures.is_empty() {
            println!("\nFailed scenarios:");
            for f in &self.failures {
                println!("- {f}");
            }
        }
    }

    /// One line per row name: medians over the rounds, and each round's ratio to its own
    /// ceiling, since on two shared cores the ceiling itself moves by a third between rounds.
    fn print_table(&self) {
        let rounds = self.ceilings.len().max(1);
        let names = self.row_names();
        let per_round = if rounds > 1 {
            " ratio in each round |"
        } else {
            ""
        };
        let any_beside = self.rows.iter().any(|r| r.beside.is_some());
        let (beside_head, beside_align) = if any_beside {
            (
                " ratio to the bare drain just before (each round) |",
                "---|",
            )
        } else {
            ("", "")
        };
        println!(
            "| scenario | msg/s | ratio to ceiling |{per_round}{beside_head} broker µs/msg | daemon (or receiver) µs/msg | target µs/msg | peak RSS MiB | CPU steal % |"
        );
        let align = if rounds > 1 { "---|" } else { "" };
        println!("|---|---:|---:|{align}{beside_align}---:|---:|---:|---:|---:|");
        let us = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1}"));
        for name in names {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.name == name).collect();
            let ratios: Vec<f64> = rows
                .iter()
                .filter_map(|r| self.ceilings.get(r.round).map(|c| r.rate / c))
                .collect();
            let pick =
                |f: fn(&Row) -> Option<f64>| median(rows.iter().filter_map(|r| f(r)).collect());
            let rate = pick(|r| Some(r.rate)).unwrap_or(f64::NAN);
            let ratio = median(ratios.clone()).map_or("—".into(), |r| format!("{r:.2}"));
            let each = if rounds > 1 {
                format!(" {} |", two_places(&ratios))
            } else {
                String::new()
            };
            let beside = if any_beside {
                let ratios: Vec<f64> = rows
                    .iter()
                    .filter_map(|r| r.beside.map(|b| r.rate / b))
                    .collect();
                let (each, several) = (two_places(&ratios), ratios.len() > 1);
                match median(ratios) {
                    Some(m) if several => format!(" {m:.2} ({each}) |"),
                    Some(m) => format!(" {m:.2} |"),
                    None => " — |".to_string(),
                }
            } else {
                String::new()
            };
            // CPU s per 10k messages is 100 µs per message per unit.
            let cpu = us(pick(|r| r.cpu_per_10k.map(|c| c * 100.0)));
            let rss = rows
                .iter()
                .filter_map(|r| r.peak_rss_mib)
                .reduce(f64::max)
                .map_or("—".into(), |r| format!("{r:.1}"));
            println!(
                "| {name} | {rate:.0} | {ratio} |{each}{beside} {} | {cpu} | {} | {rss} | {} |",
                us(pick(|r| r.broker_us)),
                us(pick(|r| r.target_us)),
                us(pick(|r| r.steal_pct))
            );
        }
        let medians = if rounds > 1 {
            format!(
                " {rounds} rounds, each the two bare receivers and then every row: msg/s and µs are medians over the rounds, the ratio is the median of each round's ratio to that round's ceiling, peak RSS the highest, CPU steal the median share of the machine's CPU time the hypervisor took during each drain."
            )
        } else {
            String::new()
        };
        let beside_note = if any_beside {
            " The ratio to the bare drain just before reads each hot-potato row against bare receivers draining as many queues (TCP_NODELAY, a connection each) right before it, so both see the machine at nearly the same moment."
        } else {
            ""
        };
        println!(
            "\nThe ceiling is the faster of the two single-queue bare receivers (recv + accept per message; they differ only in TCP_NODELAY); the many-queue bare row, when there, drains as many queues as the rows of several enrollments, a connection each; their CPU is the bench process's. hot-potato times run from `POST /enroll` to the target's Nth request, and each queue was then checked empty through the management API.{medians}{beside_note}\n"
        );
    }

    /// The rows' names, each once, in the order they first ran.
    fn row_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for row in &self.rows {
            if !names.contains(&row.name.as_str()) {
                names.push(&row.name);
            }
        }
        names
    }

    /// A second table, one line per row name (medians over the rounds): how much of each
    /// process's CPU the kernel took and how often its threads slept and woke per message.
    /// Both grow with every separate write on loopback, which is what bounds the rows that
    /// miss their targets (see the README).
    fn print_costs(&self) {
        let names = self.row_names();
        println!(
            "| scenario | broker kernel % | broker switches/msg | daemon (or receiver) kernel % | daemon (or receiver) switches/msg | target kernel % | target switches/msg |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let shown =
            |v: Option<f64>, places: usize| v.map_or("—".into(), |v| format!("{v:.places$}"));
        for name in names {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.name == name).collect();
            let mut cells = Vec::new();
            for process in [
                |c: &ProcessCosts| c.broker,
                |c: &ProcessCosts| c.daemon,
                |c: &ProcessCosts| c.target,
            ] {
                let costs: Vec<Costs> = rows.iter().filter_map(|r| process(&r.costs)).collect();
                let kernel = median(costs.iter().map(|c| c.kernel_pct).collect());
                let switches = median(costs.iter().filter_map(|c| c.switches_per_msg).collect());
                cells.push(shown(kernel, 0));
                cells.push(shown(switches, 2));
            }
            println!("| {name} | {} |", cells.join(" | "));
        }
        println!(
            "\nKernel % is stime / (utime + stime) of each process over the drain (/proc/PID/stat); switches/msg are its threads' voluntary and involuntary context switches (/proc/PID/task/*/status) per message. The target's and the bare receiver's figures are the bench process's. On loopback the sender's `write` also runs the receiver's TCP input and wakes it, so each separate POST, answer or frame costs both sides kernel time.\n"
        );
    }
}

/// Ratios as the table prints them, comma-separated.
fn two_places(ratios: &[f64]) -> String {
    let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    each.join(", ")
}

/// The middle value (the mean of the two middle ones for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}
