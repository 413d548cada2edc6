//! Running weft where flanneld ran: configured by flanneld's environment
//! variables alone, finding the interface as flanneld does, refusing what it
//! does not implement, and `node-agent doctor` on real hosts.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_common::NodeConfig;
use weft_tests::{
    CONVERGE, Cluster, Host, SWITCH_IP, SubnetEnv, doctor_check, node_agent_binary, require_bpffs,
    require_root, require_tools, wait_until,
};

const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
/// How long an agent refusing its settings may take to exit.
const REFUSAL: Duration = Duration::from_secs(10);

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&["ip", "nsenter", "etcd", "etcdctl", "ping", "ethtool"])?;
    node_agent_binary()?;
    Ok(())
}

/// Hosts 1 and 2: host 1 (after `prepare`) started by its environment
/// alone plus `extra_env`, host 2 by flags; both have leased.
fn env_host_and_flag_host<'c>(
    cluster: &'c Cluster,
    prepare: impl FnOnce(&Host<'c>) -> Result<()>,
    extra_env: Vec<(&'static str, String)>,
) -> Result<(Host<'c>, Host<'c>, SubnetEnv, SubnetEnv)> {
    let a = cluster.add_host(1)?;
    let b = cluster.add_host(2)?;
    prepare(&a)?;
    let mut env = a.agent_env();
    env.extend(extra_env);
    a.start_agent_env_only(&env)?;
    b.start_agent(&[])?;
    let env_a = a.wait_subnet_env(CONVERGE)?;
    let env_b = b.wait_subnet_env(CONVERGE)?;
    Ok((a, b, env_a, env_b))
}

/// The host's pinned NODE_CONFIG, once written: the agent writes the
/// subnet file first, then loads and configures the data path.
fn node_config(host: &Host<'_>) -> Result<NodeConfig> {
    wait_until(
        CONVERGE,
        &format!("host {}'s NODE_CONFIG to be written", host.index()),
        |last| {
            let config = host.pinned().and_then(|p| Ok(p.node_config()?));
            *last = format!("{config:?}");
            Ok(config.ok().flatten())
        },
    )
}

/// systemd's `Type=notify` handshake: READY=1 comes only once the first
/// relist has filled the peer map, so a unit ordered after weft starts on
/// a node that already forwards to every peer etcd knew. 200 leases make
/// a READY sent any earlier (before the watcher ran) find the map short.
#[test]
fn systemd_is_told_ready_once_the_peer_map_holds_every_lease() -> Result<()> {
    const PEERS: u8 = 200;
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let leases: Vec<(String, String)> = (0..PEERS)
        .map(|i| {
            let subnet = ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, 50 + i, 0), 24)?;
            let lease = node_agent::flannel::LeaseAttrs {
                public_ip: Ipv4Addr::new(198, 19, i, 1),
                backend_type: "vxlan".to_owned(),
                backend_data: Some(node_agent::flannel::VxlanLeaseData {
                    vni: Some(1),
                    vtep_mac: [0x02, 0, 0, 0x30, 0, i],
                }),
            };
            Ok((cluster.lease_key(subnet), lease.to_json()))
        })
        .collect::<Result<_>>()?;
    cluster.put_leases_bulk(&leases)?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify");
    let systemd = std::os::unix::net::UnixDatagram::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    systemd.set_read_timeout(Some(CONVERGE))?;
    let host = cluster.add_host(1)?;
    let mut env = host.agent_env();
    env.push(("FLANNELD_IFACE", "eth0".to_owned()));
    env.push(("NOTIFY_SOCKET", path.to_string_lossy().into_owned()));
    host.start_agent_env_only(&env)?;
    let mut buf = [0u8; 1024];
    let n = systemd.recv(&mut buf).with_context(|| {
        format!(
            "no sd_notify message within {CONVERGE:?}; agent log:\n{}",
            host.agent_log()
        )
    })?;
    // Read at once: the map as it was when systemd was told.
    let peers = host.peers()?.len();
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(
        message.starts_with("READY=1\n") && message.contains("STATUS=forwarding for 10.244."),
        "not a READY notification: {message:?}"
    );
    ensure!(
        peers == usize::from(PEERS),
        "READY=1 came with {peers} of {PEERS} peers in the map"
    );
    Ok(())
}

