//! The source articles' Docker recipe with Debian's real dockerd: one daemon
//! per simulated host, started with the flags `node-agent docker-opts`
//! prints, containers from a local busybox image.
//!
//! With `--ip-masq` on weft (and so `--ip-masq=false` on Docker, as
//! flannel's mk-docker-opts.sh sets it), containers reach each other by
//! their own IPs and the receiver sees the sender's container IP, while
//! traffic to the stand-in internet leaves masqueraded to the host's
//! address: after an agent restart and after the rules are deleted by hand
//! too. Without it (flannel's default) Docker masquerades everything itself.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use weft_tests::{
    CONVERGE, Cluster, Host, Signal,
    docker::{Dockerd, IpEcho},
    node_agent_binary, require_bpffs, require_root, require_tools, wait_until,
};

const NETWORK: &str = "10.244.0.0/16";
/// The stand-in for the internet: an address on the underlay that is no
/// node, and has no route to any container subnet.
const INTERNET_INDEX: u8 = 200;
const WEFT_MASQ_ARGS: [&str; 3] = ["--ip-masq", "--iptables-resync", "1"];

fn config(backend: &str) -> String {
    format!(r#"{{"Network":"{NETWORK}","SubnetLen":24,"Backend":{{"Type":"{backend}"}}}}"#)
}

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&[
        "dockerd",
        "docker",
        "nsenter",
        "tar",
        "nft",
        "iptables-save",
    ])?;
    node_agent_binary().map(drop)
}

/// `node-agent docker-opts` for `host`: the flags a user passes to dockerd.
fn docker_opts(host: &Host<'_>) -> Result<Vec<String>> {
    let agent = node_agent_binary()?;
    let out = weft_tests::process::run(weft_tests::process::command(
        &agent,
        &[
            "docker-opts",
            "--subnet-file",
            &host.subnet_file().to_string_lossy(),
        ],
    ))?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

/// Two hosts with dockerd and one echo container each, plus the internet.
struct Setup<'c> {
    // Field order is drop order: the daemons and their containers go before
    // the hosts (agents, namespaces) they run in.
    docker: Vec<Dockerd>,
    _internet_server: weft_tests::process::Background,
    hosts: Vec<Host<'c>>,
    containers: Vec<Ipv4Addr>,
    internet: Host<'c>,
    _image: IpEcho,
}

const NAMES: [&str; 2] = ["c1", "c2"];

fn start<'c>(cluster: &'c Cluster, agent_args: &[&str]) -> Result<Setup<'c>> {
    let (hosts, envs) = cluster.start_hosts(&[1, 2], agent_args, false)?;
    let image = IpEcho::build()?;
    let internet = cluster.add_host(INTERNET_INDEX)?;
    let internet_server = image.serve_in(internet.ns(), internet.ip())?;
    let mut docker = Vec::new();
    let mut containers = Vec::new();
    for ((host, env), name) in hosts.iter().zip(&envs).zip(NAMES) {
        let flags = docker_opts(host)?;
        ensure!(
            flags.contains(&format!("--ip-masq={}", !env.ipmasq)),
            "docker-opts {flags:?} for FLANNEL_IPMASQ={}",
            env.ipmasq
        );
        let d = Dockerd::start(host, &flags)?;
        d.import(&image)?;
        let ip = d.run_echo(name)?;
        ensure!(
            env.subnet.contains(&ip),
            "container {name} got {ip}, outside FLANNEL_SUBNET {}",
            env.subnet
        );
        docker.push(d);
        containers.push(ip);
    }
    Ok(Setup {
        hosts,
        docker,
        containers,
        internet,
        _internet_server: internet_server,
        _image: image,
    })
}

impl Setup<'_> {
    /// Pings and new TCP connections both ways between the containers;
    /// returns the source address each receiver saw, (c1 → c2, c2 → c1).
    fn cross_host(&self) -> Result<(Ipv4Addr, Ipv4Addr)> {
        let mut seen = Vec::new();
        for (from, to) in [(0, 1), (1, 0)] {
            let (d, dst) = (&self.docker[from], self.containers[to]);
            // The first packets may still find a neighbour unresolved.
            wait_until(
                CONVERGE,
                &format!("{} to ping {dst}", NAMES[from]),
                |last| match d.exec(NAMES[from], &format!("ping -c 1 -W 1 {dst}")) {
                    Ok(_) => Ok(Some(())),
                    Err(e) => {
                        *last = format!("{e:#}");
                        Ok(None)
                    }
                },
            )?;
            seen.push(
                d.seen_from(NAMES[from], dst)
                    .with_context(|| format!("{} → {dst} over TCP", NAMES[from]))?,
            );
        }
        Ok((seen[0], seen[1]))
    }

    /// The address the internet saw c1's connection come from.
    fn egress(&self) -> Result<Ipv4Addr> {
        self.docker[0]
            .seen_from(NAMES[0], self.internet.ip())
            .context("c1 → the internet")
    }

    /// The full check with weft masquerading.
    fn check_weft_masq(&self) -> Result<()> {
        let (at_c2, at_c1) = self.cross_host()?;
        ensure!(
            at_c2 == self.containers[0] && at_c1 == self.containers[1],
            "receivers saw {at_c2} and {at_c1}, want the container IPs {:?}",
            self.containers
        );
        let egress = self.egress()?;
        ensure!(
            egress == self.hosts[0].ip(),
            "the internet saw {egress}, want host 1's address {}",
            self.hosts[0].ip()
        );
        Ok(())
    }
}

