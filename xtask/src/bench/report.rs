//! The bench's outputs: `BENCHMARKS.md`, an SVG bar chart of the mode
//! comparison (written by hand: a few rectangles need no plotting crate)
//! and the raw samples as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::suite::{MODES, Results, Samples, median, percentile};
use crate::system::workspace_root;
use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC (civil-from-days,
/// so no date crate is needed).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn cmd_out(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn system_info() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("kernel".into(), cmd_out("uname", &["-r"]));
    let cpu = read_trim("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    m.insert("cpu".into(), format!("{cpu}, {cores} cores"));
    m.insert("loadavg_at_start".into(), read_trim("/proc/loadavg"));
    let commit = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !cmd_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    m.insert(
        "commit".into(),
        format!(
            "{commit}{}",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            }
        ),
    );
    m.insert(
        "iperf3".into(),
        cmd_out("iperf3", &["--version"])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
    );
    m
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "–".into(),
    }
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}×", v / b),
        _ => "–".into(),
    }
}

fn mode_table(out: &mut String, r: &Results, phase: &str, with_rr: bool) {
    let Some(p) = r.phases.get(phase) else {
        out.push_str("(not measured)\n");
        return;
    };
    let base = p.get("plain");
    let med = |s: Option<&Samples>, get: fn(&Samples) -> &Vec<f64>| s.and_then(|s| median(get(s)));
    if with_rr {
        out.push_str("| mode | TCP 1 stream Gbit/s | × plain | TCP 4 streams Gbit/s | × plain | 64 B UDP received pps | × plain | loss | RR trans/s | RTT p50 µs | RTT p99 µs | p50 − plain µs |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    } else {
        out.push_str("| mode | TCP 1 stream Gbit/s | × plain | TCP 4 streams Gbit/s | × plain | 64 B UDP received pps | × plain | loss |\n|---|---|---|---|---|---|---|---|\n");
    }
    for spec in MODES {
        if let Some(reason) = r.na.get(spec.key) {
            let cols = if with_rr { 12 } else { 8 };
            let _ = writeln!(
                out,
                "| {} | {reason} |{}",
                spec.label,
                " |".repeat(cols - 2)
            );
            continue;
        }
        let s = p.get(spec.key);
        let tcp1 = med(s, |s| &s.tcp1);
        let tcp4 = med(s, |s| &s.tcp4);
        let pps = med(s, |s| &s.pps);
        let loss = med(s, |s| &s.loss);
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            spec.label,
            f(tcp1, 2),
            ratio(tcp1, med(base, |s| &s.tcp1)),
            f(tcp4, 2),
            ratio(tcp4, med(base, |s| &s.tcp4)),
            f(pps.map(|v| v / 1e3), 0) + if pps.is_some() { " k" } else { "" },
            ratio(pps, med(base, |s| &s.pps)),
            f(loss.map(|l| l * 100.0), 1) + if loss.is_some() { " %" } else { "" },
        );
        if with_rr {
            let p50 = med(s, |s| &s.p50_us);
            let gap = match (p50, med(base, |s| &s.p50_us)) {
                (Some(a), Some(b)) => format!("{:+.1}", a - b),
                _ => "–".into(),
            };
            let _ = write!(
                out,
                " {} | {} | {} | {gap} |",
                f(med(s, |s| &s.tps), 0),
                f(p50, 1),
                f(med(s, |s| &s.p99_us), 1),
            );
        }
        out.push('\n');
    }
    let cols = if with_rr { 12 } else { 8 };
    let _ = writeln!(
        out,
        "| kernel ipip | n/a: this kernel has no ipip module (CONFIG_NET_IPIP is not built), so there is no kernel baseline for weft ipip |{}",
        " |".repeat(cols - 2)
    );
    let errors: Vec<String> = p
        .iter()
        .flat_map(|(k, s)| s.errors.iter().map(move |e| format!("{k}: {e}")))
        .collect();
    if !errors.is_empty() {
        out.push_str("\nFailed measurements (left out of the medians):\n\n");
        for e in errors {
            let _ = writeln!(out, "- {}", e.lines().next().unwrap_or(""));
        }
    }
}

struct Targets<'a> {
    r: &'a Results,
}

