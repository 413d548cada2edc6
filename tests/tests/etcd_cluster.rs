//! The control plane under faults, with forwarding measured throughout:
//! a three-member etcd whose members fail and get partitioned, agents
//! killed, stopped and upgraded, and a compaction behind a paused watch.
//! A 1 kpps UDP stream between two containers runs through each; the
//! promise is that it loses nothing, because the data path never waits for
//! the control plane.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;
use node_agent::flannel::{LeaseAttrs, VxlanLeaseData};
use weft_tests::stream::UdpStream;
use weft_tests::{
    CONVERGE, Cluster, Host, Signal, node_agent_binary, require_bpffs, require_root, require_tools,
    wait_routes, wait_until,
};

const CONFIG: &str = weft_tests::VXLAN_CONFIG;
const PPS: u32 = 1000;

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&["ip", "nsenter", "etcdctl", "ping", "python3"])?;
    node_agent_binary()?;
    Ok(())
}

/// Starts host `index`'s agent and waits until `watchers` have its subnet
/// in their maps; returns how long that took.
fn join_and_time(cluster: &Cluster, index: u8, watchers: &[&Host<'_>]) -> Result<Duration> {
    let start = Instant::now();
    let host = cluster.add_host(index)?;
    host.start_agent(&[])?;
    let env = host.wait_subnet_env(CONVERGE)?;
    for watcher in watchers {
        wait_routes(watcher, &[(&host, &env)])?;
    }
    let took = start.elapsed();
    // The joiner's namespace goes with `host`; its lease stays in etcd and
    // expires with its TTL, which is all this test needs.
    host.kill_agent(Signal::Term)?;
    Ok(took)
}

/// The etcd member holding an agent's watch (the fault must hit the
/// member the agents depend on), else `fallback`, said so.
fn watched_member(cluster: &Cluster, fallback: u8) -> u8 {
    cluster.etcd_member_watched().unwrap_or_else(|| {
        eprintln!("no etcd member reports a watch; hitting member {fallback}");
        fallback
    })
}

#[test]
fn agents_ride_out_a_killed_and_a_partitioned_etcd_member_without_loss() -> Result<()> {
    preflight()?;
    let cluster = Cluster::with_etcd_members(CONFIG, 3)?;
    let (hosts, _) = cluster.start_hosts(&[1, 2], &[], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    let watchers = [&hosts[0], &hosts[1]];
    let stream = UdpStream::start(&a, &b, PPS, Duration::from_secs(40))?;

    // A member dies, the one holding a watch: the agents carry on with the
    // other two, and a node that joins meanwhile still reaches their maps.
    let killed = watched_member(&cluster, 0);
    cluster.etcd().stop_member(usize::from(killed))?;
    let failover = join_and_time(&cluster, 3, &watchers)
        .with_context(|| format!("a late joiner while etcd member {killed} is dead"))?;
    cluster.etcd().restart_member(usize::from(killed))?;

    // A member loses its peers but not its clients: it has no leader, so
    // the agents' watches must move off it.
    let cut = watched_member(&cluster, 1);
    cluster.partition_etcd_member(cut, true)?;
    let detection = join_and_time(&cluster, 4, &watchers)
        .with_context(|| format!("a late joiner while etcd member {cut} is partitioned"))?;
    cluster.partition_etcd_member(cut, false)?;

    let stats = stream.finish()?;
    eprintln!(
        "etcd member {killed} killed: a joiner reached both agents in {failover:?}; member {cut} partitioned: in {detection:?}; stream lost {} of {}",
        stats.lost(),
        stats.packets
    );
    ensure!(
        stats.lost() == 0,
        "the data path lost {} of {} packets while etcd members failed",
        stats.lost(),
        stats.packets
    );
    Ok(())
}

#[test]
fn killed_stopped_and_upgraded_agents_lose_no_packet() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, envs) = cluster.start_hosts(&[1, 2], &[], false)?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    // "Rebuilt": another file, as a package upgrade leaves it.
    let upgrade_dir = tempfile::tempdir()?;
    let upgraded = upgrade_dir.path().join("node-agent");
    std::fs::copy(node_agent_binary()?, &upgraded).context("copying the agent binary")?;

    let stream = UdpStream::start(&a, &b, PPS, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs(2));
    hosts[0].kill_agent(Signal::Kill)?;
    hosts[0].start_agent(&[])?;
    hosts[0].wait_subnet_env(CONVERGE)?;
    wait_routes(&hosts[0], &[(&hosts[1], &envs[1])])?;
    hosts[1].kill_agent(Signal::Term)?;
    hosts[1].start_agent_from(&upgraded, &[])?;
    hosts[1].wait_subnet_env(CONVERGE)?;
    wait_routes(&hosts[1], &[(&hosts[0], &envs[0])])?;
    let stats = stream.finish()?;
    eprintln!(
        "SIGKILL + restart and SIGTERM + upgrade: stream lost {} of {}",
        stats.lost(),
        stats.packets
    );
    ensure!(
        stats.lost() == 0,
        "restarts lost {} of {} packets",
        stats.lost(),
        stats.packets
    );
    Ok(())
}

