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
    iperf3_tcp(client, dst, streams, secs, None)
}

/// One iperf3 TCP run of `streams` streams, at most `rate_gbps` if given;
/// Gbit/s as the receiver counted it.
fn iperf3_tcp(
    client: &Netns,
    dst: Ipv4Addr,
    streams: u32,
    secs: u32,
    rate_gbps: Option<f64>,
) -> Result<f64> {
    let (dst_s, port, secs_s, streams_s) = (
        dst.to_string(),
        IPERF_PORT.to_string(),
        secs.to_string(),
        streams.to_string(),
    );
    let rate = rate_gbps.map(|r| format!("{r}G"));
    let mut args = vec![
        "iperf3", "-c", &dst_s, "-p", &port, "-t", &secs_s, "-P", &streams_s, "-J",
        // Client on core 0, server on core 1 in every mode: the same
        // placement each time instead of the scheduler's choice.
        "-A", "0,1",
    ];
    if let Some(rate) = &rate {
        args.extend(["-b", rate.as_str()]);
    }
    let mut last = String::new();
    for _ in 0..3 {
        let out = client.exec(&args)?;
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
/// do the same work, and it takes enough CPU to stand well above the spare
/// capacity probe's noise.
pub const CPU_RATE_GBPS: f64 = 3.0;

/// CPU per Gbit/s carried while `client` sends one TCP stream to `dst` at
/// [`CPU_RATE_GBPS`] for `secs`, in cores, measured as the spare CPU the
/// run takes away (see [`soak`]): all work counts, both hosts', softirq
/// included, and iperf3's own, the same in every mode. /proc/stat cannot
/// be used here: with tick-based accounting and idle ticks stopped, bursts
/// of softirq work on a mostly idle CPU are charged to idle, which gave
/// bimodal samples (0.01 or 0.4 for the same mode). Returns (Gbit/s
/// carried, cores per Gbit/s).
pub fn tcp_cpu_per_gbps(client: &Netns, dst: Ipv4Addr, secs: u32) -> Result<(f64, f64)> {
    let ((), idle_rate) = soak(|| {
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    })?;
    let (gbps, busy_rate) = soak(|| iperf3_tcp(client, dst, 1, secs, Some(CPU_RATE_GBPS)))?;
    if gbps <= 0.0 || idle_rate <= 0.0 {
        bail!("iperf3 -b to {dst} carried nothing, or the idle probe did not run");
    }
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as f64;
    let cores = cpus * (1.0 - busy_rate / idle_rate).max(0.0);
    Ok((gbps, cores / gbps))
}

/// Runs `work` while one SCHED_IDLE thread per CPU, pinned to it, counts
/// loop iterations: such threads run only when nothing else wants the CPU
/// (softirq work preempts them too), so the iterations per second they
/// manage measure the spare CPU. Returns `work`'s result and that rate.
fn soak<T>(work: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..cpus)
        .map(|cpu| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
            std::thread::spawn(move || {
                // SAFETY: affinity and policy of the calling thread only,
                // with a zeroed (then filled) cpu_set_t and sched_param.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                    let param: libc::sched_param = std::mem::zeroed();
                    libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
                }
                while !stop.load(Ordering::Relaxed) {
                    let mut x = 0u64;
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_add(i));
                    }
                    std::hint::black_box(x);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = std::time::Instant::now();
    let result = work();
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok((result?, count.load(Ordering::Relaxed) as f64 / elapsed))
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
