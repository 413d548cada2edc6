//! The maps, pinned by name under the agent's `--pin-path` so they outlive the
//! agent and are adopted by its next start.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use ebpf_prog::ratelimit::{ICMP_PER_SECOND, LOGS_PER_SECOND, RateWindow, SECOND_NS};
use weft_common::{MAX_SUBNETS, NodeConfig, Reason, RemoteNode};

#[map]
pub static SUBNETS: LpmTrie<[u8; 4], RemoteNode> = LpmTrie::pinned(MAX_SUBNETS, 0);

#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map]
pub static NODE_IPS: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_SUBNETS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::COUNT, 0);

/// Rate-limiter state, one slot per [`Limited`] kind. Not pinned: a restart
/// may start a fresh window, and no other program or tool needs to read it.
#[map]
pub static RATE_LIMITS: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(2, 0);

/// What [`admit`] limits.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Limited {
    /// ICMP errors this node generates.
    IcmpError = 0,
    /// Error log lines.
    Log = 1,
}

/// Whether one more `kind` event fits in this CPU's budget; counts it if so.
#[inline(always)]
pub fn admit(kind: Limited) -> bool {
    let limit = match kind {
        Limited::IcmpError => ICMP_PER_SECOND,
        Limited::Log => LOGS_PER_SECOND,
    };
    let Some(window) = RATE_LIMITS.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot from a successful lookup; nothing else on this
    // CPU runs concurrently with this program.
    unsafe { (*window).admit(now, SECOND_NS, limit) }
}

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
