//! Pinned map layouts: the ABI between agent versions.
//!
//! aya adopts whatever is pinned under a map's name without comparing it
//! with the object's definition, so an agent started over pins of another
//! version would read and write them with the wrong sizes. The expected
//! layout of every pinned map is therefore read from the BPF object itself
//! (the one the agent is about to load), never from a hand-kept table: any
//! layout change in `ebpf-prog` is caught without touching this file.
//!
//! What is compared is what the kernel keeps of a map: its type, key size,
//! value size, capacity and flags. A change of *meaning* with the same
//! sizes is not detectable from these, and no version marker is pinned for
//! it: such a change must rename the map (the name is the version). The new
//! agent then creates the map afresh, and removes the old name's pin once
//! its programs no longer use it
//! ([`crate::datapath::Datapath::remove_stale_pins`]).

use std::{collections::BTreeMap, fmt, io, path::Path, sync::OnceLock};

use aya::maps::{MapError, MapInfo};
use aya_obj::maps::PinningType;
use weft_common::{MAP_COUNTERS, MAP_NODE_CONFIG};

/// What the kernel records of a map, and what must match for a pin to be
/// adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    /// `bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapLayout {
    pub fn from_info(info: &MapInfo) -> Result<Self, MapError> {
        Ok(Self {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// The layout of the map pinned at `path`, or `None` if nothing is.
    pub fn of_pin(path: &Path) -> Result<Option<Self>, MapError> {
        match MapInfo::from_pin(path) {
            Ok(info) => Self::from_info(&info).map(Some),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The numbers of `enum bpf_map_type` the data path uses.
        match self.map_type {
            1 => f.write_str("hash")?,
            2 => f.write_str("array")?,
            5 => f.write_str("percpu_hash")?,
            6 => f.write_str("percpu_array")?,
            11 => f.write_str("lpm_trie")?,
            t => write!(f, "map type {t}")?,
        }
        write!(
            f,
            " (key {} B, value {} B, {} entries, flags {:#x})",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What to do with a pinned map whose layout is not this build's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMismatch {
    /// Unpin it before loading, so the loader creates it afresh: the old
    /// programs keep the old map until the new ones are swapped into the
    /// pinned links.
    Replace,
    /// Refuse to start and leave everything as it is.
    Refuse,
}

/// The policy per map. `COUNTERS` holds statistics (they restart from
/// zero) and `NODE_CONFIG` state derived from the flags, etcd and the host,
/// written in full before the programs are swapped: both are replaced.
/// The peer maps (and any map added later, until it is listed here) hold
/// state the running data path forwards with: replacing them would leave
/// the new programs with empty peer tables from the swap until the first
/// etcd listing fills them, and for as long as etcd is unreachable. So a
/// start over peer maps of another layout is refused, the old data path
/// keeps forwarding, and the error names `node-agent cleanup`.
pub fn on_mismatch(name: &str) -> OnMismatch {
    match name {
        MAP_COUNTERS | MAP_NODE_CONFIG => OnMismatch::Replace,
        _ => OnMismatch::Refuse,
    }
}

/// One pinned map whose layout differs from this build's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub pinned: MapLayout,
    pub wanted: MapLayout,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is pinned as {}, this build needs {}",
            self.name, self.pinned, self.wanted
        )
    }
}

/// The maps to replace and the ones that refuse the start, from each
/// pinned map's layout (`None`: not pinned) and the object's.
pub fn plan(
    wanted: &BTreeMap<String, MapLayout>,
    pinned: impl Fn(&str) -> Option<MapLayout>,
) -> (Vec<Mismatch>, Vec<Mismatch>) {
    let (replace, refuse): (Vec<_>, Vec<_>) = wanted
        .iter()
        .filter_map(|(name, &wanted)| {
            let pinned = pinned(name)?;
            (pinned != wanted).then(|| Mismatch {
                name: name.clone(),
                pinned,
                wanted,
            })
        })
        .partition(|m| on_mismatch(&m.name) == OnMismatch::Replace);
    (replace, refuse)
}

/// The layout of every map the embedded object pins, by name.
pub fn wanted() -> Result<&'static BTreeMap<String, MapLayout>, String> {
    static WANTED: OnceLock<Result<BTreeMap<String, MapLayout>, String>> = OnceLock::new();
    WANTED
        .get_or_init(|| {
            let object = aya_obj::Object::parse(crate::ebpf::OBJECT)
                .map_err(|e| format!("parsing the embedded BPF object: {e}"))?;
            Ok(object
                .maps
                .iter()
                .filter(|(_, m)| m.pinning() == PinningType::ByName)
                .map(|(name, m)| {
                    let layout = MapLayout {
                        map_type: m.map_type(),
                        key_size: m.key_size(),
                        value_size: m.value_size(),
                        max_entries: m.max_entries(),
                        flags: m.map_flags(),
                    };
                    (name.clone(), layout)
                })
                .collect())
        })
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::{MAP_NODE_IPS, MAP_SUBNETS, NodeConfig, RemoteNode};

    #[test]
    fn the_object_pins_the_maps_with_the_common_layouts() {
        let wanted = wanted().expect("embedded object");
        let names: Vec<&str> = wanted.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [MAP_COUNTERS, MAP_NODE_CONFIG, MAP_NODE_IPS, MAP_SUBNETS]
        );
        assert_eq!(
            wanted[MAP_NODE_CONFIG].value_size as usize,
            size_of::<NodeConfig>()
        );
        assert_eq!(
            wanted[MAP_SUBNETS].value_size as usize,
            size_of::<RemoteNode>()
        );
    }

    fn layout(value_size: u32) -> MapLayout {
        MapLayout {
            map_type: 2,
            key_size: 4,
            value_size,
            max_entries: 1,
            flags: 0,
        }
    }

    #[test]
    fn mismatches_are_replaced_or_refused_by_map_and_absent_pins_are_new() {
        let wanted: BTreeMap<String, MapLayout> = [
            (MAP_COUNTERS, layout(8)),
            (MAP_NODE_CONFIG, layout(52)),
            (MAP_SUBNETS, layout(20)),
            (MAP_NODE_IPS, layout(4)),
            ("FUTURE", layout(4)),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_owned(), l))
        .collect();
        let pinned = |name: &str| match name {
            MAP_COUNTERS => Some(MapLayout {
                max_entries: 7,
                ..layout(8)
            }),
            MAP_NODE_CONFIG => Some(layout(48)),
            MAP_SUBNETS => Some(layout(16)),
            MAP_NODE_IPS => Some(layout(4)),
            "FUTURE" => Some(MapLayout {
                flags: 1,
                ..layout(4)
            }),
            _ => None,
        };
        let (replace, refuse) = plan(&wanted, pinned);
        let names = |v: &[Mismatch]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&replace), [MAP_COUNTERS, MAP_NODE_CONFIG]);
        assert_eq!(names(&refuse), ["FUTURE", MAP_SUBNETS]);
        assert_eq!(
            refuse[1].to_string(),
            "SUBNETS is pinned as array (key 4 B, value 16 B, 1 entries, flags 0x0), \
             this build needs array (key 4 B, value 20 B, 1 entries, flags 0x0)"
        );
        let (replace, refuse) = plan(&wanted, |_| None);
        assert!(replace.is_empty() && refuse.is_empty());
    }
}
