//! flannel's kernel set-up, on the same [`Host`]s as weft runs on, exactly
//! as flanneld programs a kernel:
//!
//! - plain routing (flannel's host-gw): one route per remote subnet via the
//!   peer's underlay address;
//! - the kernel vxlan device as flanneld's vxlan backend creates it:
//!   `flannel.1`, VNI 1, dstport 8472, nolearning, MTU 1450, and per peer a
//!   permanent neighbour entry, an fdb entry and a route via `<subnet>.0`
//!   onlink.
//!
//! The bench sets two such nodes up statically (its kernel baselines).
//! [`FlannelNode`] is an emulated flanneld: it leases as flanneld does and
//! follows lease changes through an etcd watch run from the test process,
//! applying what flanneld's backends apply on a lease event
//! (`handleSubnetEvents`). It is an emulation, not flanneld (which cannot
//! be installed here): no route check loop, no IPv6, no kube subnet manager.
//!
//! The subnet file is written by the agent's own renderer, so that
//! [`Host::attach_container`] attaches containers as usual.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use node_agent::flannel::lease::format_mac;
use node_agent::flannel::{KeyLayout, LeaseAttrs, SubnetEnv, VxlanLeaseData};
use weft_common::VXLAN_OVERHEAD;

use crate::netns::ip_in;
use crate::process::{self, Background};
use crate::{Host, parse_watch_json};

/// The cluster network both baselines use (as the weft modes do).
pub const BASELINE_NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
/// flanneld's vxlan device.
pub const FLANNEL_DEVICE: &str = "flannel.1";
const FLANNEL_VNI: u32 = 1;
const UNDERLAY_MTU: u32 = 1500;
const UNDERLAY: &str = "eth0";

/// flanneld's backends the emulation programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlannelBackend {
    Vxlan,
    HostGw,
}

impl FlannelBackend {
    /// The BackendType leases of this backend carry.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::HostGw => "host-gw",
        }
    }
}

/// Writes `host`'s subnet file for subnet `10.244.<subnet>.0/24` with `mtu`.
pub fn write_subnet_file(host: &Host<'_>, subnet: u8, mtu: u32) -> Result<SubnetEnv> {
    write_subnet_env(
        host,
        Ipv4Net::new(Ipv4Addr::new(10, 244, subnet, 0), 24)?,
        mtu,
    )
}

fn write_subnet_env(host: &Host<'_>, subnet: Ipv4Net, mtu: u32) -> Result<SubnetEnv> {
    let env = SubnetEnv {
        network: BASELINE_NETWORK,
        subnet,
        mtu,
        ipmasq: false,
    };
    std::fs::write(host.subnet_file(), env.render())
        .with_context(|| format!("writing {}", host.subnet_file().display()))?;
    Ok(env)
}

/// A host-gw node: forwarding on, subnet file with the full underlay MTU
/// (host-gw has no encapsulation overhead).
pub fn host_gw_node(host: &Host<'_>, subnet: u8) -> Result<SubnetEnv> {
    host.ns().sysctl("net.ipv4.ip_forward", "1")?;
    write_subnet_file(host, subnet, UNDERLAY_MTU)
}

/// Adds flanneld host-gw's route for `peer`'s subnet on `host`.
pub fn host_gw_add_peer(host: &Host<'_>, peer: &Host<'_>, peer_env: &SubnetEnv) -> Result<()> {
    let lease = LeaseAttrs {
        public_ip: peer.ip(),
        backend_type: FlannelBackend::HostGw.type_name().to_owned(),
        backend_data: None,
    };
    lease_added(
        host.ns().name(),
        FlannelBackend::HostGw,
        peer_env.subnet,
        &lease,
    )
}

/// A flanneld vxlan node: `flannel.1` as flanneld creates it, its address
/// `10.244.<subnet>.0/32`, forwarding on, subnet file with MTU 1450.
/// Returns the subnet file and the lease flanneld would publish for it.
pub fn flannel_vxlan_node(host: &Host<'_>, subnet: u8) -> Result<(SubnetEnv, LeaseAttrs)> {
    flannel_vxlan_device(host, Ipv4Net::new(Ipv4Addr::new(10, 244, subnet, 0), 24)?)
}

