//! Loading, attaching and pinning the BPF programs and maps.
//!
//! Everything lives under `--pin-path`: the maps by their names and one link
//! per program, named like the program. Pinned links keep the programs
//! attached when the agent stops or crashes, exactly as flannel's devices and
//! routes outlive flanneld. A restart reuses the pinned maps (their entries
//! stay) and swaps the new programs into the pinned links atomically with
//! `BPF_LINK_UPDATE`, so forwarding never stops.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use std::net::Ipv4Addr;

use crate::peers::SubnetMap;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use weft_common::{
    MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS, MAP_SUBNETS, NodeConfig, PROG_DECAP_TC,
    PROG_DECAP_XDP, PROG_ENCAP_TC, Reason, RemoteNode,
};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot create pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot load the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("link of an unexpected type: {0}")]
    LinkType(#[from] LinkError),
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("no decapsulation hook could be attached to {iface}: XDP: {xdp}; TC: {tc}")]
    NoDecapHook {
        iface: String,
        xdp: String,
        tc: String,
    },
    #[error(
        "{path} is not on a BPF filesystem, so pins would not outlive the agent; \
         mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose another --pin-path"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// Where decapsulation runs. XDP is cheapest (before any skb exists); TC
/// ingress works on every device, e.g. where a driver lacks XDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapMode {
    /// XDP, falling back to TC ingress if XDP cannot attach.
    Auto,
    Xdp,
    Tc,
}

/// Which hook decapsulation ended up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    Xdp,
    Tc,
}

/// A loaded object with pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
}

impl Datapath {
    /// Loads the object, creating the maps under `pin_path` or reusing the
    /// ones already pinned there.
    pub fn load(pin_path: &Path) -> Result<Self, DatapathError> {
        fs::create_dir_all(pin_path).map_err(|source| DatapathError::PinDir {
            path: pin_path.to_owned(),
            source,
        })?;
        if !is_bpffs(pin_path) {
            return Err(DatapathError::NotBpffs {
                path: pin_path.to_owned(),
            });
        }
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .load(crate::ebpf::OBJECT)?;
        Ok(Self {
            ebpf,
            pin_path: pin_path.to_owned(),
        })
    }

