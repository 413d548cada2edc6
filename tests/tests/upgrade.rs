//! Upgrades in place: an agent started over maps pinned by another weft
//! version (made here with bpftool in the older layouts), `status` and
//! `cleanup` over such pins, and an underlay interface deleted and created
//! again under a running agent.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use node_agent::layout::{self, MapLayout};
use node_agent::netconf::SLOW_PATH_DEVICE;
use weft_common::{
    MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS, MAP_SUBNETS, PROG_SLOWPATH_RX_TC, RemoteNode,
};
use weft_tests::{
    CONVERGE, Cluster, Host, Signal, node_agent_binary,
    old_pins::{NODE_CONFIG_48, OldMap},
    require_bpffs, require_root, require_tools, start_agents_meshed,
};

const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;

/// The value size of SUBNETS in the older layout: a `RemoteNode` without
/// its last 4 bytes.
const OLD_REMOTE_NODE: u32 = size_of::<RemoteNode>() as u32 - 4;

/// SUBNETS as a version with a smaller `RemoteNode` pinned it.
const OLD_SUBNETS: OldMap = OldMap {
    name: MAP_SUBNETS,
    kind: "lpm_trie",
    key: 8,
    value: OLD_REMOTE_NODE,
    entries: 131_072,
    // BPF_F_NO_PREALLOC, which the kernel requires of an LPM trie.
    flags: 1,
};

/// COUNTERS as a version with three reasons pinned it.
const OLD_COUNTERS: OldMap = OldMap {
    name: MAP_COUNTERS,
    kind: "percpu_array",
    key: 4,
    value: 8,
    entries: 3,
    flags: 0,
};

/// A map of a name no current version uses.
const RETIRED_MAP: OldMap = OldMap {
    name: "PEERS_V0",
    kind: "hash",
    key: 4,
    value: 4,
    entries: 16,
    flags: 0,
};

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&["ip", "nsenter", "etcdctl", "ping", "bpftool"])?;
    node_agent_binary()?;
    Ok(())
}

fn pin_old(host: &Host<'_>, maps: &[OldMap]) -> Result<()> {
    std::fs::create_dir_all(host.pin_path())
        .with_context(|| format!("creating {}", host.pin_path().display()))?;
    for map in maps {
        map.pin(host.pin_path())?;
    }
    Ok(())
}

/// `node-agent <args> --pin-path <host's>` in the host's namespace.
fn agent_command(host: &Host<'_>, args: &[&str]) -> Result<String> {
    let binary = node_agent_binary()?;
    let pin_path = host.pin_path().to_string_lossy().into_owned();
    let mut argv = vec![binary.to_str().context("binary path")?];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--pin-path", &pin_path]);
    weft_tests::process::run(host.ns().command_keep_mounts(&argv))
}