fn flannel_vxlan_device(host: &Host<'_>, subnet: Ipv4Net) -> Result<(SubnetEnv, LeaseAttrs)> {
    let ns = host.ns();
    let local = host.ip().to_string();
    let vni = FLANNEL_VNI.to_string();
    let mtu = (UNDERLAY_MTU - VXLAN_OVERHEAD).to_string();
    ns.ip(&[
        "link",
        "add",
        FLANNEL_DEVICE,
        "type",
        "vxlan",
        "id",
        &vni,
        "local",
        &local,
        "dev",
        UNDERLAY,
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", FLANNEL_DEVICE, "mtu", &mtu, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", subnet.network()),
        "dev",
        FLANNEL_DEVICE,
    ])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    let (_, vtep_mac) = ns.link(FLANNEL_DEVICE)?;
    let lease = LeaseAttrs {
        public_ip: host.ip(),
        backend_type: FlannelBackend::Vxlan.type_name().to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: Some(FLANNEL_VNI),
            vtep_mac,
        }),
    };
    let env = write_subnet_env(host, subnet, UNDERLAY_MTU - VXLAN_OVERHEAD)?;
    Ok((env, lease))
}

/// What flanneld's vxlan backend installs on `host` for a peer whose lease
/// is `peer` (PublicIP, VtepMAC) and subnet file `peer_env`.
pub fn flannel_vxlan_add_peer(
    host: &Host<'_>,
    peer: &LeaseAttrs,
    peer_env: &SubnetEnv,
) -> Result<()> {
    lease_added(
        host.ns().name(),
        FlannelBackend::Vxlan,
        peer_env.subnet,
        peer,
    )
}

/// `bridge -n <ns> args...`.
fn bridge_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("bridge");
    cmd.args(["-n", ns]).args(args);
    process::run(cmd)
}

/// `ip route <verb>` of flanneld's vxlan route to `subnet`: via its first
/// address on flannel.1, onlink.
fn vxlan_route(ns: &str, verb: &str, subnet: Ipv4Net) -> Result<String> {
    let (dst, gw) = (subnet.to_string(), subnet.network().to_string());
    ip_in(
        ns,
        &[
            "route",
            verb,
            &dst,
            "via",
            &gw,
            "dev",
            FLANNEL_DEVICE,
            "onlink",
        ],
    )
}

/// flanneld's `handleSubnetEvents` for an added (or changed) lease of
/// another node, in namespace `ns`: vxlan replaces the fdb entry for the
/// VtepMAC, the neighbour entry for `<subnet>.0` and the onlink route (the
/// route last, so the kernel never ARPs for the gateway); host-gw replaces
/// the route via the PublicIP. flanneld replaces the neighbour entry before
/// the fdb entry, two netlink calls microseconds apart; here each change is
/// a forked command, milliseconds apart, and for that long flannel.1 would
/// drop frames for a new VtepMAC it has no fdb entry for yet (measured: 3
/// to 6 packets at 1 kpps). The fdb entry goes first so that this artifact
/// of the emulation is not counted against the node being migrated; the
/// kernel ends in flanneld's state either way.
fn lease_added(
    ns: &str,
    backend: FlannelBackend,
    subnet: Ipv4Net,
    lease: &LeaseAttrs,
) -> Result<()> {
    let dst = subnet.to_string();
    match backend {
        FlannelBackend::HostGw => {
            let via = lease.public_ip.to_string();
            ip_in(
                ns,
                &["route", "replace", &dst, "via", &via, "dev", UNDERLAY],
            )?;
        }
        FlannelBackend::Vxlan => {
            let data = lease
                .backend_data
                .with_context(|| format!("lease {} has no VtepMAC", lease.to_json()))?;
            let vtep = format_mac(&data.vtep_mac);
            let gw = subnet.network().to_string();
            bridge_in(
                ns,
                &[
                    "fdb",
                    "replace",
                    &vtep,
                    "dev",
                    FLANNEL_DEVICE,
                    "dst",
                    &lease.public_ip.to_string(),
                    "self",
                    "permanent",
                ],
            )?;
            ip_in(
                ns,
                &[
                    "neigh",
                    "replace",
                    &gw,
                    "lladdr",
                    &vtep,
                    "dev",
                    FLANNEL_DEVICE,
                    "nud",
                    "permanent",
                ],
            )?;
            vxlan_route(ns, "replace", subnet)?;
        }
    }
    Ok(())
}

/// flanneld's `handleSubnetEvents` for a removed lease: every entry is
/// tried, a failure does not stop the others (flanneld logs and goes on);
/// the failures are returned as text.
fn lease_removed(
    ns: &str,
    backend: FlannelBackend,
    subnet: Ipv4Net,
    lease: &LeaseAttrs,
) -> Vec<String> {
    let dst = subnet.to_string();
    let results = match backend {
        FlannelBackend::HostGw => {
            let via = lease.public_ip.to_string();
            vec![ip_in(
                ns,
                &["route", "del", &dst, "via", &via, "dev", UNDERLAY],
            )]
        }
        FlannelBackend::Vxlan => {
            let gw = subnet.network().to_string();
            let mut r = vec![ip_in(ns, &["neigh", "del", &gw, "dev", FLANNEL_DEVICE])];
            if let Some(data) = lease.backend_data {
                let vtep = format_mac(&data.vtep_mac);
                let public_ip = lease.public_ip.to_string();
                r.push(bridge_in(
                    ns,
                    &[
                        "fdb",
                        "del",
                        &vtep,
                        "dev",
                        FLANNEL_DEVICE,
                        "dst",
                        &public_ip,
                        "self",
                    ],
                ));
            }
            r.push(vxlan_route(ns, "del", subnet));
            r
        }
    };
    results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect()
}