    /// The loaded object, e.g. for `aya_log::EbpfLogger::init`.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches encap at TC egress and, when `decap` is given, decap at XDP
    /// or TC ingress of `iface`, replacing programs in links pinned by an
    /// earlier run. Returns the decap hook used, if any.
    pub fn attach(
        &mut self,
        iface: &str,
        decap: Option<DecapMode>,
    ) -> Result<Option<DecapHook>, DatapathError> {
        self.attach_tc(PROG_ENCAP_TC, iface, TcAttachType::Egress)?;
        let hook = match decap {
            None => None,
            Some(DecapMode::Xdp) => {
                self.attach_xdp(iface)?;
                Some(DecapHook::Xdp)
            }
            Some(DecapMode::Tc) => {
                self.attach_tc(PROG_DECAP_TC, iface, TcAttachType::Ingress)?;
                Some(DecapHook::Tc)
            }
            Some(DecapMode::Auto) => match self.attach_xdp(iface) {
                Ok(()) => Some(DecapHook::Xdp),
                Err(xdp) => {
                    tracing::warn!(%iface, error = %xdp, "XDP unavailable, decapsulating at TC ingress");
                    self.attach_tc(PROG_DECAP_TC, iface, TcAttachType::Ingress)
                        .map_err(|tc| DatapathError::NoDecapHook {
                            iface: iface.to_owned(),
                            xdp: xdp.to_string(),
                            tc: tc.to_string(),
                        })?;
                    Some(DecapHook::Tc)
                }
            },
        };
        // At most one decap hook may stay: a pin left by a run in another
        // mode would decapsulate twice or shadow this one, and one left when
        // nothing needs decapsulating (host-gw) costs every received frame.
        for (stale_hook, name) in [
            (DecapHook::Xdp, PROG_DECAP_XDP),
            (DecapHook::Tc, PROG_DECAP_TC),
        ] {
            if hook != Some(stale_hook) {
                remove_pin(&self.pin_path.join(name))?;
            }
        }
        Ok(hook)
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<(), DatapathError> {
        let link_path = self.pin_path.join(name);
        let prog: &mut SchedClassifier = load_program(&mut self.ebpf, name)?;
        let program_err = |source| DatapathError::Program { name, source };
        adopt_or_attach(
            prog,
            &link_path,
            |prog, pinned| {
                let link = SchedClassifierLink::try_from(pinned)?;
                let id = prog.attach_to_link(link).map_err(program_err)?;
                // The pin keeps the link; only our handle closes.
                drop(FdLink::try_from(prog.take_link(id).map_err(program_err)?));
                Ok(())
            },
            |prog| {
                let order = TcAttachOptions::TcxOrder(LinkOrder::default());
                let id = prog
                    .attach_with_options(iface, attach_type, order)
                    .map_err(program_err)?;
                Ok(FdLink::try_from(prog.take_link(id).map_err(program_err)?)?)
            },
        )
    }

    fn attach_xdp(&mut self, iface: &str) -> Result<(), DatapathError> {
        let name = PROG_DECAP_XDP;
        let link_path = self.pin_path.join(name);
        let prog: &mut Xdp = load_program(&mut self.ebpf, name)?;
        let program_err = |source| DatapathError::Program { name, source };
        adopt_or_attach(
            prog,
            &link_path,
            |prog, pinned| {
                let link = XdpLink::try_from(pinned)?;
                let id = prog.attach_to_link(link).map_err(program_err)?;
                drop(FdLink::try_from(prog.take_link(id).map_err(program_err)?));
                Ok(())
            },
            |prog| {
                // Native mode: the frame is decapsulated before an skb
                // exists, and veth then runs GRO on the inner packet.
                let id = prog.attach(iface, XdpMode::Driver).map_err(program_err)?;
                Ok(FdLink::try_from(prog.take_link(id).map_err(program_err)?)?)
            },
        )
    }

    pub fn subnets(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 4], RemoteNode>, DatapathError> {
        let map = self.ebpf.map_mut(MAP_SUBNETS).ok_or(DatapathError::Map {
            name: MAP_SUBNETS,
            source: missing_map(MAP_SUBNETS),
        })?;
        LpmTrie::try_from(map).map_err(|source| DatapathError::Map {
            name: MAP_SUBNETS,
            source,
        })
    }

    pub fn node_ips(&mut self) -> Result<HashMap<&mut MapData, [u8; 4], u32>, DatapathError> {
        let err = |source| DatapathError::Map {
            name: MAP_NODE_IPS,
            source,
        };
        let map = self
            .ebpf
            .map_mut(MAP_NODE_IPS)
            .ok_or_else(|| err(missing_map(MAP_NODE_IPS)))?;
        HashMap::try_from(map).map_err(err)
    }

    /// Takes the peer maps out of the object, for the watcher to own.
    /// `iface` and `onlink` let it keep neighbour entries for on-link peers.
    pub fn take_peer_maps(
        &mut self,
        iface: &str,
        onlink: Vec<ipnet::Ipv4Net>,
    ) -> Result<PeerMaps, DatapathError> {
        let mut take = |name: &'static str| {
            self.ebpf.take_map(name).ok_or(DatapathError::Map {
                name,
                source: missing_map(name),
            })
        };
        let subnets =
            LpmTrie::try_from(take(MAP_SUBNETS)?).map_err(|source| DatapathError::Map {
                name: MAP_SUBNETS,
                source,
            })?;
        let node_ips =
            HashMap::try_from(take(MAP_NODE_IPS)?).map_err(|source| DatapathError::Map {
                name: MAP_NODE_IPS,
                source,
            })?;
        Ok(PeerMaps {
            subnets,
            node_ips,
            iface: iface.to_owned(),
            onlink,
            neighbours: std::collections::BTreeSet::new(),
        })
    }

