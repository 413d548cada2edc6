//! `cargo xtask chaos [--rounds N]`: the control plane's faults, timed, with
//! a 1 kpps UDP stream between two containers counting what the data path
//! loses through each. Faults: an etcd member killed, an etcd member cut
//! off from its peers, a relist of 100k leases forced by a compaction, an
//! agent SIGKILLed and restarted, an agent stopped and started from an
//! upgraded binary. Writes `bench-results/<date>-chaos.json` and the
//! "Control-plane faults" section of BENCHMARKS.md (the rest of the file is
//! left as it is; `cargo xtask bench` renders the section again from the
//! latest chaos JSON, so neither run erases the other's figures).
//!
//! Not part of `cargo xtask test`: it measures, it does not pass or fail on
//! the figures. Like `bench` it runs on the shared fixtures, so only in
//! xtask's `fixtures` build; the default build hands over to it.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Times each fault is repeated.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Use the node-agent already built (or $WEFT_NODE_AGENT) instead of
    /// running `build` first.
    #[arg(long)]
    skip_build: bool,
    /// Measure nothing: only write the section of BENCHMARKS.md again from
    /// the newest bench-results/*-chaos.json.
    #[arg(long)]
    report_only: bool,
}

#[cfg(feature = "fixtures")]
pub fn run(args: &Args) -> Result<()> {
    if args.report_only {
        return measure::rerender();
    }
    if !args.skip_build {
        crate::build::run(&crate::build::Args {})?;
    }
    measure::run(args.rounds)
}

/// Without the fixtures in this build: set up and build, then hand over.
#[cfg(not(feature = "fixtures"))]
pub fn run(args: &Args) -> Result<()> {
    let prepare = !args.skip_build && !args.report_only;
    crate::handover::run(prepare, args.skip_build)
}

#[cfg(feature = "fixtures")]
pub use measure::latest_section;

