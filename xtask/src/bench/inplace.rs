//! The in-place cost of the BPF programs: what each attached program costs
//! on the real path, from the kernel's own run statistics
//! (`kernel.bpf_stats_enabled`: `run_time_ns` and `run_cnt` per program),
//! while one TCP stream crosses each weft mode. A pass of its own, because
//! the statistics add two clock reads to every program run.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use node_agent::pinned::{self, ProgramRunStats};
use serde_json::{Value, json};

use super::suite::{ModeEnv, Plan};
use super::traffic;

/// One program on one host of one mode, over one TCP run.
#[derive(Clone, Debug, PartialEq)]
pub struct InPlaceCost {
    pub mode: String,
    /// "sender" (container A's host) or "receiver".
    pub host: String,
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
    /// MB (10^6 bytes) of TCP payload the receiver counted in the run.
    pub mb_carried: f64,
}

impl InPlaceCost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.run_time_ns as f64 / self.runs as f64)
    }

    pub fn ns_per_mb(&self) -> Option<f64> {
        (self.mb_carried > 0.0).then(|| self.run_time_ns as f64 / self.mb_carried)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "mode": self.mode, "host": self.host, "program": self.program,
            "runs": self.runs, "run_time_ns": self.run_time_ns, "mb_carried": self.mb_carried,
        })
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            mode: v["mode"].as_str()?.to_owned(),
            host: v["host"].as_str()?.to_owned(),
            program: v["program"].as_str()?.to_owned(),
            runs: v["runs"].as_u64()?,
            run_time_ns: v["run_time_ns"].as_u64()?,
            mb_carried: v["mb_carried"].as_f64()?,
        })
    }
}

/// Runs one TCP stream per weft mode with the statistics on, and returns
/// each attached program's share. Modes whose hosts pin nothing (the
/// kernel baselines) have no rows.
pub fn run(envs: &[ModeEnv<'_>], plan: &Plan) -> Result<Vec<InPlaceCost>> {
    let _stats = pinned::enable_run_stats()?;
    let mut rows = Vec::new();
    for env in envs.iter().filter(|e| e.spec.key.starts_with("weft")) {
        let hosts = [("sender", env.a.host()), ("receiver", env.b.host())];
        let snapshot = || -> Result<Vec<Vec<ProgramRunStats>>> {
            hosts
                .iter()
                .map(|(_, h)| {
                    pinned::program_run_stats(h.pin_path())
                        .with_context(|| format!("run statistics of host {}", h.index()))
                })
                .collect()
        };
        let before = snapshot()?;
        let gbps = traffic::tcp_gbps(env.a.ns(), env.b.ip(), 1, plan.tcp_secs)
            .with_context(|| format!("TCP through {}", env.spec.key))?;
        let after = snapshot()?;
        let mb_carried = gbps * 1e9 / 8.0 * f64::from(plan.tcp_secs) / 1e6;
        for (((host, _), b), a) in hosts.iter().zip(&before).zip(&after) {
            for end in a {
                // A program swapped mid-run (a restart) has a new ID and
                // no "before": its counts start at 0.
                let start = b.iter().find(|s| s.id == end.id);
                rows.push(InPlaceCost {
                    mode: env.spec.key.to_owned(),
                    host: (*host).to_owned(),
                    program: end.name.to_owned(),
                    runs: end
                        .run_count
                        .saturating_sub(start.map_or(0, |s| s.run_count)),
                    run_time_ns: end
                        .run_time_ns
                        .saturating_sub(start.map_or(0, |s| s.run_time_ns)),
                    mb_carried,
                });
            }
        }
    }
    Ok(rows)
}

/// The report's section.
pub fn table(out: &mut String, rows: &[InPlaceCost], tcp_secs: u32) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## In-place cost of the BPF programs (realistic wire)\n\nA separate pass after the interleaved rounds: with the kernel's BPF run statistics on (`BPF_ENABLE_STATS`, the switch behind `sysctl kernel.bpf_stats_enabled=1`), one TCP stream crosses each weft mode for {tcp_secs} s, and each attached program's `run_time_ns` and `run_cnt` (`bpftool prog show` prints both) are read before and after through its pinned link. Per run is the program's own time per invocation; per MB is its total time divided by the MB of TCP payload carried, so it shows what the program adds to moving data, ACKs in the other direction included. Programs that ran but decided nothing (a decap program passing an ACK that is no tunnel packet) count too: that is their cost in place. The statistics themselves add two clock reads per run, so the throughput of this pass is not comparable with the tables above.\n\n| mode | host | program | runs | ns per run | µs per MB carried |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | `{}` | {} | {} | {} |",
            r.mode,
            r.host,
            r.program,
            r.runs,
            r.ns_per_run().map_or("–".into(), |v| format!("{v:.0}")),
            r.ns_per_mb()
                .map_or("–".into(), |v| format!("{:.1}", v / 1e3)),
        );
    }
    out.push('\n');
}
