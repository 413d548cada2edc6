//! End-to-end tests: real node agents in network namespaces, a private etcd,
//! containers attached per the CNI bridge contract, traffic between them.
//!
//! They need root, bpffs, the tools `cargo xtask setup` installs and a
//! release build of node-agent (`cargo xtask build`); without any of these
//! they fail saying which is missing. Run them one at a time
//! (`--test-threads=1`, as `cargo xtask test` does): each builds a whole
//! cluster, and two at once on a two-core machine only slows both down.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use node_agent::flannel::{LeaseAttrs, VxlanLeaseData};
use weft_common::Reason;
use weft_tests::process::{Background, Bound};
use weft_tests::{
    CONVERGE, Cluster, Container, Host, Netns, Signal, SubnetEnv, SubnetEnvExt, baseline,
    node_agent_binary, require_bpffs, require_root, require_tools, start_agents_meshed,
    switch_port, wait_full_mesh, wait_routes, wait_until,
};

const CONFIG: &str = weft_tests::VXLAN_CONFIG;

/// A backend under test: its config, the MTU flannel gives containers with
/// it, and what its packets look like on the underlay.
#[derive(Clone, Copy, Debug)]
struct Backend {
    config: &'static str,
    mtu: u32,
    wire: Wire,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// UDP to 8472 carrying VXLAN with VNI 1.
    Vxlan,
    /// IP protocol 4.
    Ipip,
    /// The container packets themselves, routed to the peer.
    Plain,
}

const VXLAN: Backend = Backend {
    config: CONFIG,
    mtu: 1450,
    wire: Wire::Vxlan,
};
const IPIP: Backend = Backend {
    config: r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"ipip"}}"#,
    mtu: 1480,
    wire: Wire::Ipip,
};
const HOST_GW: Backend = Backend {
    config: r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#,
    mtu: 1500,
    wire: Wire::Plain,
};
/// Every host of the shared-bridge topology is on the same L2 segment, so
/// DirectRouting sends them plain packets; its MTU stays VXLAN's because
/// other peers may still need the tunnel.
const VXLAN_DIRECT: Backend = Backend {
    config: r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","DirectRouting":true}}"#,
    mtu: 1450,
    wire: Wire::Plain,
};

/// Runs test function `$name(backend)` once per backend, as
/// `$name::{vxlan, ipip, host_gw, vxlan_direct_routing}`.
macro_rules! per_backend {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[test]
            fn vxlan() -> Result<()> {
                super::$name(VXLAN)
            }

            #[test]
            fn ipip() -> Result<()> {
                super::$name(IPIP)
            }

            #[test]
            fn host_gw() -> Result<()> {
                super::$name(HOST_GW)
            }

            #[test]
            fn vxlan_direct_routing() -> Result<()> {
                super::$name(VXLAN_DIRECT)
            }
        }
    };
}
const NETWORK: &str = "10.244.0.0/16";
/// The PublicIP of the bad leases: no host has it.
const INTRUDER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const VXLAN_PORT: u16 = 8472;
/// Generous for agent start-up and for etcd watch events to be applied;
/// every wait polls, so passing runs do not pay it.
const TRANSFER_BYTES: u64 = 20 * 1024 * 1024;
/// IPv4 (20) + ICMP (8) headers: the largest unfragmented ping payload is
/// MTU - 28.
const PING_OVERHEAD: u32 = 28;

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&[
        "ip", "nsenter", "etcdctl", "bpftool", "tcpdump", "ping", "ethtool", "sysctl", "python3",
        "tshark", "bridge",
    ])?;
    node_agent_binary()?;
    Ok(())
}

/// Adds hosts `indexes`, starts an agent on each, and waits for their subnet
/// files and for every agent to have every other one in its map.
fn start_hosts<'c>(
    cluster: &'c Cluster,
    indexes: &[u8],
    realistic_wire: bool,
) -> Result<(Vec<Host<'c>>, Vec<SubnetEnv>)> {
    let (hosts, envs) = cluster.start_hosts(indexes, &[], realistic_wire)?;
    for (host, env) in hosts.iter().zip(&envs) {
        check_env(cluster, host, env)?;
    }
    Ok((hosts, envs))
}

/// The subnet file matches the config and the lease in etcd names the host.
fn check_env(cluster: &Cluster, host: &Host<'_>, env: &SubnetEnv) -> Result<()> {
    let network: Ipv4Net = NETWORK.parse()?;
    ensure!(
        env.network == network,
        "host {}: FLANNEL_NETWORK {}",
        host.index(),
        env.network
    );
    let expected_mtu = [VXLAN, IPIP, HOST_GW, VXLAN_DIRECT]
        .iter()
        .find(|b| b.config == cluster.config())
        .map_or(VXLAN.mtu, |b| b.mtu);
    ensure!(
        env.mtu == expected_mtu,
        "host {}: FLANNEL_MTU {}",
        host.index(),
        env.mtu
    );
    ensure!(
        env.subnet.prefix_len() == 24,
        "host {}: subnet {} is not a /24",
        host.index(),
        env.subnet
    );
    ensure!(
        network.contains(&env.subnet),
        "host {}: subnet {} outside {NETWORK}",
        host.index(),
        env.subnet
    );
    let lease = cluster
        .lease(env.subnet)?
        .with_context(|| format!("host {}: no lease for {}", host.index(), env.subnet))?;
    ensure!(
        lease.public_ip == host.ip(),
        "the lease for {} does not name host {}'s PublicIP {}: {lease:?}",
        env.subnet,
        host.index(),
        host.ip()
    );
    Ok(())
}

/// The README's `bpftool map dump pinned <pin>/SUBNETS` works on the
/// agent's pins and lists what the agent's own reader sees. Only the entry
/// count is taken from bpftool: decoding the table is `PinnedState`'s job.
fn check_bpftool_dump(host: &Host<'_>) -> Result<()> {
    let pin = host.pin_path().join(weft_common::MAP_SUBNETS);
    let out = weft_tests::process::run(weft_tests::process::command(
        "bpftool",
        &["-j", "map", "dump", "pinned", &pin.to_string_lossy()],
    ))?;
    let dump: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bpftool printed {out:?}"))?;
    let listed = dump.as_array().map_or(0, Vec::len);
    let peers = host.peers()?;
    ensure!(
        listed == peers.len(),
        "bpftool lists {listed} SUBNETS entries, the agent's reader {peers:?}"
    );
    Ok(())
}

/// Convergence, then strict pings: small ones and a full-MTU one with DF.
fn check_ping(from: &Container<'_>, to: &Container<'_>) -> Result<()> {
    let what = || format!("{} -> {}", from.ip(), to.ip());
    from.ping_until(to.ip(), CONVERGE).with_context(what)?;
    from.ping(to.ip(), 3, 56, false).with_context(what)?;
    let full = from.subnet_env().mtu - PING_OVERHEAD;
    from.ping(to.ip(), 2, full, true)
        .with_context(|| format!("full-MTU DF ping ({full} bytes) {}", what()))?;
    // Larger than the MTU without DF: the sender fragments, each fragment
    // crosses on its own, the receiver reassembles.
    from.ping(to.ip(), 2, 3000, false)
        .with_context(|| format!("fragmented 3000-byte ping {}", what()))?;
    Ok(())
}

fn check_tcp(from: &Container<'_>, to: &Container<'_>) -> Result<()> {
    let stats = from
        .tcp_transfer_to(to, TRANSFER_BYTES)
        .with_context(|| format!("TCP {} -> {}", from.ip(), to.ip()))?;
    eprintln!(
        "TCP {} -> {}: {} bytes in {:?}",
        from.ip(),
        to.ip(),
        stats.bytes,
        stats.elapsed
    );
    Ok(())
}

/// Ping (including full-MTU DF and fragmented) and TCP, each way.
fn check_both_ways(a: &Container<'_>, b: &Container<'_>) -> Result<()> {
    check_ping(a, b)?;
    check_ping(b, a)?;
    check_tcp(a, b)?;
    check_tcp(b, a)
}

/// Captures container traffic from `from` to `to` on `from`'s switch port
/// with tshark and checks that it is what `backend` puts on the wire and
/// that it decodes cleanly, outer IPv4 checksums verified.
fn check_wire(
    cluster: &Cluster,
    backend: Backend,
    from: (&Host<'_>, &Container<'_>),
    to: (&Host<'_>, &Container<'_>),
) -> Result<()> {
    let (filter, want_proto) = match backend.wire {
        Wire::Vxlan => (
            format!("udp and dst port {VXLAN_PORT} and dst host {}", to.0.ip()),
            "17,1",
        ),
        Wire::Ipip => (format!("ip proto 4 and dst host {}", to.0.ip()), "4,1"),
        Wire::Plain => (format!("icmp and dst host {}", to.1.ip()), "1"),
    };
    let fields = [
        "ip.src",
        "ip.dst",
        "ip.proto",
        "vxlan.vni",
        "ip.checksum.status",
    ];
    let capture = weft_tests::Capture::start_tshark(
        cluster.switch(),
        &switch_port(from.0.index()),
        &filter,
        2,
        &fields,
    )?;
    from.1.ping(to.1.ip(), 3, 56, false)?;
    let seen = capture.finish(Duration::from_secs(10))?;
    let line = seen
        .lines()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("nothing matching `{filter}` on the underlay"))?;
    let cols: Vec<&str> = line.split('\t').collect();
    ensure!(
        cols.len() == fields.len(),
        "unexpected tshark line {line:?}"
    );
    let outer_src = cols[0].split(',').next().unwrap_or_default();
    let want_src = match backend.wire {
        Wire::Plain => from.1.ip(),
        _ => from.0.ip(),
    };
    ensure!(
        outer_src == want_src.to_string(),
        "outer source {outer_src}, want {want_src}: {line:?}"
    );
    ensure!(
        cols[2] == want_proto,
        "IP protocols {}, want {want_proto}: {line:?}",
        cols[2]
    );
    if backend.wire == Wire::Vxlan {
        ensure!(cols[3] == "1", "VNI {}, want 1: {line:?}", cols[3]);
    }
    let outer_checksum = cols[4].split(',').next().unwrap_or_default();
    ensure!(
        outer_checksum == "1",
        "outer IPv4 checksum not good ({outer_checksum}): {line:?}"
    );
    Ok(())
}

