//! Decapsulation of VXLAN and IP-in-IP, at XDP (preferred) or TC ingress
//! (fallback).
//!
//! Only tunnel packets addressed to this node's PublicIP are touched: VXLAN
//! to the configured port with the I flag and this node's VNI, and IP-in-IP.
//! Everything else passes unchanged. Of those, only what a peer could have
//! sent is decapsulated; the rest is dropped and counted by reason:
//! - the outer source must be a known node's PublicIP (`NODE_IPS`): VXLAN's
//!   VNI and IP-in-IP's nothing are no secret;
//! - the inner destination must be a container address of this node's
//!   subnet (not its network or broadcast address): a peer only
//!   tunnels here what is for this node's containers, so anything else
//!   (another node's container, multicast, broadcast) is injection, and
//!   forwarding it would launder it behind this node's PublicIP;
//! - the inner source must be in the sending node's subnet (per `SUBNETS`),
//!   or be that node's PublicIP: its host's own traffic to containers leaves
//!   with the underlay address as source.
//!
//! Outer fragments cannot be decapsulated here (only the first holds the
//! tunnel headers, none holds the whole inner packet): they are counted and
//! passed to the stack, which reassembles them and hands VXLAN to the
//! agent's collect-metadata VXLAN device (the slow path). Its TC ingress
//! program, [`try_slowpath_rx`], applies the same rules through the same
//! function, [`accept`], and re-injects the inner frame into `--iface`'s
//! ingress, so it meets the same rp_filter and firewall as fast-path
//! packets. That device's UDP socket also turns on UDP-tunnel GRO, whose
//! aggregates the TC decap hook passes (`PassGso`) and the slow path
//! delivers. Reassembled IP-in-IP has no kernel handler here; the agent
//! writes it into a tap whose program, [`try_slowpath_ipip_rx`], runs the
//! very classification of the fast path.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_tunnel_key, xdp_action,
    },
    helpers::{bpf_redirect, bpf_skb_get_tunnel_key, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};
use ebpf_prog::{
    encap::{
        ipip::{self, IPPROTO_IPIP},
        vxlan::{self, vni_of},
    },
    headers::{
        ETH_HLEN, ETH_P_IP, IP_MF_OFFSET, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN, is_host_in,
    },
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use weft_common::{DECAP_IPIP, DECAP_VXLAN, NodeConfig, Reason};

use crate::{
    host_route,
    maps::{helper_failed, is_known_node, node_config, remote_for},
    mark,
    packet::{PacketWindow, ptr_at_mut, read_at},
};

const OUTER_IP_OFF: usize = ETH_HLEN;
const UDP_OFF: usize = OUTER_IP_OFF + IPV4_HLEN;
const VXLAN_OFF: usize = UDP_OFF + UDP_HLEN;
const VXLAN_INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const VXLAN_INNER_IP_OFF: usize = VXLAN_INNER_ETH_OFF + ETH_HLEN;
const IPIP_INNER_IP_OFF: usize = OUTER_IP_OFF + IPV4_HLEN;
/// Bytes that must be in the linear window to classify any tunnel packet.
const CLASSIFY_LEN: usize = VXLAN_INNER_IP_OFF + IPV4_HLEN;

/// A tunnel packet for this node, and how many bytes follow the outer
/// Ethernet header before the inner packet (or inner Ethernet header).
#[derive(Clone, Copy)]
enum Tunnel {
    /// Outer IPv4 + UDP + VXLAN + inner Ethernet.
    Vxlan,
    /// Outer IPv4.
    Ipip,
}

impl Tunnel {
    #[inline(always)]
    fn encap_len(self) -> usize {
        match self {
            Tunnel::Vxlan => vxlan::ENCAP_LEN,
            Tunnel::Ipip => ipip::ENCAP_LEN,
        }
    }
}

pub fn try_decap_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    let tunnel = classify(ctx, cfg, ctx.data_end() - ctx.data())?;
    let outer = read_at::<EthHdr>(ctx, 0).ok_or(Reason::DropMalformedTunnel)?;

    // SAFETY: plain helper call on this program's own context.
    let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, tunnel.encap_len() as i32) };
    if rc != 0 {
        return Err(helper_failed(Reason::DropAdjustRoom, rc));
    }
    // Every earlier pointer is stale now. The frame must be addressed to the
    // interface itself for the stack to take it as PACKET_HOST: VXLAN's inner
    // destination is whatever VtepMAC the sender looked up (RFC 7348 leaves
    // inner MACs to the overlay), and IP-in-IP has no inner Ethernet header,
    // so the outer one is rebuilt in front of the inner IPv4 header.
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Reason::DropMalformedTunnel)?;
    // SAFETY: `eth` was re-derived after adjust_head and bounds-checked.
    unsafe {
        (*eth).dst_addr = cfg.iface_mac;
        if let Tunnel::Ipip = tunnel {
            (*eth).src_addr = outer.src_addr;
            (*eth).ether_type = ETH_P_IP.to_be();
        }
    }
    mark::tag_xdp(ctx);
    Ok(xdp_action::XDP_PASS)
}

