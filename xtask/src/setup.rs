//! `cargo xtask setup`: installs what building and testing need, skipping
//! whatever is already present (idempotent).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::cmd::{self, cargo, probe, step};
use crate::system::{BPFFS, require_bpffs, require_root};

/// Debian packages the build, the tests and the demo need.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "protobuf-compiler",
    "etcd-server",
    "etcd-client",
    "bpftool",
    "iproute2",
    "tcpdump",
    "tshark",
    "iperf3",
    "iputils-ping",
    "ethtool",
    "python3",
    // The CNI plugin's tests: a real runtime (podman with its CNI backend, which needs
    // iptables for the bridge plugin's ipMasq), the plugins weft-cni delegates to, and the
    // busybox the test containers are built from (nothing can be pulled).
    "podman",
    // podman's default runtime, crun, refuses this kind of machine's hybrid cgroup layout.
    "runc",
    "containernetworking-plugins",
    "iptables",
    "busybox-static",
    // Docker's recipe (dockerd per simulated host) and `nft` to inspect and
    // disturb weft's firewall rules in the tests.
    "docker.io",
    "nftables",
    // The etcd TLS tests make their CA and certificates with it.
    "openssl",
    // The metrics test scrapes the agents with a real Prometheus and checks
    // their exposition with its promtool (both in this package).
    "prometheus",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask fuzz` and the short fuzz run of `cargo xtask test`; this
/// version builds with stable Rust 1.95 from its lock file.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// `setup` has no options.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: &Args) -> Result<()> {
    packages()?;
    bpffs()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    step("setup complete");
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let (ok, out) = probe("dpkg-query", &["-W", "-f=${Status}", p]);
            !(ok && out.trim() == "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        step("system packages: all present");
        return Ok(());
    }
    step(&format!(
        "system packages: installing {}",
        missing.join(" ")
    ));
    require_root().context("installing system packages")?;
    let mut update = Command::new("apt-get");
    update
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run(install)
}

/// The agent pins its maps and links on bpffs; some containers and minimal
/// systems do not mount it.
fn bpffs() -> Result<()> {
    if require_bpffs().is_ok() {
        step(&format!("bpffs: mounted at {BPFFS}"));
        return Ok(());
    }
    step(&format!("bpffs: mounting at {BPFFS}"));
    require_root().context("mounting bpffs")?;
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    cmd::run(mount)
}

fn rust_src() -> Result<()> {
    let (_, installed) = probe(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    );
    if installed.lines().any(|l| l.trim() == "rust-src") {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: installing (needed for -Z build-std=core)");
    let mut add = Command::new("rustup");
    add.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    cmd::run(add)
}

fn bpf_linker() -> Result<()> {
    let (_, version) = probe("bpf-linker", &["--version"]);
    if version.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: installing against LLVM 22 (found: {:?})",
        version.trim()
    ));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![PathBuf::from(LLVM_PREFIX).join("bin")];
    paths.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(paths).context("building PATH")?;
    let install = |locked: bool| {
        let mut install = cargo();
        install.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            install.arg("--locked");
        }
        install
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("PATH", &path);
        cmd::run(install)
    };
    // The locked dependency set is the tested one; fall back to fresh
    // resolution only if it does not build here.
    install(true).or_else(|e| {
        println!("--locked install failed ({e:#}); retrying without --locked");
        install(false)
    })
}

fn cargo_fuzz() -> Result<()> {
    let (_, version) = probe("cargo", &["fuzz", "--version"]);
    // It prints "cargo-fuzz 0.13.2".
    if version.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}: present"));
        return Ok(());
    }
    step(&format!(
        "cargo-fuzz {CARGO_FUZZ_VERSION}: installing (found: {:?})",
        version.trim()
    ));
    let mut install = cargo();
    install.args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    cmd::run(install)
}