per_backend!(three_hosts_connect_and_a_late_joiner_becomes_reachable);
fn three_hosts_connect_and_a_late_joiner_becomes_reachable(backend: Backend) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(backend.config)?;
    let (hosts, envs) = start_hosts(&cluster, &[1, 2, 3], false)?;
    let host_refs: Vec<&Host<'_>> = hosts.iter().collect();
    // Decapsulation exactly where something arrives encapsulated: on a
    // veth, `auto` leaves VXLAN to the kernel socket of the slow-path device
    // (no program on eth0), and IP-in-IP to a hook on eth0.
    for host in &hosts {
        let pins = host.pinned_entries()?;
        let on_eth0 = pins.iter().any(|p| p.contains("weft_decap"));
        let by_device = pins
            .iter()
            .any(|p| p.ends_with(weft_common::PROG_SLOWPATH_RX_TC));
        let want = match backend.wire {
            Wire::Ipip => (true, false),
            _ if backend.config.contains("vxlan") => (false, true),
            _ => (false, false),
        };
        ensure!(
            (on_eth0, by_device) == want,
            "host {}: decap hook on eth0 {on_eth0}, through weft.vxlan {by_device}, backend {backend:?}: {pins:?}",
            host.index()
        );
    }
    check_bpftool_dump(&hosts[0])?;
    let containers = hosts
        .iter()
        .map(Host::attach_container)
        .collect::<Result<Vec<_>>>()?;

    for (i, a) in containers.iter().enumerate() {
        for (j, b) in containers.iter().enumerate() {
            if i != j {
                check_ping(a, b)?;
            }
        }
    }
    check_tcp(&containers[0], &containers[1])?;
    check_tcp(&containers[1], &containers[0])?;
    check_tcp(&containers[2], &containers[0])?;

    // Traffic the host itself originates takes the agent's route.
    for (host, target) in [(&hosts[0], &containers[1]), (&hosts[1], &containers[2])] {
        host.ns()
            .ping_until(target.ip(), CONVERGE)
            .with_context(|| format!("host {} -> container {}", host.index(), target.ip()))?;
        host.ping(target.ip(), 3, 56, false)?;
    }

    // On the wire between host 1 and the switch, container traffic to host
    // 2 looks as the backend says, and tshark decodes it cleanly.
    check_wire(
        &cluster,
        backend,
        (&hosts[0], &containers[0]),
        (&hosts[1], &containers[1]),
    )?;

    // A fourth node joins while the others keep running.
    let late = cluster.add_host(4)?;
    late.start_agent(&[])?;
    let late_env = late.wait_subnet_env(CONVERGE)?;
    check_env(&cluster, &late, &late_env)?;
    ensure!(
        envs.iter().all(|e| e.subnet != late_env.subnet),
        "late joiner got a subnet in use: {late_env:?} vs {envs:?}"
    );
    let mut all_hosts = host_refs.clone();
    all_hosts.push(&late);
    let mut all_envs: Vec<&SubnetEnv> = envs.iter().collect();
    all_envs.push(&late_env);
    wait_full_mesh(&all_hosts, &all_envs)?;
    let late_container = late.attach_container()?;
    for c in &containers {
        check_ping(c, &late_container)?;
        check_ping(&late_container, c)?;
    }
    check_tcp(&late_container, &containers[0])?;
    Ok(())
}

per_backend!(deleting_a_lease_removes_its_route_from_the_other_agents);
fn deleting_a_lease_removes_its_route_from_the_other_agents(backend: Backend) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(backend.config)?;
    let (hosts, envs) = start_hosts(&cluster, &[1, 2, 3], false)?;

    // Host 2's own agent could re-acquire its lease; stop it so what is
    // observed is only the others reacting to the deletion.
    hosts[1].kill_agent(Signal::Kill)?;
    let gone = envs[1].subnet;
    let key = cluster.lease_key(gone);
    ensure!(
        cluster.etcd().del(&key)? == 1,
        "lease {key} was not in etcd"
    );

    for (host, other) in [
        (&hosts[0], (&hosts[2], &envs[2])),
        (&hosts[2], (&hosts[0], &envs[0])),
    ] {
        wait_until(
            CONVERGE,
            &format!("host {} to drop {gone} from SUBNETS", host.index()),
            |last| {
                let have = host.peers()?;
                if have.iter().any(|(net, _)| *net == gone) {
                    *last = format!("{have:?}");
                    return Ok(None);
                }
                Ok(Some(()))
            },
        )?;
        // Only that entry goes.
        wait_routes(host, &[other])?;
    }
    Ok(())
}

per_backend!(a_killed_agent_leaves_the_data_path_and_its_restart_adopts_it);
fn a_killed_agent_leaves_the_data_path_and_its_restart_adopts_it(backend: Backend) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(backend.config)?;
    // The realistic wire here; the other tests run on veth's default
    // offloads, so both kinds of underlay see TCP.
    let (hosts, envs) = start_hosts(&cluster, &[1, 2], true)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    check_ping(&a, &b)?;
    check_ping(&b, &a)?;

    let maps = [
        weft_common::MAP_SUBNETS,
        weft_common::MAP_COUNTERS,
        weft_common::MAP_NODE_CONFIG,
    ];
    let ids_before = maps
        .iter()
        .map(|m| hosts[0].pinned_map_id(m))
        .collect::<Result<Vec<_>>>()?;
    let pins_before = hosts[0].pinned_entries()?;
    // The VXLAN backends' slow-path device, adopted by the restart.
    let vxlan = backend.config.contains("vxlan");
    let slow_path_device = || -> Result<Option<u32>> {
        Ok(if vxlan {
            Some(hosts[0].ns().link("weft.vxlan")?.0)
        } else {
            None
        })
    };
    let device_before = slow_path_device()?;

    hosts[0].kill_agent(Signal::Kill)?;
    a.ping(b.ip(), 3, 56, false)
        .context("a -> b after SIGKILL of a's agent")?;
    b.ping(a.ip(), 3, 56, false)
        .context("b -> a after SIGKILL of a's agent")?;
    ensure!(
        hosts[0].pinned_entries()? == pins_before,
        "pins changed when the agent was killed"
    );

    // The restart swaps its programs into the pinned links atomically and
    // keeps the pinned maps: a ping running across it loses nothing.
    let env_again = std::thread::scope(|s| -> Result<SubnetEnv> {
        let pinger = s.spawn(|| a.ping(b.ip(), 20, 56, false));
        std::thread::sleep(Duration::from_millis(600));
        hosts[0].start_agent(&[])?;
        let env = hosts[0].wait_subnet_env(CONVERGE)?;
        pinger
            .join()
            .map_err(|_| anyhow::anyhow!("ping thread panicked"))?
            .context("a ping across the agent restart lost packets")?;
        Ok(env)
    })?;
    ensure!(
        env_again.subnet == envs[0].subnet,
        "restarted agent leased {} instead of reusing {}",
        env_again.subnet,
        envs[0].subnet
    );
    wait_routes(&hosts[0], &[(&hosts[1], &envs[1])])?;
    let ids_after = maps
        .iter()
        .map(|m| hosts[0].pinned_map_id(m))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        ids_after == ids_before,
        "restarted agent replaced pinned maps {maps:?}: ids {ids_before:?} -> {ids_after:?}"
    );
    let pins_after: BTreeSet<String> = hosts[0].pinned_entries()?.into_iter().collect();
    let missing: Vec<&String> = pins_before
        .iter()
        .filter(|p| !pins_after.contains(*p))
        .collect();
    ensure!(missing.is_empty(), "pins gone after restart: {missing:?}");
    ensure!(
        slow_path_device()? == device_before,
        "the restart replaced the slow-path device: ifindex {device_before:?} -> {:?}",
        slow_path_device()?
    );
    check_both_ways(&a, &b)?;

    // A clean stop leaves the data path in place too.
    hosts[1].kill_agent(Signal::Term)?;
    a.ping(b.ip(), 3, 56, false)
        .context("a -> b after SIGTERM of b's agent")?;
    b.ping(a.ip(), 3, 56, false)
        .context("b -> a after SIGTERM of b's agent")?;
    Ok(())
}

