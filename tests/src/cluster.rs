//! The simulated cluster: an underlay switch with etcd, hosts running the
//! node agent, and containers attached the way a CNI bridge plugin would.
//!
//! ```text
//!  switch ns  wtst-<tag>-sw: bridge br0 198.18.0.254/24, etcd on :2379
//!     |  p1 ... pN (veth ports)
//!  host ns    wtst-<tag>-h<N>: eth0 198.18.0.N/24, node-agent, cni0
//!     |  vc<M>
//!  container  wtst-<tag>-h<N>c<M>: eth0 <subnet>.<M+1>, default via cni0
//! ```

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::{PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;
use node_agent::flannel::subnet_env::parse_subnet;
use node_agent::flannel::{KeyLayout, LeaseAttrs, NetworkConfig, SubnetEnv};
use node_agent::pinned::PinnedState;

use crate::etcd::{Etcd, EtcdSecurity, MemberSpec};
use crate::netns::Netns;
use crate::process::{self, Background};

/// The switch's address, where etcd listens.
pub const SWITCH_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const UNDERLAY_PREFIX_LEN: u8 = 24;
const UNDERLAY_MTU: u32 = 1500;
const BRIDGE: &str = "br0";
/// Where [`Cluster::add_routed_host`] puts hosts: the other half of the
/// 198.18.0.0/15 benchmarking range.
const ROUTED_UNDERLAY: &str = "198.19.0.0/16";
const CNI_BRIDGE: &str = "cni0";
const TCP_PORT: &str = "7777";
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
const AGENT_CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);
/// `doctor` waits 5 s for etcd at most; the rest is local reads.
const DOCTOR_TIMEOUT: Duration = Duration::from_secs(30);
const CONTAINER_ENV_TIMEOUT: Duration = Duration::from_secs(30);
/// etcd's default --max-txn-ops.
const TXN_OPS: usize = 128;
/// Transactions in flight while writing leases.
const TXN_CONCURRENCY: usize = 8;
/// How long agents get to lease, write their subnet file and learn peers.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// What the agent logs after each full listing of the leases in etcd.
pub const RECONCILED: &str = "peer table reconciled with etcd";

/// One full listing, as the agent timed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconciliation {
    /// Reading every lease from etcd.
    pub list_ms: u64,
    /// Listing and bringing the SUBNETS map in line with it.
    pub total_ms: u64,
}

/// The underlay switch, etcd, and the scratch directory every host's files
/// live in. Hosts borrow it, so the compiler makes them go first on drop.
pub struct Cluster {
    // Field order is drop order: stop etcd before deleting its namespaces.
    etcd: Etcd,
    /// The members' namespaces, when etcd is a cluster of its own hosts.
    etcd_member_ns: Vec<Netns>,
    switch: Netns,
    tag: String,
    config: String,
    /// flannel's default layout, which the agent also defaults to.
    keys: KeyLayout,
    dump_logs: AtomicBool,
    work_dir: tempfile::TempDir,
}

impl Cluster {
    /// Creates the switch namespace and bridge, starts etcd on
    /// [`SWITCH_IP`] and stores `network_config_json` as
    /// `<prefix>/config`.
    pub fn new(network_config_json: &str) -> Result<Self> {
        Self::with_etcd_security(network_config_json, EtcdSecurity::default())
    }

    /// [`Self::new`] with a TLS and/or authenticated etcd; agents started
    /// with [`Host::start_agent`] get the flags it needs.
    pub fn with_etcd_security(network_config_json: &str, security: EtcdSecurity) -> Result<Self> {
        Self::build(network_config_json, security, 0)
    }

    /// [`Self::new`] with etcd as a cluster of `members` servers, each in
    /// its own namespace: clients reach member `i` at 198.18.0.(241 + i) on
    /// the underlay switch, and the members talk to each other over a
    /// separate peer bridge (198.19.254.0/24), which
    /// [`Self::partition_etcd_member`] cuts. Agents get every endpoint.
    pub fn with_etcd_members(network_config_json: &str, members: u8) -> Result<Self> {
        ensure!(
            (1..=9).contains(&members),
            "{members} etcd members: 1 to 9 please"
        );
        Self::build(network_config_json, EtcdSecurity::default(), members)
    }