impl Targets<'_> {
    fn med(&self, mode: &str, get: fn(&Samples) -> &Vec<f64>) -> Option<f64> {
        self.r
            .phases
            .get("realistic")
            .and_then(|p| p.get(mode))
            .and_then(|s| median(get(s)))
    }

    fn rows(&self) -> Vec<(String, String, Option<bool>)> {
        let mut rows = Vec::new();
        let q = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        // Issue 12's targets, realistic wire.
        for (metric, get) in [
            ("TCP 1 stream", (|s| &s.tcp1) as Getter),
            ("TCP 4 streams", |s| &s.tcp4),
        ] {
            for (mode, label) in [
                ("weft-vxlan", "weft vxlan"),
                ("weft-vxlan-bpf-host", "weft vxlan, --host-routing bpf,"),
                ("weft-ipip", "weft ipip"),
            ] {
                let kernel = q(self.med(mode, get), self.med("kernel-vxlan", get));
                rows.push((
                    format!("{label} {metric} ≥ 1.10 × kernel vxlan"),
                    ratio(kernel, Some(1.0)),
                    kernel.map(|v| v >= 1.10),
                ));
                let plain = q(self.med(mode, get), self.med("plain", get));
                rows.push((
                    format!("{label} {metric} ≥ 0.95 × plain routing"),
                    ratio(plain, Some(1.0)),
                    plain.map(|v| v >= 0.95),
                ));
            }
        }
        for (mode, label) in [
            ("weft-vxlan", "weft vxlan"),
            ("weft-vxlan-bpf-host", "weft vxlan, --host-routing bpf,"),
        ] {
            let kv = q(
                self.med(mode, |s| &s.pps),
                self.med("kernel-vxlan", |s| &s.pps),
            );
            rows.push((
                format!("{label} 64 B pps ≥ 1.3 × kernel vxlan"),
                ratio(kv, Some(1.0)),
                kv.map(|v| v >= 1.3),
            ));
            let cpu = q(
                self.med(mode, |s| &s.cpu_per_gbps),
                self.med("kernel-vxlan", |s| &s.cpu_per_gbps),
            );
            rows.push((
                format!("{label} CPU per Gbit/s ≤ 0.8 × kernel vxlan"),
                ratio(cpu, Some(1.0)),
                cpu.map(|v| v <= 0.8),
            ));
        }
        let dr = q(
            self.med("weft-vxlan-dr", |s| &s.tcp1),
            self.med("plain", |s| &s.tcp1),
        );
        rows.push((
            "weft vxlan+DirectRouting TCP (on-link peers) ≥ 0.98 × plain routing (host-gw)".into(),
            ratio(dr, Some(1.0)),
            dr.map(|v| v >= 0.98),
        ));
        let hg = q(
            self.med("weft-host-gw", |s| &s.tcp1),
            self.med("plain", |s| &s.tcp1),
        );
        rows.push((
            "weft host-gw TCP ≥ plain routing".into(),
            if self.r.na.contains_key("weft-host-gw") {
                "n/a".into()
            } else {
                f(hg.map(|v| v * 100.0), 0) + " %"
            },
            hg.map(|v| v >= 1.0),
        ));
        let rtt = match (
            self.med("weft-vxlan", |s| &s.p50_us),
            self.med("plain", |s| &s.p50_us),
        ) {
            (Some(a), Some(b)) => Some(a - b),
            _ => None,
        };
        rows.push((
            "weft vxlan RTT p50 within 2 µs of plain routing".into(),
            f(rtt, 1) + " µs",
            rtt.map(|v| v <= 2.0),
        ));
        // Default veth offloads: no weft tunnel mode collapses.
        let default_veth = |mode: &str| {
            self.r
                .phases
                .get("default-veth")
                .and_then(|p| p.get(mode))
                .and_then(|s| median(&s.tcp1))
        };
        for (mode, label) in [
            ("weft-vxlan", "weft vxlan"),
            ("weft-vxlan-xdp", "weft vxlan, xdp"),
            ("weft-vxlan-tc", "weft vxlan, tc"),
            ("weft-vxlan-dr", "weft vxlan+DirectRouting"),
            ("weft-ipip", "weft ipip"),
        ] {
            let v = q(default_veth(mode), default_veth("kernel-vxlan"));
            rows.push((
                format!("default veth: {label} TCP ≥ 0.9 × kernel vxlan"),
                ratio(v, Some(1.0)),
                v.map(|v| v >= 0.9),
            ));
        }
        let flat = match (self.r.cost.first(), self.r.cost.last()) {
            (Some(a), Some(b)) if a.encap_64 > 0.0 => Some(b.encap_64 / a.encap_64 - 1.0),
            _ => None,
        };
        rows.push((
            "encap cost flat 10 → 100k entries (within 5 %)".into(),
            f(flat.map(|v| v * 100.0), 1) + " %",
            flat.map(|v| v.abs() <= 0.05),
        ));
        let load = self
            .r
            .scale
            .load_secs
            .iter()
            .find(|(n, _)| *n == 100_000)
            .map(|(_, s)| *s);
        let load_failed = self
            .r
            .scale
            .errors
            .iter()
            .any(|e| e.starts_with("load time at 100000:"));
        rows.push((
            "100k leases loaded < 3 s".into(),
            match load {
                Some(s) => format!("{s:.2} s"),
                None if load_failed => "failed: the agent never loaded them (see Scale)".into(),
                None => "not measured in this run".into(),
            },
            if load_failed {
                Some(false)
            } else {
                load.map(|s| s < 3.0)
            },
        ));
        let conv = self
            .r
            .converge
            .as_ref()
            .and_then(|c| percentile(&c.map_ms, 0.99));
        rows.push((
            "convergence p99 < 100 ms (put → map entry)".into(),
            f(conv, 1) + " ms",
            conv.map(|v| v < 100.0),
        ));
        rows
    }
}

