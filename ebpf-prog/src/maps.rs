//! The maps, pinned by name under the agent's `--pin-path` so they outlive the
//! agent and are adopted by its next start.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use weft_common::{MAX_SUBNETS, NodeConfig, Reason, RemoteNode};

#[map]
pub static SUBNETS: LpmTrie<[u8; 4], RemoteNode> = LpmTrie::pinned(MAX_SUBNETS, 0);

#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map]
pub static NODE_IPS: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_SUBNETS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, so no other writer runs concurrently; the
        // pointer comes from a successful map lookup.
        unsafe { *slot += 1 };
    }
}

/// This node's configuration, or `None` until the agent has written it.
#[inline(always)]
pub fn node_config() -> Option<&'static NodeConfig> {
    let cfg = NODE_CONFIG.get(0)?;
    if cfg.configured == 0 { None } else { Some(cfg) }
}

/// The remote node whose subnet holds `addr` (network order).
#[inline(always)]
pub fn remote_for(addr: [u8; 4]) -> Option<RemoteNode> {
    SUBNETS.get(Key::new(32, addr)).copied()
}

/// Whether `addr` (network order) is some node's PublicIP.
#[inline(always)]
pub fn is_known_node(addr: [u8; 4]) -> bool {
    NODE_IPS.get_ptr(addr).is_some()
}
