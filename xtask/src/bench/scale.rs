//! Per-packet cost of the BPF programs (BPF_PROG_TEST_RUN) and the scale
//! runs: real leases in etcd, the time a starting agent takes to load them,
//! and throughput at the smallest and largest table against plain routing
//! with as many kernel routes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;
use node_agent::flannel::{LeaseAttrs, VxlanLeaseData};
use serde_json::{Value, json};
use weft_common::{PROG_ENCAP_TC, Reason};
use weft_tests::test_run::{self, ProgramBench, Run, TC_ACT_SHOT, XDP_PASS};
use weft_tests::{Cluster, Host, Netns, Signal, SubnetEnv};

use super::suite::{ModeEnv, Plan, median};
use super::traffic;

/// The table sizes of the cost and load-time figures.
const COST_SIZES: &[usize] = &[10, 1_000, 10_000, 100_000];
/// A /8 split into /25s holds 131072 subnets: room for 100k leases (a /24
/// split of a /8 has only 65536).
const SCALE_PREFIX_LEN: u8 = 25;
pub const SCALE_CONFIG: &str =
    r#"{"Network":"10.0.0.0/8","SubnetLen":25,"Backend":{"Type":"vxlan"}}"#;
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// A full-MTU inner packet: the container MTU (1450) is what fits the
/// underlay's 1500 with the 50-byte VXLAN overhead.
const FULL_INNER_IP: usize = 1450;

/// BPF program cost at one table size, ns per packet (median).
#[derive(Clone, Debug)]
pub struct Cost {
    pub entries: usize,
    pub encap_64: f64,
    pub encap_full: f64,
    pub decap_64: f64,
    pub decap_full: f64,
}

impl Cost {
    pub fn to_json(&self) -> Value {
        json!({"entries": self.entries, "encap_64_ns": self.encap_64,
               "encap_full_ns": self.encap_full, "decap_64_ns": self.decap_64,
               "decap_full_ns": self.decap_full})
    }
}

/// A fake remote node: its subnet, PublicIP and VtepMAC.
pub type Fake = (Ipv4Net, Ipv4Addr, [u8; 6]);

/// The `i`-th fake remote node: a /25 in 10.0.0.0/8 (from 10.0.1.0 up,
/// well below 10.244.0.0/16), a PublicIP in 198.18.1.0 .. 198.19.255.255
/// (the benchmarking range, never a simulated host's 198.18.0.x) and a
/// locally administered VtepMAC.
fn fake(i: usize) -> Fake {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    let subnet = Ipv4Addr::from(0x0a00_0000u32 + (i + 2) * 128);
    let ip = Ipv4Addr::from(0xc612_0000u32 + 256 + i);
    let b = i.to_be_bytes();
    (
        Ipv4Net::new(subnet, SCALE_PREFIX_LEN).unwrap_or_default(),
        ip,
        [0x02, 0x42, b[0], b[1], b[2], b[3]],
    )
}

/// The etcd key and value of `f`'s lease, as its agent would write them.
pub fn lease_of(cluster: &Cluster, f: &Fake) -> (String, String) {
    let lease = LeaseAttrs {
        public_ip: f.1,
        backend_type: "vxlan".to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: Some(1),
            vtep_mac: f.2,
        }),
    };
    (cluster.lease_key(f.0), lease.to_json())
}

/// Median of `samples` single runs: BPF_PROG_TEST_RUN with a repeat count
/// reruns the program on the packet it already rewrote (the kernel does
/// not restore it between repetitions), so after the first repetition the
/// encap program would time its pass path on an outer packet. One run per
/// call times the real path; the kernel's figure then includes one clock
/// read (tens of ns), the same for every size.
fn median_ns(samples: usize, mut f: impl FnMut() -> Result<Run>) -> Result<(f64, Run)> {
    let mut ns = Vec::with_capacity(samples);
    let mut last = None;
    for _ in 0..samples.max(1) {
        let r = f()?;
        ns.push(r.per_run.as_nanos() as f64);
        last = Some(r);
    }
    let m = median(&ns).context("no samples")?;
    Ok((m, last.context("no run")?))
}