fn markdown(r: &Results, kind: &str, svg_rel: &str, json_rel: &str) -> String {
    let mut o = String::new();
    let plan = r.plan.clone();
    let _ = writeln!(o, "# weft benchmarks\n");
    let _ = writeln!(
        o,
        "Generated by `cargo xtask bench{}` ({kind} run), started {} UTC, {:.0} s. Every figure below comes from that one run; nothing is hand-edited.\n",
        if kind == "quick" { " --quick" } else { "" },
        r.started,
        r.elapsed_secs
    );
    o.push_str("| | |\n|---|---|\n");
    for (k, v) in &r.system {
        let _ = writeln!(o, "| {k} | {v} |");
    }
    let _ = writeln!(
        o,
        "\nThe machine has 2 cores: sender, receiver, softirq work and the generator share them, so absolute numbers are noisy; compare modes by their ratios to plain routing, measured in the same run, modes interleaved per round (A B C … A B C …). Medians over the rounds. Raw samples: [`{json_rel}`]({json_rel}). The load average above shows any other work on the machine when the run started.\n"
    );
    if let Some(p) = &plan {
        let _ = writeln!(
            o,
            "Rounds: {} (realistic wire), {} (default veth). Durations: TCP {} s per test, 64 B UDP {} s, request/response {} s.\n",
            p.rounds, p.default_rounds, p.tcp_secs, p.pps_secs, p.rr_secs
        );
    }
    o.push_str("## Topology and modes\n\nTwo hosts, each a network namespace cabled by a veth to an underlay bridge (198.18.0.0/24), with a container behind a `cni0` bridge on each; traffic goes container → container across the underlay. Each mode has its own copy of this topology, all up at once.\n\n- **plain routing**: one kernel route per remote subnet via the peer (flannel host-gw: the practical ceiling);\n- **kernel vxlan**: `flannel.1` as flanneld's vxlan backend creates it (VNI 1, dstport 8472, nolearning, MTU 1450; a permanent neighbour entry, an fdb entry and a route via `<subnet>.0` onlink per peer);\n- **weft** modes: `node-agent run` on each host, as a user starts it, with the network config of that backend. On these veth underlays `--decap-mode auto` (the default) lets the kernel VXLAN socket of the agent's `weft.vxlan` device decapsulate (`device`); the `xdp` and `tc` rows force the other hooks; the `--host-routing bpf` row keeps `auto` and lets the slow path's program deliver each decapsulated packet to the container's bridge itself, skipping the host's IP forwarding and netfilter (an option, not the default: see the README's Architecture). IP-in-IP has no kernel socket here and decapsulates at XDP.\n\n**Realistic wire** (the primary figures): TSO and GSO off on both ends of every underlay veth (`ethtool -K <dev> tso off gso off`), GRO on, so the underlay carries MTU-sized frames like a physical link. The **default veth** variant keeps veth's offloads (64 KiB super-packets on the wire); it flatters every mode and is shown only for reference.\n\n");

    o.push_str("## Mode comparison (realistic wire)\n\n");
    let _ = writeln!(o, "![mode comparison]({svg_rel})\n");
    mode_table(&mut o, r, "realistic", true);
    let ceil = median(&r.gen_ceiling);
    let _ = writeln!(
        o,
        "\nGenerator ceiling (the same `xtask udpgen`, container → its own bridge address, no underlay, no tunnel): {} k pps sent, {} k pps received. A mode's received rate well below this is the data path's limit, not the sender's. Loss stays near zero because on a veth path a UDP socket's sent buffers are only freed on delivery, so the send buffer throttles the generator to what the path delivers: the received rate is the path's capacity. Client/server placement is fixed in every mode (iperf3 `-A 0,1`, rr-client on core 0, rr-server on core 1).\n",
        f(ceil.map(|v| v / 1e3), 0),
        f(median(&r.gen_ceiling_received).map(|v| v / 1e3), 0)
    );
    gaps(&mut o, r);
    cpu_table(&mut o, r);
    offload_table(&mut o, r);
    o.push_str("## Mode comparison (default veth offloads: TSO/GSO on — not a realistic wire)\n\n");
    mode_table(&mut o, r, "default-veth", false);

    o.push_str("\n## Per-packet cost of the BPF programs\n\n`BPF_PROG_TEST_RUN` on the real programs, loaded by the agent's loader (`weft_tests::test_run::ProgramBench`), SUBNETS filled with that many remote /25 entries. Median of single runs: with a repeat count the kernel reruns the program on the packet it already rewrote, so only the first repetition would take the real path. Each figure includes one kernel clock read. 64 B = 64-byte UDP payload; full MTU = a 1450-byte inner packet (1500 bytes outer). The decap program is fed the encap program's output.\n\n| entries | encap 64 B ns | encap full MTU ns | decap (XDP) 64 B ns | decap (XDP) full MTU ns |\n|---|---|---|---|---|\n");
    for c in &r.cost {
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            c.entries, c.encap_64, c.encap_full, c.decap_64, c.decap_full
        );
    }

    o.push('\n');
    super::inplace::table(&mut o, &r.inplace, plan.as_ref().map_or(0, |p| p.tcp_secs));

    o.push_str("\n## Scale\n\nReal leases written to etcd (flannel's format, one 24 h etcd lease, transactions of 128 puts) on a cluster with `Network` 10.0.0.0/8 and `SubnetLen` 25 (a /8 holds only 65,536 /24s, so 100k leases need /25s). \"Load time\" is from starting `node-agent run` (after `node-agent cleanup`, so nothing is adopted from pins) to every lease being in its SUBNETS map. The plain-routing baseline gets the same number of kernel routes (`ip -batch`, one `route add <subnet>/25 via <peer>` per lease).\n\n| entries | leases written to etcd (s) | running agent: write start → all in map, via its watch (s) | agent start → all in map (s) | kernel routes installed (s) |\n|---|---|---|---|---|\n");
    let s = &r.scale;
    for (n, w) in &s.write_secs {
        let load = s.load_secs.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
        let route = s.route_secs.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
        let watch = s.watch_secs.iter().find(|(m, _)| m == n).map(|(_, v)| *v);
        let load = match load {
            Some(v) => format!("{v:.3}"),
            None if s
                .errors
                .iter()
                .any(|e| e.starts_with(&format!("load time at {n}:"))) =>
            {
                "**failed** (below)".into()
            }
            None => "–".into(),
        };
        let _ = writeln!(
            o,
            "| {n} | {w:.2} | {} | {load} | {} |",
            f(watch, 3),
            f(route, 2)
        );
    }
    if !s.tput.is_empty() {
        o.push_str("\n| entries | weft vxlan TCP 1 stream Gbit/s | weft vxlan 64 B pps | plain routing + as many routes, TCP Gbit/s | plain + routes, 64 B pps |\n|---|---|---|---|---|\n");
        for t in &s.tput {
            let _ = writeln!(
                o,
                "| {} | {} | {} k | {} | {} k |",
                t.entries,
                f(median(&t.weft_tcp1), 2),
                f(median(&t.weft_pps).map(|v| v / 1e3), 0),
                f(median(&t.plain_tcp1), 2),
                f(median(&t.plain_pps).map(|v| v / 1e3), 0)
            );
        }
    }
    for e in &s.errors {
        let _ = writeln!(o, "\n- failed: {}", e.lines().next().unwrap_or(""));
    }

    o.push_str("\n## Convergence\n\nA new lease for a fresh /24 carrying host B's PublicIP and VtepMAC is put into etcd (B also gets the subnet's .1 on its bridge); the bench polls host A's pinned SUBNETS map for the entry, and from container A probes .1 every 100 µs with UDP to a closed port: B's ICMP port-unreachable reply is the first packet delivered (and answered). Times from the put's start.\n\n");
    if let Some(c) = &r.converge {
        let _ = writeln!(
            o,
            "| joins | put → map entry p50 / p99 (ms) | put → first reply p50 / p99 (ms) | failed |\n|---|---|---|---|\n| {} | {} / {} | {} / {} | {} |",
            c.map_ms.len(),
            f(percentile(&c.map_ms, 0.5), 1),
            f(percentile(&c.map_ms, 0.99), 1),
            f(percentile(&c.reply_ms, 0.5), 1),
            f(percentile(&c.reply_ms, 0.99), 1),
            c.failures.len()
        );
    } else {
        o.push_str("(not measured: weft vxlan did not come up, or the run failed; see notes)\n");
    }

    o.push_str(
        "\n## Targets (reported, not asserted)\n\n| target | this run | met |\n|---|---|---|\n",
    );
    for (t, v, met) in (Targets { r }).rows() {
        let m = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(o, "| {t} | {v} | {m} |");
    }
    if !r.notes.is_empty() {
        o.push_str("\n## Notes from this run\n\n");
        for n in &r.notes {
            let _ = writeln!(o, "- {}", n.lines().next().unwrap_or(""));
        }
    }
    // The control-plane section comes from `cargo xtask chaos`, a run of
    // its own: kept from its latest JSON, so this run does not erase it.
    if let Some(chaos) = crate::chaos::latest_section() {
        o.push('\n');
        o.push_str(&chaos);
    }
    o.push_str("\n## Commands\n\n```sh\ncargo xtask setup                        # once\ncargo xtask bench                        # builds node-agent, then the full run (< 30 min); writes this file\ncargo xtask bench --quick                # < 3 min, for development; writes target/bench-quick/\n```\n\nWhat the bench runs inside the namespaces (`ip netns exec <ns> ...`):\n\n```sh\niperf3 -s -B <container B> -p 5201                        # in container B, one per mode\niperf3 -c <container B> -p 5201 -t <T> -P 1 -J -A 0,1    # and -P 4; Gbit/s = end.sum_received\nxtask udpsink --bind <B>:9000 --max-secs <T+10> --idle-ms 500\nxtask udpgen --dst <B>:9000 --secs <T> --threads 2 --size 64   # sendmmsg, one socket per core\nxtask rr-server --bind <B>:9001 --max-secs <T+15>\nxtask rr-client --dst <B>:9001 --secs <T>                # 1-byte TCP request/response, TCP_NODELAY\n```\n");
    o
}

