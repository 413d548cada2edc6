//! Running the traffic measurements between two container namespaces:
//! iperf3 for TCP throughput, the bench's own tools for packet rate and
//! request/response latency.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weft_tests::Netns;
use weft_tests::process::{self, Background, Bound};

const IPERF_PORT: u16 = 5201;
const PPS_PORT: u16 = 9000;
const RR_PORT: u16 = 9001;
/// UDP payload of the packet-rate test.
pub const SMALL_PAYLOAD: usize = 64;

/// How long a server gets to bind its socket.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts server `cmd` and waits until it has bound `addr` as `bound`
/// says, so the client that follows never races its start-up.
fn start_server(
    cmd: std::process::Command,
    bound: Bound,
    addr: SocketAddrV4,
) -> Result<Background> {
    let mut server = Background::spawn(cmd)?;
    server.wait_bound(bound, addr, SERVER_READY_TIMEOUT)?;
    Ok(server)
}

fn self_exe() -> Result<String> {
    Ok(std::env::current_exe()
        .context("locating the xtask binary")?
        .to_string_lossy()
        .into_owned())
}

fn json(text: &str, what: &str) -> Result<Value> {
    serde_json::from_str(text.trim()).with_context(|| format!("{what} printed {text:?}"))
}

/// A persistent iperf3 server in `ns` bound to `ip`.
pub fn iperf_server(ns: &Netns, ip: Ipv4Addr) -> Result<Background> {
    start_server(
        ns.command(&[
            "iperf3",
            "-s",
            "-B",
            &ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
        ]),
        Bound::TcpListen,
        SocketAddrV4::new(ip, IPERF_PORT),
    )
}

