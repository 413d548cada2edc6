//! The benchmark run itself: the modes, their topologies on the shared
//! fixtures, the interleaved rounds, and the results handed to `report`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use weft_tests::process::Background;
use weft_tests::{
    Cluster, Container, Host, SubnetEnvExt, baseline, node_agent_binary, switch_port,
};

use super::{converge, inplace, report, scale, traffic};
use crate::system::{require_bpffs, require_root, require_tools};

/// Durations and sizes of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub tcp_secs: u32,
    pub pps_secs: f64,
    pub rr_secs: f64,
    /// Rounds of the scale throughput comparison.
    pub scale_rounds: usize,
    /// Rounds of the default-veth variant (TCP and pps only).
    pub default_rounds: usize,
    pub scale_sizes: Vec<usize>,
    pub joins: usize,
    pub test_run_samples: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                rounds: 3,
                tcp_secs: 1,
                pps_secs: 1.0,
                rr_secs: 0.5,
                scale_rounds: 1,
                default_rounds: 1,
                scale_sizes: vec![10, 1_000],
                joins: 20,
                test_run_samples: 300,
            }
        } else {
            Self {
                quick,
                rounds: 5,
                tcp_secs: 5,
                pps_secs: 4.0,
                rr_secs: 3.0,
                scale_rounds: 3,
                default_rounds: 3,
                scale_sizes: vec![10, 1_000, 10_000, 100_000],
                joins: 100,
                test_run_samples: 3000,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Plain,
    KernelVxlan,
    Weft(&'static str),
}

#[derive(Clone, Copy, Debug)]
pub struct ModeSpec {
    pub key: &'static str,
    pub label: &'static str,
    pub kind: Kind,
    /// Extra `node-agent run` flags (weft modes).
    pub args: &'static [&'static str],
}

/// Config of the kernel baselines' etcd (nothing reads it: no agent runs).
const BASELINE_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#;

pub const MODES: &[ModeSpec] = &[
    ModeSpec {
        key: "plain",
        label: "plain routing (kernel, host-gw)",
        kind: Kind::Plain,
        args: &[],
    },
    ModeSpec {
        key: "kernel-vxlan",
        label: "kernel vxlan (flanneld's flannel.1)",
        kind: Kind::KernelVxlan,
        args: &[],
    },
    ModeSpec {
        key: "weft-vxlan",
        label: "weft vxlan",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#),
        args: &[],
    },
    ModeSpec {
        key: "weft-vxlan-bpf-host",
        label: "weft vxlan, --host-routing bpf",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#),
        // Decapsulated packets go straight to the bridge, past the host's
        // IP forwarding and netfilter (an option, not the default).
        args: &["--host-routing", "bpf"],
    },
    ModeSpec {
        key: "weft-vxlan-xdp",
        label: "weft vxlan, --decap-mode xdp",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#),
        // What auto chooses on a NIC with native XDP; on these veths it
        // carries veth-only costs (see the report).
        args: &["--decap-mode", "xdp"],
    },
    ModeSpec {
        key: "weft-vxlan-tc",
        label: "weft vxlan, --decap-mode tc",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#),
        // Decapsulation at TC ingress, where a driver lacks XDP.
        args: &["--decap-mode", "tc"],
    },
    ModeSpec {
        key: "weft-host-gw",
        label: "weft host-gw",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#),
        args: &[],
    },
    ModeSpec {
        key: "weft-vxlan-dr",
        label: "weft vxlan+DirectRouting",
        kind: Kind::Weft(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        ),
        args: &[],
    },
    ModeSpec {
        key: "weft-ipip",
        label: "weft ipip",
        kind: Kind::Weft(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}"#),
        args: &[],
    },
];

/// How long an agent gets to bring a mode up before it counts as not
/// implemented / not working in this build.
const MODE_UP_TIMEOUT: Duration = Duration::from_secs(20);

/// Every sample of one mode in one phase.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub tcp1: Vec<f64>,
    pub tcp4: Vec<f64>,
    pub pps: Vec<f64>,
    pub sent_pps: Vec<f64>,
    pub loss: Vec<f64>,
    pub tps: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// TCP carried at the CPU run's fixed offered rate, Gbit/s.
    pub cpu_gbps: Vec<f64>,
    /// CPU per Gbit/s at that rate (spare capacity taken), cores.
    pub cpu_per_gbps: Vec<f64>,
    pub errors: Vec<String>,
}

