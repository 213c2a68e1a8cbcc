//! What the scenarios measured, and the results table and lists printed at the end.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::load::BODY_LEN;
use crate::process::Daemon;
use crate::procstat::machine;
use crate::settings::Settings;

/// One line of the results table.
pub struct Row {
    pub name: String,
    pub rate: f64,
    /// Daemon (or, for the ceiling, receiver) CPU seconds per 10,000 messages.
    pub cpu_per_10k: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// The broker's CPU µs per message over the same run (from its /proc entry).
    pub broker_us: Option<f64>,
    /// The HTTP target's CPU µs per message (the bench process while the daemon drains).
    pub target_us: Option<f64>,
}

/// What one daemon scenario measured.
pub struct Measured {
    pub rate: f64,
    pub cpu_per_10k: f64,
    pub peak_rss_mib: f64,
    pub broker_us: Option<f64>,
    pub target_us: Option<f64>,
}

#[derive(Default)]
pub struct Report {
    /// The faster bare receiver's rate, which the table's ratios are read against.
    pub ceiling: Option<f64>,
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
                rate: m.rate,
                cpu_per_10k: Some(m.cpu_per_10k),
                peak_rss_mib: Some(m.peak_rss_mib),
                broker_us: m.broker_us,
                target_us: m.target_us,
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
            println!(
                "| scenario | msg/s | ratio to ceiling | broker µs/msg | daemon (or receiver) µs/msg | target µs/msg | peak RSS MiB |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|");
            let us = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1}"));
            for row in &self.rows {
                let ratio = self
                    .ceiling
                    .map_or("—".into(), |c| format!("{:.2}", row.rate / c));
                // CPU s per 10k messages is 100 µs per message per unit.
                let cpu = us(row.cpu_per_10k.map(|c| c * 100.0));
                let rss = row.peak_rss_mib.map_or("—".into(), |r| format!("{r:.1}"));
                println!(
                    "| {} | {:.0} | {ratio} | {} | {cpu} | {} | {rss} |",
                    row.name,
                    row.rate,
                    us(row.broker_us),
                    us(row.target_us)
                );
            }
            println!(
                "\nThe ceiling is the faster of the two bare receivers (recv + accept per message; they differ only in TCP_NODELAY); their CPU is the bench process's. hot-potato times run from `POST /enroll` to the target's Nth request, and each queue was then checked empty through the management API.\n"
            );
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
}