    fn build(network_config_json: &str, security: EtcdSecurity, members: u8) -> Result<Self> {
        // The agent's own parser: a config it would reject is a fixture bug.
        NetworkConfig::parse(network_config_json)
            .context("the agent rejects this network config")?;
        let tag = crate::unique_tag();
        let work_dir = crate::scratch_dir().context("creating the cluster's temp dir")?;
        let switch = Netns::new(&crate::ns_name(&tag, "sw"))?;
        switch
            .ip(&["link", "add", BRIDGE, "type", "bridge"])
            .context("creating the underlay bridge")?;
        switch.ip(&[
            "addr",
            "add",
            &format!("{SWITCH_IP}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        switch.ip(&["link", "set", BRIDGE, "up"])?;
        let mut etcd_member_ns = Vec::new();
        let etcd = if members == 0 {
            Etcd::start_secured(&switch, SWITCH_IP, work_dir.path(), security)?
        } else {
            switch
                .ip(&["link", "add", ETCD_PEER_BRIDGE, "type", "bridge"])
                .context("creating the etcd peer bridge")?;
            switch.ip(&["link", "set", ETCD_PEER_BRIDGE, "up"])?;
            for i in 0..members {
                etcd_member_ns.push(cable_etcd_member(&switch, &tag, i)?);
            }
            let specs: Vec<MemberSpec<'_>> = etcd_member_ns
                .iter()
                .zip(0..)
                .map(|(ns, i)| MemberSpec {
                    ns,
                    client_ip: etcd_member_client_ip(i),
                    peer_ip: etcd_member_peer_ip(i),
                })
                .collect();
            Etcd::start_members(&specs, work_dir.path(), security)?
        };
        let cluster = Self {
            etcd,
            etcd_member_ns,
            switch,
            tag,
            config: network_config_json.to_owned(),
            keys: KeyLayout::default(),
            dump_logs: AtomicBool::new(true),
            work_dir,
        };
        cluster
            .etcd
            .put(&cluster.keys.config_key(), network_config_json)
            .context("storing the network config")?;
        Ok(cluster)
    }

    pub fn etcd(&self) -> &Etcd {
        &self.etcd
    }

    /// Cuts etcd member `index` off from the other members (its peer link
    /// down) or heals it; clients still reach it.
    pub fn partition_etcd_member(&self, index: u8, cut: bool) -> Result<()> {
        let ns = self
            .etcd_member_ns
            .get(usize::from(index))
            .with_context(|| format!("no etcd member {index} in its own namespace"))?;
        ns.ip(&["link", "set", "peer0", if cut { "down" } else { "up" }])?;
        Ok(())
    }

    /// The etcd member an agent's watch stream is on, from etcd's own gauge
    /// of watchers per member (agents connect to every member; a watch
    /// stream sits on one). `None` if no member reports one.
    pub fn etcd_member_watched(&self) -> Option<u8> {
        const SCRIPT: &str = "import sys, urllib.request\nfor l in urllib.request.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode().splitlines():\n    if l.startswith('etcd_debugging_mvcc_watcher_total '):\n        print(int(float(l.split()[1])))\n";
        (0..=u8::MAX)
            .map_while(|i| {
                let url = self.etcd.member_endpoint(usize::from(i)).ok()?;
                Some((i, url))
            })
            .find(|(_, url)| {
                process::run(self.switch.command(&["python3", "-c", SCRIPT, url]))
                    .ok()
                    .and_then(|out| out.trim().parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            })
            .map(|(i, _)| i)
    }

    /// The namespace holding the underlay bridge and etcd.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The short tag in every name this cluster creates.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The network config stored in etcd.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// The etcd key layout the agents use (flannel's default prefix).
    pub fn keys(&self) -> &KeyLayout {
        &self.keys
    }

    /// The etcd key of the lease for `subnet`.
    pub fn lease_key(&self, subnet: Ipv4Net) -> String {
        self.keys.subnet_key(subnet)
    }

    /// The lease stored for `subnet`, parsed as the agent parses it; `None`
    /// if there is none.
    pub fn lease(&self, subnet: Ipv4Net) -> Result<Option<LeaseAttrs>> {
        let key = self.lease_key(subnet);
        self.etcd
            .get(&key)?
            .map(|v| LeaseAttrs::parse(&v).with_context(|| format!("lease {key} = {v}")))
            .transpose()
    }

    /// Writes `leases` (key, value) to etcd under one 24 h etcd lease, as
    /// flannel's are, in transactions of [`TXN_OPS`] puts: for scale runs.
    pub fn put_leases_bulk(&self, leases: &[(String, String)]) -> Result<()> {
        self.put_leases_in_txns(leases, TXN_OPS)
    }

    /// [`Self::put_leases_bulk`] with every put its own transaction, so its
    /// own revision and its own watch response: for filling a watcher's
    /// buffers.
    pub fn put_leases_one_per_revision(&self, leases: &[(String, String)]) -> Result<()> {
        self.put_leases_in_txns(leases, 1)
    }

    fn put_leases_in_txns(&self, leases: &[(String, String)], per_txn: usize) -> Result<()> {
        let endpoint = self.etcd().endpoint();
        // The client's sockets must live in the switch namespace, where etcd
        // listens: a current-thread runtime on a thread that entered it.
        self.switch().run_in(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a tokio runtime")?;
            rt.block_on(async {
                let mut client = etcd_client::Client::connect([endpoint], None)
                    .await
                    .context("connecting to etcd")?;
                let lease = client
                    .lease_grant(24 * 3600, None)
                    .await
                    .context("granting an etcd lease")?
                    .id();
                let mut set = tokio::task::JoinSet::new();
                for chunk in leases.chunks(per_txn) {
                    let ops: Vec<TxnOp> = chunk
                        .iter()
                        .map(|(k, v)| {
                            TxnOp::put(
                                k.as_str(),
                                v.as_str(),
                                Some(PutOptions::new().with_lease(lease)),
                            )
                        })
                        .collect();
                    let mut c = client.clone();
                    set.spawn(async move { c.txn(Txn::new().and_then(ops)).await });
                    if set.len() >= TXN_CONCURRENCY
                        && let Some(r) = set.join_next().await
                    {
                        r.context("txn task")?.context("etcd txn")?;
                    }
                }
                while let Some(r) = set.join_next().await {
                    r.context("txn task")?.context("etcd txn")?;
                }
                Ok(())
            })
        })?
    }

    /// Stores a lease for `subnet` as flanneld or an agent would.
    pub fn put_lease(&self, subnet: Ipv4Net, lease: &LeaseAttrs) -> Result<()> {
        self.etcd.put(&self.lease_key(subnet), &lease.to_json())
    }

    /// Whether hosts print the tail of their agent log when dropped (on by
    /// default: the test harness shows it only for failing tests).
    pub fn set_dump_logs_on_drop(&self, on: bool) {
        self.dump_logs.store(on, Ordering::Relaxed);
    }

    /// Adds host `index` (1..=253): namespace `wtst-<tag>-h<index>` with
    /// `eth0` = 198.18.0.<index>/24, MTU 1500, cabled to switch port
    /// `p<index>`.
    pub fn add_host(&self, index: u8) -> Result<Host<'_>> {
        ensure!(
            (1..=253).contains(&index),
            "host index {index} outside 1..=253"
        );
        let ip = host_ip(index);
        let host = self.cable_host(index, &switch_port(index), ip)?;
        self.switch
            .ip(&["link", "set", &switch_port(index), "master", BRIDGE, "up"])?;
        // Routed hosts (see add_routed_host) sit behind the switch namespace.
        host.ns.ip(&[
            "route",
            "add",
            ROUTED_UNDERLAY,
            "via",
            &SWITCH_IP.to_string(),
        ])?;
        Ok(host)
    }

    /// Adds hosts `indexes`, starts an agent on each with `agent_args`
    /// (`realistic_wire`: underlay offloads as a NIC's, see
    /// [`Host::set_realistic_wire`]), waits for every subnet file and until
    /// every host's SUBNETS map holds every other host's subnet.
    pub fn start_hosts(
        &self,
        indexes: &[u8],
        agent_args: &[&str],
        realistic_wire: bool,
    ) -> Result<(Vec<Host<'_>>, Vec<SubnetEnv>)> {
        let hosts = indexes
            .iter()
            .map(|&i| self.add_host(i))
            .collect::<Result<Vec<_>>>()?;
        for host in &hosts {
            if realistic_wire {
                host.set_realistic_wire(true)?;
            }
            host.start_agent(agent_args)?;
        }
        let envs = hosts
            .iter()
            .map(|h| h.wait_subnet_env(CONVERGE))
            .collect::<Result<Vec<_>>>()?;
        let subnets: std::collections::BTreeSet<Ipv4Net> = envs.iter().map(|e| e.subnet).collect();
        ensure!(
            subnets.len() == envs.len(),
            "agents leased overlapping subnets: {envs:?}"
        );
        wait_full_mesh(
            &hosts.iter().collect::<Vec<_>>(),
            &envs.iter().collect::<Vec<_>>(),
        )?;
        Ok((hosts, envs))
    }

    /// A host on its own underlay segment, 198.19.<index>.0/24, behind the
    /// switch namespace acting as a router: not on the bridge hosts' L2, so
    /// reaching it takes a routed underlay (DirectRouting must tunnel to it).
    pub fn add_routed_host(&self, index: u8) -> Result<Host<'_>> {
        ensure!(
            (1..=253).contains(&index),
            "host index {index} outside 1..=253"
        );
        let ip = Ipv4Addr::new(198, 19, index, 1);
        let gateway = Ipv4Addr::new(198, 19, index, 254);
        let port = format!("r{index}");
        let host = self.cable_host(index, &port, ip)?;
        self.switch.sysctl("net.ipv4.ip_forward", "1")?;
        self.switch.ip(&[
            "addr",
            "add",
            &format!("{gateway}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            &port,
        ])?;
        self.switch.ip(&["link", "set", &port, "up"])?;
        host.ns
            .ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        Ok(host)
    }

    /// A host on its own segment 198.19.<index>.0/24 (eth0 MTU 1500), behind
    /// its own router namespace `wtst-<tag>-n<index>`, whose uplink to the
    /// switch namespace (also a router) is 198.19.<200 + index>.0/24 with
    /// MTU `narrow_mtu` on both veth ends (a veth drops frames larger than
    /// the receiving end's MTU, so one narrow end alone would not behave
    /// like a narrow link). Paths between this host and every other one
    /// cross that hop: it fragments packets without DF and answers DF ones
    /// with ICMP "fragmentation needed" to their source.
    pub fn add_host_behind_narrow_link(&self, index: u8, narrow_mtu: u32) -> Result<Host<'_>> {
        ensure!(
            (1..=50).contains(&index),
            "host index {index} outside 1..=50"
        );
        let router = Netns::new(&crate::ns_name(&self.tag, &format!("n{index}")))?;
        let uplink = |host: u8| Ipv4Addr::new(198, 19, 200 + index, host);
        let port = format!("n{index}");
        self.switch
            .add_veth(&port, &router, "uplink", narrow_mtu)
            .with_context(|| format!("cabling router {index} to the switch"))?;
        self.switch.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        self.switch.ip(&[
            "addr",
            "add",
            &format!("{}/{UNDERLAY_PREFIX_LEN}", uplink(254)),
            "dev",
            &port,
        ])?;
        self.switch.ip(&["link", "set", &port, "up"])?;
        router.ip(&[
            "addr",
            "add",
            &format!("{}/{UNDERLAY_PREFIX_LEN}", uplink(1)),
            "dev",
            "uplink",
        ])?;
        router.ip(&["link", "set", "uplink", "up"])?;
        router.ip(&["route", "add", "default", "via", &uplink(254).to_string()])?;
        let segment = format!("198.19.{index}.0/{UNDERLAY_PREFIX_LEN}");
        self.switch
            .ip(&["route", "add", &segment, "via", &uplink(1).to_string()])?;
        let gateway = Ipv4Addr::new(198, 19, index, 254);
        let mut host =
            self.cable_host_to(index, &router, "downlink", Ipv4Addr::new(198, 19, index, 1))?;
        router.ip(&[
            "addr",
            "add",
            &format!("{gateway}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "downlink",
        ])?;
        router.ip(&["link", "set", "downlink", "up"])?;
        host.ns
            .ip(&["route", "add", "default", "via", &gateway.to_string()])?;
        host.router = Some(router);
        Ok(host)
    }

    /// A new host namespace whose `eth0` (address `ip`) is cabled to the
    /// switch namespace's `port`.
    fn cable_host(&self, index: u8, port: &str, ip: Ipv4Addr) -> Result<Host<'_>> {
        self.cable_host_to(index, &self.switch, port, ip)
    }

    /// A new host namespace whose `eth0` (address `ip`) is cabled to
    /// `port` in namespace `peer`.
    fn cable_host_to(&self, index: u8, peer: &Netns, port: &str, ip: Ipv4Addr) -> Result<Host<'_>> {
        let ns = Netns::new(&crate::ns_name(&self.tag, &format!("h{index}")))?;
        ns.add_veth("eth0", peer, port, UNDERLAY_MTU)
            .with_context(|| format!("cabling host {index} to {}", peer.name()))?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        let dir = self.work_dir.path().join(format!("host{index}"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Host {
            cluster: self,
            index,
            ip,
            subnet_file: dir.join("subnet.env"),
            state_file: dir.join("state.json"),
            log_path: dir.join("agent.log"),
            pin_path: crate::pin_path(&self.tag, index),
            agent: Mutex::new(None),
            containers: AtomicU8::new(0),
            ns,
            router: None,
        })
    }
}

/// The bridge in the switch namespace that carries etcd members' peer
/// traffic, apart from the underlay.
const ETCD_PEER_BRIDGE: &str = "brp";

fn etcd_member_client_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 241 + index)
}

