//! `cargo xtask fuzz`: every libFuzzer target of the agent's flannel parsers
//! (`node-agent/fuzz`), a fixed number of inputs each, with cargo-fuzz on the
//! nightly toolchain.
//!
//! Each target starts from its committed seeds (`node-agent/fuzz/seeds/<target>`,
//! flannel's real formats) plus what earlier runs on this machine found
//! (`node-agent/fuzz/target/corpus/<target>`, ignored by git), and fails on a
//! panic: a crash, an error text over its bound or a broken round trip. The
//! input that failed is left under `node-agent/fuzz/artifacts/<target>/`.

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, step};
use crate::system::workspace_root;

/// The fuzz crate, relative to the workspace root.
const FUZZ_DIR: &str = "node-agent/fuzz";
/// Its targets, one per parser (the names of its `[[bin]]`s).
pub const TARGETS: &[&str] = &["config", "lease_value", "lease_key", "subnet_file"];
/// Inputs per target of a full run (issue 10: at least ten million each).
pub const FULL_RUNS: u64 = 10_000_000;
/// Inputs per target of the short run `cargo xtask test` makes: a few seconds
/// per target, enough to catch a parser change that panics on easy input.
pub const SHORT_RUNS: u64 = 20_000;

#[derive(clap::Args)]
pub struct Args {
    /// Inputs per target.
    #[arg(long, default_value_t = FULL_RUNS)]
    pub runs: u64,
    /// Optimise the targets less (opt-level 1 instead of 3): a cold build
    /// takes about a third of the time (cargo-fuzz compiles every crate as
    /// one codegen unit) and the targets run a few times slower, the right
    /// trade for a short run. `cargo xtask test` uses it.
    #[arg(long)]
    pub quick_build: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let dir = workspace_root().join(FUZZ_DIR);
    require_cargo_fuzz()?;
    step("building the fuzz targets (nightly, cargo-fuzz, overflow checks on)");
    let started = Instant::now();
    let mut build = cargo_fuzz(&dir, args.quick_build);
    build.args(["build", "--debug-assertions"]);
    cmd::run(build)?;
    println!("fuzz build: {:.1} s", started.elapsed().as_secs_f64());

    let mut results = Vec::new();
    for target in TARGETS {
        step(&format!("fuzzing {target}: {} inputs", args.runs));
        let result = fuzz_target(&dir, target, args)?;
        println!(
            "{target}: {} inputs in {:.1} s, {:.0} inputs/s, corpus {} inputs",
            result.runs,
            result.seconds,
            result.runs as f64 / result.seconds.max(1e-9),
            result.corpus
        );
        results.push((target, result));
    }
    step("fuzzing: no target failed");
    for (target, r) in &results {
        println!(
            "  {target:<12} {:>10} inputs {:>8.1} s {:>9.0} inputs/s",
            r.runs,
            r.seconds,
            r.runs as f64 / r.seconds.max(1e-9)
        );
    }
    Ok(())
}

/// What one target's run did.
struct Outcome {
    /// Inputs libFuzzer executed.
    runs: u64,
    seconds: f64,
    /// Inputs in the corpus afterwards.
    corpus: usize,
}

fn fuzz_target(dir: &Path, target: &str, args: &Args) -> Result<Outcome> {
    let runs = args.runs;
    let seeds = dir.join("seeds").join(target);
    let seed_count = count_files(&seeds)?;
    if seed_count == 0 {
        bail!("{} has no seed inputs", seeds.display());
    }
    let corpus = dir.join("target").join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let logs = dir.join("target").join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    let mut fuzz = cargo_fuzz(dir, args.quick_build);
    // The first corpus directory is where libFuzzer adds what it finds, the
    // seeds are only read. One process: the machine is shared.
    fuzz.args(["run", "--debug-assertions", target])
        .arg(&corpus)
        .arg(&seeds)
        .args(["--", &format!("-runs={runs}"), "-print_final_stats=1"])
        .stdout(Stdio::from(
            log.try_clone().context("duplicating the log file")?,
        ))
        .stderr(Stdio::from(log));
    println!(
        "+ {} > {}",
        crate::system::describe(&fuzz),
        log_path.display()
    );
    let started = Instant::now();
    let status = fuzz
        .status()
        .with_context(|| format!("starting cargo fuzz for {target}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let output =
        fs::read_to_string(&log_path).with_context(|| format!("reading {}", log_path.display()))?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}); the failing input is under {}; end of {}:\n{}",
            dir.join("artifacts").join(target).display(),
            log_path.display(),
            tail(&output, 40)
        );
    }
    // libFuzzer's own count, so that a run cut short cannot pass as a full one.
    let executed = output
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .with_context(|| {
            format!(
                "no executed-units count in {}:\n{}",
                log_path.display(),
                tail(&output, 20)
            )
        })?;
    if executed < runs {
        bail!(
            "fuzz target {target} ran {executed} inputs, not {runs}; end of {}:\n{}",
            log_path.display(),
            tail(&output, 20)
        );
    }
    Ok(Outcome {
        runs: executed,
        seconds,
        corpus: count_files(&corpus)?,
    })
}

/// `cargo fuzz` on the nightly toolchain (libFuzzer's instrumentation needs
/// it), run in the fuzz crate. `cargo fuzz run` builds too, so it must be
/// given the same `quick_build` as the build, or it would build again.
fn cargo_fuzz(dir: &Path, quick_build: bool) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(dir);
    // `cargo xtask` runs under stable cargo, which exports itself here; the
    // fuzz build must find nightly's cargo and rustc instead.
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "CARGO_TARGET_DIR",
        "CARGO_PROFILE_RELEASE_OPT_LEVEL",
    ] {
        cmd.env_remove(var);
    }
    if quick_build {
        cmd.env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1");
    }
    cmd
}

/// cargo-fuzz and the nightly toolchain must be there: a missing tool is a
/// failure that says how to get it, never a skipped run.
fn require_cargo_fuzz() -> Result<()> {
    let (ok, version) = cmd::probe("rustup", &["run", "nightly", "cargo", "fuzz", "--version"]);
    if !ok {
        bail!(
            "cargo-fuzz or the nightly toolchain is missing (`rustup run nightly cargo fuzz --version` failed); `cargo xtask setup` installs both"
        );
    }
    println!("{}", version.trim());
    Ok(())
}

fn count_files(dir: &Path) -> Result<usize> {
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut count = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            count += 1;
        }
    }
    Ok(count)
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