/// flanneld's `--ip-masq` chains (iptables, as flanneld installs them
/// through iptables-nft): `FLANNEL-POSTRTG` in nat, jumped to from
/// POSTROUTING, and `FLANNEL-FWD` in filter, jumped to from FORWARD. Left
/// alone when they exist already (a restarted flanneld).
fn flannel_chains(host: &Host<'_>, env: &SubnetEnv) -> Result<()> {
    let ns = host.ns();
    let (network, subnet) = (env.network.to_string(), env.subnet.to_string());
    let exists = ns
        .exec(&["iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG"])?
        .status
        .success();
    if exists {
        return Ok(());
    }
    let rules: [&[&str]; 8] = [
        &["-t", "nat", "-N", "FLANNEL-POSTRTG"],
        &[
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-s",
            &network,
            "-d",
            &network,
            "-j",
            "RETURN",
        ],
        &[
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-s",
            &subnet,
            "!",
            "-d",
            "224.0.0.0/4",
            "-j",
            "MASQUERADE",
            "--random-fully",
        ],
        &["-t", "nat", "-A", "POSTROUTING", "-j", "FLANNEL-POSTRTG"],
        &["-t", "filter", "-N", "FLANNEL-FWD"],
        &[
            "-t",
            "filter",
            "-A",
            "FLANNEL-FWD",
            "-s",
            &network,
            "-j",
            "ACCEPT",
        ],
        &[
            "-t",
            "filter",
            "-A",
            "FLANNEL-FWD",
            "-d",
            &network,
            "-j",
            "ACCEPT",
        ],
        &["-t", "filter", "-A", "FORWARD", "-j", "FLANNEL-FWD"],
    ];
    for rule in rules {
        let mut args = vec!["iptables", "-w"];
        args.extend_from_slice(rule);
        ns.run(&args)
            .with_context(|| format!("flannel's chains on host {}", host.index()))?;
    }
    Ok(())
}

/// The leases in etcd as flanneld reads them (unreadable ones skipped),
/// with the revision they were read at.
fn list_leases(host: &Host<'_>) -> Result<(i64, Vec<(Ipv4Net, LeaseAttrs)>)> {
    let keys = host.cluster().keys();
    let (revision, kvs) = host
        .cluster()
        .etcd()
        .get_prefix_at(&keys.subnets_prefix())?;
    let leases = kvs
        .iter()
        .filter_map(|(k, v)| Some((keys.parse_subnet_key(k).ok()?, LeaseAttrs::parse(v).ok()?)))
        .collect();
    Ok((revision, leases))
}

/// What the emulated flanneld knows of the other nodes' leases, and where
/// it programs the kernel. Shared with its watch thread.
struct Peers {
    ns: String,
    backend: FlannelBackend,
    own: Ipv4Net,
    keys: KeyLayout,
    known: BTreeMap<Ipv4Net, LeaseAttrs>,
    /// Failures to program an added lease: the test checks there are none.
    errors: Arc<Mutex<Vec<String>>>,
}

impl Peers {
    fn put(&mut self, subnet: Ipv4Net, lease: LeaseAttrs) {
        // flanneld skips its own lease and other backends' (with a warning).
        if subnet == self.own || lease.backend_type != self.backend.type_name() {
            return;
        }
        if self.known.get(&subnet) == Some(&lease) {
            return;
        }
        if let Err(e) = lease_added(&self.ns, self.backend, subnet, &lease) {
            self.error(format!(
                "adding lease {subnet} = {}: {e:#}",
                lease.to_json()
            ));
        }
        self.known.insert(subnet, lease);
    }

    fn delete(&mut self, subnet: Ipv4Net) {
        if let Some(lease) = self.known.remove(&subnet) {
            for e in lease_removed(&self.ns, self.backend, subnet, &lease) {
                eprintln!("emulated flanneld in {}: removing {subnet}: {e}", self.ns);
            }
        }
    }

    fn error(&self, text: String) {
        eprintln!("emulated flanneld in {}: {text}", self.ns);
        self.errors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(text);
    }