/// Where weft falls short of plain routing on the realistic wire, each
/// gap computed from this run, and what the same run says about its cause.
fn gaps(o: &mut String, r: &Results) {
    let med = |phase: &str, mode: &str, g: Getter| {
        r.phases
            .get(phase)
            .and_then(|p| p.get(mode))
            .and_then(|s| median(g(s)))
    };
    let mut lines = Vec::new();
    for spec in MODES.iter().filter(|m| m.key.starts_with("weft")) {
        if r.na.contains_key(spec.key) {
            continue;
        }
        let mut short = Vec::new();
        for (name, g) in [
            ("TCP 1 stream", (|s| &s.tcp1) as Getter),
            ("TCP 4 streams", |s| &s.tcp4),
            ("64 B pps", |s| &s.pps),
        ] {
            if let (Some(v), Some(b)) =
                (med("realistic", spec.key, g), med("realistic", "plain", g))
                && b > 0.0
                && v / b < 0.95
            {
                short.push(format!("{name} {:.0} % of plain", v / b * 100.0));
            }
        }
        if !short.is_empty() {
            lines.push(format!("- {}: {}", spec.label, short.join(", ")));
        }
    }
    if lines.is_empty() {
        return;
    }
    o.push_str("\n**Gaps** (realistic wire, below 95 % of plain routing):\n\n");
    for l in lines {
        let _ = writeln!(o, "{l}");
    }
    let tcp = |phase: &str, mode: &str| med(phase, mode, |s| &s.tcp1);
    let (Some(plain), Some(x)) = (
        tcp("default-veth", "plain"),
        tcp("default-veth", "weft-vxlan"),
    ) else {
        return;
    };
    let mut why = format!(
        "\nWhat limits TCP, from this run: with veth's default offloads (64 KiB GSO super-packets on the wire), plain routing reaches {plain:.2} Gbit/s and weft vxlan (`auto`: the kernel VXLAN socket) {x:.2} Gbit/s."
    );
    if let Some(xdp) = tcp("default-veth", "weft-vxlan-xdp") {
        let _ = write!(
            why,
            " With `--decap-mode xdp` it reaches {xdp:.2} Gbit/s{}",
            if xdp < plain * 0.5 {
                ": an XDP program on a veth makes the kernel turn GSO and TSO off on its peer (`veth_xdp_set`; `ethtool -k` on the switch-side end shows `tcp-segmentation-offload: off` though on was requested), so the switch segments every super-packet in software, and veth's XDP copies every frame it is given (`veth_convert_skb_to_xdp_buff`). Both costs exist only on a veth: a NIC's driver-mode XDP sees MTU-sized frames in its own buffers, which is what the realistic-wire table models. That is why `auto` does not pick XDP on a veth."
            } else {
                "."
            }
        );
    }
    if let Some(t) = tcp("default-veth", "weft-vxlan-tc") {
        let _ = write!(
            why,
            " With `--decap-mode tc` it reaches {t:.2} Gbit/s: TC cannot pop a UDP tunnel off a GSO aggregate on this kernel (no BPF_F_ADJ_ROOM_DECAP_L4_UDP), so it passes aggregates (`pass_gso`) to the kernel VXLAN socket, which decapsulates them whole."
        );
    }
    o.push_str(&why);
    o.push_str("\n\n");
}

