//! Convergence: from the etcd put of a new lease to the entry in a peer's
//! map, and to the first reply across the new route.
//!
//! Each join puts a lease for a fresh subnet S carrying host B's PublicIP
//! and VtepMAC (B's own lease value), gives B the address S.1 on its
//! bridge, and makes S B's subnet in its pinned node config (the data path
//! only decapsulates packets for the node's own subnet), so B stands in
//! for the node that joins. The bench then polls host A's pinned SUBNETS for S, and from
//! container A sends a UDP probe to S.1 every 100 µs on a connected socket:
//! B answers with ICMP port unreachable, which the socket reports as
//! ECONNREFUSED, so the first error is the first packet delivered and
//! answered. B's own lease is never touched (deleting it stops B's agent).

use std::io::ErrorKind;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::Client;
use ipnet::Ipv4Net;
use node_agent::pinned::PinnedState;
use serde_json::{Value, json};

use super::suite::{ModeEnv, percentile};

const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_INTERVAL: Duration = Duration::from_micros(100);
/// UDP port nothing listens on, so B answers port unreachable.
const PROBE_PORT: u16 = 33434;

#[derive(Clone, Debug, Default)]
pub struct Convergence {
    pub map_ms: Vec<f64>,
    pub reply_ms: Vec<f64>,
    pub failures: Vec<String>,
}

impl Convergence {
    pub fn to_json(&self) -> Value {
        json!({"map_ms": self.map_ms, "first_reply_ms": self.reply_ms,
               "failures": self.failures,
               "map_p50_ms": percentile(&self.map_ms, 0.5), "map_p99_ms": percentile(&self.map_ms, 0.99),
               "reply_p50_ms": percentile(&self.reply_ms, 0.5), "reply_p99_ms": percentile(&self.reply_ms, 0.99)})
    }
}

pub fn run(env: &ModeEnv<'_>, joins: usize) -> Result<Convergence> {
    let host_a = env.a.host();
    let host_b = env.b.host();
    let cluster = host_a.cluster();
    let a_net = env.a.subnet_env().subnet;
    let b_net = env.b.subnet_env().subnet;
    let b_value = cluster
        .lease(b_net)?
        .with_context(|| format!("host B's lease for {b_net} is missing"))?
        .to_json();
    // One reply per probe burst would otherwise be rate limited to ~1/s.
    host_b.ns().sysctl("net.ipv4.icmp_ratelimit", "0")?;
    let pinned = host_a.pinned()?;
    let subnets: Vec<u8> = (100..=255u8)
        .filter(|k| *k != a_net.network().octets()[2] && *k != b_net.network().octets()[2])
        .take(joins)
        .collect();
    let endpoint = cluster.etcd().endpoint();
    let a_ns = env.a.ns();
    let mut out = Convergence::default();
    // The etcd client lives on a thread in the switch namespace; the probe
    // socket is created in container A's namespace and used from here.
    cluster.switch().run_in(|| -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let mut client = rt
            .block_on(Client::connect([endpoint], None))
            .context("connecting to etcd")?;
        for k in subnets {
            let s = Ipv4Net::new(Ipv4Addr::new(10, 244, k, 0), 24)?;
            let target = Ipv4Addr::new(10, 244, k, 1);
            let key = cluster.lease_key(s);
            host_b
                .ns()
                .ip(&["addr", "add", &format!("{target}/24"), "dev", "cni0"])?;
            // B stands in for the joining node that owns S: its decap
            // programs accept only packets for the node's own subnet.
            host_b.set_pinned_local_subnet(s)?;
            let probe = a_ns.run_in(|| -> Result<UdpSocket> {
                let sock = UdpSocket::bind("0.0.0.0:0").context("probe bind")?;
                sock.connect((target, PROBE_PORT))
                    .context("probe connect")?;
                sock.set_nonblocking(true).context("probe non-blocking")?;
                Ok(sock)
            })??;
            let start = Instant::now();
            rt.block_on(client.put(key.as_str(), b_value.as_str(), None))
                .context("etcd put")?;
            let res = wait_join(&pinned, s, &probe, start);
            match res {
                Ok((map, reply)) => {
                    out.map_ms.push(map.as_secs_f64() * 1e3);
                    out.reply_ms.push(reply.as_secs_f64() * 1e3);
                }
                Err(e) => out.failures.push(format!("{s}: {e:#}")),
            }
            rt.block_on(client.delete(key.as_str(), None))
                .context("etcd delete")?;
            host_b
                .ns()
                .ip(&["addr", "del", &format!("{target}/24"), "dev", "cni0"])?;
            host_b.set_pinned_local_subnet(b_net)?;
        }
        Ok(())
    })??;
    println!(
        "    {} joins: map p50 {:.1} ms p99 {:.1} ms; first reply p50 {:.1} ms p99 {:.1} ms; {} failed",
        out.map_ms.len(),
        percentile(&out.map_ms, 0.5).unwrap_or(f64::NAN),
        percentile(&out.map_ms, 0.99).unwrap_or(f64::NAN),
        percentile(&out.reply_ms, 0.5).unwrap_or(f64::NAN),
        percentile(&out.reply_ms, 0.99).unwrap_or(f64::NAN),
        out.failures.len()
    );
    Ok(out)
}

/// Polls until `s` is in the map and a probe has been answered; returns
/// both times since `start`.
fn wait_join(
    pinned: &PinnedState,
    s: Ipv4Net,
    probe: &UdpSocket,
    start: Instant,
) -> Result<(Duration, Duration)> {
    let mut map_at = None;
    let mut reply_at = None;
    let mut last_probe = None::<Instant>;
    let mut buf = [0u8; 16];
    loop {
        let now = start.elapsed();
        if now > JOIN_TIMEOUT {
            bail!(
                "timed out (map entry {}, reply {})",
                map_at.is_some(),
                reply_at.is_some()
            );
        }
        if map_at.is_none() && pinned.peer(s)?.is_some() {
            map_at = Some(now);
        }
        if reply_at.is_none() {
            match probe.recv(&mut buf) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => reply_at = Some(now),
                _ => {}
            }
        }
        if let (Some(m), Some(r)) = (map_at, reply_at) {
            return Ok((m, r));
        }
        if last_probe.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL) {
            // A send may itself report an earlier ICMP error.
            if let Err(e) = probe.send(&[0u8])
                && e.kind() == ErrorKind::ConnectionRefused
                && reply_at.is_none()
            {
                reply_at = Some(start.elapsed());
            }
            last_probe = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}