/// TCP throughput from `client` to the iperf3 server at `dst`, Gbit/s as
/// the receiver counted it.
pub fn tcp_gbps(client: &Netns, dst: Ipv4Addr, streams: u32, secs: u32) -> Result<f64> {
    let mut last = String::new();
    for _ in 0..3 {
        let out = client.exec(&[
            "iperf3",
            "-c",
            &dst.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
            // Client on core 0, server on core 1 in every mode: the same
            // placement each time instead of the scheduler's choice.
            "-A",
            "0,1",
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            let v = json(&text, "iperf3")?;
            let bps = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("iperf3 JSON without end.sum_received")?;
            return Ok(bps / 1e9);
        }
        // "the server is busy" right after a previous test: try again.
        last = format!("{text} {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("iperf3 to {dst} failed: {last}")
}

/// The offered rate of the CPU-cost run: every mode carries it on the
/// realistic wire (the slowest, XDP on a veth, about 5 Gbit/s here), so all
/// do the same work, and it is high enough that /proc/stat's 10 ms ticks
/// add up to a usable figure in a few seconds.
pub const CPU_RATE_GBPS: f64 = 3.0;

/// Kernel CPU (system, irq and softirq time of every CPU, from /proc/stat)
/// per Gbit/s carried, while `client` sends one TCP stream to `dst` at
/// [`CPU_RATE_GBPS`] for `secs`: cores per Gbit/s. The user time of iperf3
/// is left out; it is the same in every mode. Returns (Gbit/s carried,
/// cores per Gbit/s).
pub fn tcp_cpu_per_gbps(client: &Netns, dst: Ipv4Addr, secs: u32) -> Result<(f64, f64)> {
    let before = kernel_jiffies()?;
    let start = std::time::Instant::now();
    let out = client.exec(&[
        "iperf3",
        "-c",
        &dst.to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-b",
        &format!("{CPU_RATE_GBPS}G"),
        "-J",
        "-A",
        "0,1",
    ])?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = kernel_jiffies()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "iperf3 -b to {dst} failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let gbps = json(&text, "iperf3")?["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received")?
        / 1e9;
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cores = (after - before) as f64 / hz / elapsed;
    if gbps <= 0.0 {
        bail!("iperf3 -b to {dst} carried nothing");
    }
    Ok((gbps, cores / gbps))
}

/// system + irq + softirq jiffies of all CPUs together (/proc/stat's `cpu`
/// line: user nice system idle iowait irq softirq ...).
fn kernel_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().context("a /proc/stat field"))
        .collect::<Result<_>>()?;
    let field = |i: usize| v.get(i).copied().context("a short /proc/stat cpu line");
    Ok(field(2)? + field(5)? + field(6)?)
}

/// What one packet-rate run measured.
#[derive(Clone, Copy, Debug)]
pub struct Pps {
    pub sent_pps: f64,
    pub received_pps: f64,
    pub loss: f64,
}

/// One of xtask's own tools (see `tools`) as a command line in `ns`.
fn tool_command(ns: &Netns, tool: &str, args: &[&str]) -> Result<std::process::Command> {
    let exe = self_exe()?;
    let mut argv = vec![exe.as_str(), tool];
    argv.extend_from_slice(args);
    Ok(ns.command(&argv))
}

/// Runs client tool `tool` in `ns` to completion (within `timeout`) and
/// returns the JSON object it prints.
fn run_tool(ns: &Netns, tool: &str, args: &[&str], timeout: Duration) -> Result<Value> {
    let out = process::run_timeout(tool_command(ns, tool, args)?, timeout)
        .with_context(|| tool.to_owned())?;
    json(&out, tool)
}

/// A number from a tool's JSON output.
fn field(v: &Value, tool: &str, name: &str) -> Result<f64> {
    v[name]
        .as_f64()
        .with_context(|| format!("{tool}: no {name} in {v}"))
}

/// 64-byte UDP from `gen_ns` to a sink in `sink_ns` at `dst`.
pub fn udp_pps(gen_ns: &Netns, sink_ns: &Netns, dst: Ipv4Addr, secs: f64) -> Result<Pps> {
    let addr = SocketAddrV4::new(dst, PPS_PORT);
    let bind = addr.to_string();
    let max = format!("{}", secs + 10.0);
    let sink = start_server(
        tool_command(
            sink_ns,
            "udpsink",
            &["--bind", &bind, "--max-secs", &max, "--idle-ms", "500"],
        )?,
        Bound::Udp,
        addr,
    )?;
    let secs_s = format!("{secs}");
    let size = SMALL_PAYLOAD.to_string();
    let g = run_tool(
        gen_ns,
        "udpgen",
        &[
            "--dst",
            &bind,
            "--secs",
            &secs_s,
            "--threads",
            "2",
            "--size",
            &size,
        ],
        Duration::from_secs_f64(secs + 20.0),
    )?;
    let sent = field(&g, "udpgen", "sent")?;
    let elapsed = field(&g, "udpgen", "secs")?;
    let s = json(
        &sink.finish(Duration::from_secs_f64(secs + 15.0))?,
        "udpsink",
    )?;
    let received = field(&s, "udpsink", "received")?;
    Ok(Pps {
        sent_pps: sent / elapsed,
        received_pps: received / elapsed,
        loss: if sent > 0.0 {
            (1.0 - received / sent).max(0.0)
        } else {
            1.0
        },
    })
}

/// What one request/response run measured.
#[derive(Clone, Copy, Debug)]
pub struct Rr {
    pub tps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// TCP 1-byte request/response from `client_ns` to a server in
/// `server_ns` at `dst`.
pub fn tcp_rr(client_ns: &Netns, server_ns: &Netns, dst: Ipv4Addr, secs: f64) -> Result<Rr> {
    let bind = SocketAddrV4::new(dst, RR_PORT);
    let addr = bind.to_string();
    let max = format!("{}", secs + 15.0);
    let _server = start_server(
        tool_command(
            server_ns,
            "rr-server",
            &["--bind", &addr, "--max-secs", &max, "--cpu", "1"],
        )?,
        Bound::TcpListen,
        bind,
    )?;
    let secs_s = format!("{secs}");
    let v = run_tool(
        client_ns,
        "rr-client",
        &["--dst", &addr, "--secs", &secs_s, "--cpu", "0"],
        Duration::from_secs_f64(secs + 20.0),
    )?;
    let n = field(&v, "rr-client", "transactions")?;
    let elapsed = field(&v, "rr-client", "secs")?;
    Ok(Rr {
        tps: n / elapsed,
        p50_us: field(&v, "rr-client", "p50_us")?,
        p99_us: field(&v, "rr-client", "p99_us")?,
    })
}