impl Samples {
    pub fn to_json(&self) -> Value {
        json!({
            "tcp1_gbps": self.tcp1, "tcp4_gbps": self.tcp4,
            "pps_received": self.pps, "pps_sent": self.sent_pps, "loss": self.loss,
            "rr_tps": self.tps, "rr_p50_us": self.p50_us, "rr_p99_us": self.p99_us,
            "cpu_gbps": self.cpu_gbps, "cpu_cores_per_gbps": self.cpu_per_gbps,
            "errors": self.errors,
        })
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    })
}

pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let idx = ((s.len() - 1) as f64 * p).round() as usize;
    s.get(idx).copied()
}

/// One mode's topology, up or not.
pub struct ModeEnv<'h> {
    pub spec: ModeSpec,
    pub a: Container<'h>,
    pub b: Container<'h>,
    _iperf: Background,
}

/// Everything a run measured, for the report and the JSON.
#[derive(Default)]
pub struct Results {
    pub started: String,
    pub plan: Option<Plan>,
    pub system: BTreeMap<String, String>,
    /// mode key -> why it did not run.
    pub na: BTreeMap<String, String>,
    /// phase ("realistic" / "default-veth") -> mode key -> samples.
    pub phases: BTreeMap<String, BTreeMap<String, Samples>>,
    /// Generator ceiling: sent pps to the local bridge, no tunnel.
    pub gen_ceiling: Vec<f64>,
    pub gen_ceiling_received: Vec<f64>,
    pub cost: Vec<scale::Cost>,
    /// Each program's kernel run statistics in place (a separate pass).
    pub inplace: Vec<inplace::InPlaceCost>,
    pub scale: scale::ScaleResults,
    pub converge: Option<converge::Convergence>,
    /// phase -> mode key -> `ethtool -k` of host 1's cable, both ends.
    pub offloads: BTreeMap<String, BTreeMap<String, String>>,
    pub notes: Vec<String>,
    pub elapsed_secs: f64,
}