/// The costs per table size, and a note on why single runs are timed.
pub fn program_cost(plan: &Plan) -> Result<(Vec<Cost>, String)> {
    let mut bench = ProgramBench::new()?;
    // ProgramBench::new adds two peers (10.244.2.0/24 resolved, 10.244.3.0/24).
    let mut have = 2usize;
    let mut next = 0usize;
    let mut out = Vec::new();
    let small = test_run::inner_frame([10, 244, 2, 5], 40000, 64, false);
    let full = test_run::inner_frame([10, 244, 2, 5], 40000, FULL_INNER_IP - 28, true);
    for &n in COST_SIZES {
        while have < n {
            let (subnet, ip, mac) = fake(next);
            bench.add_peer(
                subnet.network().octets(),
                u32::from(subnet.prefix_len()),
                ip.octets(),
                mac,
            )?;
            have += 1;
            next += 1;
        }
        let mut row = Cost {
            entries: n,
            encap_64: 0.0,
            encap_full: 0.0,
            decap_64: 0.0,
            decap_full: 0.0,
        };
        for (frame, enc, dec) in [
            (&small, &mut row.encap_64, &mut row.decap_64),
            (&full, &mut row.encap_full, &mut row.decap_full),
        ] {
            bench.configure_as_sender()?;
            let (ns, run) = median_ns(plan.test_run_samples, || {
                bench.run_tc_repeat(PROG_ENCAP_TC, frame, 0, 1)
            })?;
            ensure!(
                run.verdict != TC_ACT_SHOT && run.output.len() == frame.len() + 50,
                "encap did not encapsulate (verdict {}, {} bytes out)",
                run.verdict,
                run.output.len()
            );
            *enc = ns;
            bench.configure_as_receiver(test_run::PEER_SUBNET)?;
            let outer = run.output;
            let (ns, run) = median_ns(plan.test_run_samples, || bench.run_xdp_repeat(&outer, 1))?;
            ensure!(
                run.verdict == XDP_PASS && run.output.len() == frame.len(),
                "decap did not decapsulate (verdict {}, {} bytes out)",
                run.verdict,
                run.output.len()
            );
            *dec = ns;
            bench.configure_as_sender()?;
        }
        println!(
            "    {n:>6} entries: encap {:.0}/{:.0} ns, decap {:.0}/{:.0} ns (64 B / full MTU)",
            row.encap_64, row.encap_full, row.decap_64, row.decap_full
        );
        out.push(row);
    }
    // Evidence for timing single runs: with repeat 100, how many of the
    // repetitions actually encapsulated.
    bench.configure_as_sender()?;
    let before = bench.counter(Reason::Encapsulated)?;
    let run = bench.run_tc_repeat(PROG_ENCAP_TC, &small, 0, 100)?;
    let after = bench.counter(Reason::Encapsulated)?;
    let note = format!(
        "BPF_PROG_TEST_RUN with repeat 100 on the encap program encapsulated {} time(s) and reported {} ns per run: the repetitions after the first see the already-rewritten packet, which is why the cost table times single runs.",
        after.saturating_sub(before),
        run.per_run.as_nanos()
    );
    println!("    {note}");
    Ok((out, note))
}

#[derive(Clone, Debug, Default)]
pub struct ScaleTput {
    pub entries: usize,
    pub weft_tcp1: Vec<f64>,
    pub weft_pps: Vec<f64>,
    pub plain_tcp1: Vec<f64>,
    pub plain_pps: Vec<f64>,
}

#[derive(Clone, Debug, Default)]
pub struct ScaleResults {
    /// (leases, seconds to write them to etcd)
    pub write_secs: Vec<(usize, f64)>,
    /// (leases, seconds from `node-agent run` to all of them in its map)
    pub load_secs: Vec<(usize, f64)>,
    /// (leases, seconds from the start of their etcd write until the
    /// running agent has them all in its map, through its watch)
    pub watch_secs: Vec<(usize, f64)>,
    /// (routes, seconds for `ip -batch` to install them)
    pub route_secs: Vec<(usize, f64)>,
    pub tput: Vec<ScaleTput>,
    pub errors: Vec<String>,
}

impl ScaleResults {
    pub fn to_json(&self) -> Value {
        json!({
            "lease_write_secs": self.write_secs,
            "agent_load_secs": self.load_secs,
            "running_agent_watch_secs": self.watch_secs,
            "kernel_route_install_secs": self.route_secs,
            "throughput": self.tput.iter().map(|t| json!({
                "entries": t.entries, "weft_tcp1_gbps": t.weft_tcp1, "weft_pps": t.weft_pps,
                "plain_tcp1_gbps": t.plain_tcp1, "plain_pps": t.plain_pps})).collect::<Vec<_>>(),
            "errors": self.errors,
        })
    }
}

