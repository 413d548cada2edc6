//! Sending to remote nodes, at TC egress of `--iface`.
//!
//! The agent routes the whole cluster network out of `--iface` (one route),
//! so both forwarded container traffic and host-originated traffic reach this
//! hook with the stack's L2 header in front. A packet for a remote subnet is
//! then, per that node's mode: wrapped in VXLAN (RFC 7348) or IP-in-IP
//! (RFC 2003) headers inserted after the L2 header, or left as it is (host-gw,
//! DirectRouting). Either way the L2 header is rewritten for the underlay
//! next hop that the kernel's FIB picks.
//!
//! A packet too big for the underlay once encapsulated takes one of three
//! ways ([`size_verdict`]): with DF its sender gets ICMP "fragmentation
//! needed"; without DF it takes the slow path, where the kernel fragments
//! the outer packet: to a VXLAN peer through the agent's collect-metadata
//! VXLAN device, with the tunnel parameters as metadata; to an IP-in-IP
//! peer through the agent's tap and raw socket. Without a slow path it is
//! dropped.

use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, BPF_F_ZERO_CSUM_TX, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, bpf_redir_neigh, bpf_tunnel_key,
    },
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_set_tunnel_key,
    },
    programs::TcContext,
};
use ebpf_prog::{
    encap::{
        OUTER_FRAG_OFF, SizeVerdict,
        ipip::{self, IpipParams},
        next_outer_ip_id, outer_ip_id, segments, size_verdict,
        vxlan::{self, VxlanParams, flow_src_port, outer_tos},
    },
    headers::{AF_INET, ETH_HLEN, ETH_P_IP, IP_DF, IPPROTO_UDP, IPV4_HLEN, OUTER_TTL},
    icmp,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use weft_common::{Mode, NodeConfig, Reason, RemoteNode};

use crate::{
    maps::{Limited, OUTER_IP_IDS, admit, helper_failed, node_config, remote_for},
    packet::read_at,
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)` from the UAPI header, a C macro that bindgen
/// cannot see: the inner L2 header length in the top byte.
const fn adj_room_encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// GSO super-packets stay whole: the kernel segments them after this hook
/// and replicates the tunnel headers per segment (`FIXED_GSO` keeps the
/// inner MSS, which the container MTU already sized for the overhead).
const VXLAN_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | adj_room_encap_l2(ETH_HLEN as u64);
/// An outer IPv4 header and nothing else makes the kernel mark GSO packets
/// SKB_GSO_IPXIP4.
const IPIP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;

/// How the packet leaves: a success [`Reason`] and the TC verdict.
pub type Sent = (Reason, i32);

enum NextHop {
    /// Neighbour known: write its MAC and transmit on `ifindex`.
    Resolved { ifindex: u32, l2: [u8; 12] },
    /// Neighbour not yet resolved: let `bpf_redirect_neigh` resolve it.
    Unresolved { ifindex: u32 },
}

pub fn try_encap(ctx: &TcContext) -> Result<Sent, Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    let l3_min = ETH_HLEN + IPV4_HLEN;
    if ctx.data() + l3_min > ctx.data_end() && ctx.len() as usize >= l3_min {
        // Headers may sit in paged data; a failed pull shows up below as a
        // short window.
        let _ = ctx.skb.pull_data(l3_min as u32);
    }
    let eth = read_at::<EthHdr>(ctx, 0).ok_or(Reason::PassMalformed)?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return Err(Reason::PassNotIpv4);
    }
    let ip = read_at::<Ipv4Hdr>(ctx, ETH_HLEN).ok_or(Reason::DropMalformedIp)?;
    let remote = remote_for(ip.dst_addr).ok_or(Reason::PassNoRemote)?;

    // Only well-formed IPv4 is carried: a header that claims more than the
    // packet holds would reach the peer as garbage.
    let inner_l3_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    let header_len = u32::from(ip.vihl & 0x0f) * 4;
    let total_len = u32::from(u16::from_be_bytes(ip.tot_len));
    // SAFETY: reading a field of the context the kernel handed us.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if ip.vihl >> 4 != 4
        || header_len < IPV4_HLEN as u32
        || header_len > inner_l3_len
        || total_len > inner_l3_len
        // BIG TCP super-packets carry tot_len 0.
        || (total_len < header_len && gso_size == 0)
    {
        return Err(Reason::DropMalformedIp);
    }

    let sent = if remote.mode == Mode::Direct as u8 {
        // host-gw: the packet is already what the peer wants; only the next
        // hop changes, to the peer's PublicIP.
        let next = next_hop(ctx, cfg.iface_ifindex, cfg.public_ip, remote.public_ip)?;
        (
            Reason::ForwardedDirect,
            transmit(ctx, next, Some(remote.public_ip))?,
        )
    } else {
        let overhead = if remote.mode == Mode::Ipip as u8 {
            ipip::ENCAP_LEN
        } else {
            vxlan::ENCAP_LEN
        };
        let is_vxlan = remote.mode == Mode::Vxlan as u8;
        match size_verdict(
            inner_l3_len,
            overhead as u32,
            cfg.iface_mtu,
            gso_size != 0,
            u16::from_be_bytes(ip.frags) & IP_DF != 0,
            cfg.slow_path_ifindex != 0,
        ) {
            SizeVerdict::Fits => {}
            SizeVerdict::SlowPath => {
                let verdict = if is_vxlan {
                    slow_path_tx(ctx, cfg, &remote, &ip)?
                } else {
                    ipip_slow_path_tx(ctx, cfg, &remote, &ip, inner_l3_len)?
                };
                return Ok((Reason::EncapsulatedSlowPath, verdict));
            }
            // The cluster route's MTU makes the stack itself answer most of
            // these; this catches what bypasses it. `frag_needed` decides
            // what is answered and what is dropped.
            SizeVerdict::FragNeeded | SizeVerdict::Drop => {
                let next_hop_mtu = cfg.iface_mtu.saturating_sub(overhead as u32);
                let verdict = frag_needed(ctx, cfg, &ip, next_hop_mtu)?;
                return Ok((Reason::FragNeeded, verdict));
            }
        }
        let next = next_hop(ctx, cfg.iface_ifindex, cfg.public_ip, remote.public_ip)?;
        if remote.mode == Mode::Ipip as u8 {
            push_ipip(ctx, cfg, &remote, &ip, inner_l3_len)?;
        } else {
            match push_vxlan(ctx, cfg, &remote, &ip, inner_l3_len) {
                // A GSO packet that already is a tunnel packet, untouched
                // (the helper refused before changing it). The slow-path
                // device has no UDP-tunnel GSO feature, so the kernel
                // segments the packet in software before the device
                // (validate_xmit_skb) and encapsulates every segment.
                Err(Reason::DropNestedGso) if cfg.slow_path_ifindex != 0 => {
                    let verdict = slow_path_tx(ctx, cfg, &remote, &ip)?;
                    return Ok((Reason::EncapsulatedSlowPath, verdict));
                }
                pushed => pushed?,
            }
        }
        // The outer header names the next hop; the kernel routes it itself.
        (Reason::Encapsulated, transmit(ctx, next, None)?)
    };
    Ok(sent)
}

/// Turns a too-big DF packet into the ICMP "fragmentation needed" its sender
/// needs for path MTU discovery, and hands that back to the stack as if it
/// had arrived on `--iface`, which routes it to the sender (a container or
/// this host). Packets without DF, or with IP options (whose quote would not
/// be the 28 bytes built here), are dropped instead.
#[inline(always)]
fn frag_needed(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: &Ipv4Hdr,
    next_hop_mtu: u32,
) -> Result<i32, Reason> {
    if u16::from_be_bytes(ip.frags) & IP_DF == 0 || ip.vihl != 0x45 {
        return Err(Reason::DropTooBig);
    }
    let quote = read_at::<[u8; icmp::QUOTE_LEN]>(ctx, ETH_HLEN).ok_or(Reason::DropTooBig)?;
    if !icmp::may_answer(&quote) {
        return Err(Reason::DropTooBigNoReply);
    }
    if !admit(Limited::IcmpError) {
        return Err(Reason::DropIcmpRateLimited);
    }
    let reply = icmp::frag_needed(&quote, next_hop_mtu as u16);
    // SAFETY: helper on our own skb; every pointer is re-derived (by the
    // stores below) after it.
    let rc = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + icmp::REPLY_LEN) as u32, 0) };
    if rc != 0 {
        return Err(helper_failed(Reason::DropAdjustRoom, rc));
    }
    ctx.skb
        .store(ETH_HLEN, &reply, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // Addressed to the interface itself, so the stack takes it as its own.
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&cfg.iface_mac);
    l2[6..].copy_from_slice(&cfg.iface_mac);
    ctx.skb
        .store(0, &l2, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok(unsafe { bpf_redirect(cfg.iface_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}

/// Hands a too-big packet without DF to the slow-path VXLAN device: the
/// tunnel parameters travel as metadata (`bpf_skb_set_tunnel_key`), the
/// device's transmit path (drivers/net/vxlan/vxlan_core.c, collect_metadata
/// mode) builds the outer headers, and `ip_fragment` splits the outer packet
/// for the underlay, which the peer's stack reassembles. The inner frame is
/// addressed as the fast path addresses it, to the peer's VtepMAC.
#[inline(always)]
fn slow_path_tx(
    ctx: &TcContext,
    cfg: &NodeConfig,
    remote: &RemoteNode,
    ip: &Ipv4Hdr,
) -> Result<i32, Reason> {
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = remote.vni;
    // Addresses in host byte order, as the helper expects.
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(remote.public_ip);
    // The source must be the PublicIP the peer knows (its NODE_IPS), not
    // whatever the route would pick.
    key.__bindgen_anon_3.local_ipv4 = u32::from_be_bytes(cfg.public_ip);
    key.tunnel_tos = outer_tos(ip.tos);
    key.tunnel_ttl = OUTER_TTL;
    // No BPF_F_DONT_FRAGMENT: the outer packet must be fragmentable (see
    // `OUTER_FRAG_OFF`). UDP checksum 0, as on the fast path.
    // SAFETY: `key` is a valid parameter block on our stack and the size
    // passed is its size.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut key,
            size_of::<bpf_tunnel_key>() as u32,
            u64::from(BPF_F_ZERO_CSUM_TX),
        )
    };
    if rc != 0 {
        return Err(helper_failed(Reason::DropStoreBytes, rc));
    }
    let mut l2 = [0u8; 12];
    l2[..6].copy_from_slice(&remote.vtep_mac);
    l2[6..].copy_from_slice(&cfg.vtep_mac);
    ctx.skb
        .store(0, &l2, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok(unsafe { bpf_redirect(cfg.slow_path_ifindex, 0) } as i32)
}

/// Hands a too-big IP-in-IP packet without DF to the agent's `weft.ipip`
/// tap, encapsulated as the fast path would send it. The agent reads it
/// there and sends the inner packet through a raw IP-in-IP socket to the
/// outer destination, so the kernel builds the outer header again and
/// fragments it (no ipip device exists to do that on this kernel).
#[inline(always)]
fn ipip_slow_path_tx(
    ctx: &TcContext,
    cfg: &NodeConfig,
    remote: &RemoteNode,
    ip: &Ipv4Hdr,
    inner_l3_len: u32,
) -> Result<i32, Reason> {
    push_ipip(ctx, cfg, remote, ip, inner_l3_len)?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok(unsafe { bpf_redirect(cfg.slow_path_ifindex, 0) } as i32)
}

/// The outer IP identification for this packet, one per segment it will
/// become; see [`next_outer_ip_id`].
#[inline(always)]
fn fresh_outer_id(ctx: &TcContext) -> u16 {
    // SAFETY: helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let Some(state) = OUTER_IP_IDS.get_ptr_mut(0) else {
        // The one slot of an array always exists; still, an ID of its own.
        return outer_ip_id(random);
    };
    // SAFETY: reads fields of the program's own context.
    let segs = unsafe {
        let skb = ctx.skb.skb;
        segments((*skb).gso_segs, (*skb).gso_size, (*skb).len)
    };
    // SAFETY: this CPU's slot from a successful lookup; nothing else on
    // this CPU runs concurrently with this program.
    unsafe {
        let (id, next) = next_outer_ip_id(*state, segs, random);
        *state = next;
        id
    }
}

#[inline(always)]
fn push_vxlan(
    ctx: &TcContext,
    cfg: &NodeConfig,
    remote: &RemoteNode,
    ip: &Ipv4Hdr,
    inner_l3_len: u32,
) -> Result<(), Reason> {
    let headers = vxlan::build_headers(&VxlanParams {
        outer_src: cfg.public_ip,
        outer_dst: remote.public_ip,
        // SAFETY: helper on our own skb; it only computes the flow hash.
        src_port: flow_src_port(unsafe { bpf_get_hash_recalc(ctx.skb.skb) }),
        dst_port_be: cfg.vxlan_port_be,
        vni: remote.vni,
        inner_dst_mac: remote.vtep_mac,
        inner_src_mac: cfg.vtep_mac,
        inner_l3_len,
        tos: outer_tos(ip.tos),
        frag_off: OUTER_FRAG_OFF,
        ip_id: fresh_outer_id(ctx),
    });
    insert_after_l2(ctx, &headers, VXLAN_FLAGS)
}

#[inline(always)]
fn push_ipip(
    ctx: &TcContext,
    cfg: &NodeConfig,
    remote: &RemoteNode,
    ip: &Ipv4Hdr,
    inner_l3_len: u32,
) -> Result<(), Reason> {
    let header = ipip::build_header(&IpipParams {
        outer_src: cfg.public_ip,
        outer_dst: remote.public_ip,
        inner_l3_len,
        tos: outer_tos(ip.tos),
        frag_off: OUTER_FRAG_OFF,
        ip_id: fresh_outer_id(ctx),
    });
    insert_after_l2(ctx, &header, IPIP_FLAGS)
}

/// Makes room for `headers` right after the L2 header and writes them.
///
/// A packet that already is a tunnel packet (a container's own VXLAN or
/// GRE, whose checksum offload left `skb->encapsulation` set) cannot be
/// marked as encapsulated a second time: `bpf_skb_net_grow` answers
/// -EALREADY before touching it (net/core/filter.c). Without GSO the
/// encapsulation metadata only serves inner checksum offload, whose
/// `csum_start` counts from the buffer's head and so still points at the
/// same bytes after the insertion; the room is then made without the encap
/// flags. A GSO packet needs the metadata to be segmented, so it is dropped
/// and counted, never logged per packet.
#[inline(always)]
fn insert_after_l2<const N: usize>(
    ctx: &TcContext,
    headers: &[u8; N],
    flags: u64,
) -> Result<(), Reason> {
    if ctx
        .skb
        .adjust_room(N as i32, BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        // SAFETY: reading a field of the context the kernel handed us.
        if unsafe { (*ctx.skb.skb).gso_size } != 0 {
            return Err(Reason::DropNestedGso);
        }
        ctx.skb
            .adjust_room(N as i32, BPF_ADJ_ROOM_MAC, 0)
            .map_err(|rc| helper_failed(Reason::DropAdjustRoom, rc))?;
    }
    // From here on the packet is half-built: every failure must drop it.
    ctx.skb
        .store(ETH_HLEN, headers, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))
}

/// Sends the (possibly encapsulated) frame towards `next`. With a resolved
/// neighbour the L2 header is rewritten here; otherwise
/// `bpf_redirect_neigh` resolves it. `gateway` is the explicit next hop for
/// packets whose own destination is not the next hop (host-gw); tunnel
/// packets pass `None` so the kernel routes the outer header, because with
/// an explicit next hop a packet queued for ARP keeps the inner packet's
/// route (the cluster route) and leaves with that route's neighbour
/// (net/core/neighbour.c: neigh_update re-looks up via skb_dst). The agent
/// keeps "managed" neighbour entries for on-link peers so that host-gw rarely
/// meets that case.
#[inline(always)]
fn transmit(ctx: &TcContext, next: NextHop, gateway: Option<[u8; 4]>) -> Result<i32, Reason> {
    match next {
        NextHop::Resolved { ifindex, l2 } => {
            ctx.skb
                .store(0, &l2, 0)
                .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
            // SAFETY: reading a field of the context the kernel handed us.
            if ifindex == unsafe { (*ctx.skb.skb).ifindex } {
                Ok(TC_ACT_OK)
            } else {
                // SAFETY: plain helper call; the verdict it returns is ours.
                Ok(unsafe { bpf_redirect(ifindex, 0) } as i32)
            }
        }
        NextHop::Unresolved { ifindex } => match gateway {
            None => {
                // SAFETY: a NULL parameter block with length 0 is the
                // documented "look it up yourself" form.
                Ok(unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32)
            }
            Some(gw) => {
                // SAFETY: all-zero is a valid bpf_redir_neigh.
                let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
                nh.nh_family = u32::from(AF_INET);
                nh.__bindgen_anon_1.ipv4_nh = u32::from_ne_bytes(gw);
                // SAFETY: `nh` is a valid parameter block on our stack and
                // the length passed is its size.
                Ok(unsafe {
                    bpf_redirect_neigh(ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0)
                } as i32)
            }
        },
    }
}

/// Asks the kernel FIB how to reach `dst` from `src` out of `ifindex`, so the
/// underlay may be routed, not only one L2 segment.
#[inline(always)]
fn next_hop(ctx: &TcContext, ifindex: u32, src: [u8; 4], dst: [u8; 4]) -> Result<NextHop, Reason> {
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid value.
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_UDP;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `fib` is a valid, fully initialised lookup structure on our
    // stack, and the size passed matches it.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut fib,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let mut l2 = [0u8; 12];
            l2[..6].copy_from_slice(&fib.dmac);
            l2[6..].copy_from_slice(&fib.smac);
            Ok(NextHop::Resolved {
                ifindex: fib.ifindex,
                l2,
            })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Ok(NextHop::Unresolved {
            ifindex: fib.ifindex,
        }),
        // The lookup's own verdict (BPF_FIB_LKUP_RET_*, or a negative
        // errno) says why: no route, blackhole, unreachable, forwarding off.
        _ => Err(helper_failed(Reason::DropFibLookup, rc)),
    }
}