#[test]
fn tc_ingress_decapsulation_interoperates_with_xdp() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let tc_host = cluster.add_host(1)?;
    let xdp_host = cluster.add_host(2)?;
    // TC decapsulation passes GSO aggregates to the stack (counted as
    // pass_gso): this kernel cannot pop a UDP tunnel off one. A real wire
    // delivers MTU-sized frames, and without a UDP tunnel socket GRO does not
    // re-aggregate them before TC ingress; veth with TSO on would deliver the
    // sender's super-packets whole, which no NIC does.
    tc_host.set_realistic_wire(true)?;
    xdp_host.set_realistic_wire(true)?;
    start_agents_meshed(&[
        (&tc_host, &["--decap-mode", "tc"]),
        (&xdp_host, &["--decap-mode", "xdp"]),
    ])?;
    let pins = tc_host.pinned_entries()?;
    ensure!(
        pins.iter().any(|p| p.ends_with(weft_common::PROG_DECAP_TC))
            && !pins
                .iter()
                .any(|p| p.ends_with(weft_common::PROG_DECAP_XDP)),
        "--decap-mode tc must pin only the TC decap link: {pins:?}"
    );
    let marks = [
        MarkCounters::install(tc_host.ns())?,
        MarkCounters::install(xdp_host.ns())?,
    ];
    let a = tc_host.attach_container()?;
    let b = xdp_host.attach_container()?;
    check_both_ways(&a, &b)?;
    // Both hooks mark what they decapsulate, and only that: every container
    // packet that arrives on eth0 came through the tunnel.
    for (host, counters) in [&tc_host, &xdp_host].into_iter().zip(&marks) {
        let (marked, unmarked) = counters.read()?;
        ensure!(
            marked > 0 && unmarked == 0,
            "host {}: {marked} container packets on eth0 carried --decap-mark, {unmarked} did not",
            host.index()
        );
    }
    Ok(())
}

/// `--decap-mode device` on veth's default offloads, where XDP on the
/// receiver would strip GSO from its peer and TC cannot pop a tunnel off a
/// GSO aggregate: no program on eth0, the kernel VXLAN socket of
/// `weft.vxlan` decapsulates whole aggregates, and `weft_slowpath_rx_tc`
/// checks, marks and forwards every packet. The peer decapsulates at XDP:
/// the two modes interoperate.
#[test]
fn device_decapsulation_carries_gso_traffic_on_default_veth_offloads() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let device_host = cluster.add_host(1)?;
    let xdp_host = cluster.add_host(2)?;
    start_agents_meshed(&[
        (&device_host, &["--decap-mode", "device"]),
        (&xdp_host, &["--decap-mode", "xdp"]),
    ])?;
    let pins = device_host.pinned_entries()?;
    ensure!(
        pins.iter()
            .any(|p| p.ends_with(weft_common::PROG_SLOWPATH_RX_TC))
            && !pins.iter().any(|p| {
                p.ends_with(weft_common::PROG_DECAP_XDP) || p.ends_with(weft_common::PROG_DECAP_TC)
            }),
        "--decap-mode device must pin no decap program on eth0, only the slow-path device's: {pins:?}"
    );
    let marks = MarkCounters::install(device_host.ns())?;
    let a = device_host.attach_container()?;
    let b = xdp_host.attach_container()?;
    check_both_ways(&a, &b)?;
    let (marked, unmarked) = marks.read()?;
    ensure!(
        marked > 0 && unmarked == 0,
        "{marked} container packets on eth0 carried --decap-mark, {unmarked} did not"
    );
    let pinned = device_host.pinned()?;
    let through_device = pinned.counter(Reason::DecapsulatedSlowPath)?;
    ensure!(
        through_device > 0 && pinned.counter(Reason::Decapsulated)? == 0,
        "the device host decapsulated {through_device} packets through weft.vxlan and {} elsewhere",
        pinned.counter(Reason::Decapsulated)?
    );
    // The default, --host-routing kernel, never bypasses the host's stack.
    ensure!(
        pinned.counter(Reason::DeliveredDirect)? == 0,
        "--host-routing kernel delivered packets past IP forwarding"
    );
    Ok(())
}

/// `--host-routing bpf`: the decap programs hand decapsulated packets
/// straight to the container's bridge, so the host's IP forwarding and
/// netfilter's FORWARD hook never see them, on both hooks that support it
/// (the slow-path device's program under `device`, and TC ingress). The
/// routers' TTL decrement still happens (a ping crosses two hops either
/// way), and the first packets to a container, before its neighbour entry
/// exists, take the kernel's path, which resolves it.
#[test]
fn bpf_host_routing_delivers_to_containers_past_ip_forwarding() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let device_host = cluster.add_host(1)?;
    let tc_host = cluster.add_host(2)?;
    start_agents_meshed(&[
        (
            &device_host,
            &["--decap-mode", "device", "--host-routing", "bpf"],
        ),
        (&tc_host, &["--decap-mode", "tc", "--host-routing", "bpf"]),
    ])?;
    let forwarded = [
        ForwardCounter::install(device_host.ns())?,
        ForwardCounter::install(tc_host.ns())?,
    ];
    let a = device_host.attach_container()?;
    let b = tc_host.attach_container()?;
    check_both_ways(&a, &b)?;
    for (from, to) in [(&a, &b), (&b, &a)] {
        let out = from.ping(to.ip(), 1, 56, false)?;
        ensure!(
            out.contains("ttl=62"),
            "a reply crosses two routers (its own host's forwarding, then the other's decap), so it arrives with TTL 62: {out}"
        );
    }
    for (host, counter) in [(&device_host, &forwarded[0]), (&tc_host, &forwarded[1])] {
        let pinned = host.pinned()?;
        let direct = pinned.counter(Reason::DeliveredDirect)?;
        let up_the_stack =
            pinned.counter(Reason::Decapsulated)? + pinned.counter(Reason::DecapsulatedSlowPath)?;
        let through_forward = counter.packets()?;
        // Two 20 MiB transfers and their ACKs are hundreds of packets each
        // way even where GRO merges them; only the few before the
        // neighbour entry may take the kernel's path.
        ensure!(
            direct > 200 && through_forward < direct / 20 && up_the_stack < direct / 20,
            "host {}: {direct} packets delivered by BPF host routing, {up_the_stack} decapsulated up the stack, {through_forward} tunnelled container packets through FORWARD",
            host.index()
        );
    }
    Ok(())
}

/// An nftables counter, in a host's forward hook, of container packets that
/// arrived on eth0 (so, decapsulated ones).
struct ForwardCounter<'n> {
    ns: &'n Netns,
}

impl<'n> ForwardCounter<'n> {
    const TABLE: &'static str = "weft_test_forward";

    fn install(ns: &'n Netns) -> Result<Self> {
        ns.run(&["nft", "add", "table", "ip", Self::TABLE])?;
        ns.run(&[
            "nft",
            "add chain ip",
            Self::TABLE,
            "seen { type filter hook forward priority -300 ; }",
        ])?;
        ns.run(&[
            "nft",
            "add rule ip",
            Self::TABLE,
            "seen iifname eth0 ip saddr",
            NETWORK,
            "counter",
        ])?;
        Ok(Self { ns })
    }

    fn packets(&self) -> Result<u64> {
        let listing = self.ns.run(&["nft", "list", "table", "ip", Self::TABLE])?;
        let n = listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .with_context(|| format!("no packet count in:\n{listing}"))?;
        n.parse().with_context(|| format!("packet count {n:?}"))
    }
}

/// nftables counters, in a host's prerouting, of container packets arriving
/// on eth0 with and without weft's default decapsulation mark.
struct MarkCounters<'n> {
    ns: &'n Netns,
}

impl<'n> MarkCounters<'n> {
    const TABLE: &'static str = "weft_test_marks";

    fn install(ns: &'n Netns) -> Result<Self> {
        let mark = format!("{:#x}", weft_common::DEFAULT_DECAP_MARK);
        ns.run(&["nft", "add", "table", "ip", Self::TABLE])?;
        ns.run(&[
            "nft",
            "add chain ip",
            Self::TABLE,
            "pre { type filter hook prerouting priority -300 ; }",
        ])?;
        for (cmp, comment) in [("==", "marked"), ("!=", "unmarked")] {
            ns.run(&[
                "nft",
                "add rule ip",
                Self::TABLE,
                "pre iifname eth0 ip saddr",
                NETWORK,
                &format!("meta mark and {mark} {cmp} {mark} counter comment"),
                &format!("\"{comment}\""),
            ])?;
        }
        Ok(Self { ns })
    }

    /// (marked, unmarked) packet counts.
    fn read(&self) -> Result<(u64, u64)> {
        let listing = self.ns.run(&["nft", "list", "table", "ip", Self::TABLE])?;
        let packets = |comment: &str| -> Result<u64> {
            let line = listing
                .lines()
                .find(|l| l.contains(&format!("comment \"{comment}\"")))
                .with_context(|| format!("no {comment} rule in:\n{listing}"))?;
            let n = line
                .split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
                .with_context(|| format!("no packet count in {line:?}"))?;
            n.parse().with_context(|| format!("packet count {n:?}"))
        };
        Ok((packets("marked")?, packets("unmarked")?))
    }
}

#[test]
fn weft_interoperates_with_a_flannel_kernel_vxlan_node() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let weft = cluster.add_host(1)?;
    let flannel = cluster.add_host(2)?;
    // Host 2 is set up exactly as flanneld's vxlan backend does it, with its
    // lease in etcd as flanneld writes it.
    let (flannel_env, flannel_lease) = baseline::flannel_vxlan_node(&flannel, 200)?;
    cluster.put_lease(flannel_env.subnet, &flannel_lease)?;
    weft.start_agent(&[])?;
    let weft_env = weft.wait_subnet_env(CONVERGE)?;
    // flanneld reads weft's lease from etcd and programs the peer from it.
    let weft_lease = cluster
        .lease(weft_env.subnet)?
        .with_context(|| format!("no lease for {}", weft_env.subnet))?;
    baseline::flannel_vxlan_add_peer(&flannel, &weft_lease, &weft_env)?;
    wait_routes(&weft, &[(&flannel, &flannel_env)])?;

    let a = weft.attach_container()?;
    let b = flannel.attach_container()?;
    check_both_ways(&a, &b)?;
    Ok(())
}

