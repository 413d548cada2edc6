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

use crate::pinned::{PeerMaps, PinnedError};
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
    DEFAULT_DECAP_MARK, GLOBAL_DECAP_MARK, MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS,
    MAP_SUBNETS, NodeConfig, PROG_DECAP_TC, PROG_DECAP_XDP, PROG_ENCAP_TC, PROG_MARK_TC,
    PROG_SLOWPATH_IPIP_TC, PROG_SLOWPATH_RX_TC, Reason, RemoteNode,
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
    #[error(
        "pinned map {path} has {what} {found}, this build needs {want}: it was made by an \
         incompatible version; run `node-agent cleanup --pin-path {pin_path}` (forwarding \
         stops until the next start) and start again"
    )]
    PinnedLayout {
        path: PathBuf,
        pin_path: String,
        what: &'static str,
        found: u32,
        want: u32,
    },
    #[error(transparent)]
    Pinned(#[from] PinnedError),
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

/// What is fixed when the programs load (a change takes a restart, which
/// swaps the programs in place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// ORed into `skb->mark` of every decapsulated packet; 0 = no mark.
    pub decap_mark: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            decap_mark: DEFAULT_DECAP_MARK,
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
        fs::create_dir_all(pin_path).map_err(|source| DatapathError::PinDir {
            path: pin_path.to_owned(),
            source,
        })?;
        if !is_bpffs(pin_path) {
            return Err(DatapathError::NotBpffs {
                path: pin_path.to_owned(),
            });
        }
        check_pinned_layouts(pin_path)?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_path)
            .override_global(GLOBAL_DECAP_MARK, &options.decap_mark, true)
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

    /// Counter totals over all CPUs, in [`Reason`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(DatapathError::Map {
            name: MAP_COUNTERS,
            source: missing_map(MAP_COUNTERS),
        })?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| DatapathError::Map {
                name: MAP_COUNTERS,
                source,
            })?;
        Ok(crate::pinned::read_counters(&counters)?)
    }
}

fn missing_map(name: &str) -> aya::maps::MapError {
    aya::maps::MapError::InvalidName {
        name: name.to_owned(),
    }
}

/// Pinned maps are adopted as they are: aya does not compare their layout
/// with the object's, so a map made by an older build would be used with
/// the wrong sizes. `COUNTERS` grows whenever a [`Reason`] is appended; its
/// totals are statistics, so one of another size is replaced (the counts
/// restart) instead of leaving the new reasons uncounted. `NODE_CONFIG` is
/// derived entirely from the agent's flags, etcd and the host, and written
/// in full before the new programs are swapped into the pinned links, so
/// one of another size (the 48-byte layout before `slow_path_ifindex`) is
/// replaced too: the old programs keep the old map until the swap. A peer
/// table whose value layout changed cannot be adopted: that is an error
/// naming the fix.
fn check_pinned_layouts(pin_path: &Path) -> Result<(), DatapathError> {
    let info = |name: &'static str| {
        let path = pin_path.join(name);
        path.exists()
            .then(|| aya::maps::MapInfo::from_pin(&path).map(|i| (path, i)))
            .transpose()
            .map_err(|source| DatapathError::Map { name, source })
    };
    if let Some((path, counters)) = info(MAP_COUNTERS)?
        && counters.max_entries() != Reason::COUNT
    {
        tracing::warn!(
            pinned = counters.max_entries(),
            now = Reason::COUNT,
            "the pinned counters have another number of reasons; they restart from zero"
        );
        remove_pin(&path)?;
    }
    if let Some((path, config)) = info(MAP_NODE_CONFIG)?
        && config.value_size() as usize != size_of::<NodeConfig>()
    {
        tracing::info!(
            pinned = config.value_size(),
            now = size_of::<NodeConfig>(),
            "the pinned node config has an older layout; replacing it"
        );
        remove_pin(&path)?;
    }
    for (name, want) in [(MAP_SUBNETS, size_of::<RemoteNode>())] {
        if let Some((path, pinned)) = info(name)?
            && pinned.value_size() as usize != want
        {
            return Err(DatapathError::PinnedLayout {
                path,
                pin_path: pin_path.display().to_string(),
                what: "value size",
                found: pinned.value_size(),
                want: want as u32,
            });
        }
    }
    Ok(())
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

/// Unpins every link (detaching the programs) and map under `pin_path`, then
/// removes the directory.
pub fn remove_pins(pin_path: &Path) -> Result<(), DatapathError> {
    // Links first, so no program runs against half-removed maps.
    for name in [
        PROG_ENCAP_TC,
        PROG_DECAP_XDP,
        PROG_DECAP_TC,
        PROG_MARK_TC,
        PROG_SLOWPATH_RX_TC,
        PROG_SLOWPATH_IPIP_TC,
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