/// A flanneld unit's environment, nothing on the command line: the agent
/// leases, writes the subnet file with the settings the variables asked for
/// and forwards between containers on two nodes.
#[test]
fn an_agent_configured_only_by_flanneld_variables_forwards() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    // The interface by address, as flanneld's --iface also takes it; a
    // setting whose effect shows in the subnet file (masquerading), in Go's
    // boolean form `1`; one that must parse as flanneld's does (the resync
    // period); and an empty one, which flanneld ignores.
    let (a, b, env_a, env_b) = env_host_and_flag_host(
        &cluster,
        |_| Ok(()),
        vec![
            ("FLANNELD_IFACE", "198.18.0.1".to_owned()),
            ("FLANNELD_IP_MASQ", "1".to_owned()),
            ("FLANNELD_IPTABLES_RESYNC", "2".to_owned()),
            ("FLANNELD_PUBLIC_IP", String::new()),
        ],
    )?;
    ensure!(
        env_a.ipmasq && !env_b.ipmasq,
        "FLANNELD_IP_MASQ=1 did not reach the subnet file: {env_a:?} (the flag-started node: {env_b:?})"
    );
    ensure!(
        env_a.mtu == 1450,
        "FLANNEL_MTU {} for a 1500-byte eth0",
        env_a.mtu
    );
    let config = node_config(&a)?;
    ensure!(
        Ipv4Addr::from(config.public_ip) == a.ip(),
        "PublicIP {} is not FLANNELD_IFACE's address {}",
        Ipv4Addr::from(config.public_ip),
        a.ip()
    );

    let ca = a.attach_container()?;
    let cb = b.attach_container()?;
    ca.ping_until(cb.ip(), CONVERGE)?;
    cb.ping(ca.ip(), 3, 56, false)?;
    Ok(())
}

/// With no --iface at all the agent takes the default route's interface,
/// not another interface that also has an address.
#[test]
fn without_an_interface_setting_the_default_route_interface_is_used() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    // A decoy with an address and a MAC, up, that the default route does
    // not use.
    let decoy = |host: &Host<'_>| {
        let ns = host.ns();
        ns.ip(&[
            "link", "add", "decoy0", "type", "veth", "peer", "name", "decoy1",
        ])?;
        ns.ip(&["addr", "add", "198.18.99.1/24", "dev", "decoy0"])?;
        ns.ip(&["link", "set", "decoy0", "up"])?;
        ns.ip(&["link", "set", "decoy1", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &SWITCH_IP.to_string(),
            "dev",
            "eth0",
        ])?;
        Ok(())
    };
    let (a, b, _, _) = env_host_and_flag_host(&cluster, decoy, vec![])?;
    let ns = a.ns();
    let (eth0, _) = ns.link("eth0")?;
    let (decoy, _) = ns.link("decoy0")?;
    let config = node_config(&a)?;
    ensure!(
        config.iface_ifindex == eth0,
        "the agent chose ifindex {} (eth0 is {eth0}, the decoy {decoy})",
        config.iface_ifindex
    );
    ensure!(
        Ipv4Addr::from(config.public_ip) == a.ip(),
        "PublicIP {} is not eth0's address",
        Ipv4Addr::from(config.public_ip)
    );
    let ca = a.attach_container()?;
    let cb = b.attach_container()?;
    ca.ping_until(cb.ip(), CONVERGE)?;
    Ok(())
}

/// A flanneld setting weft lacks stops the agent with the setting's name
/// and the reason, and so does an etcd endpoint that is no URL: at
/// start-up, not as an endless retry.
#[test]
fn unsupported_settings_and_bad_endpoints_stop_the_agent_with_the_reason() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let a = cluster.add_host(1)?;
    // Each start is refused; the log since it names what and why.
    let refused = |what: &str, expect: &[&str]| -> Result<()> {
        let status = a
            .wait_agent_exit(REFUSAL)
            .with_context(|| what.to_owned())?;
        ensure!(!status.success(), "{what}: the agent exited 0");
        let log = a.agent_log();
        let last = log
            .rsplit("=== weft-tests: starting")
            .next()
            .unwrap_or_default();
        for needle in expect {
            ensure!(
                last.contains(needle),
                "{what}: {needle:?} not in the log:\n{last}"
            );
        }
        ensure!(
            !a.subnet_file().exists(),
            "{what}: a subnet file was written"
        );
        Ok(())
    };

    let mut env = a.agent_env();
    env.push(("FLANNELD_KUBE_SUBNET_MGR", "true".to_owned()));
    a.start_agent_env_only(&env)?;
    refused(
        "FLANNELD_KUBE_SUBNET_MGR",
        &["FLANNELD_KUBE_SUBNET_MGR", "etcd only"],
    )?;

    // On the command line, before clap could call it unknown.
    a.start_agent(&["--public-ipv6", "fd00::1"])?;
    refused("--public-ipv6", &["--public-ipv6", "IPv4 only"])?;

    let bad = "http://198.18.0.254:2379/v3";
    let mut env = a.agent_env();
    env.retain(|(k, _)| *k != "FLANNELD_ETCD_ENDPOINTS");
    env.push(("FLANNELD_ETCD_ENDPOINTS", bad.to_owned()));
    a.start_agent_env_only(&env)?;
    refused("an endpoint with a path", &["is not a URL", bad])?;
    Ok(())
}

