//! `cargo xtask demo`: a two-node cluster on the shared fixtures, with a
//! ping and a TCP transfer between containers, narrated.

/// The flannel backend of the demo cluster.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Backend {
    Vxlan,
    Ipip,
    HostGw,
}

#[derive(clap::Args)]
pub struct Args {
    /// Use the node-agent already built (or $WEFT_NODE_AGENT) instead of
    /// running setup and build first; for iterating on the demo.
    #[arg(long)]
    skip_build: bool,
    /// The flannel backend the demo cluster uses.
    #[arg(long, value_enum, default_value_t = Backend::Vxlan)]
    backend: Backend,
}

/// Without the fixtures in this build: checks what can be checked before
/// building anything, then hands over.
#[cfg(not(feature = "fixtures"))]
pub fn run(args: &Args) -> anyhow::Result<()> {
    use anyhow::Context as _;
    crate::system::require_root().context("the demo creates network namespaces and loads BPF")?;
    crate::handover::run(!args.skip_build, args.skip_build)
}

#[cfg(feature = "fixtures")]
pub use narrated::run;

#[cfg(feature = "fixtures")]
mod narrated {
    use std::process::Command;
    use std::time::Duration;

    use anyhow::{Context, Result};
    use weft_tests::{Cluster, Host, node_agent_binary, wait_until};

    use super::{Args, Backend};
    use crate::cmd::{self, step};
    use crate::system::{require_bpffs, require_root};
    use crate::{build, setup};

    const TRANSFER_BYTES: u64 = 20 * 1024 * 1024;
    /// IPv4 (20) + ICMP (8) headers: the largest unfragmented ping payload
    /// is MTU - 28.
    const PING_OVERHEAD: u32 = 28;

    /// The demo's network config for `backend`.
    fn config(backend: Backend) -> &'static str {
        match backend {
            Backend::Vxlan => {
                r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#
            }
            Backend::Ipip => {
                r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"ipip"}}"#
            }
            Backend::HostGw => {
                r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#
            }
        }
    }

    pub fn run(args: &Args) -> Result<()> {
        require_root().context("the demo creates network namespaces and loads BPF")?;
        if !args.skip_build {
            setup::run(&setup::Args {})?;
            build::run(&build::Args {})?;
        }
        require_bpffs()?;
        let agent = node_agent_binary()?;
        step(&format!("agent binary: {}", agent.display()));

        step("creating the underlay switch (bridge 198.18.0.254/24) and starting etcd on it");
        let cluster = Cluster::new(config(args.backend))?;
        // The demo narrates; agent logs would only drown that out.
        cluster.set_dump_logs_on_drop(false);
        println!("    etcd endpoint: {}", cluster.etcd().endpoint());
        println!("    {} = {}", cluster.keys().config_key(), cluster.config());

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
            .get_prefix(&cluster.keys().subnets_prefix())?
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
            let peers = wait_until(
                Duration::from_secs(30),
                "a remote subnet in SUBNETS",
                |last| {
                    let peers = host.peers()?;
                    if peers.iter().any(|(_, ip)| *ip != host.ip()) {
                        Ok(Some(peers))
                    } else {
                        *last = format!("{peers:?}");
                        Ok(None)
                    }
                },
            )?;
            for (subnet, public_ip) in peers {
                println!("    {subnet} -> node {public_ip}");
            }
        }

        step(&format!("ping A -> B ({})", b.ip()));
        a.ping_until(b.ip(), Duration::from_secs(30))?;
        let out = a.ping(b.ip(), 4, 56, false)?;
        for line in out.lines().filter(|l| !l.trim().is_empty()) {
            println!("    {line}");
        }
        let full = a.subnet_env().mtu - PING_OVERHEAD;
        step(&format!(
            "full-MTU ping A -> B, {full} bytes, don't fragment"
        ));
        a.ping(b.ip(), 2, full, true)?;
        println!("    ok");

        step(&format!(
            "TCP transfer A -> B, {} MiB",
            TRANSFER_BYTES / (1024 * 1024)
        ));
        let stats = a.tcp_transfer_to(&b, TRANSFER_BYTES)?;
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
            cmd::run(status)?;
        }

        step("cleaning up (containers, agents and their pins, hosts, switch, etcd)");
        drop(a);
        drop(b);
        drop(hosts);
        drop(cluster);
        step("demo finished");
        Ok(())
    }
}