fn etcd_member_peer_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 254, 1 + index)
}

/// A namespace for etcd member `index`: `eth0` on the underlay switch for
/// clients, `peer0` on the peer bridge for the other members.
fn cable_etcd_member(switch: &Netns, tag: &str, index: u8) -> Result<Netns> {
    let ns = Netns::new(&crate::ns_name(tag, &format!("e{index}")))?;
    for (dev, port, bridge, ip) in [
        (
            "eth0",
            format!("e{index}"),
            BRIDGE,
            etcd_member_client_ip(index),
        ),
        (
            "peer0",
            format!("ep{index}"),
            ETCD_PEER_BRIDGE,
            etcd_member_peer_ip(index),
        ),
    ] {
        ns.add_veth(dev, switch, &port, UNDERLAY_MTU)
            .with_context(|| format!("cabling etcd member {index}"))?;
        switch.ip(&["link", "set", &port, "master", bridge, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{UNDERLAY_PREFIX_LEN}"),
            "dev",
            dev,
        ])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    ns.ip(&["link", "set", "lo", "up"])?;
    Ok(ns)
}

/// The switch-side port name of host `index`'s cable.
pub fn switch_port(index: u8) -> String {
    format!("p{index}")
}

fn host_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, index)
}

/// How to stop an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Self::Term => libc::SIGTERM,
            Self::Kill => libc::SIGKILL,
        }
    }
}