/// While an agent's watch is paused (the agent frozen), leases come and
/// go, enough of them that etcd can no longer hold the frozen watch's
/// events (its send window and queue fill, and the watcher falls behind),
/// and etcd compacts past the revision it was watching from. Thawed, it
/// must be told of the compaction, relist, and end with exactly the live
/// leases in its map.
#[test]
fn a_compaction_behind_a_paused_watch_ends_in_exactly_the_live_leases() -> Result<()> {
    /// Puts while frozen, each its own revision and watch response, with an
    /// 8 KiB pad: 24 MiB, far past what the client's HTTP/2 windows (2 MiB
    /// a stream), the sockets and etcd's queue of 128 responses per watch
    /// stream can hold, so etcd must hold the watcher back and, after the
    /// compaction, cancel it. (300 puts of 4 KiB sometimes fit.)
    const CHURN: usize = 3000;
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, envs) = cluster.start_hosts(&[1, 2], &[], false)?;
    hosts[0].freeze_agent(true)?;
    let lease = |i: u8| LeaseAttrs {
        public_ip: Ipv4Addr::new(198, 18, 0, 200 + i),
        backend_type: "vxlan".to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: Some(1),
            vtep_mac: [0x02, 0, 0, 0, 0x20, i],
        }),
    };
    let subnet = |i: u8| -> Result<Ipv4Net> { Ok(format!("10.244.{}.0/24", 200 + i).parse()?) };
    let pad = "x".repeat(8192);
    let mut churn = Vec::with_capacity(CHURN);
    for n in 0..CHURN {
        let i = (n % 4) as u8;
        let json = lease(i).to_json();
        let open = json
            .strip_suffix('}')
            .context("a lease value is a JSON object")?;
        let padded = format!(r#"{open},"Pad":"{pad}"}}"#);
        churn.push((cluster.lease_key(subnet(i)?), padded));
    }
    cluster.put_leases_one_per_revision(&churn)?;
    for i in [1, 3] {
        cluster.etcd().del(&cluster.lease_key(subnet(i)?))?;
    }
    let status = weft_tests::process::run(
        cluster
            .etcd()
            .etcdctl(&["endpoint", "status", "-w", "json"]),
    )?;
    let revision = serde_json::from_str::<serde_json::Value>(&status)?
        .pointer("/0/Status/header/revision")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no revision in {status}"))?;
    weft_tests::process::run(cluster.etcd().etcdctl(&[
        "compact",
        &revision.to_string(),
        "--physical",
    ]))?;
    hosts[0].freeze_agent(false)?;

    let want: BTreeSet<(Ipv4Net, Ipv4Addr)> = [
        (envs[1].subnet, hosts[1].ip()),
        (subnet(0)?, lease(0).public_ip),
        (subnet(2)?, lease(2).public_ip),
    ]
    .into_iter()
    .collect();
    wait_until(CONVERGE, "the thawed agent's map to match etcd", |last| {
        let have: BTreeSet<_> = hosts[0].peers()?.into_iter().collect();
        *last = format!("have {have:?}, want {want:?}");
        Ok((have == want).then_some(()))
    })?;
    let log = hosts[0].agent_log();
    ensure!(
        log.contains("watch start revision was compacted"),
        "the thawed agent was never told of the compaction (its watch kept up), so this test did not test it:\n{}",
        weft_tests::process::tail(&log, 20)
    );
    ensure!(
        hosts[0].reconciliations().len() >= 2,
        "no relist after the compaction"
    );
    Ok(())
}
