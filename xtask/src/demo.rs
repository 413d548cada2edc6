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
    /// Run the containers with Debian's real dockerd, one per host, started
    /// with the flags `node-agent docker-opts` prints (agents run with
    /// --ip-masq), instead of hand-made bridges.
    #[arg(long)]
    docker: bool,
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
            // Docker's recipe: weft masquerades, so Docker must not.
            host.start_agent(if args.docker { &["--ip-masq"] } else { &[] })?;
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

        if args.docker {
            docker_demo(&cluster, &hosts, &agent)?;
        } else {
            containers_demo(&hosts)?;
        }
        for host in &hosts {
            step(&format!(
                "host {}: node-agent status --pin-path {}",
                host.index(),
                host.pin_path().display()
            ));
            // In the host's namespace: status also shows its firewall rules.
            cmd::run(host.ns().command_keep_mounts(&[
                &agent.to_string_lossy(),
                "status",
                "--pin-path",
                &host.pin_path().to_string_lossy(),
                "--state-file",
                &host.state_file().to_string_lossy(),
            ]))?;
        }

        step("cleaning up (containers, agents and their pins, hosts, switch, etcd)");
        drop(hosts);
        drop(cluster);
        step("demo finished");
        Ok(())
    }

    /// Docker's recipe: dockerd on each host with `node-agent docker-opts`,
    /// a container on each, talking by their own IPs; the internet sees the
    /// host's address.
    fn docker_demo(cluster: &Cluster, hosts: &[Host<'_>], agent: &std::path::Path) -> Result<()> {
        use weft_tests::docker::{Dockerd, IpEcho};
        let image = IpEcho::build()?;
        let internet = cluster.add_host(200)?;
        let _server = image.serve_in(internet.ns(), internet.ip())?;
        step(&format!(
            "the internet: {} (no node; serves a page that echoes the caller's address)",
            internet.ip()
        ));
        let mut daemons = Vec::new();
        let mut ips = Vec::new();
        for (host, name) in hosts.iter().zip(["c1", "c2"]) {
            let mut opts = Command::new(agent);
            opts.arg("docker-opts")
                .arg("--subnet-file")
                .arg(host.subnet_file());
            let flags = weft_tests::process::run(opts)?;
            step(&format!(
                "host {}: node-agent docker-opts -> dockerd {}",
                host.index(),
                flags.trim()
            ));
            let flags: Vec<String> = flags.split_whitespace().map(str::to_owned).collect();
            let d = Dockerd::start(host, &flags)?;
            d.import(&image)?;
            let ip = d.run_echo(name)?;
            println!("    container {name}: {ip}");
            daemons.push(d);
            ips.push(ip);
        }
        for (from, to) in [(0, 1), (1, 0)] {
            let name = ["c1", "c2"][from];
            step(&format!(
                "{name} -> {} (ping, then TCP to its echo service)",
                ips[to]
            ));
            wait_until(
                Duration::from_secs(30),
                "the first ping",
                |last| match daemons[from].exec(name, &format!("ping -c 1 -W 1 {}", ips[to])) {
                    Ok(_) => Ok(Some(())),
                    Err(e) => {
                        *last = format!("{e:#}");
                        Ok(None)
                    }
                },
            )?;
            let seen = daemons[from].seen_from(name, ips[to])?;
            anyhow::ensure!(
                seen == ips[from],
                "the receiver saw {seen}, not {name}'s own IP {}",
                ips[from]
            );
            println!("    the receiver saw the connection come from {seen}, {name}'s own IP");
        }
        step(&format!("c1 -> the internet {}", internet.ip()));
        let seen = daemons[0].seen_from("c1", internet.ip())?;
        anyhow::ensure!(
            seen == hosts[0].ip(),
            "the internet saw {seen}, not host 1's {}",
            hosts[0].ip()
        );
        println!("    the internet saw {seen}: host 1, masqueraded by weft");
        step("host 1: weft's masquerade table (nft list table ip weft)");
        for line in hosts[0]
            .ns()
            .run(&["nft", "list", "table", "ip", "weft"])?
            .lines()
        {
            println!("    {line}");
        }
        Ok(())
    }

    /// Hand-made bridges, as a CNI bridge plugin would make them.
    fn containers_demo(hosts: &[Host<'_>]) -> Result<()> {
        let a = hosts[0].attach_container()?;
        let b = hosts[1].attach_container()?;
        step(&format!(
            "containers: A {} in {} on host 1, B {} in {} on host 2",
            a.ip(),
            a.ns().name(),
            b.ip(),
            b.ns().name()
        ));

        for host in hosts {
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

        Ok(())
    }
}