    /// Applies one line of the watch's output.
    fn apply(&mut self, line: &str) {
        let events = match parse_watch_json(line) {
            Ok(events) => events,
            Err(e) => return self.error(format!("watch printed {line:?}: {e:#}")),
        };
        for event in events {
            let Ok(subnet) = self.keys.parse_subnet_key(&event.key) else {
                continue;
            };
            match event.value {
                None => self.delete(subnet),
                Some(value) => match LeaseAttrs::parse(&value) {
                    Ok(lease) => self.put(subnet, lease),
                    Err(e) => eprintln!("emulated flanneld: skipping lease {subnet}: {e}"),
                },
            }
        }
    }
}

/// An emulated flanneld running on a host (see the module comment). Its
/// kernel state stays when it stops, as flanneld's does.
pub struct FlannelNode {
    backend: FlannelBackend,
    env: SubnetEnv,
    lease: LeaseAttrs,
    errors: Arc<Mutex<Vec<String>>>,
    /// Set before the watch is killed: its end is then no failure.
    stopping: Arc<AtomicBool>,
    // Dropped first: killing the watch ends the thread's input.
    watch: Option<Background>,
    thread: Option<JoinHandle<()>>,
}

impl FlannelNode {
    /// flanneld starting on `host` with `backend`: keeps the subnet of a
    /// lease carrying the host's PublicIP, else leases
    /// `10.244.<free_subnet>.0/24`; creates `flannel.1` (vxlan) and its
    /// iptables chains, writes the subnet file, publishes its lease (under
    /// a 24 h etcd lease, replacing the value: a VtepMAC update), then
    /// programs every other lease and follows their changes.
    pub fn start(host: &Host<'_>, backend: FlannelBackend, free_subnet: u8) -> Result<Self> {
        let cluster = host.cluster();
        let (_, leases) = list_leases(host)?;
        let subnet = match leases.iter().find(|(_, l)| l.public_ip == host.ip()) {
            Some((subnet, _)) => *subnet,
            None => Ipv4Net::new(Ipv4Addr::new(10, 244, free_subnet, 0), 24)?,
        };
        let (env, lease) = match backend {
            FlannelBackend::Vxlan => flannel_vxlan_device(host, subnet)?,
            FlannelBackend::HostGw => {
                host.ns().sysctl("net.ipv4.ip_forward", "1")?;
                let lease = LeaseAttrs {
                    public_ip: host.ip(),
                    backend_type: backend.type_name().to_owned(),
                    backend_data: None,
                };
                (write_subnet_env(host, subnet, UNDERLAY_MTU)?, lease)
            }
        };
        flannel_chains(host, &env)?;
        cluster.put_leases_bulk(&[(cluster.keys().subnet_key(subnet), lease.to_json())])?;

        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut peers = Peers {
            ns: host.ns().name().to_owned(),
            backend,
            own: subnet,
            keys: cluster.keys().clone(),
            known: BTreeMap::new(),
            errors: Arc::clone(&errors),
        };
        // List, then watch from the next revision: nothing falls between.
        let (revision, leases) = list_leases(host)?;
        for (subnet, lease) in leases {
            peers.put(subnet, lease);
        }
        let mut watch = cluster
            .etcd()
            .watch_prefix(&cluster.keys().subnets_prefix(), revision + 1)?;
        let stdout = watch.take_stdout().context("the watch has no stdout")?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name(format!("flanneld-h{}", host.index()))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(line) if line.trim().is_empty() => {}
                        Ok(line) => peers.apply(&line),
                        Err(_) => break,
                    }
                }
                if !stopped.load(Ordering::Relaxed) {
                    peers.error("the etcd watch ended".to_owned());
                }
            })
            .context("starting the emulated flanneld's watch thread")?;
        let node = Self {
            backend,
            env,
            lease,
            errors,
            stopping,
            watch: Some(watch),
            thread: Some(thread),
        };
        node.check()?;
        Ok(node)
    }

    pub fn backend(&self) -> FlannelBackend {
        self.backend
    }

    /// The subnet file it wrote.
    pub fn env(&self) -> &SubnetEnv {
        &self.env
    }

    /// The lease it published.
    pub fn lease(&self) -> &LeaseAttrs {
        &self.lease
    }

    /// Fails if programming a lease failed so far.
    pub fn check(&self) -> Result<()> {
        let errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if !errors.is_empty() {
            bail!("the emulated flanneld failed: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Stops following leases (flanneld stopped); the kernel state stays.
    pub fn stop(mut self) -> Result<()> {
        self.halt();
        self.check()
    }

    fn halt(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.watch.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FlannelNode {
    fn drop(&mut self) {
        self.halt();
    }
}