struct Agent {
    process: Background,
    /// The subnet file as it was when this agent started (`None`: absent),
    /// to tell its write from one left by an earlier agent.
    prior_file: Option<FileStamp>,
}

/// Identity and change times of a file: any write, in place or by rename,
/// changes at least one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let m = fs::metadata(path).ok()?;
        Some(Self {
            ino: m.ino(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// One simulated node: a namespace cabled to the switch, optionally
/// running the node agent. Drop stops the agent, runs `node-agent cleanup`,
/// removes the pin directory and deletes the namespace.
pub struct Host<'c> {
    cluster: &'c Cluster,
    index: u8,
    ip: Ipv4Addr,
    subnet_file: PathBuf,
    /// `--state-file`: the agent's lease and sync state, for `status`.
    state_file: PathBuf,
    log_path: PathBuf,
    pin_path: PathBuf,
    agent: Mutex<Option<Agent>>,
    containers: AtomicU8,
    // Last fields: the namespaces go after Drop::drop has cleaned up in
    // them, the host's before its router's.
    ns: Netns,
    /// The router namespace of [`Cluster::add_host_behind_narrow_link`].
    router: Option<Netns>,
}

/// What the fixtures need of a subnet file beyond its fields.
pub trait SubnetEnvExt {
    /// FLANNEL_SUBNET as written: the subnet's first host address with the
    /// prefix length, e.g. `10.244.5.1/24`, the bridge's address.
    fn gateway(&self) -> Ipv4Net;
    /// Host number `n` of the subnet (1 is the gateway).
    fn host_addr(&self, n: u8) -> Result<Ipv4Addr>;
}

impl SubnetEnvExt for SubnetEnv {
    fn gateway(&self) -> Ipv4Net {
        let first = Ipv4Addr::from(u32::from(self.subnet.network()).saturating_add(1));
        Ipv4Net::new(first, self.subnet.prefix_len()).unwrap_or(self.subnet)
    }

    fn host_addr(&self, n: u8) -> Result<Ipv4Addr> {
        // The last address is the broadcast; u64 so a /0 cannot overflow.
        ensure!(
            u64::from(n) + 1 < 1u64 << (32 - u32::from(self.subnet.prefix_len())),
            "subnet {} has no host {n}",
            self.subnet
        );
        Ok(Ipv4Addr::from(
            u32::from(self.subnet.network()) + u32::from(n),
        ))
    }
}

/// Parses a subnet file the agent wrote (FLANNEL_SUBNET with the agent's
/// own parser) and checks that it is exactly what the agent's `render`
/// makes of it: a file half-written, or with other lines, is an error.
pub fn parse_subnet_env(text: &str) -> Result<SubnetEnv> {
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("{name} missing"))
    };
    let env = SubnetEnv {
        network: var("FLANNEL_NETWORK")?.parse().context("FLANNEL_NETWORK")?,
        subnet: parse_subnet(text)?.context("FLANNEL_SUBNET missing")?,
        mtu: var("FLANNEL_MTU")?.parse().context("FLANNEL_MTU")?,
        ipmasq: var("FLANNEL_IPMASQ")?.parse().context("FLANNEL_IPMASQ")?,
    };
    ensure!(
        env.render() == text,
        "not the agent's rendering of {env:?}: {text:?}"
    );
    Ok(env)
}

/// What a TCP transfer measured.
#[derive(Clone, Copy, Debug)]
pub struct TransferStats {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl<'c> Host<'c> {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// The underlay address, 198.18.0.<index>.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    /// `--pin-path` given to the agent: `/sys/fs/bpf/weft-t<tag>-<index>`.
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }

    pub fn subnet_file(&self) -> &Path {
        &self.subnet_file
    }

    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    fn agent_slot(&self) -> MutexGuard<'_, Option<Agent>> {
        // A panic while holding the lock leaves a consistent Option behind.
        self.agent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts `node-agent run` in this host's namespace (network namespace
    /// only, see [`Netns::command_keep_mounts`]) with RUST_LOG=info
    /// (or the caller's RUST_LOG), appending to the host's agent log.
    pub fn start_agent(&self, extra_args: &[&str]) -> Result<()> {
        let etcd_flags = self.cluster.etcd.agent_flags();
        let etcd_flags: Vec<&str> = etcd_flags.iter().map(String::as_str).collect();
        self.start_agent_with_etcd_flags(extra_args, &etcd_flags)
    }

    /// [`Self::start_agent`] with `etcd_flags` in place of the TLS and
    /// authentication flags the cluster's etcd needs: for testing wrong ones.
    pub fn start_agent_with_etcd_flags(
        &self,
        extra_args: &[&str],
        etcd_flags: &[&str],
    ) -> Result<()> {
        self.start_agent_binary(&crate::node_agent_binary()?, extra_args, etcd_flags)
    }

    /// [`Self::start_agent`] from another copy of the agent binary: an
    /// upgrade in place.
    pub fn start_agent_from(&self, binary: &Path, extra_args: &[&str]) -> Result<()> {
        let etcd_flags = self.cluster.etcd.agent_flags();
        let etcd_flags: Vec<&str> = etcd_flags.iter().map(String::as_str).collect();
        self.start_agent_binary(binary, extra_args, &etcd_flags)
    }

    fn start_agent_binary(
        &self,
        binary: &Path,
        extra_args: &[&str],
        etcd_flags: &[&str],
    ) -> Result<()> {
        let binary = binary.to_string_lossy().into_owned();
        let flags = self.agent_flags();
        let mut args = vec![binary.as_str(), "run"];
        args.extend(flags.iter().map(String::as_str));
        args.extend_from_slice(etcd_flags);
        args.extend_from_slice(extra_args);
        self.spawn_agent(self.ns.command_keep_mounts(&args))
    }

