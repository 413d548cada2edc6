//! How `demo` and `bench` run from xtask's default build: they need the
//! shared fixtures (weft-tests), which need the BPF toolchain and protoc,
//! so the default build does not have them. It sets up and builds (so a
//! fresh machine gets that toolchain), then rebuilds xtask with the
//! `fixtures` feature and runs the same command line there.

use anyhow::Result;

use crate::cmd::{self, cargo, step};
use crate::{build, setup};

/// Hands the current command line over to the `fixtures` build. With
/// `prepare`, runs `setup` and `build` here first. `skip_build_given`:
/// whether the command line already says `--skip-build`; the feature build
/// is always told so, as what it needs is built by then.
pub fn run(prepare: bool, skip_build_given: bool) -> Result<()> {
    if prepare {
        setup::run(&setup::Args {})?;
        build::run(&build::Args {})?;
    }
    step("building xtask with the `fixtures` feature and handing over");
    let mut feature_build = cargo();
    feature_build.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--features",
        "fixtures",
        "--",
    ]);
    feature_build.args(std::env::args_os().skip(1));
    if !skip_build_given {
        feature_build.arg("--skip-build");
    }
    cmd::run(feature_build)
}
