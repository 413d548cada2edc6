//! The maps, pinned by name under the agent's `--pin-path` so they outlive the
//! agent and are adopted by its next start.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use ebpf_prog::ratelimit::{ICMP_PER_SECOND, LOGS_PER_SECOND, RateWindow, SECOND_NS};
use weft_common::{
    COUNTER_SLOTS, Counter, MAX_SUBNETS, NodeConfig, Program, Reason, RemoteNode, counter_index,
};

#[map]
pub static SUBNETS: LpmTrie<[u8; 4], RemoteNode> = LpmTrie::pinned(MAX_SUBNETS, 0);

#[map]
pub static NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

#[map]
pub static NODE_IPS: HashMap<[u8; 4], u32> = HashMap::pinned(MAX_SUBNETS, 0);

#[map]
pub static COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// The return code of the helper that just failed on this CPU, from
/// [`helper_failed`] to [`count`] (one slot). Not pinned: it only lives
/// from a failure to the end of that program run.
#[map]
static EXT_ERR: PerCpuArray<i64> = PerCpuArray::with_max_entries(1, 0);

/// Rate-limiter state, one slot per [`Limited`] kind. Not pinned: a restart
/// may start a fresh window, and no other program or tool needs to read it.
#[map]
pub static RATE_LIMITS: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(2, 0);

/// Each CPU's outer IP identification counter (see
/// `ebpf_prog::encap::next_outer_ip_id`; 0 until seeded). Not pinned: a
/// restart seeds a new one at random.
#[map]
pub static OUTER_IP_IDS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

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

/// Counts one packet of `bytes` for `program` and `reason`: one map lookup,
/// plus one more on the rare helper-failure paths to carry the helper's
/// return code (Cilium's `ext_err`) into the counter.
#[inline(always)]
pub fn count(program: Program, reason: Reason, bytes: u32) {
    let Some(slot) = COUNTERS.get_ptr_mut(counter_index(program, reason)) else {
        return;
    };
    // SAFETY: per-CPU slot, so no other writer runs concurrently; the
    // pointer comes from a successful map lookup.
    unsafe {
        (*slot).packets += 1;
        (*slot).bytes += u64::from(bytes);
    }
    if is_helper_failure(reason)
        && let Some(err) = EXT_ERR.get_ptr_mut(0)
    {
        // SAFETY: per-CPU slots from successful lookups, as above.
        unsafe {
            if *err != 0 {
                (*slot).ext_err = *err;
                (*slot).ext_err_ns = bpf_ktime_get_ns();
                *err = 0;
            }
        }
    }
}

/// The reasons that mean a kernel helper refused the packet; each comes
/// from [`helper_failed`], which keeps the helper's return code.
#[inline(always)]
pub fn is_helper_failure(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DropAdjustRoom | Reason::DropStoreBytes | Reason::DropFibLookup
    )
}

/// `reason`, after keeping the failed helper's return code `rc` for
/// [`count`]: `.map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))`.
#[inline(always)]
pub fn helper_failed(reason: Reason, rc: i64) -> Reason {
    if let Some(err) = EXT_ERR.get_ptr_mut(0) {
        // SAFETY: per-CPU slot from a successful lookup.
        unsafe { *err = rc };
    }
    reason
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
