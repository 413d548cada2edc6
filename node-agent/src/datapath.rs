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

use crate::{
    layout,
    pinned::{PeerMaps, PinnedError},
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use weft_common::{
    Counter, DEFAULT_DECAP_MARK, GLOBAL_DECAP_MARK, GLOBAL_HOST_ROUTING, GLOBAL_PUBLIC_IP_IS_LOCAL,
    HOST_ROUTING_BPF, HOST_ROUTING_KERNEL, MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS,
    MAP_SUBNETS, NodeConfig, PROG_DECAP_TC, PROG_DECAP_XDP, PROG_ENCAP_TC, PROG_MARK_TC, Reason,
    RemoteNode,
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
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error(
        "the maps pinned under {pin_path} were made by an incompatible weft version and hold \
         peer state this build cannot read: {maps}. Nothing was changed and the running data \
         path keeps forwarding; to upgrade, run `node-agent cleanup --pin-path {pin_path}` \
         (forwarding stops until the next start) and start again"
    )]
    PinnedLayout { pin_path: String, maps: String },
    #[error("cannot check the pinned maps' layouts: {0}")]
    Layouts(String),
    #[error("cannot read which interface the link pinned at {path} is attached to: {source}")]
    LinkIfindex { path: PathBuf, source: io::Error },
    #[error("interface {iface}: {source}")]
    Iface { iface: String, source: io::Error },
    #[error(transparent)]
    Pinned(#[from] PinnedError),
}

/// Where decapsulation runs. XDP is cheapest per packet (before any skb
/// exists); TC ingress works on every device, e.g. where a driver lacks
/// XDP; `device` leaves it to the kernel's VXLAN socket of the slow-path
/// device, whose GRO cells merge the inner packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapMode {
    /// XDP, falling back to TC ingress if XDP cannot attach.
    Auto,
    Xdp,
    Tc,
    /// No program on `--iface`: the collect-metadata device `weft.vxlan`
    /// decapsulates every VXLAN packet (UDP tunnel GSO and GRO as the
    /// kernel's own vxlan device has them) and `weft_slowpath_rx_tc` at its
    /// TC ingress checks and forwards each. VXLAN only.
    Device,
}

/// How decapsulated packets reach their container (`--host-routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// Up the host's stack on `--iface`, then IP forwarding: netfilter's
    /// PREROUTING and FORWARD hooks and conntrack see every packet, as with
    /// flannel. The default, because Docker's FORWARD rules, kube-proxy and
    /// firewall rules on `--decap-mark` rely on it.
    #[default]
    Kernel,
    /// The decap program looks the inner destination up in the FIB and
    /// redirects the frame to the container's bridge itself (TC and device
    /// decapsulation; XDP-decapsulated packets still go up the stack).
    /// Skips IP forwarding, netfilter and conntrack for tunnelled traffic.
    Bpf,
}

impl HostRouting {
    /// The value of the programs' `HOST_ROUTING` global.
    pub fn global(self) -> u32 {
        match self {
            HostRouting::Kernel => HOST_ROUTING_KERNEL,
            HostRouting::Bpf => HOST_ROUTING_BPF,
        }
    }
}

/// The decap mode to use for `requested`, given whether the slow-path
/// device (and so its kernel VXLAN socket) is there and the underlay's
/// driver; with the reason, to log, when it is not what was asked.
///
/// `auto` on a veth takes `device`: XDP on a veth copies every frame
/// (`veth_convert_skb_to_xdp_buff`) and strips GSO from its peer
/// (`veth_xdp_set`), so TCP from the peer is segmented in software, while
/// the kernel VXLAN socket takes the peer's GSO aggregates whole and merges
/// MTU-sized packets in its GRO cells (BENCHMARKS.md: ~3× the TCP of XDP
/// on a veth). On other drivers `auto` keeps XDP, which a NIC's driver runs
/// before any skb exists, with TC as the fallback. `device` without the
/// device (ipip, or flannel.1 still holding the port) falls back to `auto`.
pub fn resolve_decap_mode(
    requested: DecapMode,
    device_ready: bool,
    driver: Option<&str>,
) -> (DecapMode, Option<&'static str>) {
    match requested {
        DecapMode::Device if !device_ready => (
            DecapMode::Auto,
            Some(
                "--decap-mode device needs the slow-path VXLAN device (a vxlan backend, its port free); decapsulating at XDP or TC ingress instead",
            ),
        ),
        DecapMode::Auto if device_ready && driver == Some("veth") => (
            DecapMode::Device,
            Some(
                "--decap-mode auto on a veth underlay: the kernel VXLAN socket of the slow-path device decapsulates, since XDP on a veth copies every frame and strips GSO from its peer",
            ),
        ),
        other => (other, None),
    }
}