fn with_weft_masquerade(backend: &str) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(&config(backend))?;
    let setup = start(&cluster, &WEFT_MASQ_ARGS)?;
    let host = &setup.hosts[0];
    // Docker sets FORWARD's policy to DROP when it turns forwarding on
    // itself; here the agent did that first, so set it as such a host has
    // it. The agent's accepts are then what let new connections from the
    // other host in.
    for h in &setup.hosts {
        h.ns().run(&["iptables", "-P", "FORWARD", "DROP"])?;
        wait_until(
            CONVERGE,
            "weft's accepts in iptables' FORWARD chain",
            |last| {
                *last = h.ns().run(&["iptables-save", "-t", "filter"])?;
                Ok((last.contains(&format!("-A FORWARD -s {NETWORK}"))
                    && last.contains(&format!("-A FORWARD -d {NETWORK}")))
                .then_some(()))
            },
        )?;
    }
    setup.check_weft_masq()?;

    // A restart adopts the rules, and everything still holds.
    host.kill_agent(Signal::Term)?;
    host.start_agent(&WEFT_MASQ_ARGS)?;
    host.wait_subnet_env(CONVERGE)?;
    setup.check_weft_masq()?;

    // Deleted by hand: the resync puts both back.
    host.ns().run(&["nft", "delete", "table", "ip", "weft"])?;
    let chain = host
        .ns()
        .run(&["nft", "-a", "list", "chain", "ip", "filter", "FORWARD"])?;
    let handles: Vec<&str> = chain
        .lines()
        .filter(|l| l.contains("weft: forward"))
        .filter_map(|l| l.rsplit("# handle ").next())
        .collect();
    ensure!(
        handles.len() == 2,
        "weft's forward rules by handle: {chain}"
    );
    for handle in handles {
        host.ns().run(&[
            "nft",
            "delete",
            "rule",
            "ip",
            "filter",
            "FORWARD",
            "handle",
            handle.trim(),
        ])?;
    }
    wait_until(CONVERGE, "the agent to restore its rules", |last| {
        *last = host.ns().run(&["nft", "list", "ruleset"])?;
        Ok((last.contains("table ip weft")
            && last.contains("masquerade")
            && last.matches("weft: forward").count() == 2)
            .then_some(()))
    })?;
    setup.check_weft_masq()?;
    let log = host.agent_log();
    ensure!(
        log.matches("firewall rules were missing or changed")
            .count()
            >= 1,
        "restoring not logged:\n{log}"
    );
    ensure!(host.agent_running(), "agent stopped:\n{log}");
    Ok(())
}

#[test]
fn docker_with_weft_masquerade_vxlan() -> Result<()> {
    with_weft_masquerade("vxlan")
}

#[test]
fn docker_with_weft_masquerade_ipip() -> Result<()> {
    with_weft_masquerade("ipip")
}

#[test]
fn docker_with_weft_masquerade_host_gw() -> Result<()> {
    with_weft_masquerade("host-gw")
}

/// flannel's default: weft does not masquerade, Docker does (its default
/// `--ip-masq=true`), so containers still reach each other and the internet,
/// but every receiver sees the sending host's address.
#[test]
fn docker_masquerading_itself_still_connects() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(&config("vxlan"))?;
    let setup = start(&cluster, &[])?;
    let (at_c2, at_c1) = setup.cross_host()?;
    ensure!(
        at_c2 == setup.hosts[0].ip() && at_c1 == setup.hosts[1].ip(),
        "with Docker masquerading, receivers saw {at_c2} and {at_c1}"
    );
    ensure!(
        setup.egress()? == setup.hosts[0].ip(),
        "egress not masqueraded"
    );
    let ruleset = setup.hosts[0].ns().run(&["nft", "list", "ruleset"])?;
    ensure!(
        !ruleset.contains("table ip weft"),
        "weft installed masquerade rules without --ip-masq:\n{ruleset}"
    );
    Ok(())
}
