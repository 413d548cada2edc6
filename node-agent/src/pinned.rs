//! The data path's state as it is pinned under `--pin-path`: the one way to
//! read it, and the agent's writer of the peer maps.
//!
//! [`PinnedState`] opens the pins of a running (or stopped) agent read-only;
//! `node-agent status`, `node-agent cleanup`, the tests and the benchmark all
//! read through it, so the key and value layouts of `weft-common` are decoded
//! in exactly one place. [`PeerMaps`] is what the watcher writes through.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::links::{FdLink, PinnedLink},
};
use ipnet::Ipv4Net;
use weft_common::{
    Counter, MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS, MAP_SUBNETS, NodeConfig, PROG_DECAP_TC,
    PROG_DECAP_XDP, PROG_ENCAP_TC, PROG_MARK_TC, PROG_SLOWPATH_IPIP_TC, PROG_SLOWPATH_RX_TC,
    Program, Reason, RemoteNode, counter_index,
};

use crate::{
    layout::{self, MapLayout},
    peers::SubnetMap,
};

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("BPF map {name} holds an invalid key {key:?}")]
    BadKey { name: &'static str, key: String },
    #[error("BPF map {name} cannot be read by this build: {why}")]
    Unreadable { name: &'static str, why: String },
    #[error("nothing of weft is pinned under {path}")]
    NothingPinned { path: PathBuf },
    #[error("cannot check the pinned maps' layouts: {0}")]
    Layouts(String),
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("cannot list the loaded BPF programs: {0}")]
    Programs(aya::programs::ProgramError),
    #[error("cannot enable BPF run statistics: {0}")]
    Stats(#[source] aya::sys::SyscallError),
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> PinnedError {
    move |source| PinnedError::Map { name, source }
}

/// The LPM key of `subnet`: prefix length (host order), address (network order).
pub fn subnet_key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

fn key_subnet(key: &Key<[u8; 4]>) -> Result<Ipv4Net, PinnedError> {
    u8::try_from(key.prefix_len())
        .ok()
        .and_then(|len| Ipv4Net::new(Ipv4Addr::from(key.data()), len).ok())
        .ok_or_else(|| PinnedError::BadKey {
            name: MAP_SUBNETS,
            key: format!("{:?}/{}", key.data(), key.prefix_len()),
        })
}

/// Size of [`NodeConfig`] before `slow_path_ifindex` was appended; the
/// first 48 bytes of both layouts are the same fields.
const OLD_NODE_CONFIG_LEN: usize = 48;
const _: () = assert!(OLD_NODE_CONFIG_LEN < size_of::<NodeConfig>());

/// The pinned `NODE_CONFIG`, in the current layout or the one before it.
enum NodeConfigMap {
    Current(Array<MapData, NodeConfig>),
    Before48(Array<MapData, [u8; OLD_NODE_CONFIG_LEN]>),
}

impl NodeConfigMap {
    fn open(map: Map) -> Result<Self, PinnedError> {
        let Map::Array(data) = map else {
            return Array::<_, NodeConfig>::try_from(map)
                .map(Self::Current)
                .map_err(map_err(MAP_NODE_CONFIG));
        };
        let old = data.info().map_err(map_err(MAP_NODE_CONFIG))?.value_size() as usize
            == OLD_NODE_CONFIG_LEN;
        let map = Map::Array(data);
        if old {
            Array::try_from(map).map(Self::Before48)
        } else {
            Array::try_from(map).map(Self::Current)
        }
        .map_err(map_err(MAP_NODE_CONFIG))
    }
}

/// A pinned map this build cannot decode (pinned by another version), or
/// that is not pinned at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub name: &'static str,
    pub why: String,
}

/// Read access to every map pinned under one pin path. A map of a layout
/// this build does not know (see [`crate::layout`]) is left closed and
/// listed by [`PinnedState::unreadable`]: the others still read, so
/// `status` and `cleanup` work over pins of another version.
pub struct PinnedState {
    subnets: Option<LpmTrie<MapData, [u8; 4], RemoteNode>>,
    node_ips: Option<HashMap<MapData, [u8; 4], u32>>,
    node_config: Option<NodeConfigMap>,
    counters: Option<PerCpuArray<MapData, Counter>>,
    unreadable: Vec<Unreadable>,
}

fn readable<'a, T>(
    map: &'a Option<T>,
    name: &'static str,
    unreadable: &[Unreadable],
) -> Result<&'a T, PinnedError> {
    map.as_ref().ok_or_else(|| PinnedError::Unreadable {
        name,
        why: unreadable
            .iter()
            .find(|u| u.name == name)
            .map_or_else(String::new, |u| u.why.clone()),
    })
}