pub fn run(quick: bool) -> Result<()> {
    require_root().context("the bench creates namespaces and loads BPF")?;
    require_bpffs()?;
    require_tools(&["iperf3", "ethtool", "ip", "bridge", "nsenter"])?;
    let begin = Instant::now();
    let mut plan = Plan::new(quick);
    // For investigating the scale section alone: WEFT_BENCH_SCALE_ONLY=<sizes,...>.
    let scale_only = std::env::var("WEFT_BENCH_SCALE_ONLY").ok();
    if let Some(sizes) = &scale_only {
        plan.scale_sizes = sizes
            .split(',')
            .map(|s| s.trim().parse().context("WEFT_BENCH_SCALE_ONLY"))
            .collect::<Result<_>>()?;
        let mut scale = scale::ScaleResults::default();
        let _agent = pin_agent_binary()?;
        scale::run(&plan, None, &mut scale)?;
        println!("{:#}", scale.to_json());
        return Ok(());
    }
    let _agent = pin_agent_binary()?;
    let mut results = Results {
        started: report::utc_now(),
        plan: Some(plan.clone()),
        system: report::system_info(),
        ..Results::default()
    };
    println!("==> weft bench ({})", if quick { "quick" } else { "full" });
    for (k, v) in &results.system {
        println!("    {k}: {v}");
    }

    // BPF cost first: it needs no topology and is the least noisy figure.
    println!("==> per-packet cost of the BPF programs (BPF_PROG_TEST_RUN)");
    match scale::program_cost(&plan) {
        Ok((c, note)) => {
            results.cost = c;
            results.notes.push(note);
        }
        Err(e) => results
            .notes
            .push(format!("BPF program cost failed: {e:#}")),
    }

    // For comparing a few modes while developing: WEFT_BENCH_MODES=<key,...>
    // (plain routing is always kept: every ratio is to it).
    let only = std::env::var("WEFT_BENCH_MODES").ok();
    let modes: Vec<&ModeSpec> = MODES
        .iter()
        .filter(|m| {
            only.as_deref().is_none_or(|keys| {
                m.kind == Kind::Plain || keys.split(',').any(|k| k.trim() == m.key)
            })
        })
        .collect();
    if let Some(keys) = &only {
        results
            .notes
            .push(format!("only the modes WEFT_BENCH_MODES={keys} ran"));
    }
    println!("==> setting up one topology per mode");
    let clusters: Vec<Result<Cluster>> = modes.iter().map(|m| make_cluster(m)).collect();
    let hosts: Vec<Result<Vec<Host<'_>>>> = modes
        .iter()
        .zip(&clusters)
        .map(|(spec, c)| match c {
            Ok(c) => make_hosts(spec, c),
            Err(e) => bail!("{e:#}"),
        })
        .collect();
    let mut envs: Vec<ModeEnv<'_>> = Vec::new();
    for (spec, h) in modes.iter().zip(&hosts) {
        let env = match h {
            Ok(h) => make_env(spec, h),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        match env {
            Ok(env) => {
                println!("    {}: up", spec.key);
                envs.push(env);
            }
            Err(e) => {
                let reason = na_reason(&e);
                println!("    {}: {reason}", spec.key);
                results.na.insert(spec.key.to_owned(), reason);
            }
        }
    }
    if !envs.iter().any(|e| e.spec.kind == Kind::Plain) {
        bail!("plain routing did not come up; nothing to compare against");
    }

    for (phase, realistic, rounds) in [
        ("realistic", true, plan.rounds),
        ("default-veth", false, plan.default_rounds),
    ] {
        println!("==> phase {phase}: {rounds} round(s), modes interleaved");
        for h in hosts.iter().flatten().flatten() {
            set_wire(h, realistic)?;
        }
        let offloads = results.offloads.entry(phase.to_owned()).or_default();
        for env in &envs {
            offloads.insert(env.spec.key.to_owned(), offload_summary(env.a.host()));
        }
        if !realistic {
            results.notes.push(format!(
                "default veth: TCP segmentation offload on the switch side of host 1's cable after requesting it on (the kernel turns it off on the peer of a veth with an XDP program): {}",
                peer_tso(&envs)
            ));
        }
        let phase_map = results.phases.entry(phase.to_owned()).or_default();
        for round in 0..rounds {
            for env in &envs {
                let s = phase_map.entry(env.spec.key.to_owned()).or_default();
                measure_mode(env, &plan, realistic, s);
                println!(
                    "    round {} {:14} tcp1 {:5.2} tcp4 {:5.2} Gbit/s  pps {:>8.0}  rr p50 {:>6.1} us",
                    round + 1,
                    env.spec.key,
                    s.tcp1.last().copied().unwrap_or(f64::NAN),
                    s.tcp4.last().copied().unwrap_or(f64::NAN),
                    s.pps.last().copied().unwrap_or(f64::NAN),
                    s.p50_us.last().copied().unwrap_or(f64::NAN),
                );
            }
            if realistic && let Some(plain) = envs.iter().find(|e| e.spec.kind == Kind::Plain) {
                // The generator's ceiling: container to its own bridge
                // address, no tunnel and no underlay.
                match plain.a.host().subnet_env().and_then(|env| {
                    let gw = env.gateway().addr();
                    traffic::udp_pps(plain.a.ns(), plain.a.host().ns(), gw, plan.pps_secs)
                }) {
                    Ok(p) => {
                        results.gen_ceiling.push(p.sent_pps);
                        results.gen_ceiling_received.push(p.received_pps);
                    }
                    Err(e) => results.notes.push(format!("generator ceiling: {e:#}")),
                }
            }
        }
    }
    // The rest runs on the realistic wire.
    for h in hosts.iter().flatten().flatten() {
        set_wire(h, true)?;
    }

    println!("==> in-place BPF cost (kernel run statistics)");
    match inplace::run(&envs, &plan) {
        Ok(rows) => results.inplace = rows,
        Err(e) => results
            .notes
            .push(format!("in-place BPF cost failed: {e:#}")),
    }

    println!("==> convergence");
    if let Some(env) = envs.iter().find(|e| e.spec.key == "weft-vxlan") {
        match converge::run(env, plan.joins) {
            Ok(c) => results.converge = Some(c),
            Err(e) => results.notes.push(format!("convergence failed: {e:#}")),
        }
    }

    println!("==> scale");
    let plain = envs.iter().find(|e| e.spec.kind == Kind::Plain);
    match scale::run(&plan, plain, &mut results.scale) {
        Ok(()) => {}
        Err(e) => results.notes.push(format!("scale run failed: {e:#}")),
    }

    drop(envs);
    drop(hosts);
    drop(clusters);
    results.elapsed_secs = begin.elapsed().as_secs_f64();
    results.system.insert(
        "loadavg_at_end".into(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    report::write(&results)?;
    println!("==> bench finished in {:.0} s", results.elapsed_secs);
    Ok(())
}

/// Copies the agent binary aside so a concurrent rebuild of
/// target/release/node-agent cannot change it mid-run, and points the
/// fixtures at the copy. Returns the scratch dir holding it.
fn pin_agent_binary() -> Result<weft_tests::TempDir> {
    let src = node_agent_binary()?;
    let dir = weft_tests::scratch_dir()?;
    let dst = dir.path().join("node-agent");
    std::fs::copy(&src, &dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    // SAFETY: called before the bench runs anything concurrently (the
    // threads the fixtures started so far have all been joined), so
    // nothing reads the environment at the same time.
    unsafe { std::env::set_var("WEFT_NODE_AGENT", &dst) };
    Ok(dir)
}

fn na_reason(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    if text.contains("not implemented") {
        "n/a (not implemented in this build)".to_owned()
    } else {
        let first: String = text
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        format!("n/a (did not come up: {first})")
    }
}

fn make_cluster(spec: &ModeSpec) -> Result<Cluster> {
    let config = match spec.kind {
        Kind::Weft(c) => c,
        Kind::Plain | Kind::KernelVxlan => BASELINE_CONFIG,
    };
    let cluster = Cluster::new(config)?;
    // The bench prints its own summary; agent logs would drown it.
    cluster.set_dump_logs_on_drop(false);
    Ok(cluster)
}

fn make_hosts<'c>(spec: &ModeSpec, cluster: &'c Cluster) -> Result<Vec<Host<'c>>> {
    let hosts = vec![cluster.add_host(1)?, cluster.add_host(2)?];
    match spec.kind {
        Kind::Plain => {
            let envs = [
                baseline::host_gw_node(&hosts[0], 1)?,
                baseline::host_gw_node(&hosts[1], 2)?,
            ];
            baseline::host_gw_add_peer(&hosts[0], &hosts[1], &envs[1])?;
            baseline::host_gw_add_peer(&hosts[1], &hosts[0], &envs[0])?;
        }
        Kind::KernelVxlan => {
            let (env1, lease1) = baseline::flannel_vxlan_node(&hosts[0], 1)?;
            let (env2, lease2) = baseline::flannel_vxlan_node(&hosts[1], 2)?;
            baseline::flannel_vxlan_add_peer(&hosts[0], &lease2, &env2)?;
            baseline::flannel_vxlan_add_peer(&hosts[1], &lease1, &env1)?;
        }
        Kind::Weft(_) => {
            for h in &hosts {
                h.start_agent(spec.args)?;
            }
            for h in &hosts {
                if let Err(e) = h.wait_subnet_env(MODE_UP_TIMEOUT) {
                    let log = h.agent_log();
                    if log.contains("not implemented") {
                        bail!("not implemented: {e:#}");
                    }
                    return Err(e);
                }
            }
        }
    }
    Ok(hosts)
}

fn make_env<'h>(spec: &ModeSpec, hosts: &'h [Host<'h>]) -> Result<ModeEnv<'h>> {
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), MODE_UP_TIMEOUT)
        .context("container A cannot reach container B")?;
    b.ping_until(a.ip(), MODE_UP_TIMEOUT)
        .context("container B cannot reach container A")?;
    let iperf = traffic::iperf_server(b.ns(), b.ip())?;
    Ok(ModeEnv {
        spec: *spec,
        a,
        b,
        _iperf: iperf,
    })
}

/// One round of one mode: TCP 1 and 4 streams, 64-byte pps, and (on the
/// realistic wire) request/response. A failed measurement is recorded and
/// the rest go on.
fn measure_mode(env: &ModeEnv<'_>, plan: &Plan, realistic: bool, s: &mut Samples) {
    let (a, b) = (&env.a, &env.b);
    match traffic::tcp_gbps(a.ns(), b.ip(), 1, plan.tcp_secs) {
        Ok(v) => s.tcp1.push(v),
        Err(e) => s.errors.push(format!("tcp1: {e:#}")),
    }
    match traffic::tcp_gbps(a.ns(), b.ip(), 4, plan.tcp_secs) {
        Ok(v) => s.tcp4.push(v),
        Err(e) => s.errors.push(format!("tcp4: {e:#}")),
    }
    match traffic::udp_pps(a.ns(), b.ns(), b.ip(), plan.pps_secs) {
        Ok(p) => {
            s.pps.push(p.received_pps);
            s.sent_pps.push(p.sent_pps);
            s.loss.push(p.loss);
        }
        Err(e) => s.errors.push(format!("pps: {e:#}")),
    }
    if realistic {
        match traffic::tcp_cpu_per_gbps(a.ns(), b.ip(), plan.tcp_secs) {
            Ok((gbps, per)) => {
                s.cpu_gbps.push(gbps);
                s.cpu_per_gbps.push(per);
            }
            Err(e) => s.errors.push(format!("cpu: {e:#}")),
        }
        match traffic::tcp_rr(a.ns(), b.ns(), b.ip(), plan.rr_secs) {
            Ok(r) => {
                s.tps.push(r.tps);
                s.p50_us.push(r.p50_us);
                s.p99_us.push(r.p99_us);
            }
            Err(e) => s.errors.push(format!("rr: {e:#}")),
        }
    }
}

/// The realistic wire: no segmentation offloads (MTU-sized frames on the
/// underlay) and GRO on at both ends of the cable, as NICs ship; or veth's
/// defaults (TSO/GSO on, GRO off).
fn set_wire(host: &Host<'_>, realistic: bool) -> Result<()> {
    host.set_realistic_wire(realistic)?;
    let gro = if realistic { "on" } else { "off" };
    let port = switch_port(host.index());
    for (ns, dev) in [
        (host.ns(), "eth0"),
        (host.cluster().switch(), port.as_str()),
    ] {
        ns.run(&["ethtool", "-K", dev, "gro", gro])
            .with_context(|| format!("GRO {gro} on {dev} of host {}", host.index()))?;
    }
    Ok(())
}

/// The offloads that matter here, as `ethtool -k` reports them, on both
/// ends of `host`'s cable: `host eth0: gro on, ... / switch port: ...`.
fn offload_summary(host: &Host<'_>) -> String {
    const FEATURES: [&str; 4] = [
        "generic-receive-offload",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "tx-udp_tnl-segmentation",
    ];
    let port = switch_port(host.index());
    [
        ("host eth0", host.ns().run(&["ethtool", "-k", "eth0"])),
        (
            "switch port",
            host.cluster().switch().run(&["ethtool", "-k", &port]),
        ),
    ]
    .into_iter()
    .map(|(side, out)| {
        let features = match out {
            Ok(out) => FEATURES
                .iter()
                .map(|name| {
                    let state = out
                        .lines()
                        .find_map(|l| l.trim().strip_prefix(&format!("{name}:")))
                        .map_or("?", str::trim);
                    format!("{name} {state}")
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("ethtool failed: {e:#}"),
        };
        format!("{side}: {features}")
    })
    .collect::<Vec<_>>()
    .join("; ")
}

/// `mode: on|off` for each mode: the switch-side end of host 1's cable's
/// `tcp-segmentation-offload` as `ethtool -k` reports it.
fn peer_tso(envs: &[ModeEnv<'_>]) -> String {
    envs.iter()
        .map(|e| {
            let host = e.a.host();
            let port = switch_port(host.index());
            let state = host
                .cluster()
                .switch()
                .run(&["ethtool", "-k", &port])
                .ok()
                .and_then(|out| {
                    out.lines()
                        .find_map(|l| l.strip_prefix("tcp-segmentation-offload:"))
                        .map(|v| v.trim().to_owned())
                })
                .unwrap_or_else(|| "?".into());
            format!("{} {state}", e.spec.key)
        })
        .collect::<Vec<_>>()
        .join(", ")
}