fn status<'r>(report: &'r Value, name: &str) -> Result<&'r str> {
    doctor_check(report, name)?["status"]
        .as_str()
        .with_context(|| format!("{name} has no status"))
}

/// `doctor` passes on a host where the agent runs well, and finds each
/// planted problem (GRO off on the veth underlay under XDP decapsulation,
/// a container bridge wider than FLANNEL_MTU, a route inside the Network)
/// with its fix; a failed check makes it exit non-zero, and the fixed host
/// passes again. (On a veth `auto` would not use XDP: the agents ask for
/// it, as on a NIC, since GRO matters only to XDP.)
#[test]
fn doctor_passes_on_a_good_host_and_names_planted_problems() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, _) = cluster.start_hosts(&[1, 2], &["--decap-mode", "xdp"], false)?;
    let a = &hosts[0];
    let ns = a.ns();
    ns.run(&["ethtool", "-K", "eth0", "gro", "on"])?;

    let (passed, report) = a.doctor(&[])?;
    ensure!(
        passed && report["ok"] == true,
        "a good host failed: {report:#}"
    );
    for name in [
        "btf",
        "tcx",
        "bpffs",
        "interface",
        "public-ip",
        "etcd",
        "config",
        "mtu",
        "routes",
        "decap",
        "gro",
        "forwarding",
    ] {
        ensure!(
            status(&report, name)? == "ok",
            "{name} is not ok on a good host: {report:#}"
        );
    }

    // veth's default: GRO off. A warning with the fix, not a failure.
    ns.run(&["ethtool", "-K", "eth0", "gro", "off"])?;
    let (passed, report) = a.doctor(&[])?;
    ensure!(passed, "GRO off failed the run: {report:#}");
    ensure!(
        status(&report, "gro")? == "warn",
        "GRO off not found: {report:#}"
    );
    let fix = doctor_check(&report, "gro")?["fix"]
        .as_str()
        .unwrap_or_default();
    ensure!(fix.contains("ethtool -K eth0 gro on"), "gro fix: {fix}");
    ns.run(&["ethtool", "-K", "eth0", "gro", "on"])?;

    // A container bridge at 1500 bytes over a 1450-byte tunnel.
    ns.ip(&["link", "add", "cni0", "mtu", "1500", "type", "bridge"])?;
    let (passed, report) = a.doctor(&[])?;
    ensure!(
        !passed && report["ok"] == false,
        "a too-wide cni0 passed: {report:#}"
    );
    ensure!(status(&report, "mtu")? == "fail", "{report:#}");
    let fix = doctor_check(&report, "mtu")?["fix"]
        .as_str()
        .unwrap_or_default();
    ensure!(fix.contains("ip link set cni0 mtu 1450"), "mtu fix: {fix}");
    ns.ip(&["link", "set", "cni0", "mtu", "1450"])?;

    // A host route inside the Network.
    ns.ip(&[
        "route",
        "add",
        "10.244.77.0/24",
        "via",
        &SWITCH_IP.to_string(),
    ])?;
    let (passed, report) = a.doctor(&[])?;
    ensure!(!passed, "an overlapping route passed: {report:#}");
    let detail = doctor_check(&report, "routes")?["detail"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        status(&report, "routes")? == "fail" && detail.contains("10.244.77.0/24"),
        "the overlapping route was not named: {report:#}"
    );
    ns.ip(&["route", "del", "10.244.77.0/24"])?;

    let (passed, report) = a.doctor(&[])?;
    ensure!(passed, "the repaired host still fails: {report:#}");
    Ok(())
}

