//! `--host-routing bpf`: a decapsulated packet goes straight to the device
//! that leads to its container, instead of up the host's stack on
//! `--iface` and through IP forwarding.
//!
//! The decap program asks the FIB what the kernel's forwarding path would
//! ask (`bpf_fib_lookup` without `BPF_FIB_LOOKUP_OUTPUT`, with `--iface` as
//! the input device, so `ip_forward` off, policy rules on the input device
//! and unreachable routes still apply; rules on the firewall mark do not,
//! since the lookup carries none), rewrites the Ethernet header to the
//! neighbour it returns, decrements the TTL as a router does, and redirects
//! to the egress of that device: the bridge (`cni0`, `docker0`, the CNI
//! bridge), which delivers to the container's port. This is Cilium's "eBPF
//! host routing", and it gives up what Cilium's gives up: netfilter's
//! PREROUTING and FORWARD hooks and conntrack never see these packets, so
//! Docker's and kube-proxy's FORWARD rules, and any firewall rule matching
//! `--decap-mark`, do not apply to them. That is why the default is
//! `kernel` (see the README's "Host routing").
//!
//! Whatever the FIB cannot answer at once (no neighbour entry yet, TTL
//! expiring, a local or non-unicast destination, a packet too big for the
//! device) is left to the kernel's path, which resolves, answers with ICMP
//! or drops exactly as it would have without this option.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::TcContext,
};
use ebpf_prog::{
    checksum::ipv4_ttl_decremented,
    headers::{AF_INET, ETH_HLEN},
};
use network_types::ip::Ipv4Hdr;
use weft_common::{HOST_ROUTING_BPF, NodeConfig, Reason};

use crate::{maps::helper_failed, packet::read_at};

/// `--host-routing`, written into `.rodata` by the agent's loader before the
/// programs load. With the default (kernel) the verifier prunes [`deliver`]
/// as dead code.
#[unsafe(no_mangle)]
static HOST_ROUTING: u32 = 0;

/// Offset of the TTL, protocol and checksum word in the IPv4 header.
const TTL_OFF: usize = 8;

#[inline(always)]
fn enabled() -> bool {
    // SAFETY: a read of a static. Volatile, so the compiler cannot fold the
    // 0 it sees here: the loader patches the real value in.
    unsafe { core::ptr::read_volatile(&HOST_ROUTING) == HOST_ROUTING_BPF }
}

/// Sends the decapsulated frame in `ctx` (Ethernet header at 0, its inner
/// IPv4 header behind it) out of the device the FIB chooses for its
/// destination, as though `--iface` had received and forwarded it.
/// `Ok(Some(verdict))`: the redirect verdict to return. `Ok(None)`: leave the
/// packet to the kernel's path, untouched. `Err`: a rewrite failed half-way,
/// so the packet must be dropped.
#[inline(always)]
pub fn deliver(ctx: &TcContext, cfg: &NodeConfig) -> Result<Option<i32>, Reason> {
    if !enabled() {
        return Ok(None);
    }
    let Some(ip) = read_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Ok(None);
    };
    // Options (record route, timestamps, source routes) are the kernel's
    // to process when it forwards (ip_forward_options).
    if ip.vihl & 0x0f != 5 {
        return Ok(None);
    }
    // A TTL of 0 or 1 is the kernel's to answer (ICMP time exceeded).
    let Some(ttl_word) = ipv4_ttl_decremented([ip.ttl, ip.proto, ip.check[0], ip.check[1]]) else {
        return Ok(None);
    };
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    // tot_len stays 0: the helper then checks the skb against the chosen
    // device's MTU itself, which accepts GRO aggregates (is_skb_forwardable)
    // where a length from the header would not.
    fib.ifindex = cfg.iface_ifindex;
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // SAFETY: `fib` is a valid, fully initialised lookup structure on our
    // stack, and the size passed matches it.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // Back out of the underlay is no container's path; anything else the
    // FIB did not resolve completely is the kernel's to handle.
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex == cfg.iface_ifindex {
        return Ok(None);
    }
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&fib.dmac);
    l2[6..].copy_from_slice(&fib.smac);
    // From the first store on the packet is half-rewritten: a failure drops it.
    ctx.skb
        .store(ETH_HLEN + TTL_OFF, &ttl_word, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    ctx.skb
        .store(0, &l2, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok(Some(unsafe { bpf_redirect(fib.ifindex, 0) } as i32))
}
