//! `cargo xtask test`: set-up, build, then every tier of tests, and a short
//! run of the fuzz targets.

use anyhow::{Context, Result, bail};

use crate::cmd::{self, cargo, step};
use crate::system::require_root;
use crate::{build, fuzz, setup};

/// The crate holding the BPF programs and their host-testable logic.
const BPF_CRATE: &str = "ebpf-prog";

/// `test` has no options.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: &Args) -> Result<()> {
    require_root().context("`cargo xtask test` runs the end-to-end tests")?;
    setup::run(&setup::Args {})?;
    build::run(&build::Args {})?;
    check_bpf_crate_is_tested()?;
    step(&format!(
        "unit tests of every workspace crate (including {BPF_CRATE}'s host library)"
    ));
    let mut unit = cargo();
    // All features: xtask's `fixtures` code (demo, bench) is tested too,
    // not only its default light build.
    unit.args([
        "test",
        "--workspace",
        "--release",
        "--all-features",
        "--exclude",
        "weft-tests",
    ]);
    cmd::run(unit)?;
    step(&format!(
        "fuzz targets of the flannel parsers, short run ({} inputs each; `cargo xtask fuzz` runs {})",
        fuzz::SHORT_RUNS,
        fuzz::FULL_RUNS
    ));
    fuzz::run(&fuzz::Args {
        runs: fuzz::SHORT_RUNS,
        quick_build: true,
    })?;
    step(
        "weft-tests: fixture unit tests, BPF_PROG_TEST_RUN, end-to-end, flannel parity (environment, interface choice, doctor), migration from flannel and CNI plugin (podman) tests, one at a time",
    );
    let mut e2e = cargo();
    e2e.args([
        "test",
        "--release",
        "-p",
        "weft-tests",
        "--",
        "--test-threads=1",
    ]);
    cmd::run(e2e)?;
    step("all tests passed");
    Ok(())
}

/// The BPF crate's host-testable library must be a workspace member, or
/// `cargo test --workspace` would silently leave its unit tests out.
fn check_bpf_crate_is_tested() -> Result<()> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let has_lib = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == BPF_CRATE)
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .flat_map(|t| t["kind"].as_array().into_iter().flatten())
        .any(|k| k == "lib");
    if !has_lib {
        bail!(
            "{BPF_CRATE} is not a workspace member with a library target: its host unit tests would not run"
        );
    }
    Ok(())
}
