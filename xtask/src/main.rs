//! `cargo xtask <setup|build|test|fuzz|demo|bench|chaos>`: the project's task runner.
//!
//! One module per task, each owning its options (`Args`) and its `run`.
//! The default build compiles with stable Rust and nothing installed, so
//! that `setup` can run on a fresh machine; `demo`, `bench` and `chaos` need the
//! shared fixtures (weft-tests) and so the `fixtures` feature, which they
//! rebuild xtask with and hand over to (see `handover`).

mod bench;
mod build;
mod chaos;
mod cmd;
mod demo;
mod fuzz;
#[cfg(not(feature = "fixtures"))]
mod handover;
mod setup;
// The machine checks weft-tests uses, compiled from the same file: this
// build cannot depend on weft-tests (see system.rs).
#[path = "../../tests/src/system.rs"]
#[cfg_attr(
    not(feature = "fixtures"),
    expect(dead_code, reason = "only the bench checks for tools")
)]
mod system;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "weft development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install system packages, rust-src for nightly and bpf-linker
    /// (skips whatever is already present).
    Setup(setup::Args),
    /// Build node-agent (and through its build script the BPF programs).
    Build(build::Args),
    /// Setup, build, then every unit and end-to-end test and a short fuzz
    /// run (needs root).
    Test(test::Args),
    /// Run every fuzz target of the agent's flannel parsers (cargo-fuzz,
    /// nightly) for `--runs` inputs each; fails if any target fails.
    Fuzz(fuzz::Args),
    /// Setup, build, then a two-node cluster with a ping and a TCP
    /// transfer between containers, narrated (needs root).
    Demo(demo::Args),
    /// Benchmark weft against plain routing and the kernel vxlan device on
    /// one topology (needs root and `cargo xtask build` first); writes
    /// BENCHMARKS.md, docs/bench-modes.svg and bench-results/*.json.
    Bench(bench::Args),
    /// The control plane's faults, timed, with the packets a 1 kpps stream
    /// loses through each (needs root); writes bench-results/*-chaos.json
    /// and the "Control-plane faults" section of BENCHMARKS.md.
    Chaos(chaos::Args),
    /// The bench's traffic tools, run inside namespaces by `bench`.
    #[cfg(feature = "fixtures")]
    #[command(flatten)]
    Tool(bench::tools::Tool),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup(args) => setup::run(&args),
        Task::Build(args) => build::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Chaos(args) => chaos::run(&args),
        #[cfg(feature = "fixtures")]
        Task::Tool(tool) => tool.run(),
    }
}