/// Which hook decapsulation ended up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    Xdp,
    Tc,
    /// The slow-path device's program only (`--decap-mode device`).
    Device,
}

/// What is fixed when the programs load (a change takes a restart, which
/// swaps the programs in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// ORed into `skb->mark` of every decapsulated packet; 0 = no mark.
    pub decap_mark: u32,
    pub host_routing: HostRouting,
    /// Whether the PublicIP is an address of `--iface`; false behind 1:1
    /// NAT, where peers' tunnel packets arrive for the private address and
    /// the slow path must accept them there.
    pub public_ip_is_local: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            decap_mark: DEFAULT_DECAP_MARK,
            host_routing: HostRouting::default(),
            public_ip_is_local: true,
        }
    }
}

/// A loaded object with pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    pin_path: PathBuf,
    options: LoadOptions,
}

impl Datapath {
    /// Loads the object, creating the maps under `pin_path` or reusing the
    /// ones already pinned there.
    pub fn load(pin_path: &Path, options: LoadOptions) -> Result<Self, DatapathError> {
        crate::bpffs::ensure_mounted(pin_path)?;
        fs::create_dir_all(pin_path).map_err(|source| DatapathError::PinDir {
            path: pin_path.to_owned(),
            source,
        })?;
        if !crate::bpffs::is_bpffs(pin_path) {
            return Err(DatapathError::NotBpffs {
                path: pin_path.to_owned(),
            });
        }
        check_pinned_layouts(pin_path)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .override_global(GLOBAL_DECAP_MARK, &options.decap_mark, true)
            .override_global(GLOBAL_HOST_ROUTING, &options.host_routing.global(), true)
            .override_global(
                GLOBAL_PUBLIC_IP_IS_LOCAL,
                &u32::from(options.public_ip_is_local),
                true,
            )
            .load(crate::ebpf::OBJECT)?;
        Ok(Self {
            ebpf,
            pin_path: pin_path.to_owned(),
            options,
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
        self.attach_decap(iface, decap)
    }

    /// The decap half of [`Self::attach`], on its own for a hook attached
    /// later than encap (a node taken over from flanneld).
    pub fn attach_decap(
        &mut self,
        iface: &str,
        decap: Option<DecapMode>,
    ) -> Result<Option<DecapHook>, DatapathError> {
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
            // The caller attaches the slow-path device's program.
            Some(DecapMode::Device) => Some(DecapHook::Device),
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
        // XDP has no skb to mark: it tags the frame, and a TC ingress
        // program turns the tag into the mark (TC decap marks by itself).
        if hook == Some(DecapHook::Xdp) && self.options.decap_mark != 0 {
            self.attach_tc(PROG_MARK_TC, iface, TcAttachType::Ingress)?;
        } else {
            remove_pin(&self.pin_path.join(PROG_MARK_TC))?;
        }
        Ok(hook)
    }

    /// Attaches slow-path receive program `name` (`weft_slowpath_rx_tc` or
    /// `weft_slowpath_ipip_tc`) at TC ingress of device `dev`, or, with
    /// `None` (another backend, or no device), removes a link an earlier
    /// run pinned for it. `fresh` says the device was (re)created by this
    /// run: a link pinned for an earlier device died with it and cannot be
    /// updated, so it is unpinned first.
    pub fn attach_slow_path(
        &mut self,
        name: &'static str,
        dev: Option<(&str, bool)>,
    ) -> Result<(), DatapathError> {
        let link_path = self.pin_path.join(name);
        match dev {
            Some((dev, fresh)) => {
                if fresh {
                    remove_pin(&link_path)?;
                }
                self.attach_tc(name, dev, TcAttachType::Ingress)
            }
            None => remove_pin(&link_path),
        }
    }

    fn attach_tc(
        &mut self,
        name: &'static str,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<(), DatapathError> {
        let link_path = self.pin_path.join(name);
        let ifindex = ifindex(iface)?;
        let prog: &mut SchedClassifier = load_program(&mut self.ebpf, name)?;
        let program_err = |source| DatapathError::Program { name, source };
        adopt_or_attach(
            prog,
            &link_path,
            ifindex,
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
        let ifindex = ifindex(iface)?;
        let prog: &mut Xdp = load_program(&mut self.ebpf, name)?;
        let program_err = |source| DatapathError::Program { name, source };
        adopt_or_attach(
            prog,
            &link_path,
            ifindex,
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
    pub fn take_peer_maps(&mut self) -> Result<PeerMaps, DatapathError> {
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
        Ok(PeerMaps::new(subnets, node_ips))
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

    /// Unpins what an older version pinned under a name this one no longer
    /// uses (a renamed map or program). Called once every program is
    /// attached: nothing of ours uses them any more, and a stale link would
    /// keep an old program running beside the new ones.
    pub fn remove_stale_pins(&self) -> Result<(), DatapathError> {
        let programs: Vec<&str> = self.ebpf.programs().map(|(name, _)| name).collect();
        let removed = remove_pins_except(&self.pin_path, &programs)?;
        if !removed.is_empty() {
            tracing::info!(
                ?removed,
                "removed pins an older version left under names no longer used"
            );
        }
        Ok(())
    }

    /// Counter totals over all CPUs, in [`Reason`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        Ok(crate::pinned::packets_by_reason(&self.counter_table()?))
    }

    /// Every (program, reason) slot, totalled over the CPUs.
    pub fn counter_table(&self) -> Result<Vec<crate::pinned::CounterRow>, DatapathError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(DatapathError::Map {
            name: MAP_COUNTERS,
            source: missing_map(MAP_COUNTERS),
        })?;
        let counters: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
        Ok(crate::pinned::read_counter_table(&counters)?)
    }
}

fn missing_map(name: &str) -> aya::maps::MapError {
    aya::maps::MapError::InvalidName {
        name: name.to_owned(),
    }
}

/// Pinned maps are adopted as they are: aya does not compare their layout
/// with the object's, so a map made by another build would be used with the
/// wrong sizes. Every pinned map is compared with the object's definition
/// ([`layout::plan`]); a mismatch is replaced or refuses the start, per
/// [`layout::on_mismatch`]. Nothing is replaced when anything is refused,
/// so a refused start leaves the running data path exactly as it was.
fn check_pinned_layouts(pin_path: &Path) -> Result<(), DatapathError> {
    let wanted = layout::wanted().map_err(DatapathError::Layouts)?;
    let mut pinned = std::collections::BTreeMap::new();
    for name in wanted.keys() {
        let path = pin_path.join(name);
        let found = layout::MapLayout::of_pin(&path)
            .map_err(|source| DatapathError::Pinned(PinnedError::Open { path, source }))?;
        pinned.insert(name.clone(), found);
    }
    let (replace, refuse) = layout::plan(wanted, |name| pinned.get(name).copied().flatten());
    if !refuse.is_empty() {
        return Err(DatapathError::PinnedLayout {
            pin_path: pin_path.display().to_string(),
            maps: refuse
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    for m in replace {
        tracing::warn!(
            map = %m.name,
            pinned = %m.pinned,
            now = %m.wanted,
            "the pinned map has another layout (an upgrade); replacing it \
             (counters restart from zero, the node config is written afresh)"
        );
        remove_pin(&pin_path.join(&m.name))?;
    }
    Ok(())
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
    match prog.load_once() {
        // Attaching again (the interface was created again) reuses it.
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(prog),
        Err(source) => Err(DatapathError::Program { name, source }),
    }
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
/// new link so it outlives this process. A pinned link attached to another
/// interface than `ifindex` (`--iface` changed, or the interface was deleted
/// and created again, which leaves the link attached to nothing) is not
/// swapped into: it is unpinned, which detaches it, and attached afresh.
fn adopt_or_attach<P>(
    prog: &mut P,
    link_path: &Path,
    ifindex: u32,
    replace: impl FnOnce(&mut P, FdLink) -> Result<(), DatapathError>,
    attach: impl FnOnce(&mut P) -> Result<FdLink, DatapathError>,
) -> Result<(), DatapathError> {
    let link_err = |source| DatapathError::Link {
        path: link_path.to_owned(),
        source,
    };
    if let Some(pinned) = pinned_link(link_path).map_err(link_err)? {
        let attached =
            pinned_link_ifindex(link_path).map_err(|source| DatapathError::LinkIfindex {
                path: link_path.to_owned(),
                source,
            })?;
        match attached {
            Some(attached) if attached != ifindex => {
                tracing::warn!(
                    link = %link_path.display(),
                    attached,
                    ifindex,
                    "the pinned link is attached to another interface (0: to one that is gone); \
                     attaching afresh"
                );
                drop(pinned);
                remove_pin(link_path)?;
            }
            _ => return replace(prog, FdLink::from(pinned)),
        }
    }
    attach(prog)?
        .pin(link_path)
        .map_err(|source| DatapathError::Pin {
            path: link_path.to_owned(),
            source,
        })?;
    Ok(())
}

/// The index of interface `iface` in this network namespace.
fn ifindex(iface: &str) -> Result<u32, DatapathError> {
    let err = |source| DatapathError::Iface {
        iface: iface.to_owned(),
        source,
    };
    let c_name = std::ffi::CString::new(iface).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the whole call.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(err(io::Error::last_os_error())),
        index => Ok(index),
    }
}

/// The ifindex the tcx or XDP link pinned at `path` is attached to, as the
/// kernel shows it in the link's fdinfo (0 once its interface is gone);
/// `None` for a link that names no interface. aya 0.14's `LinkInfo` does
/// not expose it, hence a file descriptor of our own.
fn pinned_link_ifindex(path: &Path) -> io::Result<Option<u32>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // `union bpf_attr` for BPF_OBJ_GET: `pathname` (a u64 pointer), then
    // `bpf_fd`, `file_flags` (0: read-write) and `path_fd`, all zero.
    let mut attr = [0u64; 3];
    attr[0] = c_path.as_ptr() as u64;
    // SAFETY: `attr` is a valid, writable bpf_attr prefix of the size
    // passed, and the path it points to outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel just returned this new descriptor, owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(fdinfo_ifindex(&text))
}

/// The `ifindex:` field of a BPF link's fdinfo (tcx and XDP links print it).
fn fdinfo_ifindex(fdinfo: &str) -> Option<u32> {
    fdinfo.lines().find_map(|line| {
        let value = line.strip_prefix("ifindex:")?;
        value.trim().parse().ok()
    })
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

/// Unpins every link (detaching the programs) and map under `pin_path`,
/// whatever version of weft pinned them and whatever their layout, then
/// removes the directory.
pub fn remove_pins(pin_path: &Path) -> Result<(), DatapathError> {
    let pins = match pinned_names(pin_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(|source| DatapathError::Remove {
            path: pin_path.to_owned(),
            source,
        })?,
    };
    // Links (everything that is not a map) first, so no program runs
    // against half-removed maps.
    let (maps, links): (Vec<_>, Vec<_>) = pins
        .into_iter()
        .partition(|path| aya::maps::MapInfo::from_pin(path).is_ok());
    for path in links.iter().chain(&maps) {
        remove_pin(path)?;
    }
    match fs::remove_dir(pin_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DatapathError::Remove {
            path: pin_path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Every pin directly under `pin_path`.
fn pinned_names(pin_path: &Path) -> io::Result<Vec<PathBuf>> {
    fs::read_dir(pin_path)?
        .map(|entry| entry.map(|e| e.path()))
        .collect()
}

/// Unpins what is under `pin_path` but named after neither a map pinned by
/// the object nor one of `programs` (the links' names). Returns the names
/// removed.
fn remove_pins_except(pin_path: &Path, programs: &[&str]) -> Result<Vec<String>, DatapathError> {
    let wanted = layout::wanted().map_err(DatapathError::Layouts)?;
    let pins = pinned_names(pin_path).map_err(|source| DatapathError::Remove {
        path: pin_path.to_owned(),
        source,
    })?;
    let mut removed = Vec::new();
    for path in pins {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !wanted.contains_key(name) && !programs.contains(&name) {
            removed.push(name.to_owned());
            remove_pin(&path)?;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_fdinfo_names_the_interface() {
        let tcx = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2063\nlink_type:\ttcx\n\
                   link_id:\t12\nprog_tag:\tab\nprog_id:\t40\nifindex:\t7\nattach_type:\t46 (tcx_egress)\n";
        assert_eq!(fdinfo_ifindex(tcx), Some(7));
        assert_eq!(fdinfo_ifindex("link_type:\txdp\nifindex:\t0\n"), Some(0));
        assert_eq!(fdinfo_ifindex("link_type:\ttracing\nprog_id:\t3\n"), None);
    }

    #[test]
    fn auto_takes_the_vxlan_socket_on_a_veth_and_xdp_elsewhere() {
        use DecapMode::*;
        let chosen = |requested, ready, driver| resolve_decap_mode(requested, ready, driver).0;
        assert_eq!(chosen(Auto, true, Some("veth")), Device);
        assert_eq!(chosen(Auto, true, Some("mlx5_core")), Auto);
        assert_eq!(chosen(Auto, true, None), Auto, "unknown driver: XDP first");
        // No slow-path device (ipip, or flannel.1 on the port): XDP first.
        assert_eq!(chosen(Auto, false, Some("veth")), Auto);
        assert_eq!(chosen(Device, false, Some("veth")), Auto);
        // An explicit choice stands, and is not logged as changed.
        for mode in [Xdp, Tc, Device] {
            assert_eq!(resolve_decap_mode(mode, true, Some("veth")), (mode, None));
        }
    }
}
