//! `cargo xtask build`: the release node-agent, BPF object embedded, and the CNI plugin
//! `weft-cni` (a second binary of the node-agent package, so the same build makes it).

use anyhow::Result;

use crate::cmd::{self, cargo, step};

/// `build` has no options.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: &Args) -> Result<()> {
    step(
        "building node-agent and weft-cni (release; node-agent's build script builds the BPF programs)",
    );
    let mut build = cargo();
    build.args(["build", "--release", "-p", "node-agent"]);
    cmd::run(build)
}