/// `Ok((reason, verdict))`: [`Reason::Decapsulated`] up the stack, or
/// [`Reason::DeliveredDirect`] by host routing.
pub fn try_decap_tc(ctx: &TcContext) -> Result<(Reason, i32), Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    // Classified first, so that only aggregates of tunnel packets for this
    // node count as `PassGso` (not, say, the slow path's re-injected inner
    // aggregates), and injected ones are dropped here already.
    let tunnel = classify_tc(ctx, cfg)?;
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        // A GRO aggregate of tunnel packets (UDP-tunnel GRO runs because
        // the slow-path device has a socket on the port): this kernel
        // cannot pop a UDP tunnel off a GSO skb from BPF (no
        // BPF_F_ADJ_ROOM_DECAP_L4_UDP). The device's socket decapsulates
        // it and the slow path delivers it.
        return Err(Reason::PassGso);
    }
    pop_tc(ctx, tunnel)?;
    match host_route::deliver(ctx, cfg)? {
        Some(verdict) => Ok((Reason::DeliveredDirect, verdict)),
        None => Ok((Reason::Decapsulated, TC_ACT_OK)),
    }
}

/// The IP-in-IP slow path: TC ingress of the agent's `weft.ipip` tap. This
/// kernel has no IP-in-IP handler, so the agent reads reassembled outer
/// fragments from a raw IPPROTO_IPIP socket and writes them, behind an
/// Ethernet header, into the tap. They are classified and decapsulated
/// exactly as on the fast path, then re-injected into `--iface`'s ingress.
/// The caller drops whatever this rejects, pass reasons included: passed
/// up from the tap, an IP-in-IP packet would reach the raw socket again.
pub fn try_slowpath_ipip_rx(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    let tunnel = classify_tc(ctx, cfg)?;
    if !matches!(tunnel, Tunnel::Ipip) {
        return Err(Reason::DropMalformedTunnel);
    }
    pop_tc(ctx, tunnel)?;
    // Whatever the agent wrote as the destination, the stack must take the
    // frame as addressed to `--iface` when it is re-injected there.
    ctx.skb
        .store(0, &cfg.iface_mac, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok(unsafe { bpf_redirect(cfg.iface_ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}

/// [`classify`] at TC, where the headers may first need pulling into the
/// linear window.
#[inline(always)]
fn classify_tc(ctx: &TcContext, cfg: &NodeConfig) -> Result<Tunnel, Reason> {
    if ctx.data() + CLASSIFY_LEN > ctx.data_end() && ctx.len() as usize >= CLASSIFY_LEN {
        // Headers may sit in paged data; pulling is harmless if it fails
        // (classify then sees a short window and passes the packet).
        let _ = ctx.skb.pull_data(CLASSIFY_LEN as u32);
    }
    classify(ctx, cfg, ctx.len() as usize)
}

/// Pops everything between the outer Ethernet header and the inner IPv4
/// header, and marks the packet as decapsulated. Every packet pointer is
/// stale afterwards.
#[inline(always)]
fn pop_tc(ctx: &TcContext, tunnel: Tunnel) -> Result<(), Reason> {
    ctx.skb
        .adjust_room(-(tunnel.encap_len() as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|rc| helper_failed(Reason::DropAdjustRoom, rc))?;
    mark::mark_tc(ctx);
    Ok(())
}

/// Which tunnel the packet is, when it is one for this node carrying a sane
/// IPv4 packet; otherwise the reason it is not ours (pass) or is broken or
/// forbidden (drop). `frame_len` is the whole frame's length, linear or not.
#[inline(always)]
fn classify(pkt: &impl PacketWindow, cfg: &NodeConfig, frame_len: usize) -> Result<Tunnel, Reason> {
    let eth = read_at::<EthHdr>(pkt, 0).ok_or(Reason::PassMalformed)?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return Err(Reason::PassNotIpv4);
    }
    let ip = read_at::<Ipv4Hdr>(pkt, OUTER_IP_OFF).ok_or(Reason::PassMalformed)?;
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    if ip.dst_addr != cfg.public_ip {
        return Err(Reason::PassNotTunnel);
    }
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IP_MF_OFFSET != 0 {
        return Err(outer_fragment(pkt, cfg, &ip, frags));
    }
    // Outer options: the stack parses those.
    if ip.vihl & 0x0f != 5 {
        return Err(Reason::PassNotTunnel);
    }
    let outer_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if ip.proto == IPPROTO_UDP && cfg.decap & DECAP_VXLAN != 0 {
        let udp = read_at::<UdpHdr>(pkt, UDP_OFF).ok_or(Reason::PassMalformed)?;
        if u16::from_ne_bytes(udp.dst) != cfg.vxlan_port_be {
            return Err(Reason::PassNotTunnel);
        }
        let vxlan =
            read_at::<[u8; VXLAN_HLEN]>(pkt, VXLAN_OFF).ok_or(Reason::DropMalformedTunnel)?;
        if vni_of(&vxlan) != Some(cfg.vni) {
            return Err(Reason::PassForeignVni);
        }
        accept(
            pkt,
            cfg,
            ip.src_addr,
            Inner::Ethernet(VXLAN_INNER_ETH_OFF),
            Some(outer_len),
            frame_len,
        )?;
        Ok(Tunnel::Vxlan)
    } else if ip.proto == IPPROTO_IPIP && cfg.decap & DECAP_IPIP != 0 {
        // IP-in-IP has no key or port: the source address is all that tells
        // a peer's packet from an injected one.
        accept(
            pkt,
            cfg,
            ip.src_addr,
            Inner::Ipv4(IPIP_INNER_IP_OFF),
            Some(outer_len),
            frame_len,
        )?;
        Ok(Tunnel::Ipip)
    } else {
        Err(Reason::PassNotTunnel)
    }
}

/// Where the inner packet starts.
#[derive(Clone, Copy)]
enum Inner {
    /// An inner Ethernet header at this offset (VXLAN), then IPv4.
    Ethernet(usize),
    /// The inner IPv4 header at this offset (IP-in-IP).
    Ipv4(usize),
}

/// The acceptance rules of every decapsulating path (XDP, TC ingress, the
/// slow path), in one place: the tunnel packet from `outer_src` must come
/// from a known node, carry IPv4, and pass [`check_inner`]. `outer_len` is
/// the outer IPv4 length the packet claims (`None` when the kernel already
/// removed the outer headers); `frame_len` the whole frame's length.
#[inline(always)]
fn accept(
    pkt: &impl PacketWindow,
    cfg: &NodeConfig,
    outer_src: [u8; 4],
    inner: Inner,
    outer_len: Option<usize>,
    frame_len: usize,
) -> Result<(), Reason> {
    if !is_known_node(outer_src) {
        return Err(Reason::DropUnknownSource);
    }
    let ip_off = match inner {
        Inner::Ethernet(off) => {
            let eth = read_at::<EthHdr>(pkt, off).ok_or(Reason::DropMalformedTunnel)?;
            if eth.ether_type != ETH_P_IP.to_be() {
                return Err(Reason::DropInnerNotIpv4);
            }
            off + ETH_HLEN
        }
        Inner::Ipv4(off) => off,
    };
    check_inner(pkt, cfg, outer_src, ip_off, outer_len, frame_len)
}

/// The counter for an outer IPv4 fragment addressed to this node: a piece
/// of a tunnel packet ([`Reason::PassOuterFragment`]), or something else
/// the stack owns. Only the first fragment holds the UDP header, so a later
/// UDP fragment counts as a tunnel fragment whatever its port. Either way
/// the packet passes: the stack reassembles it, and a reassembled VXLAN
/// packet reaches the slow-path device's socket. Reassembled IP-in-IP has
/// nowhere to go on a kernel without an ipip device (see README).
#[inline(always)]
fn outer_fragment(pkt: &impl PacketWindow, cfg: &NodeConfig, ip: &Ipv4Hdr, frags: u16) -> Reason {
    const IP_OFFSET: u16 = 0x1fff;
    let tunnel = if ip.proto == IPPROTO_UDP && cfg.decap & DECAP_VXLAN != 0 {
        // Options would move the UDP header; such a first fragment counts
        // as a tunnel fragment too.
        frags & IP_OFFSET != 0
            || ip.vihl & 0x0f != 5
            || read_at::<UdpHdr>(pkt, UDP_OFF)
                .is_none_or(|udp| u16::from_ne_bytes(udp.dst) == cfg.vxlan_port_be)
    } else {
        ip.proto == IPPROTO_IPIP && cfg.decap & DECAP_IPIP != 0
    };
    if tunnel {
        Reason::PassOuterFragment
    } else {
        Reason::PassNotTunnel
    }
}

/// The slow path: TC ingress of the agent's collect-metadata VXLAN device.
/// The kernel has already removed the outer headers (of a reassembled outer
/// packet, a GRO aggregate, or anything else its socket received) and left
/// them as tunnel metadata; the frame starts at the inner Ethernet header.
/// Accepted frames are addressed to `--iface` and re-injected into its
/// ingress, exactly where a fast-path decapsulated frame enters the stack;
/// everything else is dropped, because the device's own stack has no use
/// for it.
/// `Ok((reason, verdict))` as for [`try_decap_tc`], with
/// [`Reason::DecapsulatedSlowPath`] for the way up the stack.
pub fn try_slowpath_rx(ctx: &TcContext) -> Result<(Reason, i32), Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    // SAFETY: all-zero is a valid bpf_tunnel_key.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    // SAFETY: `key` is a writable parameter block on our stack and the size
    // passed is its size.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc != 0 {
        // No tunnel metadata: nothing the VXLAN receive path produced.
        return Err(Reason::DropMalformedTunnel);
    }
    // The device accepts every VNI (collect_metadata); the fast path passes
    // other VNIs to the stack, so this is where they end.
    if key.tunnel_id != cfg.vni {
        return Err(Reason::DropForeignVni);
    }
    // The socket listens on every local address; a peer only sends to the
    // PublicIP (the fast path passes anything else to the stack, which is
    // how it gets here). Behind 1:1 NAT the PublicIP is no local address
    // and peers' packets arrive for the private one, so the check is off.
    // SAFETY: the IPv4 member of the union, filled by the helper, in host
    // order like `remote_ipv4`.
    if public_ip_is_local()
        && unsafe { key.__bindgen_anon_3.local_ipv4 }.to_be_bytes() != cfg.public_ip
    {
        return Err(Reason::DropForeignOuterDestination);
    }
    // SAFETY: the IPv4 member of the union; the helper filled it (flags 0
    // means IPv4), in host byte order (net/core/filter.c).
    let outer_src = unsafe { key.__bindgen_anon_1.remote_ipv4 }.to_be_bytes();
    const PULL: usize = ETH_HLEN + IPV4_HLEN;
    if ctx.data() + PULL > ctx.data_end() && ctx.len() as usize >= PULL {
        // A reassembled packet's headers may sit in a fragment's page; a
        // failed pull shows up as a short window below.
        let _ = ctx.skb.pull_data(PULL as u32);
    }
    accept(
        ctx,
        cfg,
        outer_src,
        Inner::Ethernet(0),
        None,
        ctx.len() as usize,
    )?;
    // It carries the mark either way (a redirect within the namespace
    // keeps it).
    mark::mark_tc(ctx);
    if let Some(verdict) = host_route::deliver(ctx, cfg)? {
        return Ok((Reason::DeliveredDirect, verdict));
    }
    // As on the fast path: the frame must be addressed to `--iface` for the
    // stack to take it as PACKET_HOST when it is re-injected there.
    ctx.skb
        .store(0, &cfg.iface_mac, 0)
        .map_err(|rc| helper_failed(Reason::DropStoreBytes, rc))?;
    // SAFETY: plain helper call; the verdict it returns is ours.
    Ok((Reason::DecapsulatedSlowPath, unsafe {
        bpf_redirect(cfg.iface_ifindex, u64::from(BPF_F_INGRESS))
    } as i32))
}

/// Whether the PublicIP is an address of `--iface`, written into `.rodata`
/// by the agent's loader (1, the default) or not (0: 1:1 NAT).
#[unsafe(no_mangle)]
static PUBLIC_IP_IS_LOCAL: u32 = 1;

#[inline(always)]
fn public_ip_is_local() -> bool {
    // SAFETY: a read of a static. Volatile, so the compiler cannot fold the
    // value it sees here: the loader patches the real one in.
    unsafe { core::ptr::read_volatile(&PUBLIC_IP_IS_LOCAL) != 0 }
}

/// The inner IPv4 header at `off` must be sane, the outer one may not claim
/// more bytes than the frame holds, nor the inner more than the outer: a
/// truncated tunnel packet is dropped here, counted, rather than handed to
/// the stack as an inner packet it can only discard. Then its addresses must be ones the node at
/// `outer_src` could have sent (see the module's comment).
#[inline(always)]
fn check_inner(
    pkt: &impl PacketWindow,
    cfg: &NodeConfig,
    outer_src: [u8; 4],
    off: usize,
    outer_len: Option<usize>,
    frame_len: usize,
) -> Result<(), Reason> {
    let inner = read_at::<Ipv4Hdr>(pkt, off).ok_or(Reason::DropMalformedTunnel)?;
    let inner_len = usize::from(u16::from_be_bytes(inner.tot_len));
    // Within the outer packet, not merely the frame: an outer total length
    // short of the inner packet (0 included) is no packet a peer sends, and
    // what lies past it is Ethernet padding. Without outer headers (the
    // kernel removed them on the slow path) the frame is the bound.
    let limit = match outer_len {
        Some(len) if len + ETH_HLEN > frame_len => return Err(Reason::DropMalformedTunnel),
        Some(len) => len + ETH_HLEN,
        None => frame_len,
    };
    if inner.vihl >> 4 != 4
        || inner.vihl & 0x0f < 5
        || inner_len < usize::from(inner.vihl & 0x0f) * 4
        || inner_len + off > limit
    {
        return Err(Reason::DropMalformedTunnel);
    }
    // A container's address: the subnet's network and broadcast addresses
    // are in the prefix but reach only the host (as broadcasts).
    if !is_host_in(inner.dst_addr, cfg.local_subnet, cfg.local_prefix_len) {
        return Err(Reason::DropForeignInnerDestination);
    }
    if inner.src_addr != outer_src {
        match remote_for(inner.src_addr) {
            Some(node) if node.public_ip == outer_src => {}
            _ => return Err(Reason::DropSpoofedInnerSource),
        }
    }
    Ok(())
}
