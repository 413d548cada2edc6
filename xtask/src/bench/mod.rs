//! `cargo xtask bench [--quick]`: weft against what a user would pick
//! instead, on one topology (two hosts in namespaces on a veth underlay, a
//! container behind a bridge on each), in one run, modes interleaved per
//! round. Writes `BENCHMARKS.md`, `docs/bench-modes.svg` and
//! `bench-results/<date>-<kind>.json` (a quick run writes its Markdown and
//! chart under `target/bench-quick/` so it never replaces a full run's).
//!
//! It runs on the shared fixtures, so only in xtask's `fixtures` build; the
//! default build hands over to it.

#[cfg(feature = "fixtures")]
mod converge;
#[cfg(feature = "fixtures")]
pub mod inplace;
#[cfg(feature = "fixtures")]
pub mod report;
#[cfg(feature = "fixtures")]
pub mod scale;
#[cfg(feature = "fixtures")]
pub mod suite;
#[cfg(feature = "fixtures")]
pub mod tools;
#[cfg(feature = "fixtures")]
mod traffic;

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// A short run (under 3 minutes) for development; its report goes
    /// to target/bench-quick/ instead of BENCHMARKS.md.
    #[arg(long)]
    quick: bool,
    /// Use the node-agent already built (or $WEFT_NODE_AGENT) instead of
    /// running `build` first.
    #[arg(long)]
    skip_build: bool,
    /// Only render BENCHMARKS.md and the chart again from a run's JSON
    /// (bench-results/<run>.json); measures nothing.
    #[arg(long, value_name = "JSON")]
    report_from: Option<PathBuf>,
}

#[cfg(feature = "fixtures")]
pub fn run(args: &Args) -> Result<()> {
    if let Some(json) = &args.report_from {
        return report::rerender(json);
    }
    if !args.skip_build {
        crate::build::run(&crate::build::Args {})?;
    }
    suite::run(args.quick)
}

/// Without the fixtures in this build: set up and build (unless only
/// re-rendering a report), then hand over.
#[cfg(not(feature = "fixtures"))]
pub fn run(args: &Args) -> Result<()> {
    let prepare = !args.skip_build && args.report_from.is_none();
    crate::handover::run(prepare, args.skip_build)
}
