//! `cargo xtask build`: the release node-agent, BPF object embedded.

use anyhow::Result;

use crate::cmd::{self, cargo, step};

/// `build` has no options.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: &Args) -> Result<()> {
    step("building node-agent (release; its build script builds the BPF programs)");
    let mut build = cargo();
    build.args(["build", "--release", "-p", "node-agent"]);
    cmd::run(build)
}