    pub fn write_node_config(&mut self, cfg: &NodeConfig) -> Result<(), DatapathError> {
        let err = |source| DatapathError::Map {
            name: MAP_NODE_CONFIG,
            source,
        };
        let map = self
            .ebpf
            .map_mut(MAP_NODE_CONFIG)
            .ok_or(DatapathError::Map {
                name: MAP_NODE_CONFIG,
                source: missing_map(MAP_NODE_CONFIG),
            })?;
        let mut array: Array<_, NodeConfig> = Array::try_from(map).map_err(err)?;
        array.set(0, cfg, 0).map_err(err)
    }

    /// Counter totals over all CPUs, in [`Reason`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        read_counters_from(self.ebpf.map(MAP_COUNTERS).ok_or(DatapathError::Map {
            name: MAP_COUNTERS,
            source: missing_map(MAP_COUNTERS),
        })?)
    }
}

fn read_counters_from(map: &aya::maps::Map) -> Result<Vec<(Reason, u64)>, DatapathError> {
    let err = |source| DatapathError::Map {
        name: MAP_COUNTERS,
        source,
    };
    let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(err)?;
    Reason::ALL
        .iter()
        .map(|&r| Ok((r, counters.get(&(r as u32), 0).map_err(err)?.iter().sum())))
        .collect()
}

fn missing_map(name: &str) -> aya::maps::MapError {
    aya::maps::MapError::InvalidName {
        name: name.to_owned(),
    }
}