/// `ethtool -k` of host 1's cable in each phase and mode.
fn offload_table(out: &mut String, r: &Results) {
    if r.offloads.is_empty() {
        return;
    }
    out.push_str("## Offloads as measured\n\n`ethtool -k` on both ends of host 1's underlay cable during each phase (an XDP program on a veth turns GSO/TSO off on its peer, whatever was asked).\n\n| phase | mode | offloads |\n|---|---|---|\n");
    for (phase, modes) in &r.offloads {
        for spec in MODES {
            if let Some(summary) = modes.get(spec.key) {
                let _ = writeln!(out, "| {phase} | {} | {summary} |", spec.label);
            }
        }
    }
    out.push('\n');
}

/// CPU per Gbit/s at a fixed offered TCP rate, realistic wire.
fn cpu_table(out: &mut String, r: &Results) {
    let Some(p) = r.phases.get("realistic") else {
        return;
    };
    let med = |key: &str, get: Getter| p.get(key).and_then(|s| median(get(s)));
    let _ = writeln!(
        out,
        "## CPU cost (realistic wire)\n\nOne TCP stream offered at {} Gbit/s (`iperf3 -b`), a rate every mode carries. CPU is the spare capacity the run takes away: one SCHED_IDLE thread pinned to each CPU counts loop iterations during the run and during one idle second before it, and the cores used are CPUs × (1 − busy rate / idle rate), in cores per Gbit/s carried. Both hosts' work is in it, softirq included, and iperf3's own, the same in every mode. (/proc/stat's system + softirq time came out bimodal here: with tick-based accounting and idle ticks stopped, short bursts of softirq work on a mostly idle CPU are charged to idle.) Lower is better.\n\n| mode | carried Gbit/s | cores per Gbit/s | × kernel vxlan | × plain |\n|---|---|---|---|---|",
        super::traffic::CPU_RATE_GBPS
    );
    let kernel = med("kernel-vxlan", |s| &s.cpu_per_gbps);
    let plain = med("plain", |s| &s.cpu_per_gbps);
    for spec in MODES {
        if r.na.contains_key(spec.key) {
            continue;
        }
        let per = med(spec.key, |s| &s.cpu_per_gbps);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            spec.label,
            f(med(spec.key, |s| &s.cpu_gbps), 2),
            f(per, 3),
            ratio(per, kernel),
            ratio(per, plain),
        );
    }
    out.push('\n');
}