    /// Starts the agent as [`Self::start_agent`] does, in a private mount
    /// namespace of its own where /sys/fs/bpf is no BPF filesystem (unmounted
    /// there only, after checking that the namespace really is another one):
    /// the agent must mount bpffs itself, and that mount dies with it.
    pub fn start_agent_without_bpffs(&self) -> Result<()> {
        let binary = crate::node_agent_binary()?.to_string_lossy().into_owned();
        let flags = self.agent_flags();
        // $1..: the agent's command line.
        let script = r#"set -e
[ "$(readlink /proc/self/ns/mnt)" != "$(readlink /proc/1/ns/mnt)" ] || { echo "not in a private mount namespace" >&2; exit 97; }
while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf; done
exec "$@""#;
        let mut args = vec![
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            binary.as_str(),
            "run",
        ];
        args.extend(flags.iter().map(String::as_str));
        self.spawn_agent(self.ns.command_keep_mounts(&args))
    }

    /// The flags that point an agent (or `doctor`) at this host's etcd,
    /// interface, subnet file, pin path and state file; not the TLS or auth flags.
    fn agent_flags(&self) -> Vec<String> {
        [
            "--etcd-endpoints",
            &self.cluster.etcd.endpoints(),
            "--iface",
            "eth0",
            "--subnet-file",
            &self.subnet_file.to_string_lossy(),
            "--pin-path",
            &self.pin_path.to_string_lossy(),
            "--state-file",
            &self.state_file.to_string_lossy(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The environment that configures an agent like [`Self::start_agent`]'s
    /// flags, flanneld's way (`FLANNELD_*`; the pin path, which flanneld
    /// lacks, as `WEFT_PIN_PATH`), less the interface: add `FLANNELD_IFACE`
    /// or leave it to the default route. The cluster's etcd must need no
    /// TLS or authentication.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FLANNELD_ETCD_ENDPOINTS", self.cluster.etcd.endpoints()),
            (
                "FLANNELD_SUBNET_FILE",
                self.subnet_file.to_string_lossy().into_owned(),
            ),
            (
                "WEFT_PIN_PATH",
                self.pin_path.to_string_lossy().into_owned(),
            ),
            (
                "WEFT_STATE_FILE",
                self.state_file.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// Starts `node-agent run` with no flags at all, configured only by
    /// `env`, as a unit file with an `EnvironmentFile=` does. Nothing of the
    /// test's own environment named `FLANNELD_*` or `WEFT_*` leaks in.
    pub fn start_agent_env_only(&self, env: &[(&str, String)]) -> Result<()> {
        let binary = crate::node_agent_binary()?.to_string_lossy().into_owned();
        let mut cmd = self.ns.command_keep_mounts(&[&binary, "run"]);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("FLANNELD_") || name.starts_with("WEFT_") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        self.spawn_agent(cmd)
    }

    /// Runs `node-agent doctor --json` in this host's namespace with the
    /// agent's flags plus `extra_args`. Returns whether it exited 0 and the
    /// report.
    pub fn doctor(&self, extra_args: &[&str]) -> Result<(bool, serde_json::Value)> {
        let binary = crate::node_agent_binary()?.to_string_lossy().into_owned();
        let flags = self.agent_flags();
        let mut args = vec![binary.as_str(), "doctor", "--json"];
        args.extend(flags.iter().map(String::as_str));
        args.extend_from_slice(extra_args);
        let output = process::run_output(self.ns.command_keep_mounts(&args), DOCTOR_TIMEOUT)?;
        let report = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "host {}: doctor printed no JSON report; stderr:\n{}",
                self.index,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        Ok((output.status.success(), report))
    }

    /// Starts the agent command `cmd` (RUST_LOG=info unless the caller's
    /// RUST_LOG is set), appending to the host's agent log.
    fn spawn_agent(&self, mut cmd: std::process::Command) -> Result<()> {
        let mut slot = self.agent_slot();
        if let Some(agent) = slot.as_mut()
            && agent.process.try_wait()?.is_none()
        {
            bail!("host {}: agent already running", self.index);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Marks restarts in the one log the host keeps.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .and_then(|mut log| {
                writeln!(log, "=== weft-tests: starting {}", process::describe(&cmd))
            })
            .with_context(|| format!("writing {}", self.log_path.display()))?;
        let prior_file = FileStamp::of(&self.subnet_file);
        let process = Background::spawn_logged(cmd, &self.log_path)?;
        *slot = Some(Agent {
            process,
            prior_file,
        });
        Ok(())
    }

    /// The running agent's pid, if one was started and has not been reaped.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent_slot().as_ref().and_then(|a| a.process.id())
    }

    /// Whether the agent process is alive.
    pub fn agent_running(&self) -> bool {
        self.agent_slot()
            .as_mut()
            .is_some_and(|a| matches!(a.process.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for the agent to exit by itself and returns
    /// its status; fails, with the log, if it is still running.
    pub fn wait_agent_exit(&self, timeout: Duration) -> Result<ExitStatus> {
        process::wait_until(timeout, "the agent to exit", |_| {
            let mut slot = self.agent_slot();
            let agent = slot
                .as_mut()
                .with_context(|| format!("host {}: no agent was started", self.index))?;
            agent.process.try_wait()
        })
        .with_context(|| format!("log:\n{}", process::tail(&self.agent_log(), 40)))
    }

    /// Sends `signal` to the agent and waits for it to exit.
    pub fn kill_agent(&self, signal: Signal) -> Result<ExitStatus> {
        let mut agent = self
            .agent_slot()
            .take()
            .with_context(|| format!("host {}: no agent was started", self.index))?;
        if let Some(status) = agent.process.try_wait()? {
            bail!(
                "host {}: agent had already exited ({status}); log:\n{}",
                self.index,
                process::tail(&self.agent_log(), 40)
            );
        }
        match agent.process.stop(signal.raw(), AGENT_STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => bail!(
                "host {}: agent did not exit within {AGENT_STOP_TIMEOUT:?} of {signal:?} (killed); log:\n{}",
                self.index,
                process::tail(&self.agent_log(), 40)
            ),
        }
    }

    /// Freezes (`true`, SIGSTOP) or thaws (SIGCONT) the running agent: its
    /// etcd watch pauses while the data path keeps forwarding.
    pub fn freeze_agent(&self, frozen: bool) -> Result<()> {
        let pid = self
            .agent_pid()
            .with_context(|| format!("host {}: no agent running", self.index))?;
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
        // SAFETY: kill(2) with a pid this fixture spawned and still owns.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling agent {pid}"));
        }
        Ok(())
    }

    /// The agent's full listings of etcd so far (its "peer table reconciled
    /// with etcd" lines), oldest first: one at start and one per relist.
    pub fn reconciliations(&self) -> Vec<Reconciliation> {
        let field = |line: &str, name: &str| -> Option<u64> {
            line.split(name)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        self.agent_log()
            .lines()
            .filter(|l| l.contains(RECONCILED))
            .filter_map(|l| {
                Some(Reconciliation {
                    list_ms: field(l, "list_ms=")?,
                    total_ms: field(l, "total_ms=")?,
                })
            })
            .collect()
    }

    /// Everything the agent(s) on this host logged.
    pub fn agent_log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the running agent has written the subnet file (a file
    /// left by an earlier agent on this host does not count) and parses it.
    /// Fails early, with the log, if the agent exits.
    pub fn wait_subnet_env(&self, timeout: Duration) -> Result<SubnetEnv> {
        let prior = self
            .agent_slot()
            .as_ref()
            .map(|a| a.prior_file)
            .with_context(|| format!("host {}: no agent was started", self.index))?;
        let result = process::wait_until(timeout, "the agent to write the subnet file", |last| {
            if let Some(agent) = self.agent_slot().as_mut()
                && let Some(status) = agent.process.try_wait()?
            {
                bail!("the agent exited with {status}");
            }
            let Some(stamp) = FileStamp::of(&self.subnet_file) else {
                *last = format!("{} does not exist", self.subnet_file.display());
                return Ok(None);
            };
            if prior == Some(stamp) {
                *last = "only the subnet file of a previous agent run exists".into();
                return Ok(None);
            }
            let text = fs::read_to_string(&self.subnet_file)
                .with_context(|| format!("reading {}", self.subnet_file.display()))?;
            // The agent may be mid-write if it does not rename into place.
            match parse_subnet_env(&text) {
                Ok(env) => Ok(Some(env)),
                Err(e) => {
                    *last = format!("{e:#}: {text:?}");
                    Ok(None)
                }
            }
        });
        result.with_context(|| {
            format!(
                "host {}: agent log:\n{}",
                self.index,
                process::tail(&self.agent_log(), 40)
            )
        })
    }

    /// With `realistic`, turns TCP and generic segmentation offloads off
    /// on this host's cable (both ends), so the wire carries MTU-sized
    /// frames as a physical link does rather than 64 KiB veth super-packets;
    /// without, restores veth's default (both on).
    pub fn set_realistic_wire(&self, realistic: bool) -> Result<()> {
        let state = if realistic { "off" } else { "on" };
        let port = switch_port(self.index);
        for (ns, dev, side) in [
            (&self.ns, "eth0", "host"),
            (&self.cluster.switch, port.as_str(), "switch"),
        ] {
            ns.run(&["ethtool", "-K", dev, "tso", state, "gso", state])
                .with_context(|| format!("ethtool on the {side} side of host {}", self.index))?;
        }
        Ok(())
    }

    /// Creates `cni0` (first time) and a new container namespace attached
    /// to it, per the connectivity contract: eth0 with the subnet's next
    /// free address (first container: .2), MTU FLANNEL_MTU, default route
    /// via the bridge. Waits for the subnet file if needed.
    pub fn attach_container(&self) -> Result<Container<'_>> {
        self.attach_container_with_mtu(None)
    }

    /// [`Self::attach_container`] with the container's veth MTU set to
    /// `container_mtu` instead of FLANNEL_MTU: a misconfigured container, for
    /// path-MTU tests.
    pub fn attach_container_with_mtu(&self, container_mtu: Option<u32>) -> Result<Container<'_>> {
        let env = match self.subnet_env() {
            Ok(env) => env,
            Err(_) => self.wait_subnet_env(CONTAINER_ENV_TIMEOUT)?,
        };
        let bridge_mtu = env.mtu.to_string();
        let mtu = container_mtu.unwrap_or(env.mtu);
        let exists = self
            .ns
            .exec(&["ip", "link", "show", CNI_BRIDGE])?
            .status
            .success();
        if !exists {
            self.ns
                .ip(&[
                    "link",
                    "add",
                    CNI_BRIDGE,
                    "mtu",
                    &bridge_mtu,
                    "type",
                    "bridge",
                ])
                .context("creating cni0")?;
            self.ns
                .ip(&["addr", "add", &env.gateway().to_string(), "dev", CNI_BRIDGE])?;
            self.ns.ip(&["link", "set", CNI_BRIDGE, "up"])?;
        }
        let n = self.containers.fetch_add(1, Ordering::Relaxed) + 1;
        ensure!(n < 250, "too many containers on host {}", self.index);
        let ip = env.host_addr(n + 1)?;
        let gateway = env.gateway();
        let ns = Netns::new(&format!("{}c{n}", self.ns.name()))?;
        let peer = format!("vc{n}");
        ns.add_veth("eth0", &self.ns, &peer, mtu)
            .with_context(|| format!("creating container {n}'s veth on host {}", self.index))?;
        self.ns
            .ip(&["link", "set", &peer, "master", CNI_BRIDGE, "up"])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", gateway.prefix_len()),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gateway.addr().to_string(),
        ])?;
        Ok(Container {
            host: self,
            ns,
            ip,
            env,
        })
    }

    /// Pings from the host's own namespace; see [`Netns::ping`].
    pub fn ping(&self, dst: Ipv4Addr, count: u32, size: u32, df: bool) -> Result<String> {
        self.ns.ping(dst, count, size, df)
    }

    /// The subnet file as it is now (no waiting), parsed.
    pub fn subnet_env(&self) -> Result<SubnetEnv> {
        let text = fs::read_to_string(&self.subnet_file)
            .with_context(|| format!("reading {}", self.subnet_file.display()))?;
        parse_subnet_env(&text).with_context(|| format!("{}", self.subnet_file.display()))
    }

    /// Deletes this host's underlay interface `eth0` and cables a new one
    /// to the same switch port with the same address: what a re-created
    /// interface (a new ifindex, and a veth's new MAC) looks like to the
    /// agent. Hosts on the switch's bridge only ([`Cluster::add_host`]).
    pub fn recable_underlay(&self) -> Result<()> {
        ensure!(
            self.router.is_none() && self.ip.octets()[..3] == [198, 18, 0],
            "host {}: only a host on the switch's bridge can be cabled again",
            self.index
        );
        let port = switch_port(self.index);
        // Deleting one end of a veth pair deletes both.
        self.ns.ip(&["link", "del", "eth0"])?;
        self.ns
            .add_veth("eth0", &self.cluster.switch, &port, UNDERLAY_MTU)?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{}/{UNDERLAY_PREFIX_LEN}", self.ip),
            "dev",
            "eth0",
        ])?;
        self.ns.ip(&["link", "set", "eth0", "up"])?;
        self.cluster
            .switch
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        Ok(())
    }

    /// The agent's pinned maps, read as `node-agent status` reads them.
    pub fn pinned(&self) -> Result<PinnedState> {
        PinnedState::open(&self.pin_path)
            .with_context(|| format!("host {}: opening the pinned maps", self.index))
    }

    /// Rewrites the local subnet in this host's pinned NODE_CONFIG, which
    /// the data path reads per packet (the agent writes it once, at start):
    /// lets a benchmark make a running node stand in for a joining one.
    pub fn set_pinned_local_subnet(&self, subnet: Ipv4Net) -> Result<()> {
        use aya::maps::{Array, Map, MapData};
        let path = self.pin_path.join(weft_common::MAP_NODE_CONFIG);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut array: Array<_, weft_common::NodeConfig> = Array::try_from(Map::Array(data))?;
        let mut cfg = array.get(&0, 0)?;
        cfg.local_subnet = subnet.network().octets();
        cfg.local_prefix_len = subnet.prefix_len();
        array.set(0, cfg, 0)?;
        Ok(())
    }

    /// The SUBNETS map as (subnet, remote PublicIP) pairs, sorted.
    pub fn peers(&self) -> Result<Vec<(Ipv4Net, Ipv4Addr)>> {
        let peers = self.pinned()?.peers().context("reading SUBNETS")?;
        Ok(peers
            .into_iter()
            .map(|(net, node)| (net, Ipv4Addr::from(node.public_ip)))
            .collect())
    }

    /// The kernel id of a map pinned under the pin path. The same id after
    /// an agent restart means the restarted agent adopted the pinned map
    /// rather than creating a new one.
    pub fn pinned_map_id(&self, map: &str) -> Result<u32> {
        let path = self.pin_path.join(map);
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(info.id())
    }

    /// Every path under the pin directory, relative to it, sorted.
    pub fn pinned_entries(&self) -> Result<Vec<String>> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
            for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
                let path = entry.context("reading a pin dir entry")?.path();
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push(rel.to_string_lossy().into_owned());
                if path.is_dir() {
                    walk(root, &path, out)?;
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.pin_path, &self.pin_path, &mut out)?;
        out.sort();
        Ok(out)
    }

    /// Runs `node-agent cleanup` for this host's pin path, subnet and state
    /// files, inside its namespace (cleanup detaches from its devices there).
    pub fn agent_cleanup(&self) -> Result<()> {
        self.agent_cleanup_with(&[])
    }

    /// [`Self::agent_cleanup`] with `--keep-subnet-file`: the last step of
    /// a rollback to flanneld, which has written its own.
    pub fn agent_cleanup_keeping_subnet_file(&self) -> Result<()> {
        self.agent_cleanup_with(&["--keep-subnet-file"])
    }

    fn agent_cleanup_with(&self, extra: &[&str]) -> Result<()> {
        let binary = crate::node_agent_binary()?;
        let mut cmd = self.ns.command_keep_mounts(&[
            &binary.to_string_lossy(),
            "cleanup",
            "--pin-path",
            &self.pin_path.to_string_lossy(),
            "--subnet-file",
            &self.subnet_file.to_string_lossy(),
            "--state-file",
            &self.state_file.to_string_lossy(),
        ]);
        cmd.args(extra);
        process::run_timeout(cmd, AGENT_CLEANUP_TIMEOUT)
            .with_context(|| format!("host {}: node-agent cleanup", self.index))?;
        Ok(())
    }

    fn stop_agent_for_drop(&self) {
        let Some(mut agent) = self.agent_slot().take() else {
            return;
        };
        // SIGTERM first: a clean shutdown path is part of what runs in
        // tests; SIGKILL only if it does not end in time.
        let _ = agent.process.stop(libc::SIGTERM, AGENT_STOP_TIMEOUT);
    }
}

impl Drop for Host<'_> {
    fn drop(&mut self) {
        self.stop_agent_for_drop();
        if self.cluster.dump_logs.load(Ordering::Relaxed) {
            let log = self.agent_log();
            if !log.is_empty() {
                eprintln!(
                    "---- host {} ({}) agent log, last 60 lines ----\n{}\n----",
                    self.index,
                    self.ns.name(),
                    process::tail(&log, 60)
                );
            }
        }
        // Its failure is not fatal; the namespace and pins go anyway.
        let _ = self.agent_cleanup();
        if self.pin_path.exists()
            && let Err(e) = fs::remove_dir_all(&self.pin_path)
        {
            eprintln!("weft-tests: removing {}: {e}", self.pin_path.display());
        }
        // `ns` (deleted by its Drop) and the files in the cluster's temp dir
        // go after this.
    }
}