impl PinnedState {
    /// Opens the maps an agent pinned under `pin_path`.
    pub fn open(pin_path: &Path) -> Result<Self, PinnedError> {
        let wanted = layout::wanted().map_err(PinnedError::Layouts)?;
        let mut unreadable = Vec::new();
        let mut open = |name: &'static str, also: Option<MapLayout>| {
            let path = pin_path.join(name);
            let checked = match MapLayout::of_pin(&path) {
                Ok(None) => Err("not pinned".to_owned()),
                Err(e) => Err(e.to_string()),
                Ok(Some(found)) => match wanted.get(name) {
                    Some(want) if found == *want || Some(found) == also => {
                        MapData::from_pin(&path).map_err(|e| e.to_string())
                    }
                    Some(want) => Err(format!("pinned as {found}, this build reads {want}")),
                    None => Err(format!("pinned as {found}, unknown to this build")),
                },
            };
            checked
                .map_err(|why| unreadable.push(Unreadable { name, why }))
                .ok()
        };
        // NODE_CONFIG of the layout before `slow_path_ifindex` still reads.
        let before48 = wanted.get(MAP_NODE_CONFIG).map(|l| MapLayout {
            value_size: OLD_NODE_CONFIG_LEN as u32,
            ..*l
        });
        let subnets = open(MAP_SUBNETS, None);
        let node_ips = open(MAP_NODE_IPS, None);
        let node_config = open(MAP_NODE_CONFIG, before48);
        let counters = open(MAP_COUNTERS, None);
        if unreadable.len() == 4 && unreadable.iter().all(|u| u.why == "not pinned") {
            return Err(PinnedError::NothingPinned {
                path: pin_path.to_owned(),
            });
        }
        Ok(Self {
            subnets: subnets
                .map(|m| LpmTrie::try_from(Map::LpmTrie(m)))
                .transpose()
                .map_err(map_err(MAP_SUBNETS))?,
            node_ips: node_ips
                .map(|m| HashMap::try_from(Map::HashMap(m)))
                .transpose()
                .map_err(map_err(MAP_NODE_IPS))?,
            node_config: node_config
                .map(|m| NodeConfigMap::open(Map::Array(m)))
                .transpose()?,
            counters: counters
                .map(|m| PerCpuArray::try_from(Map::PerCpuArray(m)))
                .transpose()
                .map_err(map_err(MAP_COUNTERS))?,
            unreadable,
        })
    }

    /// The maps this build cannot read (another version's layout, or not
    /// pinned), and why.
    pub fn unreadable(&self) -> &[Unreadable] {
        &self.unreadable
    }

    /// Whether anything is pinned under `pin_path` (cleanup of a node that
    /// never ran is not an error).
    pub fn exists(pin_path: &Path) -> bool {
        pin_path.join(MAP_NODE_CONFIG).exists()
    }

    /// Every remote subnet and its node, sorted by subnet.
    pub fn peers(&self) -> Result<Vec<(Ipv4Net, RemoteNode)>, PinnedError> {
        let mut peers = readable(&self.subnets, MAP_SUBNETS, &self.unreadable)?
            .iter()
            .map(|entry| {
                let (key, node) = entry.map_err(map_err(MAP_SUBNETS))?;
                Ok((key_subnet(&key)?, node))
            })
            .collect::<Result<Vec<_>, PinnedError>>()?;
        peers.sort_by_key(|(net, _)| *net);
        Ok(peers)
    }

    /// The entry stored for exactly `subnet`, if any.
    pub fn peer(&self, subnet: Ipv4Net) -> Result<Option<RemoteNode>, PinnedError> {
        let subnets = readable(&self.subnets, MAP_SUBNETS, &self.unreadable)?;
        match subnets.get(&subnet_key(subnet), 0) {
            Ok(node) => Ok(Some(node)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_SUBNETS)(e)),
        }
    }

    /// What the encap program finds for a packet to `dst`: the longest match.
    pub fn lookup(&self, dst: Ipv4Addr) -> Result<Option<RemoteNode>, PinnedError> {
        let subnets = readable(&self.subnets, MAP_SUBNETS, &self.unreadable)?;
        match subnets.get(&Key::new(32, dst.octets()), 0) {
            Ok(node) => Ok(Some(node)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_SUBNETS)(e)),
        }
    }

    /// The PublicIPs IP-in-IP is accepted from, sorted.
    pub fn node_ips(&self) -> Result<Vec<Ipv4Addr>, PinnedError> {
        let mut ips = readable(&self.node_ips, MAP_NODE_IPS, &self.unreadable)?
            .keys()
            .map(|k| k.map(Ipv4Addr::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(MAP_NODE_IPS))?;
        ips.sort();
        Ok(ips)
    }

    /// This node's configuration, or `None` before the agent filled it in.
    /// A pin of the older 48-byte layout (an agent from before the slow
    /// path still running) reads with `slow_path_ifindex` 0.
    pub fn node_config(&self) -> Result<Option<NodeConfig>, PinnedError> {
        let cfg = match readable(&self.node_config, MAP_NODE_CONFIG, &self.unreadable)? {
            NodeConfigMap::Current(map) => map.get(&0, 0),
            NodeConfigMap::Before48(map) => map.get(&0, 0).map(|old| {
                let mut bytes = [0u8; size_of::<NodeConfig>()];
                bytes[..OLD_NODE_CONFIG_LEN].copy_from_slice(&old);
                // SAFETY: NodeConfig is #[repr(C)] plain old data (aya::Pod:
                // every bit pattern is valid), `bytes` is exactly its size,
                // and read_unaligned needs no alignment.
                unsafe { bytes.as_ptr().cast::<NodeConfig>().read_unaligned() }
            }),
        }
        .map_err(map_err(MAP_NODE_CONFIG))?;
        Ok((cfg.configured != 0).then_some(cfg))
    }

    /// Packets per reason, over all programs and CPUs, in [`Reason`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, PinnedError> {
        Ok(packets_by_reason(&self.counter_table()?))
    }

    /// One reason's packets over all programs and CPUs.
    pub fn counter(&self, reason: Reason) -> Result<u64, PinnedError> {
        let counters = readable(&self.counters, MAP_COUNTERS, &self.unreadable)?;
        Ok(Program::ALL
            .iter()
            .map(|&p| read_slot(counters, p, reason).map(|row| row.packets))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .sum())
    }

    /// Every (program, reason) slot, totalled over the CPUs.
    pub fn counter_table(&self) -> Result<Vec<CounterRow>, PinnedError> {
        read_counter_table(readable(&self.counters, MAP_COUNTERS, &self.unreadable)?)
    }
}