/// Picks one metric's samples.
type Getter = fn(&Samples) -> &Vec<f64>;

/// The mode comparison as a grouped bar chart: per mode, TCP 1 stream,
/// TCP 4 streams and 64 B pps as ratios to plain routing.
fn svg(r: &Results) -> String {
    let metrics: [(&str, Getter, &str); 3] = [
        ("TCP 1 stream", |s| &s.tcp1, "#4e79a7"),
        ("TCP 4 streams", |s| &s.tcp4, "#59a14f"),
        ("64 B UDP pps", |s| &s.pps, "#f28e2b"),
    ];
    let empty = BTreeMap::new();
    let p = r.phases.get("realistic").unwrap_or(&empty);
    let base: Vec<Option<f64>> = metrics
        .iter()
        .map(|(_, g, _)| p.get("plain").and_then(|s| median(g(s))))
        .collect();
    let rows: Vec<(&str, Option<Vec<Option<f64>>>)> = MODES
        .iter()
        .map(|m| {
            if r.na.contains_key(m.key) {
                (m.key, None)
            } else {
                let vals = metrics
                    .iter()
                    .zip(&base)
                    .map(
                        |((_, g, _), b)| match (p.get(m.key).and_then(|s| median(g(s))), b) {
                            (Some(v), Some(b)) if *b > 0.0 => Some(v / b),
                            _ => None,
                        },
                    )
                    .collect();
                (m.key, Some(vals))
            }
        })
        .collect();
    let max = rows
        .iter()
        .filter_map(|(_, v)| v.as_ref())
        .flatten()
        .flatten()
        .fold(1.2f64, |a, b| a.max(*b))
        .ceil()
        .max(1.5);
    let (w, h) = (900.0, 440.0);
    let (left, right, top, bottom) = (60.0, 20.0, 50.0, 110.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let y = |v: f64| top + plot_h * (1.0 - v / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">weft vs kernel: container-to-container, realistic wire, ratio to plain routing (median of rounds)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" fill="#555">{} · {}</text>"##,
        r.started,
        r.system.get("kernel").map_or("", String::as_str)
    );
    let mut t = 0.0;
    while t <= max + 1e-9 {
        let yy = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{t:.2}×</text>"##,
            w - right,
            left - 6.0,
            yy + 4.0
        );
        t += 0.25;
    }
    let y1 = y(1.0);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{y1:.1}" y2="{y1:.1}" stroke="#000" stroke-dasharray="6 4"/>"##,
        w - right
    );
    let group_w = plot_w / rows.len() as f64;
    let bar_w = group_w * 0.8 / metrics.len() as f64;
    for (i, (label, vals)) in rows.iter().enumerate() {
        let gx = left + group_w * i as f64 + group_w * 0.1;
        match vals {
            None => {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#888">n/a</text>"##,
                    gx + group_w * 0.4,
                    y1 - 8.0
                );
            }
            Some(vals) => {
                for (j, v) in vals.iter().enumerate() {
                    let Some(v) = v else { continue };
                    let x = gx + bar_w * j as f64;
                    let yy = y(*v);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                        bar_w - 2.0,
                        (top + plot_h - yy).max(0.0),
                        metrics[j].2,
                        x + bar_w / 2.0 - 1.0,
                        yy - 3.0
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            xml(label)
        );
    }
    for (j, (name, _, color)) in metrics.iter().enumerate() {
        let x = left + 180.0 * j as f64;
        let yy = h - 30.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{}" y="{yy}">{name}</text>"#,
            yy - 10.0,
            x + 16.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#555">dashed line: plain routing (1.0×)</text>"##,
        left + 560.0,
        h - 30.0
    );
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn to_json(r: &Results, kind: &str) -> Value {
    let phases: serde_json::Map<String, Value> = r
        .phases
        .iter()
        .map(|(ph, modes)| {
            let m: serde_json::Map<String, Value> = modes
                .iter()
                .map(|(k, s)| (k.clone(), s.to_json()))
                .collect();
            (ph.clone(), Value::Object(m))
        })
        .collect();
    json!({
        "kind": kind,
        "started_utc": r.started,
        "elapsed_secs": r.elapsed_secs,
        "system": r.system,
        "plan": r.plan.as_ref().map(|p| json!({"rounds": p.rounds, "default_rounds": p.default_rounds,
            "tcp_secs": p.tcp_secs, "pps_secs": p.pps_secs, "rr_secs": p.rr_secs,
            "scale_sizes": p.scale_sizes, "scale_rounds": p.scale_rounds, "joins": p.joins, "test_run_samples": p.test_run_samples})),
        "not_available": r.na,
        "phases": phases,
        "generator_ceiling_pps_sent": r.gen_ceiling,
        "generator_ceiling_pps_received": r.gen_ceiling_received,
        "bpf_cost": r.cost.iter().map(super::scale::Cost::to_json).collect::<Vec<_>>(),
        "bpf_cost_in_place": r.inplace.iter().map(super::inplace::InPlaceCost::to_json).collect::<Vec<_>>(),
        "scale": r.scale.to_json(),
        "convergence": r.converge.as_ref().map(super::converge::Convergence::to_json),
        "offloads": r.offloads,
        "notes": r.notes,
    })
}

/// Writes the raw results as JSON, then the Markdown report and the chart.
pub fn write(r: &Results) -> Result<()> {
    let quick = r.plan.as_ref().is_some_and(|p| p.quick);
    let kind = if quick { "quick" } else { "full" };
    let root = workspace_root();
    let json_name = format!("{}-{kind}.json", r.started.replace([' ', ':'], "-"));
    // A quick run's JSON stays out of bench-results/ (the record of full
    // runs), next to its report.
    let json_dir = if quick {
        root.join("target").join("bench-quick")
    } else {
        root.join("bench-results")
    };
    std::fs::create_dir_all(&json_dir)
        .with_context(|| format!("creating {}", json_dir.display()))?;
    let json_path = json_dir.join(&json_name);
    let text = serde_json::to_string_pretty(&to_json(r, kind)).context("serialising results")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("==> wrote {}", json_path.display());
    write_reports(r, &json_name)
}

/// Writes the Markdown report and the chart for results whose JSON is
/// `json_name` (in bench-results/, or target/bench-quick/ for a quick run).
fn write_reports(r: &Results, json_name: &str) -> Result<()> {
    let quick = r.plan.as_ref().is_some_and(|p| p.quick);
    let kind = if quick { "quick" } else { "full" };
    let root = workspace_root();
    let (md_path, svg_path, svg_rel, json_rel) = if quick {
        let dir = root.join("target").join("bench-quick");
        (
            dir.join("BENCHMARKS.md"),
            dir.join("bench-modes.svg"),
            "bench-modes.svg".to_owned(),
            json_name.to_owned(),
        )
    } else {
        (
            root.join("BENCHMARKS.md"),
            root.join("docs").join("bench-modes.svg"),
            "docs/bench-modes.svg".to_owned(),
            format!("bench-results/{json_name}"),
        )
    };
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&svg_path, svg(r)).with_context(|| format!("writing {}", svg_path.display()))?;
    let old = std::fs::read_to_string(&md_path).ok();
    let text = keep_migration_section(old.as_deref(), markdown(r, kind, &svg_rel, &json_rel));
    std::fs::write(&md_path, text).with_context(|| format!("writing {}", md_path.display()))?;
    println!("==> wrote {}", md_path.display());
    println!("==> wrote {}", svg_path.display());
    Ok(())
}