/// A container namespace attached to its host's `cni0`. Dropping it deletes
/// the namespace (and with it the veth pair).
pub struct Container<'h> {
    host: &'h Host<'h>,
    ns: Netns,
    ip: Ipv4Addr,
    env: SubnetEnv,
}

impl Container<'_> {
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn host(&self) -> &Host<'_> {
        self.host
    }

    /// The subnet file the container was attached with.
    pub fn subnet_env(&self) -> &SubnetEnv {
        &self.env
    }

    /// See [`Netns::ping`].
    pub fn ping(&self, dst: Ipv4Addr, count: u32, size: u32, df: bool) -> Result<String> {
        self.ns.ping(dst, count, size, df)
    }

    /// See [`Netns::ping_until`].
    pub fn ping_until(&self, dst: Ipv4Addr, timeout: Duration) -> Result<()> {
        self.ns.ping_until(dst, timeout)
    }

    /// Sends `bytes` bytes over one TCP connection to `dst` and checks that
    /// exactly that many arrived, as counted by the receiver (and echoed
    /// back to the sender). Uses small python3 programs so no extra tool is
    /// needed in the namespaces.
    pub fn tcp_transfer_to(&self, dst: &Container<'_>, bytes: u64) -> Result<TransferStats> {
        tcp_transfer(
            &self.ns,
            self.ip,
            &dst.ns,
            dst.ip,
            bytes,
            Duration::from_secs(60),
        )
    }
}