#[test]
fn bad_leases_and_an_etcd_outage_do_not_stop_forwarding() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, envs) = start_hosts(&cluster, &[1, 2], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    check_ping(&a, &b)?;

    // Garbage the agents must log and skip: a value that is not JSON, a key
    // that is not a subnet, a lease outside the network, and a lease that
    // claims host 2's subnet again from another address.
    let etcd = cluster.etcd();
    let intruder = LeaseAttrs {
        public_ip: INTRUDER_IP,
        backend_type: "vxlan".to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: None,
            vtep_mac: [0x02, 0, 0, 0, 0, 0x09],
        }),
    };
    etcd.put(&cluster.lease_key("10.244.250.0/24".parse()?), "{not json")?;
    etcd.put(
        &format!("{}not-a-subnet", cluster.keys().subnets_prefix()),
        &intruder.to_json(),
    )?;
    cluster.put_lease("10.99.0.0/24".parse()?, &intruder)?;
    let overlapping = Ipv4Net::new(envs[1].subnet.network(), 23)?.trunc();
    cluster.put_lease(overlapping, &intruder)?;

    // An outage: the data path keeps forwarding on the table it has.
    etcd.stop();
    a.ping(b.ip(), 5, 56, false)
        .context("a -> b with etcd down")?;
    b.ping(a.ip(), 5, 56, false)
        .context("b -> a with etcd down")?;
    etcd.restart()?;

    // After reconnecting, the agents follow etcd again: a new node appears
    // in their tables, the garbage never does.
    let late = cluster.add_host(3)?;
    late.start_agent(&[])?;
    let late_env = late.wait_subnet_env(CONVERGE)?;
    wait_routes(&hosts[0], &[(&hosts[1], &envs[1]), (&late, &late_env)])?;
    wait_routes(&hosts[1], &[(&hosts[0], &envs[0]), (&late, &late_env)])?;
    for host in &hosts {
        let table = host.peers()?;
        ensure!(
            table.len() == 2 && table.iter().all(|(_, ip)| *ip != INTRUDER_IP),
            "host {}: a bad lease got into SUBNETS: {table:?}",
            host.index()
        );
        let log = host.agent_log();
        ensure!(
            log.contains("skipping"),
            "host {}: bad leases not logged:\n{log}",
            host.index()
        );
        let lost = log.matches("etcd watch lost").count();
        ensure!(
            lost == 1,
            "host {}: outage reported {lost} times, want once:\n{log}",
            host.index()
        );
        ensure!(host.agent_running(), "host {}: agent stopped", host.index());
    }
    let c = late.attach_container()?;
    check_ping(&a, &c)?;
    check_ping(&c, &b)?;
    Ok(())
}

#[test]
fn cleanup_removes_everything_the_agent_created() -> Result<()> {
    preflight()?;
    require_tools(&["nft", "iptables"])?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, _envs) =
        cluster.start_hosts(&[1, 2], &["--ip-masq", "--iptables-resync", "1"], false)?;
    let host = &hosts[0];
    // An iptables FORWARD chain (as Docker makes) gets weft's accepts too.
    host.ns().run(&["iptables", "-P", "FORWARD", "DROP"])?;
    let ours = |host: &Host<'_>| -> Result<usize> {
        Ok(host
            .ns()
            .run(&["nft", "list", "ruleset"])?
            .matches("comment \"weft:")
            .count())
    };
    wait_until(CONVERGE, "weft's four firewall rules", |last| {
        let n = ours(host)?;
        *last = format!("{n} rules");
        Ok((n == 4).then_some(()))
    })?;
    let route = |host: &Host<'_>| host.ns().ip(&["route", "show", NETWORK]);
    let managed = |host: &Host<'_>| -> Result<String> {
        let neigh = host.ns().ip(&["neigh", "show", "dev", "eth0"])?;
        Ok(neigh
            .lines()
            .filter(|l| l.contains("managed"))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    // The route follows the subnet file by a moment, and the managed
    // neighbour entry for the peer follows its lease.
    wait_until(
        CONVERGE,
        "the cluster route and the peer's neighbour entry",
        |last| {
            *last = format!("{}{}", route(host)?, managed(host)?);
            Ok((!route(host)?.trim().is_empty() && !managed(host)?.is_empty()).then_some(()))
        },
    )?;
    let slow_path_device = |host: &Host<'_>| -> Result<bool> {
        Ok(host
            .ns()
            .exec(&["ip", "link", "show", "weft.vxlan"])?
            .status
            .success())
    };
    ensure!(slow_path_device(host)?, "no slow-path device weft.vxlan");
    host.kill_agent(Signal::Term)?;
    let (pin, file) = (host.pin_path(), host.subnet_file());
    host.agent_cleanup()?;
    ensure!(
        !slow_path_device(host)?,
        "the slow-path device weft.vxlan is left"
    );
    ensure!(!pin.exists(), "{} still exists", pin.display());
    ensure!(!file.exists(), "{} still exists", file.display());
    ensure!(
        managed(host)?.is_empty(),
        "managed neighbours left: {}",
        managed(host)?
    );
    let gateway = host
        .ns()
        .ip(&["neigh", "show", "10.244.0.0", "dev", "eth0"])?;
    ensure!(
        gateway.trim().is_empty(),
        "the cluster route's neighbour entry is left: {gateway}"
    );
    ensure!(
        route(host)?.trim().is_empty(),
        "cluster route left: {}",
        route(host)?
    );
    let link = host.ns().ip(&["link", "show", "eth0"])?;
    ensure!(!link.contains("xdp"), "XDP still attached: {link}");
    let ruleset = host.ns().run(&["nft", "list", "ruleset"])?;
    ensure!(
        ours(host)? == 0 && !ruleset.contains("table ip weft"),
        "firewall rules left:\n{ruleset}"
    );
    ensure!(
        ruleset.contains("chain FORWARD"),
        "cleanup removed iptables' own chain:\n{ruleset}"
    );
    Ok(())
}

#[test]
fn direct_routing_tunnels_only_to_peers_off_the_local_segment() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(VXLAN_DIRECT.config)?;
    let near = cluster.add_host(1)?;
    let neighbour = cluster.add_host(2)?;
    // Behind the switch namespace acting as a router: another L2 segment.
    let far = cluster.add_routed_host(3)?;
    let hosts = [&near, &neighbour, &far];
    for host in hosts {
        host.start_agent(&[])?;
    }
    let envs = hosts
        .iter()
        .map(|h| h.wait_subnet_env(CONVERGE))
        .collect::<Result<Vec<_>>>()?;
    wait_full_mesh(&hosts, &envs.iter().collect::<Vec<_>>())?;
    let a = near.attach_container()?;
    let b = neighbour.attach_container()?;
    let c = far.attach_container()?;
    for (x, y) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&b, &c)] {
        check_ping(x, y)?;
    }
    check_tcp(&a, &c)?;
    check_tcp(&c, &a)?;
    // The capture on host 1's port shows plain packets to the peer on its
    // segment and VXLAN to the one behind the router.
    check_wire(&cluster, VXLAN_DIRECT, (&near, &a), (&neighbour, &b))?;
    check_wire(&cluster, VXLAN, (&near, &a), (&far, &c))?;
    Ok(())
}

per_backend!(tcp_completes_from_containers_whose_mtu_is_too_high);
fn tcp_completes_from_containers_whose_mtu_is_too_high(backend: Backend) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(backend.config)?;
    let (hosts, _envs) = start_hosts(&cluster, &[1, 2], true)?;
    // Both ends too high, so MSS clamping cannot hide the problem: full-size
    // DF segments must meet "fragmentation needed" and path MTU discovery
    // must shrink them.
    let too_high = Some(backend.mtu + 500);
    let a = hosts[0].attach_container_with_mtu(too_high)?;
    let b = hosts[1].attach_container_with_mtu(too_high)?;
    a.ping_until(b.ip(), CONVERGE)?;
    check_tcp(&a, &b)?;
    check_tcp(&b, &a)?;
    let full = backend.mtu - PING_OVERHEAD;
    a.ping(b.ip(), 2, full, true)
        .context("full-MTU ping after PMTU discovery")?;

    // A socket in IP_PMTUDISC_PROBE mode sets DF and ignores the route MTU,
    // so its datagram reaches the encap program too big; the program's own
    // ICMP reply must reach the socket's error queue naming the tunnel MTU.
    if backend.wire != Wire::Plain {
        let script = r#"
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 3)  # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.connect((sys.argv[1], 9))
s.send(b"x" * 1472)
deadline = time.time() + 3
while time.time() < deadline:
    try:
        _, anc, _, _ = s.recvmsg(2048, 1024, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    except BlockingIOError:
        time.sleep(0.05)
        continue
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == 11:
            _, origin, icmp_type, icmp_code, _, info = struct.unpack("IBBBBI", data[:12])
            print(f"origin={origin} type={icmp_type} code={icmp_code} mtu={info}")
            sys.exit(0)
print("no error queued")
"#;
        let dst = b.ip().to_string();
        let out = hosts[0].ns().run(&["python3", "-c", script, &dst])?;
        let want = format!("origin=2 type=3 code=4 mtu={}", backend.mtu);
        ensure!(
            out.contains(&want),
            "want an ICMP error {want} on the socket, got: {out}"
        );
    }
    Ok(())
}