/// Whether `path` lives on bpffs. `ip netns exec` remounts /sys, hiding the
/// host's bpffs; pins made elsewhere would vanish with the agent.
fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c_path` is a valid NUL-terminated string and `buf` a properly
    // sized, writable statfs buffer that outlives the call.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Loads program `name` into the kernel (idempotent) and returns it typed.
fn load_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    P: ProgramLoad,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })?;
    prog.load_once()
        .map_err(|source| DatapathError::Program { name, source })?;
    Ok(prog)
}

/// `load()` for the program types the agent attaches.
trait ProgramLoad {
    fn load_once(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl ProgramLoad for SchedClassifier {
    fn load_once(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl ProgramLoad for Xdp {
    fn load_once(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

/// Swaps our program into the link pinned at `link_path` (`replace`), or,
/// when nothing is pinned there, attaches it afresh (`attach`) and pins the
/// new link so it outlives this process.
fn adopt_or_attach<P>(
    prog: &mut P,
    link_path: &Path,
    replace: impl FnOnce(&mut P, FdLink) -> Result<(), DatapathError>,
    attach: impl FnOnce(&mut P) -> Result<FdLink, DatapathError>,
) -> Result<(), DatapathError> {
    let link_err = |source| DatapathError::Link {
        path: link_path.to_owned(),
        source,
    };
    match pinned_link(link_path).map_err(link_err)? {
        Some(pinned) => replace(prog, FdLink::from(pinned)),
        None => {
            attach(prog)?
                .pin(link_path)
                .map_err(|source| DatapathError::Pin {
                    path: link_path.to_owned(),
                    source,
                })?;
            Ok(())
        }
    }
}

/// The link pinned at `path`, or `None` if nothing is pinned there.
fn pinned_link(path: &Path) -> Result<Option<PinnedLink>, LinkError> {
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(link)),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Unpins `path`; for a link whose only reference is the pin this detaches it.
fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Remove {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Reads this node's configuration from a pinned `NODE_CONFIG`, for cleanup
/// after the agent is gone.
pub fn pinned_node_config(pin_path: &Path) -> Result<Option<NodeConfig>, DatapathError> {
    let path = pin_path.join(MAP_NODE_CONFIG);
    if !path.exists() {
        return Ok(None);
    }
    let err = |source| DatapathError::Map {
        name: MAP_NODE_CONFIG,
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    let array: Array<_, NodeConfig> = Array::try_from(aya::maps::Map::Array(data)).map_err(err)?;
    let cfg = array.get(&0, 0).map_err(err)?;
    Ok((cfg.configured != 0).then_some(cfg))
}

/// The peer-facing state of the data path: `SUBNETS`, `NODE_IPS`, and a
/// "managed" neighbour entry per on-link peer. The kernel keeps managed
/// entries resolved (they exist for BPF FIB lookups), so sends to a peer
/// rarely find its neighbour unresolved.
pub struct PeerMaps {
    subnets: LpmTrie<MapData, [u8; 4], RemoteNode>,
    node_ips: HashMap<MapData, [u8; 4], u32>,
    iface: String,
    onlink: Vec<ipnet::Ipv4Net>,
    /// Neighbour entries this process installed, so relists do not churn them.
    neighbours: std::collections::BTreeSet<Ipv4Addr>,
}

fn subnet_key(subnet: ipnet::Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

impl SubnetMap for PeerMaps {
    fn put(&mut self, subnet: ipnet::Ipv4Net, node: &RemoteNode) -> Result<(), MapError> {
        self.subnets.insert(&subnet_key(subnet), node, 0)
    }

    fn delete(&mut self, subnet: ipnet::Ipv4Net) -> Result<(), MapError> {
        match self.subnets.remove(&subnet_key(subnet)) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    fn subnets(&self) -> Result<Vec<ipnet::Ipv4Net>, MapError> {
        self.subnets
            .keys()
            .map(|k| {
                let k = k?;
                ipnet::Ipv4Net::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
                    .map_err(|_| MapError::KeyNotFound)
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
        let onlink = |ip: &&Ipv4Addr| self.onlink.iter().any(|n| n.contains(*ip));
        let new: Vec<Ipv4Addr> = add
            .iter()
            .filter(onlink)
            .filter(|ip| !self.neighbours.contains(ip))
            .copied()
            .collect();
        let gone: Vec<Ipv4Addr> = remove
            .iter()
            .filter(|ip| self.neighbours.contains(ip))
            .copied()
            .collect();
        // Neighbour entries only speed sends up; failing to set them is
        // logged, not fatal.
        match crate::netconf::managed_neighbours(&self.iface, &new, &gone) {
            Ok(()) => {
                self.neighbours.extend(&new);
                for ip in &gone {
                    self.neighbours.remove(ip);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot update neighbour entries for peers"),
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

/// What `node-agent status` shows: the pinned peer table and counters.
pub struct PinnedStatus {
    pub peers: Vec<(ipnet::Ipv4Net, RemoteNode)>,
    pub counters: Vec<(Reason, u64)>,
}

/// Reads the pinned maps of a running (or stopped) agent.
pub fn pinned_status(pin_path: &Path) -> Result<PinnedStatus, DatapathError> {
    let open = |name: &'static str| {
        MapData::from_pin(pin_path.join(name)).map_err(|source| DatapathError::Map { name, source })
    };
    let err = |name: &'static str| move |source| DatapathError::Map { name, source };
    let subnets: LpmTrie<_, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(open(MAP_SUBNETS)?)).map_err(err(MAP_SUBNETS))?;
    let mut peers = Vec::new();
    for entry in subnets.iter() {
        let (key, node) = entry.map_err(err(MAP_SUBNETS))?;
        if let Ok(net) = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8) {
            peers.push((net, node));
        }
    }
    peers.sort_by_key(|(net, _)| *net);
    let counters = read_counters_from(&aya::maps::Map::PerCpuArray(open(MAP_COUNTERS)?))?;
    Ok(PinnedStatus { peers, counters })
}

/// Unpins every link (detaching the programs) and map under `pin_path`, then
/// removes the directory.
pub fn remove_pins(pin_path: &Path) -> Result<(), DatapathError> {
    // Links first, so no program runs against half-removed maps.
    for name in [
        PROG_ENCAP_TC,
        PROG_DECAP_XDP,
        PROG_DECAP_TC,
        MAP_SUBNETS,
        MAP_NODE_IPS,
        MAP_NODE_CONFIG,
        MAP_COUNTERS,
    ] {
        remove_pin(&pin_path.join(name))?;
    }
    match fs::remove_dir(pin_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Remove {
            path: pin_path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}