/// Sends `bytes` bytes over one TCP connection from namespace `src` to a
/// receiver listening on `dst_ip` in namespace `dst` and checks that exactly
/// that many arrived, as counted by the receiver (and echoed back to the
/// sender), all within `timeout`. `src_ip` only names the sender in errors.
pub fn tcp_transfer(
    src: &Netns,
    src_ip: Ipv4Addr,
    dst: &Netns,
    dst_ip: Ipv4Addr,
    bytes: u64,
    timeout: Duration,
) -> Result<TransferStats> {
    let python = python3();
    let timeout_s = timeout.as_secs().to_string();
    let dst_ip = dst_ip.to_string();
    let bytes_s = bytes.to_string();
    let server =
        Background::spawn(dst.command(&[python, "-c", TCP_SERVER, &dst_ip, TCP_PORT, &timeout_s]))?;
    let client = src.command(&[
        python, "-c", TCP_CLIENT, &dst_ip, TCP_PORT, &bytes_s, &timeout_s,
    ]);
    let client_desc = process::describe(&client);
    let start = Instant::now();
    let client_out = process::run_output(client, timeout + Duration::from_secs(10))?;
    let elapsed = start.elapsed();
    let received = server
        .finish(Duration::from_secs(10))
        .with_context(|| format!("TCP receiver in {}", dst.name()))?;
    let sent = process::check(&client_desc, &client_out)
        .with_context(|| format!("TCP sender in {}", src.name()))?;
    let received: u64 = received
        .trim()
        .parse()
        .with_context(|| format!("receiver printed {received:?}"))?;
    let acked: u64 = sent
        .trim()
        .parse()
        .with_context(|| format!("sender printed {sent:?}"))?;
    ensure!(
        received == bytes && acked == bytes,
        "TCP {} -> {}: sent {bytes} bytes, receiver counted {received}, sender was told {acked}",
        src_ip,
        dst_ip
    );
    Ok(TransferStats { bytes, elapsed })
}