#[cfg(feature = "fixtures")]
mod measure {
    use std::collections::BTreeSet;
    use std::fmt::Write as _;
    use std::net::Ipv4Addr;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, ensure};
    use ipnet::Ipv4Net;
    use node_agent::flannel::{LeaseAttrs, VxlanLeaseData};
    use serde_json::{Value, json};
    use weft_tests::stream::{StreamStats, UdpStream};
    use weft_tests::{
        CONVERGE, Cluster, Container, Host, Signal, node_agent_binary, process, wait_routes,
    };

    use crate::bench::report::{system_info, utc_now};
    use crate::bench::scale::{SCALE_CONFIG, fakes_avoiding, lease_of};
    use crate::bench::suite::median;
    use crate::system::{require_bpffs, require_root, require_tools, workspace_root};

    const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
    const PPS: u32 = 1000;
    const RELIST_LEASES: usize = 100_000;
    /// Each stream runs this long; the fault starts one second in, and
    /// what it times must be over before the stream ends.
    const STREAM: Duration = Duration::from_secs(8);
    /// Longest wait for a fault's effect before the round counts as failed.
    const FAULT_TIMEOUT: Duration = Duration::from_secs(60);
    const BEGIN: &str = "<!-- chaos:begin (written by `cargo xtask chaos`) -->";
    const END: &str = "<!-- chaos:end -->";

    /// One fault's rounds.
    #[derive(Default)]
    struct Fault {
        /// Seconds from the fault to the moment the timed effect was seen.
        secs: Vec<f64>,
        /// For the etcd faults: seconds from the fault until etcd accepted
        /// the probe write (its own recovery: an election, when the member
        /// hit was the leader). The agents' part is `secs` minus this.
        accepted: Vec<f64>,
        /// Per round: packets sent and lost by the 1 kpps stream.
        packets: Vec<u64>,
        lost: Vec<u64>,
        /// The agent's own listing times, where the fault is a relist.
        list_ms: Vec<u64>,
        total_ms: Vec<u64>,
        /// Per round, what was hit (which etcd member).
        targets: Vec<String>,
        errors: Vec<String>,
    }

    impl Fault {
        fn stream(&mut self, stats: Result<StreamStats>) {
            match stats {
                Ok(s) => {
                    self.packets.push(s.packets);
                    self.lost.push(s.lost());
                }
                Err(e) => self.errors.push(format!("stream: {e:#}")),
            }
        }

        fn to_json(&self) -> Value {
            json!({"secs": self.secs, "accepted_secs": self.accepted,
                   "packets": self.packets, "lost": self.lost,
                   "list_ms": self.list_ms, "total_ms": self.total_ms,
                   "targets": self.targets, "errors": self.errors})
        }
    }

    /// The faults in the order of the report: (JSON key, fault, what is timed).
    const FAULTS: &[(&str, &str, &str)] = &[
        (
            "etcd_member_killed",
            "etcd member killed (SIGKILL), the one holding an agent's watch",
            "kill → a lease written through another member is in both agents' maps (failover)",
        ),
        (
            "etcd_member_partitioned",
            "etcd member cut off from its peers (clients still reach it), the one holding an agent's watch",
            "cut → a lease written through another member is in both agents' maps (detection and failover)",
        ),
        (
            "relist_100k",
            "relist of 100k leases: the agent frozen while etcd restarts, a lease is written and etcd compacts past its watch",
            "thaw → the lease written meanwhile is in the map, including the agent's watch backoff, which doubles from 0.2 s as the rounds come less than a minute apart (the relist itself: the agent's own list / list+reconcile ms in brackets)",
        ),
        (
            "agent_sigkill_restart",
            "agent SIGKILLed and started again",
            "kill → the restarted agent has written its subnet file and has its peer in the map",
        ),
        (
            "agent_sigterm_upgrade",
            "agent stopped (SIGTERM) and started from another binary (an upgrade)",
            "stop → the new agent has written its subnet file and has its peer in the map",
        ),
    ];

    pub fn run(rounds: usize) -> Result<()> {
        ensure!(rounds > 0, "--rounds must be at least 1");
        require_root().context("chaos creates namespaces and loads BPF")?;
        require_bpffs()?;
        require_tools(&["ip", "nsenter", "etcdctl", "python3"])?;
        // A copy, so a rebuild of target/release/node-agent meanwhile
        // cannot change the agent mid-run.
        let agent_dir = weft_tests::scratch_dir()?;
        let agent = agent_dir.path().join("node-agent");
        std::fs::copy(node_agent_binary()?, &agent).context("copying the agent binary")?;
        // SAFETY: nothing runs concurrently yet; no other thread reads the
        // environment.
        unsafe { std::env::set_var("WEFT_NODE_AGENT", &agent) };

        let started = utc_now();
        let system = system_info();
        let begin = Instant::now();
        // One per FAULTS entry, in its order.
        let mut faults: [Fault; 5] = Default::default();
        let [killed, cut, relist, sigkill, upgrade] = &mut faults;
        println!("==> etcd members and agents ({rounds} rounds)");
        if let Err(e) = etcd_and_agent_faults(rounds, [killed, cut, sigkill, upgrade]) {
            // What was measured so far is kept; the report lists this.
            println!("    stopped: {e:#}");
            killed
                .errors
                .push(format!("the etcd and agent rounds stopped: {e:#}"));
        }
        println!("==> relist of {RELIST_LEASES} leases ({rounds} rounds)");
        if let Err(e) = relists(rounds, relist) {
            relist.errors.push(format!("{e:#}"));
        }
        let elapsed = begin.elapsed().as_secs_f64();

        let root = workspace_root();
        let dir = root.join("bench-results");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json_path = dir.join(format!("{}-chaos.json", started.replace([' ', ':'], "-")));
        let mut by_key = serde_json::Map::new();
        for ((key, _, _), f) in FAULTS.iter().zip(&faults) {
            by_key.insert((*key).to_owned(), f.to_json());
        }
        let v = json!({"kind": "chaos", "started": started, "elapsed_secs": elapsed,
                       "rounds": rounds, "pps": PPS, "system": system, "faults": by_key});
        let text = serde_json::to_string_pretty(&v).context("serialising results")?;
        std::fs::write(&json_path, text + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        println!("==> wrote {}", json_path.display());
        rerender()
    }

    /// Writes the section of BENCHMARKS.md from the newest chaos JSON.
    pub fn rerender() -> Result<()> {
        let md = workspace_root().join("BENCHMARKS.md");
        let section = latest_section().context("no readable bench-results/*-chaos.json")?;
        splice(&md, &section)?;
        println!("==> updated the control-plane section of {}", md.display());
        Ok(())
    }

    /// A lease of a node that exists only in etcd, for subnet `10.244.<third>.0/24`.
    fn probe_lease(third: u8) -> Result<(Ipv4Net, LeaseAttrs)> {
        let subnet: Ipv4Net = format!("10.244.{third}.0/24").parse()?;
        let lease = LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, 0, 200),
            backend_type: "vxlan".to_owned(),
            backend_data: Some(VxlanLeaseData {
                vni: Some(1),
                vtep_mac: [0x02, 0, 0, 0, 0x30, third],
            }),
        };
        Ok((subnet, lease))
    }

    /// Writes `key` through the member at `endpoint` alone, retrying while
    /// etcd cannot commit it (the fault may have taken the leader: the
    /// others elect a new one first). Each try gives up after 1 s, so the
    /// time it returns is when etcd could take writes again, to about 1 s.
    fn put_through(cluster: &Cluster, endpoint: &str, key: &str, value: &str) -> Result<()> {
        let etcd = cluster.etcd();
        process::wait_until(FAULT_TIMEOUT, "etcd to accept the probe lease", |last| {
            let put = ["--command-timeout=1s", "put", "--", key, value];
            match process::run(etcd.etcdctl_at(endpoint, &put)) {
                Ok(_) => Ok(Some(())),
                Err(e) => {
                    *last = format!("{e:#}");
                    Ok(None)
                }
            }
        })
    }

    /// Polls (every 2 ms: the figure is the point) until every host has
    /// `subnet` in its SUBNETS map; seconds since `start`.
    fn wait_in_maps(hosts: &[&Host<'_>], subnet: Ipv4Net, start: Instant) -> Result<f64> {
        loop {
            let all = hosts.iter().all(|h| {
                h.pinned()
                    .ok()
                    .is_some_and(|p| matches!(p.peer(subnet), Ok(Some(_))))
            });
            if all {
                return Ok(start.elapsed().as_secs_f64());
            }
            ensure!(
                start.elapsed() < FAULT_TIMEOUT,
                "{subnet} not in every agent's map within {FAULT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The member to hit: the one holding a watch, else the next in turn
    /// (said so in the report).
    fn pick_member(cluster: &Cluster, members: usize, round: usize, out: &mut Fault) -> usize {
        match cluster.etcd_member_watched().map(usize::from) {
            Some(m) => {
                out.targets.push(format!("{m}"));
                m
            }
            None => {
                let m = round % members;
                out.targets
                    .push(format!("{m} (in turn: no member reported a watch)"));
                m
            }
        }
    }

    /// Runs `fault` with a stream between the containers around it (the
    /// fault one second in), records the time it returns and the loss.
    fn with_stream(
        a: &Container<'_>,
        b: &Container<'_>,
        out: &mut Fault,
        fault: impl FnOnce() -> Result<f64>,
    ) -> Result<()> {
        let stream = UdpStream::start(a, b, PPS, STREAM)?;
        std::thread::sleep(Duration::from_secs(1));
        let timed = fault();
        out.stream(stream.finish());
        match timed {
            Ok(secs) => {
                out.secs.push(secs);
                Ok(())
            }
            Err(e) => {
                out.errors.push(format!("{e:#}"));
                Err(e)
            }
        }
    }

    fn etcd_and_agent_faults(rounds: usize, out: [&mut Fault; 4]) -> Result<()> {
        const MEMBERS: u8 = 3;
        let [killed, cut, sigkill, upgrade] = out;
        let cluster = Cluster::with_etcd_members(CONFIG, MEMBERS)?;
        cluster.set_dump_logs_on_drop(false);
        let (hosts, envs) = cluster.start_hosts(&[1, 2], &[], false)?;
        let a = hosts[0].attach_container()?;
        let b = hosts[1].attach_container()?;
        a.ping_until(b.ip(), CONVERGE)?;
        let both = [&hosts[0], &hosts[1]];
        let upgrade_dir = weft_tests::scratch_dir()?;
        let upgraded = upgrade_dir.path().join("node-agent");
        std::fs::copy(node_agent_binary()?, &upgraded).context("copying the agent binary")?;
        let etcd = cluster.etcd();
        let members = usize::from(MEMBERS);

        for round in 0..rounds {
            let third = u8::try_from(100 + round).unwrap_or(u8::MAX);
            // A member dies; a lease goes in through another one.
            let target = pick_member(&cluster, members, round, killed);
            let (subnet, lease) = probe_lease(third)?;
            let key = cluster.lease_key(subnet);
            let other = etcd.member_endpoint((target + 1) % members)?;
            let mut accepted = None;
            let r = with_stream(&a, &b, killed, || {
                let start = Instant::now();
                etcd.stop_member(target)?;
                put_through(&cluster, &other, &key, &lease.to_json())?;
                accepted = Some(start.elapsed().as_secs_f64());
                wait_in_maps(&both, subnet, start)
            });
            killed.accepted.extend(accepted.filter(|_| r.is_ok()));
            etcd.restart_member(target)?;
            etcd.del(&key)?;
            report("member killed", round, &r, killed);

            // A member loses its peers (no leader), clients still reach it.
            let target = pick_member(&cluster, members, round, cut);
            let (subnet, lease) = probe_lease(third + 50)?;
            let key = cluster.lease_key(subnet);
            let other = etcd.member_endpoint((target + 1) % members)?;
            let index = u8::try_from(target)?;
            let mut accepted = None;
            let r = with_stream(&a, &b, cut, || {
                let start = Instant::now();
                cluster.partition_etcd_member(index, true)?;
                put_through(&cluster, &other, &key, &lease.to_json())?;
                accepted = Some(start.elapsed().as_secs_f64());
                wait_in_maps(&both, subnet, start)
            });
            cut.accepted.extend(accepted.filter(|_| r.is_ok()));
            cluster.partition_etcd_member(index, false)?;
            etcd.restart_member(target)?;
            etcd.del(&key)?;
            report("member partitioned", round, &r, cut);

            let r = with_stream(&a, &b, sigkill, || {
                let start = Instant::now();
                hosts[0].kill_agent(Signal::Kill)?;
                hosts[0].start_agent(&[])?;
                hosts[0].wait_subnet_env(CONVERGE)?;
                wait_routes(&hosts[0], &[(&hosts[1], &envs[1])])?;
                Ok(start.elapsed().as_secs_f64())
            });
            report("agent SIGKILL + restart", round, &r, sigkill);

            let r = with_stream(&a, &b, upgrade, || {
                let start = Instant::now();
                hosts[1].kill_agent(Signal::Term)?;
                hosts[1].start_agent_from(&upgraded, &[])?;
                hosts[1].wait_subnet_env(CONVERGE)?;
                wait_routes(&hosts[1], &[(&hosts[0], &envs[0])])?;
                Ok(start.elapsed().as_secs_f64())
            });
            report("agent SIGTERM + upgrade", round, &r, upgrade);
            // A failed agent fault leaves the host without an agent: stop.
            for h in both {
                ensure!(
                    h.agent_running(),
                    "host {}'s agent is not running",
                    h.index()
                );
            }
        }
        Ok(())
    }

    fn report(what: &str, round: usize, r: &Result<()>, f: &Fault) {
        match r {
            Ok(()) => println!(
                "    round {}: {what}: {:.3} s{}, stream lost {} of {}",
                round + 1,
                f.secs.last().copied().unwrap_or(f64::NAN),
                f.accepted
                    .get(f.secs.len().wrapping_sub(1))
                    .map_or_else(String::new, |a| format!(
                        " (etcd took writes again after {a:.3} s)"
                    )),
                f.lost.last().copied().unwrap_or(0),
                f.packets.last().copied().unwrap_or(0)
            ),
            Err(e) => println!("    round {}: {what}: failed: {e:#}", round + 1),
        }
    }

    fn relists(rounds: usize, out: &mut Fault) -> Result<()> {
        let cluster = Cluster::new(SCALE_CONFIG)?;
        cluster.set_dump_logs_on_drop(false);
        // The leases first, so the agents start on them (their first
        // listing), and one more per round, written while the agent is
        // frozen. Nothing is leased yet: nothing to avoid.
        let fakes = fakes_avoiding(RELIST_LEASES + rounds, &BTreeSet::new());
        let leases: Vec<(String, String)> = fakes[..RELIST_LEASES]
            .iter()
            .map(|f| lease_of(&cluster, f))
            .collect();
        cluster.put_leases_bulk(&leases)?;
        let (hosts, _) = cluster.start_hosts(&[1, 2], &[], false)?;
        let a = hosts[0].attach_container()?;
        let b = hosts[1].attach_container()?;
        a.ping_until(b.ip(), CONVERGE)?;
        let last = fakes[RELIST_LEASES - 1].0;
        wait_in_maps(&[&hosts[0]], last, Instant::now()).with_context(|| {
            format!(
                "the agent's log:\n{}",
                process::tail(&hosts[0].agent_log(), 20)
            )
        })?;
        let etcd = cluster.etcd();
        let mut times = Vec::new();
        for round in 0..rounds {
            let before = hosts[0].reconciliations().len();
            let fake = &fakes[RELIST_LEASES + round];
            let r = with_stream(&a, &b, out, || {
                hosts[0].freeze_agent(true)?;
                let frozen = (|| -> Result<()> {
                    // A frozen client's watch stays synced (etcd buffers
                    // its events): the restart breaks it, so the thawed
                    // agent must resume it, from a compacted revision.
                    etcd.restart()?;
                    let (key, value) = lease_of(&cluster, fake);
                    etcd.put(&key, &value)?;
                    let status = process::run(etcd.etcdctl(&["endpoint", "status", "-w", "json"]))?;
                    let revision = serde_json::from_str::<Value>(&status)?
                        .pointer("/0/Status/header/revision")
                        .and_then(Value::as_u64)
                        .with_context(|| format!("no revision in {status}"))?;
                    process::run(etcd.etcdctl(&["compact", &revision.to_string(), "--physical"]))?;
                    Ok(())
                })();
                let start = Instant::now();
                hosts[0].freeze_agent(false)?;
                frozen?;
                let secs = wait_in_maps(&[&hosts[0]], fake.0, start).with_context(|| {
                    format!(
                        "the agent's log:\n{}",
                        process::tail(&hosts[0].agent_log(), 20)
                    )
                })?;
                let done = process::wait_until(FAULT_TIMEOUT, "the agent to relist", |_| {
                    Ok(hosts[0].reconciliations().get(before).copied())
                })?;
                println!(
                    "      the agent listed in {} ms, reconciled in {} ms",
                    done.list_ms, done.total_ms
                );
                times.push(done);
                Ok(secs)
            });
            report("relist", round, &r, out);
            ensure!(hosts[0].agent_running(), "host 1's agent stopped");
        }
        out.list_ms = times.iter().map(|t| t.list_ms).collect();
        out.total_ms = times.iter().map(|t| t.total_ms).collect();
        Ok(())
    }

    fn stats(v: &[f64]) -> String {
        let min = v.iter().copied().reduce(f64::min);
        let max = v.iter().copied().reduce(f64::max);
        match (median(v), min, max) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.3} | {lo:.3} | {hi:.3}"),
            _ => "– | – | –".to_owned(),
        }
    }

    /// The newest `bench-results/*-chaos.json`, if any.
    fn latest_json() -> Option<PathBuf> {
        let dir = workspace_root().join("bench-results");
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with("-chaos.json"))
            .max()
    }

    /// The "Control-plane faults" section, between its markers, rendered
    /// from the newest chaos JSON; `None` if there is none.
    pub fn latest_section() -> Option<String> {
        let path = latest_json()?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        let rel = format!("bench-results/{}", path.file_name()?.to_string_lossy());
        Some(section(&v, &rel))
    }

    fn section(v: &Value, json_rel: &str) -> String {
        let u64s = |f: &Value, k: &str| -> Vec<u64> {
            f.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        let strs = |f: &Value, k: &str| -> Vec<String> {
            f.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let mut o = String::new();
        let _ = writeln!(o, "{BEGIN}\n## Control-plane faults\n");
        let sys = |k: &str| v["system"][k].as_str().unwrap_or("not recorded").to_owned();
        let load = sys("loadavg_at_start");
        let _ = writeln!(
            o,
            "Generated by `cargo xtask chaos --rounds {}`, started {} UTC, {:.0} s; raw figures: [`{json_rel}`]({json_rel}). **The machine has 2 cores and was running other work at the same time** (builds and tests of other sessions; load average at the start: {load}; {}; commit {}), so the times are upper bounds of what the agent needs, not its cost. Each fault is repeated; the table gives the median, min and max of the time named, and the packets a 1 kpps UDP stream between containers on the two hosts lost in each round (the stream runs {} s around each fault; the goal is zero: the data path never waits for the control plane).\n",
            v["rounds"],
            v["started"].as_str().unwrap_or("?"),
            v["elapsed_secs"].as_f64().unwrap_or(0.0),
            sys("cpu"),
            sys("commit"),
            STREAM.as_secs()
        );
        o.push_str("| fault | time from the fault to | median s | min s | max s | of which etcd: fault → probe write accepted, median (min–max) s | packets lost per round (of sent) |\n|---|---|---|---|---|---|---|\n");
        let mut problems = Vec::new();
        for (key, fault, timed) in FAULTS {
            let f = &v["faults"][*key];
            let secs: Vec<f64> = f
                .get("secs")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let lost = u64s(f, "lost");
            let accepted: Vec<f64> = f
                .get("accepted_secs")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let lo = accepted.iter().copied().reduce(f64::min);
            let hi = accepted.iter().copied().reduce(f64::max);
            let etcd_part = match (median(&accepted), lo, hi) {
                (Some(m), Some(lo), Some(hi)) => format!("{m:.3} ({lo:.3}–{hi:.3})"),
                _ => "–".to_owned(),
            };
            let sent = u64s(f, "packets");
            let mut timed = (*timed).to_owned();
            let (list, total) = (u64s(f, "list_ms"), u64s(f, "total_ms"));
            if !list.is_empty() {
                let _ = write!(
                    timed,
                    " [list {} ms; list+reconcile {} ms]",
                    join(&list),
                    join(&total)
                );
            }
            let targets = strs(f, "targets");
            if !targets.is_empty() {
                let _ = write!(timed, " [member hit per round: {}]", targets.join(", "));
            }
            let sent_text = sent.first().map_or_else(String::new, |s| {
                if sent.iter().all(|x| x == s) {
                    format!(" (of {s} each)")
                } else {
                    format!(" (of {})", join(&sent))
                }
            });
            let _ = writeln!(
                o,
                "| {fault} | {timed} | {} | {etcd_part} | {}{sent_text} |",
                stats(&secs),
                if lost.is_empty() {
                    "–".to_owned()
                } else {
                    join(&lost)
                }
            );
            for e in strs(f, "errors") {
                problems.push(format!("{fault}: {}", e.lines().next().unwrap_or("")));
            }
        }
        o.push_str("\nThe etcd faults run on a three-member etcd, each member in its own namespace, clients on the underlay and peers on a separate bridge (a partition takes a member's peer link down); the agents are given every member. The member hit is the one etcd's own `etcd_debugging_mvcc_watcher_total` gauge shows holding a watch (the agents keep connections to every member; their watch streams sit on one). The probe lease is written with `etcdctl` through another member, each try giving up after 1 s and retried, so the time includes that process's start and etcd's own recovery (a new leader must be elected when the member hit was the leader; until then no write commits), shown in its own column: the agents' part is the difference. After each etcd fault the member is restarted and the cluster waits to be healthy. The relist runs on a single etcd holding 100,000 leases (10.0.0.0/8 in /25s, as in Scale above) with the agent frozen (SIGSTOP) while etcd restarts (which breaks its watch: a frozen client's watch otherwise stays synced, etcd buffering its events), a lease is written and etcd is compacted past the agent's revision; thawed, the agent finds its watch gone and lists everything again.\n");
        if !problems.is_empty() {
            o.push_str("\nFailures in this run:\n\n");
            for p in problems {
                let _ = writeln!(o, "- {p}");
            }
        }
        o.push_str("\n```sh\ncargo xtask chaos                 # --rounds 5; about 5 minutes; writes this section and bench-results/<date>-chaos.json\ncargo xtask chaos --report-only   # writes this section again from the newest of those JSON files\n```\n");
        let _ = writeln!(o, "{END}");
        o
    }

    /// Replaces the section between the markers in `md`, or puts it before
    /// the "## Commands" heading (else at the end); the rest stays.
    fn splice(md: &Path, section: &str) -> Result<()> {
        let text = std::fs::read_to_string(md).unwrap_or_default();
        let new = insert_section(&text, section);
        std::fs::write(md, new).with_context(|| format!("writing {}", md.display()))
    }

    /// `text` with `section` in place of any earlier one.
    pub fn insert_section(text: &str, section: &str) -> String {
        if let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END))
            && b < e
        {
            let after = &text[e + END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            return format!("{}{section}{after}", &text[..b]);
        }
        match text.find("\n## Commands") {
            Some(i) => format!("{}{section}\n{}", &text[..=i], &text[i + 1..]),
            None if text.is_empty() => section.to_owned(),
            None => format!(
                "{}\n{section}",
                text.trim_end_matches('\n').to_owned() + "\n"
            ),
        }
    }
}

#[cfg(all(test, feature = "fixtures"))]
mod tests {
    use super::measure::insert_section;

    #[test]
    fn the_section_goes_before_commands_and_replaces_only_itself() {
        let section = "<!-- chaos:begin (written by `cargo xtask chaos`) -->\n## Control-plane faults\nA\n<!-- chaos:end -->\n";
        let bench = "# weft benchmarks\n\n## Scale\n\nx\n\n## Commands\n\ny\n";
        let once = insert_section(bench, section);
        assert_eq!(
            once,
            format!("# weft benchmarks\n\n## Scale\n\nx\n\n{section}\n## Commands\n\ny\n")
        );
        let newer = section.replace("\nA\n", "\nB\n");
        let twice = insert_section(&once, &newer);
        assert_eq!(twice, once.replace("\nA\n", "\nB\n"));
        assert_eq!(insert_section("", section), section);
    }
}