/// The vxlan backend's `MTU`, as flannel honours it: the tunnel is sized
/// for that underlay MTU instead of the interface's, so `FLANNEL_MTU` and
/// the cluster route carry `MTU - 50`, and the data path builds no outer
/// packet above `MTU`. Full-size DF packets cross; one byte more does not.
#[test]
fn the_vxlan_backend_mtu_sizes_the_tunnel_as_in_flannel() -> Result<()> {
    preflight()?;
    let cluster =
        Cluster::new(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","MTU":1400}}"#)?;
    let (hosts, envs) = cluster.start_hosts(&[1, 2], &[], false)?;
    for (host, env) in hosts.iter().zip(&envs) {
        ensure!(
            env.mtu == 1350,
            "host {}: FLANNEL_MTU {}",
            host.index(),
            env.mtu
        );
        let config = node_config(host)?;
        ensure!(
            config.iface_mtu == 1400,
            "host {}: the data path sizes outer packets for {}",
            host.index(),
            config.iface_mtu
        );
        let route = host.ns().ip(&["route", "show", "10.244.0.0/16"])?;
        ensure!(
            route.contains("mtu 1350"),
            "host {}: cluster route {route}",
            host.index()
        );
    }
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    // IPv4 and ICMP headers: 28 bytes.
    a.ping(b.ip(), 3, 1350 - 28, true)?;
    b.ping(a.ip(), 3, 1350 - 28, true)?;
    // A container that ignores FLANNEL_MTU meets the 1350-byte path.
    let wide = hosts[0].attach_container_with_mtu(Some(1500))?;
    let refused = wide.ping(b.ip(), 1, 1350 - 28 + 1, true);
    ensure!(
        refused.is_err(),
        "a 1351-byte DF packet crossed a 1350-byte tunnel"
    );
    wide.ping(b.ip(), 2, 1350 - 28, true)?;
    Ok(())
}

/// Where /sys/fs/bpf is no BPF filesystem the agent mounts one and
/// forwards; in a private mount namespace it warns that the mount (and the
/// pins) will not outlive it. The machine's own bpffs is untouched.
#[test]
fn the_agent_mounts_bpffs_and_warns_when_the_mount_dies_with_it() -> Result<()> {
    preflight()?;
    require_tools(&["unshare", "mountpoint", "umount"])?;
    let cluster = Cluster::new(CONFIG)?;
    let a = cluster.add_host(1)?;
    let b = cluster.add_host(2)?;
    a.start_agent_without_bpffs()?;
    b.start_agent(&[])?;
    a.wait_subnet_env(CONVERGE)?;
    b.wait_subnet_env(CONVERGE)?;
    let ca = a.attach_container()?;
    let cb = b.attach_container()?;
    ca.ping_until(cb.ip(), CONVERGE)?;
    let log = a.agent_log();
    ensure!(
        log.contains("mounted a BPF filesystem") && log.contains("private mount namespace"),
        "no mount or no warning in the log:\n{log}"
    );
    // The pins live in the agent's own mount, not on the machine's bpffs.
    ensure!(
        !a.pin_path().exists(),
        "{} appeared on the machine's bpffs",
        a.pin_path().display()
    );
    require_bpffs().context("the machine's bpffs after the test")?;
    Ok(())
}

/// An endpoint nobody listens on is named in the agent's retry warning,
/// with the cause and without gRPC's metadata dump; the agent keeps
/// waiting for it rather than exiting.
#[test]
fn an_unreachable_endpoint_is_named_in_the_warning() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let a = cluster.add_host(1)?;
    // The switch's address, where etcd listens, on a port it does not.
    let dead = format!("http://{SWITCH_IP}:2399");
    let mut env = a.agent_env();
    env.retain(|(k, _)| *k != "FLANNELD_ETCD_ENDPOINTS");
    env.push(("FLANNELD_ETCD_ENDPOINTS", dead.clone()));
    env.push(("FLANNELD_IFACE", "eth0".to_owned()));
    a.start_agent_env_only(&env)?;
    let want = format!("cannot reach etcd at {dead}");
    wait_until(CONVERGE, "the agent to warn about the endpoint", |last| {
        *last = a.agent_log();
        ensure!(a.agent_running(), "the agent exited");
        Ok(last.contains(&want).then_some(()))
    })?;
    let log = a.agent_log();
    ensure!(
        log.contains("Connection refused") && !log.contains("MetadataMap"),
        "the warning lacks the cause or carries gRPC noise:\n{log}"
    );
    ensure!(a.agent_running(), "the agent gave up on etcd:\n{log}");
    Ok(())
}