#[test]
fn the_agent_puts_back_its_route_and_neighbours_after_removal_and_a_link_flap() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, _envs) = start_hosts(&cluster, &[1, 2], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    check_ping(&a, &b)?;
    let host = &hosts[0];
    let peer_ip = hosts[1].ip().to_string();
    let route = |host: &Host<'_>| host.ns().ip(&["route", "show", NETWORK]);
    let managed = |host: &Host<'_>| -> Result<bool> {
        let neigh = host.ns().ip(&["neigh", "show", &peer_ip, "dev", "eth0"])?;
        Ok(neigh.contains("managed"))
    };
    let wait_route_back = |what: &str| {
        wait_until(CONVERGE, what, |last| {
            *last = route(host)?;
            Ok(last.contains("onlink").then_some(()))
        })
    };
    wait_until(CONVERGE, "the peer's managed neighbour entry", |last| {
        *last = host.ns().ip(&["neigh", "show", "dev", "eth0"])?;
        Ok(managed(host)?.then_some(()))
    })?;

    // Removed by hand, as a careless `ip route flush` would.
    host.ns().ip(&["route", "del", NETWORK])?;
    wait_route_back("the cluster route, deleted by hand, back")?;
    check_ping(&a, &b)?;

    // The gateway's permanent neighbour entry and the peer's managed one.
    host.ns()
        .ip(&["neigh", "del", "10.244.0.0", "dev", "eth0"])?;
    host.ns().ip(&["neigh", "del", &peer_ip, "dev", "eth0"])?;
    wait_until(CONVERGE, "both neighbour entries back", |last| {
        *last = host.ns().ip(&["neigh", "show", "dev", "eth0"])?;
        Ok((last.contains("10.244.0.0") && managed(host)?).then_some(()))
    })?;

    // A link flap: the kernel flushes the routes through eth0 when it goes
    // down; the agent puts the cluster route back when it comes up.
    host.ns().ip(&["link", "set", "eth0", "down"])?;
    wait_until(CONVERGE, "the kernel to flush the route", |last| {
        *last = route(host)?;
        Ok(last.trim().is_empty().then_some(()))
    })?;
    host.ns().ip(&["link", "set", "eth0", "up"])?;
    wait_route_back("the cluster route back after the link came up")?;
    ensure!(
        route(host)?.contains(&format!("mtu {}", a.subnet_env().mtu)),
        "route lost its MTU: {}",
        route(host)?
    );
    check_both_ways(&a, &b)?;

    let log = host.agent_log();
    ensure!(
        log.contains("cluster route was removed; putting it back")
            && log.contains("host networking repaired"),
        "repairs not logged:\n{log}"
    );
    ensure!(host.agent_running(), "agent stopped:\n{log}");
    Ok(())
}

/// Sends one crafted tunnel packet from a namespace: VXLAN (VNI 1, port 8472)
/// over a UDP socket, or IP-in-IP over a raw protocol-4 socket (the kernel
/// adds the outer header), carrying UDP `inner_src:9999 -> inner_dst:9999`
/// with payload `tag`.
const INJECT: &str = r#"
import socket, struct, sys
kind, outer_dst, src, dst, tag = sys.argv[1:6]
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
payload = tag.encode()
udp = struct.pack("!HHHH", 9999, 9999, 8 + len(payload), 0) + payload
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                  socket.inet_aton(src), socket.inet_aton(dst))
ip = hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + udp
if kind == "vxlan":
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    vxlan = struct.pack("!II", 0x08000000, 1 << 8)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(vxlan + eth + ip, (outer_dst, 8472))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
    s.sendto(ip, (outer_dst, 0))
"#;

/// Receives UDP on port 9999 for two seconds and prints each payload.
const LISTEN: &str = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(0.2)
end = time.time() + 2
while time.time() < end:
    try:
        print(s.recv(2048).decode(), flush=True)
    except socket.timeout:
        pass
"#;

/// One crafted packet: tag, sending namespace, outer destination, inner
/// source and destination, and the reason it must be counted under (`None`:
/// honest, decapsulated and delivered).
type Injection<'a> = (
    &'a str,
    &'a Netns,
    &'a str,
    &'a str,
    &'a str,
    Option<Reason>,
);

/// What a host that is no node, or a node lying about its containers, can
/// send with the right VNI and port is dropped and counted; the same packet
/// with honest addresses from a node arrives (so the injection works).
fn injected_tunnel_packets_are_dropped_and_counted(backend: Backend) -> Result<()> {
    preflight()?;
    let kind = match backend.wire {
        Wire::Vxlan => "vxlan",
        Wire::Ipip => "ipip",
        Wire::Plain => bail!("no tunnel to inject into"),
    };
    let cluster = Cluster::new(backend.config)?;
    let (hosts, envs) = start_hosts(&cluster, &[1, 2, 3], false)?;
    let stranger = cluster.add_host(150)?;
    let target = hosts[0].attach_container()?;
    let target_ip = target.ip().to_string();
    let host1 = hosts[0].ip().to_string();
    let from_node2 = envs[1].host_addr(9)?.to_string();
    let in_node3 = envs[2].host_addr(9)?.to_string();
    let nobody = "10.244.250.9";
    let mut cases: Vec<Injection<'_>> = vec![
        (
            "honest",
            hosts[1].ns(),
            &host1,
            &from_node2,
            &target_ip,
            None,
        ),
        (
            "stranger",
            stranger.ns(),
            &host1,
            &from_node2,
            &target_ip,
            Some(Reason::DropUnknownSource),
        ),
        (
            "spoofed-source",
            hosts[1].ns(),
            &host1,
            &in_node3,
            &target_ip,
            Some(Reason::DropSpoofedInnerSource),
        ),
        (
            "nobodys-source",
            hosts[1].ns(),
            &host1,
            nobody,
            &target_ip,
            Some(Reason::DropSpoofedInnerSource),
        ),
        (
            "other-node",
            hosts[1].ns(),
            &host1,
            &from_node2,
            &in_node3,
            Some(Reason::DropForeignInnerDestination),
        ),
        (
            "multicast",
            hosts[1].ns(),
            &host1,
            &from_node2,
            "224.0.0.18",
            Some(Reason::DropForeignInnerDestination),
        ),
    ];
    // A second address of host 1's underlay interface: the kernel VXLAN
    // socket of the slow path listens on every address, a peer only sends
    // to the PublicIP. Only VXLAN has such a socket; an IP-in-IP packet to
    // it is no tunnel packet for this node.
    let other_local = "198.18.0.201";
    if kind == "vxlan" {
        hosts[0]
            .ns()
            .ip(&["addr", "add", &format!("{other_local}/24"), "dev", "eth0"])?;
        cases.push((
            "other-local-address",
            hosts[1].ns(),
            other_local,
            &from_node2,
            &target_ip,
            Some(Reason::DropForeignOuterDestination),
        ));
    }
    let python = "python3";
    // An honest packet is decapsulated at a hook on eth0 or, where the
    // kernel VXLAN socket decapsulates (`auto` on a veth), by the slow path.
    let count = |reason: Option<Reason>| -> Result<u64> {
        let pinned = hosts[0].pinned()?;
        Ok(match reason {
            Some(r) => pinned.counter(r)?,
            None => {
                pinned.counter(Reason::Decapsulated)?
                    + pinned.counter(Reason::DecapsulatedSlowPath)?
            }
        })
    };
    for (tag, from, outer_dst, src, dst, reason) in cases {
        let counted = reason.map_or("decapsulated", |r| r.name());
        let before = count(reason)?;
        let mut listener = Background::spawn(target.ns().command(&[python, "-c", LISTEN]))?;
        listener.wait_bound(
            Bound::Udp,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9999),
            Duration::from_secs(10),
        )?;
        from.run(&[python, "-c", INJECT, kind, outer_dst, src, dst, tag])?;
        let received = listener.finish(Duration::from_secs(10))?;
        let after = count(reason)?;
        match reason {
            None => ensure!(
                received.contains(tag),
                "{kind}, {tag}: the honest packet did not arrive ({received:?})"
            ),
            Some(_) => ensure!(
                !received.contains(tag),
                "{kind}, {tag}: an injected packet reached the container"
            ),
        }
        ensure!(
            after > before,
            "{kind}, {tag}: {counted} did not move ({before} -> {after})"
        );
    }
    Ok(())
}

#[test]
fn injected_vxlan_is_dropped_and_counted() -> Result<()> {
    injected_tunnel_packets_are_dropped_and_counted(VXLAN)
}

#[test]
fn injected_ipip_is_dropped_and_counted() -> Result<()> {
    injected_tunnel_packets_are_dropped_and_counted(IPIP)
}