/// One (program, reason) slot of `COUNTERS`, totalled over the CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterRow {
    pub program: Program,
    pub reason: Reason,
    pub packets: u64,
    pub bytes: u64,
    /// The latest failed helper's return code over all CPUs (see
    /// [`Counter::ext_err`]); 0 when no helper failed.
    pub ext_err: i64,
}

fn read_slot<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
    program: Program,
    reason: Reason,
) -> Result<CounterRow, PinnedError> {
    let per_cpu = counters
        .get(&counter_index(program, reason), 0)
        .map_err(map_err(MAP_COUNTERS))?;
    let latest = per_cpu
        .iter()
        .filter(|c| c.ext_err != 0)
        .max_by_key(|c| c.ext_err_ns);
    Ok(CounterRow {
        program,
        reason,
        packets: per_cpu.iter().map(|c| c.packets).sum(),
        bytes: per_cpu.iter().map(|c| c.bytes).sum(),
        ext_err: latest.map_or(0, |c| c.ext_err),
    })
}

/// Every (program, reason) slot, programs in [`Program`] order and reasons
/// in [`Reason`] order within each.
pub fn read_counter_table<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
) -> Result<Vec<CounterRow>, PinnedError> {
    Program::ALL
        .iter()
        .flat_map(|&p| Reason::ALL.iter().map(move |&r| (p, r)))
        .map(|(p, r)| read_slot(counters, p, r))
        .collect()
}

/// Packets per reason over all programs, in [`Reason`] order.
pub fn packets_by_reason(table: &[CounterRow]) -> Vec<(Reason, u64)> {
    Reason::ALL
        .iter()
        .map(|&r| {
            let n = table
                .iter()
                .filter(|row| row.reason == r)
                .map(|row| row.packets)
                .sum();
            (r, n)
        })
        .collect()
}

