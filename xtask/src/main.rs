//! `cargo xtask <setup|build|test|demo|bench>`: the project's task runner.

#[cfg(feature = "bench")]
mod bench;

#[cfg(feature = "bench")]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use weft_tests::{Cluster, Host, require_root, workspace_root};

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
];
/// The crate holding the BPF programs and their host-testable logic.
const BPF_CRATE: &str = "ebpf-prog";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The demo's network config for `--backend`.
fn demo_config(backend: DemoBackend) -> &'static str {
    match backend {
        DemoBackend::Vxlan => {
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#
        }
        DemoBackend::Ipip => {
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"ipip"}}"#
        }
        DemoBackend::HostGw => {
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum DemoBackend {
    Vxlan,
    Ipip,
    HostGw,
}
const DEMO_TRANSFER_BYTES: u64 = 20 * 1024 * 1024;

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
    Setup,
    /// Build node-agent (and through its build script the BPF programs).
    Build,
    /// Setup, build, then every unit and end-to-end test (needs root).
    Test,
    /// Setup, build, then a two-node cluster with a ping and a TCP
    /// transfer between containers, narrated (needs root).
    Demo {
        /// Use the node-agent already built (or $WEFT_NODE_AGENT) instead of
        /// running setup and build first; for iterating on the demo.
        #[arg(long)]
        skip_build: bool,
        /// The flannel backend the demo cluster uses.
        #[arg(long, value_enum, default_value_t = DemoBackend::Vxlan)]
        backend: DemoBackend,
    },
    /// Benchmark weft against plain routing and the kernel vxlan device on
    /// one topology (needs root and `cargo xtask build` first); writes
    /// BENCHMARKS.md, docs/bench-modes.svg and bench-results/*.json.
    Bench {
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
    },
    /// The bench's UDP generator (run inside a namespace by `bench`).
    #[command(hide = true)]
    #[cfg(feature = "bench")]
    Udpgen {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// The bench's UDP sink.
    #[command(hide = true)]
    #[cfg(feature = "bench")]
    Udpsink {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        max_secs: f64,
        #[arg(long, default_value_t = 500)]
        idle_ms: u64,
    },
    /// The bench's TCP request/response server.
    #[command(hide = true)]
    #[cfg(feature = "bench")]
    RrServer {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        max_secs: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// The bench's TCP request/response client.
    #[command(hide = true)]
    #[cfg(feature = "bench")]
    RrClient {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        cpu: Option<usize>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => build(),
        Task::Test => test(),
        Task::Demo {
            skip_build,
            backend,
        } => demo(skip_build, backend),
        Task::Bench {
            quick,
            skip_build,
            report_from,
        } => bench_entry(quick, skip_build, report_from),
        #[cfg(feature = "bench")]
        Task::Udpgen {
            dst,
            secs,
            threads,
            size,
        } => bench::tools::udpgen(dst, secs, threads, size),
        #[cfg(feature = "bench")]
        Task::Udpsink {
            bind,
            max_secs,
            idle_ms,
        } => bench::tools::udpsink(bind, max_secs, idle_ms),
        #[cfg(feature = "bench")]
        Task::RrServer {
            bind,
            max_secs,
            cpu,
        } => {
            bench::tools::pin_cpu(cpu)?;
            bench::tools::rr_server(bind, max_secs)
        }
        #[cfg(feature = "bench")]
        Task::RrClient { dst, secs, cpu } => {
            bench::tools::pin_cpu(cpu)?;
            bench::tools::rr_client(dst, secs)
        }
    }
}

#[cfg(feature = "bench")]
fn bench_entry(quick: bool, skip_build: bool, report_from: Option<PathBuf>) -> Result<()> {
    if let Some(json) = report_from {
        return bench::rerender(&json);
    }
    if !skip_build {
        build()?;
    }
    bench::run(quick)
}

/// Without the `bench` feature (the default: see xtask/Cargo.toml), set up
/// and build, then rebuild xtask with the feature and run the bench there.
#[cfg(not(feature = "bench"))]
fn bench_entry(quick: bool, skip_build: bool, report_from: Option<PathBuf>) -> Result<()> {
    if !skip_build && report_from.is_none() {
        setup()?;
        build()?;
    }
    step("building xtask with the `bench` feature and handing over");
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "xtask",
        "--features",
        "bench",
        "--",
        "bench",
        "--skip-build",
    ]);
    if quick {
        cmd.arg("--quick");
    }
    if let Some(json) = report_from {
        cmd.arg("--report-from").arg(json);
    }
    run(cmd)
}