/// The kernel id of the link pinned for the slow-path program: a new id
/// means it was attached afresh.
fn slow_path_link_id(host: &Host<'_>) -> Result<u32> {
    let path = host.pin_path().join(PROG_SLOWPATH_RX_TC);
    let link = aya::programs::links::PinnedLink::from_pin(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(aya::programs::links::FdLink::from(link).info()?.id())
}

fn pinned_layout(pin_path: &Path, name: &str) -> Result<MapLayout> {
    MapLayout::of_pin(&pin_path.join(name))?.with_context(|| format!("{name} is not pinned"))
}

#[test]
fn peer_maps_of_another_layout_refuse_the_start_and_status_and_cleanup_still_work() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let host = cluster.add_host(1)?;
    pin_old(&host, &[OLD_SUBNETS, OLD_COUNTERS, RETIRED_MAP])?;
    let ids = |names: &[&str]| -> Result<Vec<u32>> {
        names.iter().map(|n| host.pinned_map_id(n)).collect()
    };
    let before = ids(&[MAP_SUBNETS, MAP_COUNTERS])?;

    host.start_agent(&[])?;
    let status = host.wait_agent_exit(CONVERGE)?;
    ensure!(!status.success(), "the agent started over an old SUBNETS");
    let log = host.agent_log();
    let pin_path = host.pin_path().display().to_string();
    let now = size_of::<RemoteNode>();
    for expected in [
        format!(
            "SUBNETS is pinned as lpm_trie (key 8 B, value {OLD_REMOTE_NODE} B, 131072 entries, flags 0x1)"
        ),
        format!("this build needs lpm_trie (key 8 B, value {now} B, 131072 entries, flags 0x1)"),
        format!("`node-agent cleanup --pin-path {pin_path}`"),
    ] {
        ensure!(
            log.contains(&expected),
            "no {expected:?} in the log:\n{log}"
        );
    }
    ensure!(
        !log.contains("COUNTERS is pinned"),
        "statistics are no reason to refuse:\n{log}"
    );
    // Refused means untouched: not even the replaceable COUNTERS went.
    ensure!(
        ids(&[MAP_SUBNETS, MAP_COUNTERS])? == before,
        "a refused start changed the pins"
    );
    ensure!(
        !host.subnet_file().exists(),
        "a refused start wrote the subnet file"
    );

    // status shows what it can and names what it cannot read.
    let text = agent_command(&host, &["status"])?;
    let old_subnets = format!("pinned as lpm_trie (key 8 B, value {OLD_REMOTE_NODE} B");
    for expected in [
        "peers: not readable by this build",
        "counters: not readable by this build",
        "maps this build cannot read",
        "SUBNETS",
        old_subnets.as_str(),
        "COUNTERS",
        "NODE_CONFIG",
        "not pinned",
    ] {
        ensure!(
            text.contains(expected),
            "status lacks {expected:?}:\n{text}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&agent_command(&host, &["status", "--json"])?)?;
    let mut unreadable: Vec<&str> = json["unreadable"]
        .as_array()
        .context("status --json: no unreadable list")?
        .iter()
        .filter_map(|u| u["map"].as_str())
        .collect();
    unreadable.sort_unstable();
    ensure!(
        unreadable == [MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS, MAP_SUBNETS],
        "status --json: {json}"
    );
    ensure!(
        json["peers"].is_null() && json["counters"].is_null(),
        "{json}"
    );

    // cleanup removes every pin, whatever its layout or name, and the dir.
    host.agent_cleanup()?;
    ensure!(
        !host.pin_path().exists(),
        "cleanup left {:?}",
        host.pinned_entries()
    );
    Ok(())
}

#[test]
fn old_counters_and_node_config_are_replaced_and_the_node_forwards() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let hosts = [cluster.add_host(1)?, cluster.add_host(2)?];
    pin_old(&hosts[0], &[OLD_COUNTERS, NODE_CONFIG_48, RETIRED_MAP])?;
    let mut value = [0u8; 48];
    value[0] = 1; // configured
    weft_tests::old_pins::update(
        &hosts[0].pin_path().join(MAP_NODE_CONFIG),
        &0u32.to_ne_bytes(),
        &value,
    )?;
    // status reads the old NODE_CONFIG (an older agent may still run) and
    // names the COUNTERS it cannot.
    let json: serde_json::Value =
        serde_json::from_str(&agent_command(&hosts[0], &["status", "--json"])?)?;
    ensure!(json["node"]["configured"] == true, "{json}");
    let unreadable = json["unreadable"].to_string();
    ensure!(
        unreadable.contains(MAP_COUNTERS) && !unreadable.contains(MAP_NODE_CONFIG),
        "{json}"
    );

    start_agents_meshed(&[(&hosts[0], &[]), (&hosts[1], &[])])?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;

    let wanted = layout::wanted().map_err(anyhow::Error::msg)?;
    for name in [MAP_COUNTERS, MAP_NODE_CONFIG] {
        let now = pinned_layout(hosts[0].pin_path(), name)?;
        ensure!(now == wanted[name], "{name} still pinned as {now}");
    }
    let log = hosts[0].agent_log();
    let replaced = log
        .matches("another layout (an upgrade); replacing it")
        .count();
    ensure!(replaced == 2, "{replaced} replacements logged:\n{log}");
    ensure!(
        log.contains("PEERS_V0"),
        "the retired map's removal is not logged:\n{log}"
    );
    ensure!(
        !hosts[0].pin_path().join(RETIRED_MAP.name).exists(),
        "the retired map is still pinned"
    );
    let status = agent_command(&hosts[0], &["status"])?;
    ensure!(
        !status.contains("cannot read"),
        "status after the upgrade: {status}"
    );
    Ok(())
}

#[test]
fn a_recreated_underlay_interface_is_followed_live_and_after_a_restart() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, _) = cluster.start_hosts(&[1, 2], &[], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    let pid = hosts[0].agent_pid();

    // While the agent runs: it follows without a restart, within the
    // bound the issue allows for recovery.
    const RECOVERY: Duration = Duration::from_secs(30);
    hosts[0].recable_underlay()?;
    a.ping_until(b.ip(), RECOVERY)
        .context("no forwarding after eth0 was created again")?;
    b.ping_until(a.ip(), RECOVERY)?;
    ensure!(
        hosts[0].agent_running() && hosts[0].agent_pid() == pid,
        "the agent restarted"
    );
    let (ifindex, _) = hosts[0].ns().link("eth0")?;
    let cfg = hosts[0]
        .pinned()?
        .node_config()?
        .context("NODE_CONFIG unconfigured")?;
    ensure!(
        cfg.iface_ifindex == ifindex,
        "NODE_CONFIG names ifindex {}, eth0 is {ifindex}",
        cfg.iface_ifindex
    );
    let log = hosts[0].agent_log();
    ensure!(
        log.matches("--iface was deleted and created again").count() == 1
            && log.contains("data path attached to the re-created interface"),
        "the re-creation is not logged once:\n{log}"
    );

    // The slow-path device deleted by hand is created again, with its
    // program, and NODE_CONFIG points at the new one.
    let (old_dev, _) = hosts[0].ns().link(SLOW_PATH_DEVICE)?;
    let old_link = slow_path_link_id(&hosts[0])?;
    hosts[0].ns().ip(&["link", "del", SLOW_PATH_DEVICE])?;
    weft_tests::wait_until(RECOVERY, "the slow-path device to come back", |state| {
        let Ok((dev, _)) = hosts[0].ns().link(SLOW_PATH_DEVICE) else {
            *state = "no device".to_owned();
            return Ok(None);
        };
        let cfg = hosts[0].pinned()?.node_config()?;
        *state = format!("device {dev}, NODE_CONFIG {cfg:?}");
        Ok((dev != old_dev && cfg.is_some_and(|c| c.slow_path_ifindex == dev)).then_some(()))
    })?;
    ensure!(
        hosts[0]
            .agent_log()
            .contains("the slow-path device was deleted; created it again"),
        "the re-creation is not logged"
    );
    ensure!(
        slow_path_link_id(&hosts[0])? != old_link,
        "the slow-path program was not attached afresh"
    );
    a.ping_until(b.ip(), RECOVERY)?;

    // While the agent is stopped: the restarted agent finds links pinned
    // for an interface that is gone, and attaches afresh.
    hosts[0].kill_agent(Signal::Term)?;
    hosts[0].recable_underlay()?;
    hosts[0].start_agent(&[])?;
    a.ping_until(b.ip(), RECOVERY)
        .context("no forwarding after a restart over a re-created eth0")?;
    ensure!(
        hosts[0]
            .agent_log()
            .contains("the pinned link is attached to another interface"),
        "the stale links are not reported"
    );
    Ok(())
}