/// Starts the section of BENCHMARKS.md that no bench run measures: the
/// packets lost per migration from flannel and per rollback, recorded from
/// `tests/tests/migration.rs`. A re-render keeps it, from this marker to
/// the next such marker (another kept section) or the end.
const MIGRATION_MARKER: &str = "<!-- kept by xtask bench: migration from flannel -->";
const KEPT_PREFIX: &str = "<!-- kept by xtask bench";

/// `new` with the migration section of `old` (the file being replaced)
/// appended, if it had one.
fn keep_migration_section(old: Option<&str>, mut new: String) -> String {
    let Some(start) = old.and_then(|o| o.find(MIGRATION_MARKER).map(|i| &o[i..])) else {
        return new;
    };
    let end = start[MIGRATION_MARKER.len()..]
        .find(KEPT_PREFIX)
        .map_or(start.len(), |i| i + MIGRATION_MARKER.len());
    if !new.ends_with('\n') {
        new.push('\n');
    }
    new.push('\n');
    new.push_str(start[..end].trim_end());
    new.push('\n');
    new
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(v: &Value) -> Vec<(usize, f64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    let n = usize::try_from(p.get(0)?.as_u64()?).ok()?;
                    Some((n, p.get(1)?.as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Rebuilds a run's results from the JSON it wrote, so the Markdown and
/// the chart can be rendered again (by a newer report generator) from the
/// same measured data.
pub fn from_json(v: &Value) -> Result<Results> {
    use super::converge::Convergence;
    use super::scale::{Cost, ScaleResults, ScaleTput};
    let kind = v["kind"].as_str().context("no kind")?;
    let p = &v["plan"];
    let num = |k: &str| p[k].as_f64().unwrap_or(0.0);
    let plan = super::suite::Plan {
        quick: kind == "quick",
        rounds: num("rounds") as usize,
        tcp_secs: num("tcp_secs") as u32,
        pps_secs: num("pps_secs"),
        rr_secs: num("rr_secs"),
        scale_rounds: p["scale_rounds"].as_f64().unwrap_or(0.0) as usize,
        default_rounds: num("default_rounds") as usize,
        scale_sizes: floats(&p["scale_sizes"])
            .into_iter()
            .map(|x| x as usize)
            .collect(),
        joins: num("joins") as usize,
        test_run_samples: num("test_run_samples") as usize,
    };
    let map_str = |x: &Value| -> BTreeMap<String, String> {
        x.as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut phases = BTreeMap::new();
    for (ph, modes) in v["phases"].as_object().into_iter().flatten() {
        let mut m = BTreeMap::new();
        for (k, s) in modes.as_object().into_iter().flatten() {
            m.insert(
                k.clone(),
                Samples {
                    tcp1: floats(&s["tcp1_gbps"]),
                    tcp4: floats(&s["tcp4_gbps"]),
                    pps: floats(&s["pps_received"]),
                    sent_pps: floats(&s["pps_sent"]),
                    loss: floats(&s["loss"]),
                    tps: floats(&s["rr_tps"]),
                    p50_us: floats(&s["rr_p50_us"]),
                    p99_us: floats(&s["rr_p99_us"]),
                    cpu_gbps: floats(&s["cpu_gbps"]),
                    cpu_per_gbps: floats(&s["cpu_cores_per_gbps"]),
                    errors: strings(&s["errors"]),
                },
            );
        }
        phases.insert(ph.clone(), m);
    }
    let cost = v["bpf_cost"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| Cost {
            entries: c["entries"].as_u64().unwrap_or(0) as usize,
            encap_64: c["encap_64_ns"].as_f64().unwrap_or(f64::NAN),
            encap_full: c["encap_full_ns"].as_f64().unwrap_or(f64::NAN),
            decap_64: c["decap_64_ns"].as_f64().unwrap_or(f64::NAN),
            decap_full: c["decap_full_ns"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    let s = &v["scale"];
    let scale = ScaleResults {
        write_secs: pairs(&s["lease_write_secs"]),
        load_secs: pairs(&s["agent_load_secs"]),
        watch_secs: pairs(&s["running_agent_watch_secs"]),
        route_secs: pairs(&s["kernel_route_install_secs"]),
        tput: s["throughput"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| ScaleTput {
                entries: t["entries"].as_u64().unwrap_or(0) as usize,
                weft_tcp1: floats(&t["weft_tcp1_gbps"]),
                weft_pps: floats(&t["weft_pps"]),
                plain_tcp1: floats(&t["plain_tcp1_gbps"]),
                plain_pps: floats(&t["plain_pps"]),
            })
            .collect(),
        errors: strings(&s["errors"]),
    };
    let c = &v["convergence"];
    let converge = (!c.is_null()).then(|| Convergence {
        map_ms: floats(&c["map_ms"]),
        reply_ms: floats(&c["first_reply_ms"]),
        failures: strings(&c["failures"]),
    });
    Ok(Results {
        started: v["started_utc"].as_str().unwrap_or_default().to_owned(),
        plan: Some(plan),
        system: map_str(&v["system"]),
        na: map_str(&v["not_available"]),
        phases,
        gen_ceiling: floats(&v["generator_ceiling_pps_sent"]),
        gen_ceiling_received: floats(&v["generator_ceiling_pps_received"]),
        cost,
        inplace: v["bpf_cost_in_place"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(super::inplace::InPlaceCost::from_json)
            .collect(),
        scale,
        converge,
        offloads: v["offloads"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(phase, modes)| (phase.clone(), map_str(modes)))
            .collect(),
        notes: strings(&v["notes"]),
        elapsed_secs: v["elapsed_secs"].as_f64().unwrap_or(0.0),
    })
}

/// `xtask bench --report-from <json>`: renders BENCHMARKS.md and the chart
/// again from a run's raw results (the JSON itself is left as it is).
pub fn rerender(path: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let r = from_json(&v)?;
    let json_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("JSON path without a file name")?;
    write_reports(&r, &json_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rerender_keeps_the_migration_section_and_nothing_else_of_the_old_file() {
        let old = format!(
            "# old results\n\n{MIGRATION_MARKER}\n## Migrating from flannel\nlost 0\n\n<!-- kept by xtask bench: other -->\nother\n"
        );
        let new = keep_migration_section(Some(&old), "# new results\n".to_owned());
        assert_eq!(
            new,
            format!("# new results\n\n{MIGRATION_MARKER}\n## Migrating from flannel\nlost 0\n")
        );
        // Kept again on the next re-render, once.
        assert_eq!(
            keep_migration_section(Some(&new), "# new results\n".to_owned()),
            new
        );
        assert_eq!(keep_migration_section(None, "x\n".to_owned()), "x\n");
        assert_eq!(
            keep_migration_section(Some("no marker"), "x\n".to_owned()),
            "x\n"
        );
    }
}