pub fn run(plan: &Plan, plain: Option<&ModeEnv<'_>>, out: &mut ScaleResults) -> Result<()> {
    let cluster = Cluster::new(SCALE_CONFIG)?;
    cluster.set_dump_logs_on_drop(false);
    let a = cluster.add_host(1)?;
    let b = cluster.add_host(2)?;
    for h in [&a, &b] {
        h.set_realistic_wire(true)?;
        h.start_agent(&[])?;
    }
    let env_a = a.wait_subnet_env(Duration::from_secs(30))?;
    let env_b = b.wait_subnet_env(Duration::from_secs(30))?;
    let ca = a.attach_container()?;
    let cb = b.attach_container()?;
    ca.ping_until(cb.ip(), Duration::from_secs(30))?;
    let _iperf = traffic::iperf_server(cb.ns(), cb.ip())?;
    let taken: BTreeSet<Ipv4Net> = [env_a.subnet, env_b.subnet].into();

    let max = plan.scale_sizes.iter().copied().max().unwrap_or(0);
    let fakes = fakes_avoiding(max, &taken);

    let first = plan.scale_sizes.first().copied().unwrap_or(0);
    let last = max;
    let mut written = 0usize;
    let mut routed = 0usize;
    let route_ns = plain.map(|p| p.a.host().ns());
    for &n in &plan.scale_sizes {
        let batch: Vec<(String, String)> = fakes[written..n]
            .iter()
            .map(|f| lease_of(&cluster, f))
            .collect();
        let t = Instant::now();
        cluster.put_leases_bulk(&batch)?;
        out.write_secs.push((n, t.elapsed().as_secs_f64()));
        written = n;
        println!(
            "    {n:>6} leases in etcd ({:.1} s to write)",
            t.elapsed().as_secs_f64()
        );

        // The running agent picks the new leases up through its watch;
        // the table must be full before throughput is measured on it.
        match wait_loaded(&a, &samples_of(&fakes[..n], &env_b), n + 1, t) {
            Ok(secs) => out.watch_secs.push((n, secs)),
            Err(e) => out.errors.push(format!("watch catch-up at {n}: {e:#}")),
        }

        if let Some(ns) = route_ns {
            let t = Instant::now();
            add_routes(ns, &fakes[routed..n])?;
            out.route_secs.push((n, t.elapsed().as_secs_f64()));
            routed = n;
        }

        if n == first || n == last {
            let mut t = ScaleTput {
                entries: n,
                ..ScaleTput::default()
            };
            let weft_ok = match ca.ping_until(cb.ip(), Duration::from_secs(30)) {
                Ok(()) => true,
                Err(e) => {
                    out.errors.push(format!(
                        "weft throughput at {n}: container A cannot reach container B: {e:#}"
                    ));
                    false
                }
            };
            for _ in 0..plan.scale_rounds {
                if weft_ok {
                    match traffic::tcp_gbps(ca.ns(), cb.ip(), 1, plan.tcp_secs) {
                        Ok(v) => t.weft_tcp1.push(v),
                        Err(e) => out.errors.push(format!("weft tcp at {n}: {e:#}")),
                    }
                    match traffic::udp_pps(ca.ns(), cb.ns(), cb.ip(), plan.pps_secs) {
                        Ok(p) => t.weft_pps.push(p.received_pps),
                        Err(e) => out.errors.push(format!("weft pps at {n}: {e:#}")),
                    }
                }
                if let Some(p) = plain {
                    match traffic::tcp_gbps(p.a.ns(), p.b.ip(), 1, plan.tcp_secs) {
                        Ok(v) => t.plain_tcp1.push(v),
                        Err(e) => out.errors.push(format!("plain tcp at {n}: {e:#}")),
                    }
                    match traffic::udp_pps(p.a.ns(), p.b.ns(), p.b.ip(), plan.pps_secs) {
                        Ok(p) => t.plain_pps.push(p.received_pps),
                        Err(e) => out.errors.push(format!("plain pps at {n}: {e:#}")),
                    }
                }
            }
            println!(
                "    {n:>6} entries: weft tcp1 {:.2} Gbit/s pps {:.0}; plain+routes tcp1 {:.2} pps {:.0}",
                median(&t.weft_tcp1).unwrap_or(f64::NAN),
                median(&t.weft_pps).unwrap_or(f64::NAN),
                median(&t.plain_tcp1).unwrap_or(f64::NAN),
                median(&t.plain_pps).unwrap_or(f64::NAN)
            );
            out.tput.push(t);
        }

        // A starting agent: stop it, remove its pins (else the restart
        // adopts the filled map), start it, time until the map is full.
        // Last, because a failure here leaves host A without its agent.
        match agent_load_time(&a, &fakes[..n], &env_b) {
            Ok(secs) => {
                println!("    {n:>6} leases: agent loaded them in {secs:.3} s");
                out.load_secs.push((n, secs));
            }
            Err(e) => {
                println!("    {n:>6} leases: load failed: {e:#}");
                out.errors.push(format!("load time at {n}: {e:#}"));
            }
        }
    }
    if let Some(ns) = route_ns {
        // Leaves the plain-routing host as it was (only its peer route).
        let _ = ns.ip(&["route", "flush", "proto", "static"]);
    }
    Ok(())
}