/// Names of every program the agent attaches through a link pinned under
/// `--pin-path` by that name.
pub const LINKED_PROGRAMS: [&str; 6] = [
    PROG_ENCAP_TC,
    PROG_DECAP_XDP,
    PROG_DECAP_TC,
    PROG_MARK_TC,
    PROG_SLOWPATH_RX_TC,
    PROG_SLOWPATH_IPIP_TC,
];

/// The kernel's run statistics of one attached program: `run_time_ns` and
/// `run_cnt` of `bpf_prog_info`, which grow only while BPF statistics are
/// enabled (`kernel.bpf_stats_enabled=1`, or [`enable_run_stats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramRunStats {
    pub name: &'static str,
    /// The kernel's program ID (what `bpftool prog show id` takes).
    pub id: u32,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// Run statistics of every program attached through a link pinned under
/// `pin_path`, in [`LINKED_PROGRAMS`] order; programs not attached on this
/// node are left out.
pub fn program_run_stats(pin_path: &Path) -> Result<Vec<ProgramRunStats>, PinnedError> {
    let mut attached = Vec::new();
    for name in LINKED_PROGRAMS {
        let path = pin_path.join(name);
        if !path.exists() {
            continue;
        }
        let link =
            FdLink::from(
                PinnedLink::from_pin(&path).map_err(|source| PinnedError::Link {
                    path: path.clone(),
                    source,
                })?,
            );
        let info = link
            .info()
            .map_err(|source| PinnedError::Link { path, source })?;
        attached.push((name, info.program_id()));
    }
    let mut stats: Vec<ProgramRunStats> = attached
        .iter()
        .map(|&(name, id)| ProgramRunStats {
            name,
            id,
            run_time_ns: 0,
            run_count: 0,
        })
        .collect();
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(PinnedError::Programs)?;
        if let Some(s) = stats.iter_mut().find(|s| s.id == info.id()) {
            s.run_time_ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            s.run_count = info.run_count();
        }
    }
    Ok(stats)
}

/// Turns on the kernel's BPF run statistics (`BPF_ENABLE_STATS`, the same
/// switch as `sysctl kernel.bpf_stats_enabled=1`) for as long as the
/// returned descriptor stays open. They cost two clock reads per program
/// run, so they are off unless someone measures.
pub fn enable_run_stats() -> Result<std::os::fd::OwnedFd, PinnedError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(PinnedError::Stats)
}

/// The peer-facing maps the watcher owns: `SUBNETS` and `NODE_IPS`.
pub struct PeerMaps {
    subnets: LpmTrie<MapData, [u8; 4], RemoteNode>,
    node_ips: HashMap<MapData, [u8; 4], u32>,
}

impl PeerMaps {
    pub fn new(
        subnets: LpmTrie<MapData, [u8; 4], RemoteNode>,
        node_ips: HashMap<MapData, [u8; 4], u32>,
    ) -> Self {
        Self { subnets, node_ips }
    }
}

impl SubnetMap for PeerMaps {
    fn put(&mut self, subnet: Ipv4Net, node: &RemoteNode) -> Result<(), MapError> {
        self.subnets.insert(&subnet_key(subnet), node, 0)
    }

    fn delete(&mut self, subnet: Ipv4Net) -> Result<(), MapError> {
        match self.subnets.remove(&subnet_key(subnet)) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    fn subnets(&self) -> Result<Vec<Ipv4Net>, MapError> {
        self.subnets
            .keys()
            .map(|k| {
                let k = k?;
                // A key the agent cannot read back is reported like a
                // missing one: reconciliation then rewrites the map.
                key_subnet(&k).map_err(|_| MapError::KeyNotFound)
            })
            .collect()
    }

    fn update_node_ips(&mut self, add: &[Ipv4Addr], remove: &[Ipv4Addr]) -> Result<(), MapError> {
        for ip in add {
            self.node_ips.insert(ip.octets(), 1, 0)?;
        }
        for ip in remove {
            match self.node_ips.remove(&ip.octets()) {
                Err(MapError::KeyNotFound) | Ok(()) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn node_ips(&self) -> Result<Vec<Ipv4Addr>, MapError> {
        self.node_ips
            .keys()
            .map(|k| k.map(Ipv4Addr::from))
            .collect()
    }
}