/// A Network whose one route would take over an underlay route is refused
/// before the agent changes anything on the host, with an error naming the
/// route; the route is left alone.
#[test]
fn a_network_capturing_an_underlay_route_is_refused() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let host = cluster.add_host(1)?;
    // Say the etcd or a routed peer of this site sits in 10.244.77.0/24.
    let underlay = "10.244.77.0/24";
    host.ns().ip(&[
        "route",
        "add",
        underlay,
        "via",
        &weft_tests::SWITCH_IP.to_string(),
    ])?;
    host.start_agent(&["--ip-masq"])?;
    wait_until(CONVERGE, "the agent to refuse and exit", |last| {
        *last = host.agent_log();
        Ok((!host.agent_running()).then_some(()))
    })?;
    let log = host.agent_log();
    ensure!(
        log.contains(&format!(
            "would capture the existing route {underlay} via {}",
            weft_tests::SWITCH_IP
        )),
        "the refusal does not name the route:\n{log}"
    );
    let routes = host.ns().ip(&["route", "show"])?;
    ensure!(
        routes.contains(underlay) && !routes.contains(NETWORK),
        "routes changed:\n{routes}"
    );
    ensure!(!host.subnet_file().exists(), "subnet file written");
    ensure!(
        !host.pin_path().exists(),
        "BPF objects pinned at {}",
        host.pin_path().display()
    );
    let ruleset = host.ns().run(&["nft", "list", "ruleset"])?;
    ensure!(
        !ruleset.contains("weft"),
        "firewall rules installed:\n{ruleset}"
    );
    Ok(())
}

/// The MTU of the hop in the middle of [`path_mtu_never_black_holes`]'s
/// underlay: below the nodes' 1500, so full-size VXLAN packets (1450 inner
/// + 50) must be fragmented on the way.
const NARROW_HOP_MTU: u32 = 1400;
/// An IPv4 datagram size over the cluster MTU (1450) but within the hosts'
/// 1500-byte interfaces: what a host socket that ignores the route's MTU
/// sends whole, without DF. A container (MTU 1450) fragments it itself.
const BIG_DATAGRAM: usize = 1480;
/// Its UDP payload (IPv4 20 + UDP 8 bytes of headers).
const BIG_PAYLOAD: usize = BIG_DATAGRAM - 28;

/// Sends `count` datagrams of `payload` UDP bytes (usually [`BIG_PAYLOAD`])
/// from a socket in `from`
/// with `IP_MTU_DISCOVER` = `pmtudisc` (so it sizes by the device MTU and
/// never sets DF) to a socket bound in `to` at `to_ip`, and checks that each
/// arrives whole and unchanged. `Ok(false)` when the sending kernel refuses
/// the datagram with `EMSGSIZE` (an `IP_PMTUDISC_INTERFACE` socket on a
/// device whose MTU is below it: it neither fragments nor sets DF).
fn big_datagrams_arrive(
    from: &Netns,
    to: &Netns,
    to_ip: Ipv4Addr,
    pmtudisc: libc::c_int,
    count: u8,
    payload: usize,
) -> Result<bool> {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd as _;
    const PORT: u16 = 7788;
    let receiver = to
        .run_in(|| UdpSocket::bind(SocketAddrV4::new(to_ip, PORT)))?
        .with_context(|| format!("binding {to_ip}:{PORT} in {}", to.name()))?;
    receiver.set_read_timeout(Some(Duration::from_secs(3)))?;
    let sender = from
        .run_in(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))?
        .with_context(|| format!("binding a sender in {}", from.name()))?;
    let mode = pmtudisc;
    // SAFETY: setsockopt(2) on a socket we own, with a c_int option value
    // that outlives the call and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sender.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const mode).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt IP_MTU_DISCOVER {pmtudisc}: {}",
        std::io::Error::last_os_error()
    );
    let mut buf = vec![0u8; 4096];
    for i in 0..count {
        let payload: Vec<u8> = (0..payload).map(|b| (b as u8) ^ i).collect();
        // The socket was made in `from`'s namespace and stays there; sending
        // from this thread is fine.
        match sender.send_to(&payload, SocketAddrV4::new(to_ip, PORT)) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => return Ok(false),
            Err(e) => {
                return Err(e).with_context(|| format!("sending datagram {i} to {to_ip}"));
            }
        }
        let (n, src) = receiver.recv_from(&mut buf).with_context(|| {
            format!(
                "datagram {i} of {} bytes (IP_MTU_DISCOVER {pmtudisc}) from {} \
                 never reached {to_ip}",
                payload.len() + 28,
                from.name()
            )
        })?;
        ensure!(
            buf[..n] == payload[..],
            "datagram {i} from {src} arrived changed: {n} bytes"
        );
    }
    Ok(true)
}

/// The counters of `host` by reason.
fn counters(host: &Host<'_>) -> Result<std::collections::BTreeMap<&'static str, u64>> {
    Ok(host
        .pinned()?
        .counters()?
        .into_iter()
        .map(|(r, n)| (r.name(), n))
        .collect())
}

/// How much `reason` grew on `host` since `before`.
fn grew(
    host: &Host<'_>,
    before: &std::collections::BTreeMap<&'static str, u64>,
    reason: Reason,
) -> Result<u64> {
    let now = host.pinned()?.counter(reason)?;
    Ok(now - before.get(reason.name()).copied().unwrap_or(0))
}

/// Path MTU never black-holes: both nodes have 1500-byte interfaces, but
/// the routed underlay between them crosses a 1400-byte hop. Outer headers
/// never carry DF, so that hop fragments full-size tunnel packets, and the
/// receiver reassembles them and decapsulates through its slow-path
/// device; datagrams bigger than the cluster MTU from sockets that ignore
/// path MTU (`IP_PMTUDISC_OMIT`, `IP_PMTUDISC_INTERFACE`) go out through
/// the sender's slow-path device, which fragments the outer packet.
/// `far_args` are the far node's agent flags (its decap mode).
/// Both nodes run with `args`; `far_gro` turns GRO on on the far node's
/// eth0; `hook_sees_fragments`: outer fragments pass a decap hook on eth0
/// (XDP, or TC without GRO), which counts them, before the kernel
/// reassembles them.
fn path_mtu_never_black_holes(
    args: &[&str],
    far_gro: bool,
    hook_sees_fragments: bool,
) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(VXLAN.config)?;
    let near = cluster.add_host(1)?;
    let far = cluster.add_host_behind_narrow_link(3, NARROW_HOP_MTU)?;
    // Strict reverse-path filtering, as many distributions set it: the
    // slow path re-injects into eth0's ingress, where the route back to the
    // sender's subnet (the cluster route) also points, so it passes.
    for host in [&near, &far] {
        host.ns().sysctl("net.ipv4.conf.all.rp_filter", "1")?;
    }
    if far_gro {
        // GRO on the far node's veth: with the slow-path device's UDP
        // tunnel socket, the kernel then aggregates VXLAN packets before
        // TC ingress, as a NIC's GRO does.
        far.ns().run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    }
    start_agents_meshed(&[(&near, args), (&far, args)])?;
    for host in [&near, &far] {
        let dev = host.ns().ip(&["-d", "link", "show", "weft.vxlan"])?;
        ensure!(
            dev.contains("vxlan external") && dev.contains("dstport 8472") && dev.contains("UP"),
            "host {}: the slow-path device is not an external vxlan device on 8472: {dev}",
            host.index()
        );
    }
    let a = near.attach_container()?;
    let c = far.attach_container()?;
    let (near0, far0) = (counters(&near)?, counters(&far)?);
    let reassembled0 = [reassembled(&near)?, reassembled(&far)?];

    // DF and non-DF pings up to the full 1450-byte MTU, fragmented pings,
    // and TCP at full MSS, both ways: every full-size tunnel packet is
    // fragmented at the narrow hop.
    check_both_ways(&a, &c)?;
    for &size in &[1000, 1372, 1400, 1422] {
        for df in [true, false] {
            a.ping(c.ip(), 2, size, df)
                .with_context(|| format!("{size}-byte ping (DF {df}) across the narrow hop"))?;
            c.ping(a.ip(), 2, size, df)
                .with_context(|| format!("{size}-byte ping (DF {df}) back"))?;
        }
    }
    let frags_far = grew(&far, &far0, Reason::PassOuterFragment)?;
    let slow_far = grew(&far, &far0, Reason::DecapsulatedSlowPath)?;
    let frags_near = grew(&near, &near0, Reason::PassOuterFragment)?;
    let slow_near = grew(&near, &near0, Reason::DecapsulatedSlowPath)?;
    eprintln!(
        "after pings and TCP: far pass_outer_fragment {frags_far} decapsulated_slow_path {slow_far}; \
         near {frags_near} / {slow_near}"
    );
    ensure!(
        slow_far > 0 && slow_near > 0,
        "full-size packets crossed the narrow hop without the slow path: far {slow_far}, near {slow_near}"
    );
    // The hop really fragmented them, and each node put them back together
    // (under device decapsulation every packet counts as slow path, so that
    // count alone would not show it).
    let reassembled1 = [reassembled(&near)?, reassembled(&far)?];
    ensure!(
        reassembled1[0] > reassembled0[0] && reassembled1[1] > reassembled0[1],
        "no outer packet was reassembled: near {reassembled0:?} -> {reassembled1:?} (near, far)"
    );
    if hook_sees_fragments {
        // With GRO, the far node may see the fragments already reassembled
        // and aggregated; without, every fragment passes the decap hook.
        ensure!(
            frags_far > 0 && frags_near > 0,
            "no outer fragments counted: far {frags_far}, near {frags_near}"
        );
    }

    // Datagrams bigger than the cluster MTU from sockets that ignore path
    // MTU. Hosts send them whole (their device MTU is 1500) without DF, too
    // big to encapsulate here: the slow-path device sends them and
    // fragments the outer packet. Containers fragment them at their
    // 1450-byte MTU (OMIT) and the fast path carries the pieces, or refuse
    // them locally (INTERFACE, see `big_datagrams_arrive`).
    let (near1, far1) = (counters(&near)?, counters(&far)?);
    for (mode, name) in [
        (libc::IP_PMTUDISC_OMIT, "IP_PMTUDISC_OMIT"),
        (libc::IP_PMTUDISC_INTERFACE, "IP_PMTUDISC_INTERFACE"),
    ] {
        let what = |dir: &str| format!("{BIG_DATAGRAM}-byte UDP from a {name} socket, {dir}");
        for (from, to, to_ip, dir) in [
            (a.ns(), c.ns(), c.ip(), "container -> remote container"),
            (c.ns(), a.ns(), a.ip(), "remote container -> container"),
        ] {
            let sent = big_datagrams_arrive(from, to, to_ip, mode, 5, BIG_PAYLOAD)
                .with_context(|| what(dir))?;
            ensure!(
                sent || mode == libc::IP_PMTUDISC_INTERFACE,
                "{}: refused locally with EMSGSIZE",
                what(dir)
            );
        }
        for (from, to, to_ip, dir) in [
            (near.ns(), c.ns(), c.ip(), "host -> remote container"),
            (far.ns(), a.ns(), a.ip(), "far host -> remote container"),
        ] {
            let sent = big_datagrams_arrive(from, to, to_ip, mode, 5, BIG_PAYLOAD)
                .with_context(|| what(dir))?;
            ensure!(sent, "{}: refused locally with EMSGSIZE", what(dir));
        }
    }
    let slow_tx_near = grew(&near, &near1, Reason::EncapsulatedSlowPath)?;
    let slow_tx_far = grew(&far, &far1, Reason::EncapsulatedSlowPath)?;
    let too_big_near = grew(&near, &near1, Reason::DropTooBig)?;
    let too_big_far = grew(&far, &far1, Reason::DropTooBig)?;
    let slow_rx_far = grew(&far, &far1, Reason::DecapsulatedSlowPath)?;
    let slow_rx_near = grew(&near, &near1, Reason::DecapsulatedSlowPath)?;
    eprintln!(
        "after big datagrams: encapsulated_slow_path near {slow_tx_near} far {slow_tx_far}; \
         decapsulated_slow_path near {slow_rx_near} far {slow_rx_far}; \
         drop_too_big near {too_big_near} far {too_big_far}"
    );
    // Two modes x five datagrams from each host, one too-big fragment each.
    ensure!(
        slow_tx_near >= 10 && slow_tx_far >= 10,
        "hosts' too-big datagrams did not take the slow path: near {slow_tx_near}, far {slow_tx_far}"
    );
    ensure!(
        too_big_near == 0 && too_big_far == 0,
        "too-big packets were dropped: near {too_big_near}, far {too_big_far}"
    );
    // Each host's ten plus the containers' five OMIT datagrams cross the
    // narrow hop as outer fragments.
    ensure!(
        slow_rx_far >= 15 && slow_rx_near >= 15,
        "reassembled datagrams did not come through the slow path: near {slow_rx_near}, far {slow_rx_far}"
    );
    Ok(())
}