pub(crate) fn python3() -> &'static str {
    // The distribution's interpreter avoids version-manager shims, whose
    // behaviour depends on the caller's directory and environment.
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// argv: bind address, port, timeout seconds. Counts bytes until EOF,
/// replies with the count, prints it.
const TCP_SERVER: &str = r#"
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(1)
s.settimeout(timeout)
c, _ = s.accept()
c.settimeout(timeout)
n = 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
c.sendall(str(n).encode())
c.close()
print(n, flush=True)
"#;

/// argv: address, port, byte count, timeout seconds. Retries the connect
/// until the server listens, sends the bytes, half-closes, prints the
/// count the server reports.
const TCP_CLIENT: &str = r#"
import socket, sys, time
host, port, total, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
while True:
    try:
        c = socket.create_connection((host, port), timeout=2)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
c.settimeout(timeout)
buf = b"\x5a" * (1 << 16)
left = total
while left > 0:
    left -= c.send(buf[: min(left, len(buf))])
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(64)
    if not b:
        break
    reply += b
print(int(reply), flush=True)
"#;

/// Waits until `host`'s SUBNETS map holds each peer's subnet, pointing at
/// the peer's PublicIP.
pub fn wait_routes(host: &Host<'_>, peers: &[(&Host<'_>, &SubnetEnv)]) -> Result<()> {
    let want: Vec<(Ipv4Net, Ipv4Addr)> = peers.iter().map(|(h, e)| (e.subnet, h.ip())).collect();
    process::wait_until(
        CONVERGE,
        &format!("host {}'s SUBNETS to hold {want:?}", host.index()),
        |last| match host.peers() {
            Ok(have) if want.iter().all(|w| have.contains(w)) => Ok(Some(())),
            Ok(have) => {
                *last = format!("{have:?}");
                Ok(None)
            }
            // Not pinned yet right after start.
            Err(e) => {
                *last = format!("{e:#}");
                Ok(None)
            }
        },
    )
}

/// [`wait_routes`] for every host against all the others.
/// Starts an agent with its flags on each host, waits for every subnet
/// file and until every agent has every other one in its map; returns the
/// subnet files in the hosts' order.
pub fn start_agents_meshed(hosts: &[(&Host<'_>, &[&str])]) -> Result<Vec<SubnetEnv>> {
    for (host, args) in hosts {
        host.start_agent(args)?;
    }
    let envs = hosts
        .iter()
        .map(|(h, _)| h.wait_subnet_env(CONVERGE))
        .collect::<Result<Vec<_>>>()?;
    wait_full_mesh(
        &hosts.iter().map(|(h, _)| *h).collect::<Vec<_>>(),
        &envs.iter().collect::<Vec<_>>(),
    )?;
    Ok(envs)
}

pub fn wait_full_mesh(hosts: &[&Host<'_>], envs: &[&SubnetEnv]) -> Result<()> {
    for (i, host) in hosts.iter().enumerate() {
        let peers: Vec<(&Host<'_>, &SubnetEnv)> = hosts
            .iter()
            .zip(envs)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (h, e))| (*h, *e))
            .collect();
        wait_routes(host, &peers)?;
    }
    Ok(())
}

/// The check named `name` in a `node-agent doctor --json` report
/// ([`Host::doctor`]).
pub fn doctor_check<'r>(
    report: &'r serde_json::Value,
    name: &str,
) -> Result<&'r serde_json::Value> {
    report["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no {name} check in {report:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subnet_env() -> Result<()> {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";
        let env = parse_subnet_env(text)?;
        assert_eq!(env.mtu, 1450);
        assert_eq!(env.subnet, "10.244.5.0/24".parse::<Ipv4Net>()?);
        assert_eq!(env.gateway().to_string(), "10.244.5.1/24");
        assert_eq!(env.host_addr(2)?, Ipv4Addr::new(10, 244, 5, 2));
        assert!(env.host_addr(255).is_err());
        assert!(parse_subnet_env("FLANNEL_NETWORK=10.244.0.0/16\n").is_err());
        assert!(parse_subnet_env(&text.replace("1450", "1450 ")).is_err());
        Ok(())
    }
}