fn step(msg: &str) {
    println!("==> {msg}");
}

/// The cargo that runs us, so nested builds use the same toolchain.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
fn run(mut cmd: Command) -> Result<()> {
    let desc = weft_tests::process::describe(&cmd);
    println!("+ {desc}");
    let status = cmd.status().with_context(|| format!("starting `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns whether it succeeded and its stdout;
/// a command that cannot start counts as failed (tool not installed).
fn probe(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}

fn setup() -> Result<()> {
    setup_packages()?;
    setup_bpffs()?;
    setup_rust_src()?;
    setup_bpf_linker()?;
    step("setup complete");
    Ok(())
}

fn setup_packages() -> Result<()> {
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
    run(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run(install)
}

/// The agent pins its maps and links on bpffs; some containers and minimal
/// systems do not mount it.
fn setup_bpffs() -> Result<()> {
    if weft_tests::require_bpffs().is_ok() {
        step(&format!("bpffs: mounted at {}", weft_tests::BPFFS));
        return Ok(());
    }
    step(&format!("bpffs: mounting at {}", weft_tests::BPFFS));
    require_root().context("mounting bpffs")?;
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", weft_tests::BPFFS]);
    run(mount)
}

fn setup_rust_src() -> Result<()> {
    let (_, installed) = probe(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    );
    if installed.lines().any(|l| l.trim() == "rust-src") {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: installing (needed for -Z build-std=core)");
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    run(cmd)
}

fn setup_bpf_linker() -> Result<()> {
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
        let mut cmd = cargo();
        cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("PATH", &path);
        run(cmd)
    };
    // The locked dependency set is the tested one; fall back to fresh
    // resolution only if it does not build here.
    install(true).or_else(|e| {
        println!("--locked install failed ({e:#}); retrying without --locked");
        install(false)
    })
}

fn build() -> Result<()> {
    step("building node-agent (release; its build script builds the BPF programs)");
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "node-agent"]);
    run(cmd)
}

fn test() -> Result<()> {
    require_root().context("`cargo xtask test` runs the end-to-end tests")?;
    setup()?;
    build()?;
    check_bpf_crate_is_tested()?;
    step(&format!(
        "unit tests of every workspace crate (including {BPF_CRATE}'s host library)"
    ));
    let mut unit = cargo();
    // All features: the bench's code is tested too, not only the default
    // light build of xtask.
    unit.args([
        "test",
        "--workspace",
        "--release",
        "--all-features",
        "--exclude",
        "weft-tests",
    ]);
    run(unit)?;
    step("weft-tests: fixture unit tests, BPF_PROG_TEST_RUN and end-to-end tests, one at a time");
    let mut e2e = cargo();
    e2e.args([
        "test",
        "--release",
        "-p",
        "weft-tests",
        "--features",
        "bpf",
        "--",
        "--test-threads=1",
    ]);
    run(e2e)?;
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

fn demo(skip_build: bool, backend: DemoBackend) -> Result<()> {
    require_root().context("the demo creates network namespaces and loads BPF")?;
    if !skip_build {
        setup()?;
        build()?;
    }
    weft_tests::require_bpffs()?;
    let agent = weft_tests::node_agent_binary()?;
    step(&format!("agent binary: {}", agent.display()));

    step("creating the underlay switch (bridge 198.18.0.254/24) and starting etcd on it");
    let cluster = Cluster::new(demo_config(backend))?;
    // The demo narrates; agent logs would only drown that out.
    cluster.set_dump_logs_on_drop(false);
    println!("    etcd endpoint: {}", cluster.etcd().endpoint());
    println!(
        "    {}/config = {}",
        weft_tests::ETCD_PREFIX,
        cluster.config()
    );

    let mut hosts: Vec<Host<'_>> = Vec::new();
    for index in [1, 2] {
        let host = cluster.add_host(index)?;
        step(&format!(
            "host {index}: namespace {}, eth0 {}; starting node-agent (pins under {})",
            host.ns().name(),
            host.ip(),
            host.pin_path().display()
        ));
        host.start_agent(&[])?;
        hosts.push(host);
    }
    for host in &hosts {
        host.wait_subnet_env(Duration::from_secs(30))?;
        let text = std::fs::read_to_string(host.subnet_file())
            .with_context(|| format!("reading {}", host.subnet_file().display()))?;
        step(&format!(
            "host {}: subnet file {}",
            host.index(),
            host.subnet_file().display()
        ));
        for line in text.lines() {
            println!("    {line}");
        }
    }
    step("leases in etcd");
    for (key, value) in cluster
        .etcd()
        .get_prefix(&format!("{}/subnets/", weft_tests::ETCD_PREFIX))?
    {
        println!("    {key} = {value}");
    }

    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    step(&format!(
        "containers: A {} in {} on host 1, B {} in {} on host 2",
        a.ip(),
        a.ns().name(),
        b.ip(),
        b.ns().name()
    ));

    for host in &hosts {
        step(&format!(
            "host {}: SUBNETS map (bpftool map dump pinned {}/SUBNETS)",
            host.index(),
            host.pin_path().display()
        ));
        // The peer's entry appears once its agent has seen the lease.
        weft_tests::wait_until(
            Duration::from_secs(30),
            "a remote subnet in SUBNETS",
            |last| {
                let entries = host.map_dump_subnets()?;
                if entries.iter().any(|(_, ip)| *ip != host.ip()) {
                    Ok(Some(()))
                } else {
                    *last = format!("{entries:?}");
                    Ok(None)
                }
            },
        )?;
        for (subnet, public_ip) in host.map_dump_subnets()? {
            println!("    {subnet} -> node {public_ip}");
        }
    }

    step(&format!("ping A -> B ({})", b.ip()));
    a.ping_until(b.ip(), Duration::from_secs(30))?;
    let out = a.ping(b.ip(), 4, 56, false)?;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        println!("    {line}");
    }
    let full = a.subnet_env().mtu - 28;
    step(&format!(
        "full-MTU ping A -> B, {full} bytes, don't fragment"
    ));
    a.ping(b.ip(), 2, full, true)?;
    println!("    ok");

    step(&format!(
        "TCP transfer A -> B, {} MiB",
        DEMO_TRANSFER_BYTES / (1024 * 1024)
    ));
    let stats = a.tcp_transfer_to(&b, DEMO_TRANSFER_BYTES)?;
    let secs = stats.elapsed.as_secs_f64();
    // Display only: f64 is exact up to 2^53 bytes.
    let mbit = stats.bytes as f64 * 8.0 / secs.max(1e-9) / 1e6;
    println!(
        "    {} bytes received intact in {secs:.3} s ({mbit:.0} Mbit/s)",
        stats.bytes
    );

    for host in &hosts {
        step(&format!(
            "host {}: node-agent status --pin-path {}",
            host.index(),
            host.pin_path().display()
        ));
        let mut status = Command::new(&agent);
        status.arg("status").arg("--pin-path").arg(host.pin_path());
        run(status)?;
    }

    step("cleaning up (containers, agents and their pins, hosts, switch, etcd)");
    drop(a);
    drop(b);
    drop(hosts);
    drop(cluster);
    step("demo finished");
    Ok(())
}