/// Datagrams the host's IP layer reassembled (`Ip: ReasmOKs` in its
/// namespace's /proc/net/snmp).
fn reassembled(host: &Host<'_>) -> Result<u64> {
    let snmp = host.ns().run(&["cat", "/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        bail!("no Ip: lines in /proc/net/snmp:\n{snmp}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ReasmOKs")
        .with_context(|| format!("no ReasmOKs in {names}"))?
        .1
        .parse()
        .context("ReasmOKs")
}

#[test]
fn path_mtu_never_black_holes_across_a_narrow_underlay_hop() -> Result<()> {
    path_mtu_never_black_holes(&["--decap-mode", "xdp"], false, true)
}

/// The same with TC-ingress decapsulation and GRO on the far node's
/// interface: UDP-tunnel GRO aggregates (`pass_gso`) reach the slow path.
#[test]
fn path_mtu_never_black_holes_with_tc_decap_and_gro() -> Result<()> {
    path_mtu_never_black_holes(&["--decap-mode", "tc"], true, false)
}

/// The same with the kernel VXLAN socket decapsulating everything
/// (`--decap-mode device`, what `auto` picks on a veth): it reassembles
/// the outer fragments itself.
#[test]
fn path_mtu_never_black_holes_with_device_decap() -> Result<()> {
    path_mtu_never_black_holes(&["--decap-mode", "device"], false, false)
}

/// With a kernel UDP tunnel socket on the VXLAN port (the slow-path
/// device's), GRO aggregates VXLAN packets before TC ingress. TC decap
/// cannot pop a UDP tunnel off an aggregate on this kernel (no
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP`), so it passes them (`pass_gso`), the
/// device's socket decapsulates them and the slow path delivers them.
#[test]
fn tc_decap_delivers_gro_aggregates_through_the_slow_path() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(VXLAN.config)?;
    let sender = cluster.add_host(1)?;
    let receiver = cluster.add_host(2)?;
    // veth runs GRO (in NAPI) only when asked to, as a NIC does by default.
    receiver.ns().run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    start_agents_meshed(&[(&sender, &[]), (&receiver, &["--decap-mode", "tc"])])?;
    let a = sender.attach_container()?;
    let b = receiver.attach_container()?;
    let before = counters(&receiver)?;
    check_both_ways(&a, &b)?;
    let gso = grew(&receiver, &before, Reason::PassGso)?;
    let slow = grew(&receiver, &before, Reason::DecapsulatedSlowPath)?;
    let fast = grew(&receiver, &before, Reason::Decapsulated)?;
    eprintln!(
        "TC decap with GRO: pass_gso {gso}, decapsulated_slow_path {slow}, decapsulated {fast}"
    );
    ensure!(
        gso > 0,
        "no GRO aggregates reached TC decap; the test does not exercise them"
    );
    ensure!(
        slow >= gso,
        "GRO aggregates passed by TC decap ({gso}) were not all delivered by the slow path ({slow})"
    );
    Ok(())
}

/// IP-in-IP across the narrow hop, on this kernel without an ipip device:
/// outer headers carry no DF either, so the hop fragments full-size
/// packets; the receiver counts the outer fragments
/// (`pass_outer_fragment`), its stack reassembles them, and the agent's
/// userspace slow path (a raw IP-in-IP socket feeding the `weft.ipip` tap,
/// whose program decapsulates) delivers them (`decapsulated_slow_path`).
/// A host's too-big datagram without DF goes the other way: the encap
/// program hands it to the tap, the agent sends it through the raw socket,
/// the kernel fragments it (`encapsulated_slow_path`).
#[test]
fn ipip_across_a_narrow_hop_is_carried_by_the_userspace_slow_path() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(IPIP.config)?;
    let near = cluster.add_host(1)?;
    let far = cluster.add_host_behind_narrow_link(3, NARROW_HOP_MTU)?;
    start_agents_meshed(&[(&near, &[]), (&far, &[])])?;
    for host in [&near, &far] {
        let dev = host.ns().exec(&["ip", "link", "show", "weft.vxlan"])?;
        ensure!(
            !dev.status.success(),
            "the ipip backend must not create the VXLAN slow-path device"
        );
        let tap = host.ns().ip(&["-d", "link", "show", "weft.ipip"])?;
        ensure!(
            tap.contains("tun type tap") && tap.contains(",UP"),
            "host {}: no IP-in-IP tap up: {tap}",
            host.index()
        );
    }
    let a = near.attach_container()?;
    let c = far.attach_container()?;
    let (near0, far0) = (counters(&near)?, counters(&far)?);
    check_both_ways(&a, &c)?;
    for df in [true, false] {
        // 1452 + 28 = 1480 inner (the ipip cluster MTU), 1500 outer.
        a.ping(c.ip(), 2, 1452, df)
            .with_context(|| format!("full-size IP-in-IP ping (DF {df}) across the narrow hop"))?;
        c.ping(a.ip(), 2, 1452, df)
            .with_context(|| format!("full-size IP-in-IP ping (DF {df}) back"))?;
    }
    big_datagrams_arrive(
        a.ns(),
        c.ns(),
        c.ip(),
        libc::IP_PMTUDISC_OMIT,
        5,
        BIG_PAYLOAD,
    )
    .context("big datagrams from an IP_PMTUDISC_OMIT socket in a container")?;
    for (host, before) in [(&near, &near0), (&far, &far0)] {
        let frags = grew(host, before, Reason::PassOuterFragment)?;
        let slow = grew(host, before, Reason::DecapsulatedSlowPath)?;
        eprintln!(
            "ipip host {}: pass_outer_fragment {frags}, decapsulated_slow_path {slow}",
            host.index()
        );
        ensure!(
            frags > 0 && slow > 0,
            "host {}: outer fragments {frags}, slow-path deliveries {slow}",
            host.index()
        );
    }
    // A host's datagrams without DF that fit its 1500-byte interface but
    // not the tunnel (1500 + 20 bytes), both ways.
    let (near1, far1) = (counters(&near)?, counters(&far)?);
    big_datagrams_arrive(near.ns(), c.ns(), c.ip(), libc::IP_PMTUDISC_OMIT, 5, 1472)
        .context("1500-byte datagrams from an IP_PMTUDISC_OMIT socket on a host")?;
    big_datagrams_arrive(far.ns(), a.ns(), a.ip(), libc::IP_PMTUDISC_OMIT, 5, 1472)
        .context("1500-byte datagrams from an IP_PMTUDISC_OMIT socket on the far host")?;
    for (host, before) in [(&near, &near1), (&far, &far1)] {
        let sent = grew(host, before, Reason::EncapsulatedSlowPath)?;
        let too_big = grew(host, before, Reason::DropTooBig)?;
        eprintln!(
            "ipip host {}: encapsulated_slow_path {sent}, drop_too_big {too_big}",
            host.index()
        );
        ensure!(
            sent >= 5 && too_big == 0,
            "host {}: slow-path sends {sent}, dropped as too big {too_big}",
            host.index()
        );
    }
    Ok(())
}

/// On the wire, tunnel packets never carry DF, and their outer IP IDs
/// differ packet to packet, also for the segments the kernel cuts from a
/// GSO super-packet after the encap program (the container's TCP hands it
/// super-packets): `inet_gso_segment` gives each segment the next ID. Fragmentable datagrams with repeating IDs could be spliced wrongly.
#[test]
fn outer_headers_never_set_df_and_ids_vary_on_the_wire() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(VXLAN.config)?;
    let sender = cluster.add_host(1)?;
    let receiver = cluster.add_host(2)?;
    // The sender's cable has no segmentation offloads, as a NIC without
    // them: GSO super-packets leaving the encap program are cut into
    // segments before the wire, where the capture sees them.
    sender.set_realistic_wire(true)?;
    start_agents_meshed(&[(&sender, &[]), (&receiver, &[])])?;
    let a = sender.attach_container()?;
    let b = receiver.attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    let before = counters(&sender)?;
    const PACKETS: u32 = 400;
    let capture = weft_tests::Capture::start_tshark(
        cluster.switch(),
        &switch_port(sender.index()),
        &format!("udp dst port {VXLAN_PORT} and greater 1400"),
        PACKETS,
        &["ip.id", "ip.flags.df"],
    )?;
    a.tcp_transfer_to(&b, 4 * 1024 * 1024)?;
    let seen = capture.finish(Duration::from_secs(20))?;
    let gso = grew(&sender, &before, Reason::Encapsulated)?;
    let mut ids = BTreeSet::new();
    let mut lines = 0;
    for line in seen.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let (Some(id), Some(df)) = (cols.first(), cols.get(1)) else {
            bail!("unexpected tshark line {line:?}");
        };
        // Outer first, then the inner packet's.
        let outer_id = id.split(',').next().unwrap_or_default();
        let outer_df = df.split(',').next().unwrap_or_default();
        ensure!(
            matches!(outer_df, "0" | "False"),
            "an outer header with DF: {line:?}"
        );
        ids.insert(outer_id.to_owned());
        lines += 1;
    }
    eprintln!(
        "{lines} full-size tunnel packets from {gso} encapsulations: {} distinct outer IDs",
        ids.len()
    );
    ensure!(lines == PACKETS as usize, "captured {lines} packets");
    ensure!(
        (gso as usize) < lines,
        "no GSO super-packets were encapsulated ({gso} encapsulations for {lines} packets): \
         the test does not exercise per-segment IDs"
    );
    ensure!(
        ids.len() >= lines * 95 / 100,
        "outer IDs repeat: {} distinct in {lines} packets",
        ids.len()
    );
    Ok(())
}

/// Containers running their own VXLAN tunnel to each other (kind in a pod,
/// KubeVirt) put tunnel packets inside weft's tunnel. Packets without GSO
/// are carried by the fast path. GSO packets that already are tunnel packets
/// cannot get a second tunnel from BPF: `tcp` says whether the backend
/// carries them another way (VXLAN: the slow-path device, which segments
/// them first); if not they are counted as drop_nested_gso, never logged
/// per packet.
fn nested_vxlan_between_containers(backend: Backend, tcp: bool) -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(backend.config)?;
    let (hosts, _) = start_hosts(&cluster, &[1, 2], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    check_ping(&a, &b)?;
    let nested = |c: &Container<'_>, remote: &Container<'_>, addr: &str| -> Result<()> {
        c.ns().ip(&[
            "link",
            "add",
            "nv0",
            "type",
            "vxlan",
            "id",
            "77",
            "remote",
            &remote.ip().to_string(),
            "dstport",
            "4789",
            "dev",
            "eth0",
        ])?;
        c.ns().ip(&["addr", "add", addr, "dev", "nv0"])?;
        c.ns().ip(&["link", "set", "nv0", "up"])?;
        Ok(())
    };
    nested(&a, &b, "192.168.77.1/24")?;
    nested(&b, &a, "192.168.77.2/24")?;
    let (a_inner, b_inner) = (
        Ipv4Addr::new(192, 168, 77, 1),
        Ipv4Addr::new(192, 168, 77, 2),
    );
    a.ns().ping_until(b_inner, CONVERGE)?;
    let out = a.ns().ping(b_inner, 20, 1000, false)?;
    ensure!(
        out.contains(" 0% packet loss"),
        "ping over the nested tunnel lost packets:\n{out}"
    );
    let nested_gso =
        |h: &Host<'_>| -> Result<u64> { Ok(h.pinned()?.counter(Reason::DropNestedGso)?) };
    let slow_sent =
        |h: &Host<'_>| -> Result<u64> { Ok(h.pinned()?.counter(Reason::EncapsulatedSlowPath)?) };
    let before = nested_gso(&hosts[0])?;
    let slow_before = slow_sent(&hosts[0])?;
    // A failing transfer stalls until its deadline: keep that short.
    let deadline = Duration::from_secs(if tcp { 60 } else { 5 });
    let transfer =
        weft_tests::tcp_transfer(a.ns(), a_inner, b.ns(), b_inner, 2 * 1024 * 1024, deadline);
    let dropped = nested_gso(&hosts[0])? - before;
    match transfer {
        Ok(_) => {
            ensure!(tcp, "nested TCP went through; this backend should carry it");
            let slow = slow_sent(&hosts[0])? - slow_before;
            ensure!(
                slow > 0 && dropped == 0,
                "nested TCP should go through the slow-path device: {slow} sent there, {dropped} dropped"
            );
        }
        Err(e) if tcp => bail!("TCP over the nested tunnel failed: {e:#}"),
        Err(_) => ensure!(
            dropped > 0,
            "nested TCP failed without drop_nested_gso counting why"
        ),
    }
    // However many packets met the limit, the log holds at most a few
    // lines about them: errors are rate-limited per CPU and second.
    let log = hosts[0].agent_log();
    let helper_errors = log.matches("helper failed").count();
    ensure!(
        helper_errors <= 10,
        "{helper_errors} BPF error lines for {dropped} dropped packets:\n{log}"
    );
    eprintln!("nested TCP: {dropped} GSO packets counted as drop_nested_gso");
    Ok(())
}

#[test]
fn nested_vxlan_between_containers_over_vxlan() -> Result<()> {
    nested_vxlan_between_containers(VXLAN, true)
}

#[test]
fn nested_vxlan_between_containers_over_ipip() -> Result<()> {
    nested_vxlan_between_containers(IPIP, false)
}

/// A node behind 1:1 NAT: its `--public-ip` is no address of its own, and a
/// NAT (the switch here) rewrites the outer destination of its peers'
/// tunnel packets to its private address. The fast path passes those (they
/// are not for the PublicIP) and the slow path decapsulates them: the
/// outer-destination check, which guards nodes whose PublicIP is local,
/// is off there.
#[test]
fn a_node_behind_one_to_one_nat_receives_through_the_slow_path() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let natted = cluster.add_host(1)?;
    let peer = cluster.add_host(2)?;
    let nat_ip = "198.18.0.203";
    let switch = cluster.switch();
    peer.ns().ip(&[
        "route",
        "add",
        nat_ip,
        "via",
        &weft_tests::SWITCH_IP.to_string(),
    ])?;
    switch.run(&["sysctl", "-w", "net.ipv4.ip_forward=1"])?;
    switch.run(&["sysctl", "-w", "net.ipv4.conf.all.send_redirects=0"])?;
    switch.run(&["nft", "add", "table", "ip", "weft_test_nat"])?;
    switch.run(&[
        "nft",
        "add chain ip weft_test_nat",
        "pre { type nat hook prerouting priority -100 ; }",
    ])?;
    switch.run(&[
        "nft",
        "add rule ip weft_test_nat pre ip daddr",
        nat_ip,
        "dnat to",
        &natted.ip().to_string(),
    ])?;
    // Not start_agents_meshed: its wait expects every host's own address
    // as its PublicIP; the pings below wait for the mesh instead.
    natted.start_agent(&["--public-ip", nat_ip])?;
    peer.start_agent(&[])?;
    for host in [&natted, &peer] {
        host.wait_subnet_env(CONVERGE)?;
    }
    let a = natted.attach_container()?;
    let b = peer.attach_container()?;
    b.ping_until(a.ip(), CONVERGE)
        .context("the peer's container cannot reach the NATed node's")?;
    a.ping(b.ip(), 3, 56, false)?;
    check_tcp(&b, &a)?;
    let pinned = natted.pinned()?;
    let through_slow_path = pinned.counter(Reason::DecapsulatedSlowPath)?;
    let refused = pinned.counter(Reason::DropForeignOuterDestination)?;
    ensure!(
        through_slow_path > 0 && refused == 0,
        "behind NAT: {through_slow_path} decapsulated by the slow path, {refused} refused for their outer destination"
    );
    Ok(())
}