/// `n` fake remote nodes, skipping any subnet in `taken` (the ones real
/// hosts happened to lease).
pub fn fakes_avoiding(n: usize, taken: &BTreeSet<Ipv4Net>) -> Vec<Fake> {
    (0..)
        .map(fake)
        .filter(|f| !taken.contains(&f.0))
        .take(n)
        .collect()
}

/// Installs one kernel route per fake subnet via the plain-routing peer,
/// with `ip -batch`, as a host-gw node with that many peers would hold.
fn add_routes(ns: &Netns, fakes: &[Fake]) -> Result<()> {
    if fakes.is_empty() {
        return Ok(());
    }
    let mut text = String::with_capacity(fakes.len() * 64);
    for f in fakes {
        text.push_str(&format!(
            "route add {} via 198.18.0.2 dev eth0 proto static\n",
            f.0
        ));
    }
    let dir = weft_tests::scratch_dir()?;
    let batch = dir.path().join("routes");
    std::fs::write(&batch, text).with_context(|| format!("writing {}", batch.display()))?;
    ns.ip(&["-batch", &batch.to_string_lossy()])
        .context("installing the scale routes")?;
    Ok(())
}

/// Lookup samples for "all of `fakes` and host B's subnet are in the map":
/// 64 evenly spaced leases, the last one and host B's, cheap to look up
/// every few ms, unlike reading 100k entries.
fn samples_of(fakes: &[Fake], env_b: &SubnetEnv) -> Vec<Ipv4Net> {
    let step = (fakes.len() / 64).max(1);
    let mut samples: Vec<Ipv4Net> = fakes.iter().step_by(step).map(|f| f.0).collect();
    if let Some(l) = fakes.last() {
        samples.push(l.0);
    }
    samples.push(env_b.subnet);
    samples
}

/// Waits until `a`'s SUBNETS holds every sample and at least `want`
/// entries; returns the seconds since `start` at which the samples were
/// all there. The error carries the last line of the agent's log.
fn wait_loaded(a: &Host<'_>, samples: &[Ipv4Net], want: usize, start: Instant) -> Result<f64> {
    let last_log = || {
        a.agent_log()
            .lines()
            .last()
            .unwrap_or_default()
            .chars()
            .take(400)
            .collect::<String>()
    };
    let mut seen_at = None;
    loop {
        let elapsed = start.elapsed();
        ensure!(
            elapsed < LOAD_TIMEOUT,
            "the agent did not load {want} entries within {LOAD_TIMEOUT:?}; its last log line: {}",
            last_log()
        );
        ensure!(
            a.agent_running(),
            "the agent exited; its last log line: {}",
            last_log()
        );
        // Opened afresh each round: a starting agent creates the pins.
        if let Ok(pinned) = a.pinned()
            && samples
                .iter()
                .all(|s| matches!(pinned.peer(*s), Ok(Some(_))))
        {
            let at = *seen_at.get_or_insert(elapsed);
            // Confirms with a full count (the agent may insert in any
            // order); the time is when the samples were all there.
            let count = pinned.peers().map_or(0, |p| p.len());
            if count >= want {
                return Ok(at.as_secs_f64());
            }
            seen_at = None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn agent_load_time(a: &Host<'_>, fakes: &[Fake], env_b: &SubnetEnv) -> Result<f64> {
    a.kill_agent(Signal::Term)?;
    a.agent_cleanup()?;
    let samples = samples_of(fakes, env_b);
    let start = Instant::now();
    a.start_agent(&[])?;
    wait_loaded(a, &samples, fakes.len() + 1, start)
}
