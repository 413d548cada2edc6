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

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::bpf_xdp_adjust_head,
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
    maps::{is_known_node, node_config, remote_for},
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
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, tunnel.encap_len() as i32) } != 0 {
        return Err(Reason::DropAdjustRoom);
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

pub fn try_decap_tc(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    // SAFETY: reading a field of the context the kernel handed us.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        // A GRO aggregate of tunnel packets: this kernel cannot pop a UDP
        // tunnel off a GSO skb from BPF (no BPF_F_ADJ_ROOM_DECAP_L4_UDP).
        return Err(Reason::PassGso);
    }
    if ctx.data() + CLASSIFY_LEN > ctx.data_end() && ctx.len() as usize >= CLASSIFY_LEN {
        // Headers may sit in paged data; pulling is harmless if it fails
        // (classify then sees a short window and passes the packet).
        let _ = ctx.skb.pull_data(CLASSIFY_LEN as u32);
    }
    let tunnel = classify(ctx, cfg, ctx.len() as usize)?;

    // Pops everything between the outer Ethernet header, whose destination
    // already is this host's MAC, and the inner IPv4 header.
    ctx.skb
        .adjust_room(-(tunnel.encap_len() as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Reason::DropAdjustRoom)?;
    mark::mark_tc(ctx);
    Ok(TC_ACT_OK)
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
    // Outer options or fragments: the stack reassembles / parses those.
    if ip.vihl & 0x0f != 5 || u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
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
        if !is_known_node(ip.src_addr) {
            return Err(Reason::DropUnknownSource);
        }
        let inner_eth =
            read_at::<EthHdr>(pkt, VXLAN_INNER_ETH_OFF).ok_or(Reason::DropMalformedTunnel)?;
        if inner_eth.ether_type != ETH_P_IP.to_be() {
            return Err(Reason::DropInnerNotIpv4);
        }
        check_inner(
            pkt,
            cfg,
            ip.src_addr,
            VXLAN_INNER_IP_OFF,
            outer_len,
            frame_len,
        )?;
        Ok(Tunnel::Vxlan)
    } else if ip.proto == IPPROTO_IPIP && cfg.decap & DECAP_IPIP != 0 {
        // IP-in-IP has no key or port: the source address is all that tells
        // a peer's packet from an injected one.
        if !is_known_node(ip.src_addr) {
            return Err(Reason::DropUnknownSource);
        }
        check_inner(
            pkt,
            cfg,
            ip.src_addr,
            IPIP_INNER_IP_OFF,
            outer_len,
            frame_len,
        )?;
        Ok(Tunnel::Ipip)
    } else {
        Err(Reason::PassNotTunnel)
    }
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
    outer_len: usize,
    frame_len: usize,
) -> Result<(), Reason> {
    let inner = read_at::<Ipv4Hdr>(pkt, off).ok_or(Reason::DropMalformedTunnel)?;
    let inner_len = usize::from(u16::from_be_bytes(inner.tot_len));
    if inner.vihl >> 4 != 4
        || inner.vihl & 0x0f < 5
        || inner_len < usize::from(inner.vihl & 0x0f) * 4
        || outer_len + ETH_HLEN > frame_len
        // Within the outer packet, not merely the frame: an outer total
        // length short of the inner packet (0 included) is no packet a
        // peer sends, and what lies past it is Ethernet padding.
        || inner_len + off > outer_len + ETH_HLEN
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