/// An agent of an older version decapsulated at XDP on a veth, where `auto`
/// now picks the kernel VXLAN socket (`device`). Restarted over its pins,
/// the new agent detaches XDP and unpins its link while the slow-path link
/// of the earlier run is updated in place, and the node keeps forwarding,
/// now through the slow path only.
#[test]
fn an_xdp_node_restarted_with_auto_moves_to_device_decapsulation() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let hosts = [cluster.add_host(1)?, cluster.add_host(2)?];
    start_agents_meshed(&[(&hosts[0], &["--decap-mode", "xdp"]), (&hosts[1], &[])])?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    b.ping_until(a.ip(), CONVERGE)?;
    let xdp_pin = hosts[0].pin_path().join(weft_common::PROG_DECAP_XDP);
    ensure!(xdp_pin.exists(), "--decap-mode xdp pinned no XDP link");
    let slow_path_before = slow_path_link_id(&hosts[0])?;

    hosts[0].kill_agent(Signal::Term)?;
    hosts[0].start_agent(&[])?;
    hosts[0].wait_subnet_env(CONVERGE)?;
    weft_tests::wait_until(CONVERGE, "the restarted agent to unpin XDP", |last| {
        *last = format!("{} is pinned", xdp_pin.display());
        Ok((!xdp_pin.exists()).then_some(()))
    })?;
    let link = hosts[0].ns().ip(&["-d", "link", "show", "eth0"])?;
    ensure!(
        !link.contains("xdp"),
        "XDP is still attached to eth0 after the move to device: {link}"
    );
    ensure!(
        slow_path_link_id(&hosts[0])? == slow_path_before,
        "the slow-path link was attached afresh instead of updated in place"
    );
    let before = hosts[0]
        .pinned()?
        .counter(weft_common::Reason::DecapsulatedSlowPath)?;
    b.ping(a.ip(), 3, 56, false)
        .context("b -> a after the move to device")?;
    a.ping(b.ip(), 3, 56, false)
        .context("a -> b after the move to device")?;
    let after = hosts[0]
        .pinned()?
        .counter(weft_common::Reason::DecapsulatedSlowPath)?;
    ensure!(
        after >= before + 6,
        "the slow path decapsulated {} packets of 6 pings after the move",
        after - before
    );
    let log = hosts[0].agent_log();
    ensure!(
        log.contains("chosen=Device"),
        "the restarted agent did not log its choice of device:\n{log}"
    );
    Ok(())
}
