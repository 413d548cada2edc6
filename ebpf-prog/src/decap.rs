//! VXLAN decapsulation, at XDP (preferred) or TC ingress (fallback).
//!
//! Only UDP to this node's PublicIP and the configured port, with the VXLAN I
//! flag and this node's VNI, is touched. Everything else passes unchanged.

use aya_ebpf::{
    bindings::{TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use ebpf_prog::{
    encap::vxlan::{ENCAP_LEN, vni_of},
    headers::{ETH_HLEN, ETH_P_IP, IP_MF_OFFSET, IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_HLEN},
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use weft_common::{NodeConfig, Reason};

use crate::{
    maps::node_config,
    packet::{PacketWindow, ptr_at_mut, read_at},
};

const UDP_OFF: usize = ETH_HLEN + IPV4_HLEN;
const VXLAN_OFF: usize = UDP_OFF + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
/// Bytes that must be in the linear window to classify a packet.
const CLASSIFY_LEN: usize = INNER_IP_OFF + IPV4_HLEN;

pub fn try_decap_xdp(ctx: &XdpContext) -> Result<u32, Reason> {
    let cfg = node_config().ok_or(Reason::PassNotConfigured)?;
    classify(ctx, cfg, ctx.data_end() - ctx.data())?;

    // SAFETY: plain helper call on this program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return Err(Reason::DropAdjustRoom);
    }
    // The inner frame's destination is the VtepMAC the sender looked up for
    // this node. Give it the interface's own MAC so the stack accepts it as
    // PACKET_HOST even when the published VtepMAC differs (RFC 7348 leaves the
    // inner MACs to the overlay).
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Reason::DropMalformedTunnel)?;
    // SAFETY: `eth` was re-derived after adjust_head and bounds-checked.
    unsafe { (*eth).dst_addr = cfg.iface_mac };
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
    classify(ctx, cfg, ctx.len() as usize)?;

    // Pops outer IPv4 + UDP + VXLAN + inner Ethernet right after the outer
    // Ethernet header, whose destination already is this host's MAC.
    ctx.skb
        .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Reason::DropAdjustRoom)?;
    Ok(TC_ACT_OK)
}

/// `Ok(())` when the packet is VXLAN for this node carrying a sane IPv4
/// packet; otherwise the reason it is not ours (pass) or is broken (drop).
/// `frame_len` is the whole frame's length, linear or not.
#[inline(always)]
fn classify(pkt: &impl PacketWindow, cfg: &NodeConfig, frame_len: usize) -> Result<(), Reason> {
    let eth = read_at::<EthHdr>(pkt, 0).ok_or(Reason::PassMalformed)?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return Err(Reason::PassNotIpv4);
    }
    let ip = read_at::<Ipv4Hdr>(pkt, ETH_HLEN).ok_or(Reason::PassMalformed)?;
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    if ip.proto != IPPROTO_UDP || ip.dst_addr != cfg.public_ip {
        return Err(Reason::PassNotTunnel);
    }
    // Outer options or fragments: the stack reassembles / parses those.
    if ip.vihl & 0x0f != 5 || u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return Err(Reason::PassNotTunnel);
    }
    let udp = read_at::<UdpHdr>(pkt, UDP_OFF).ok_or(Reason::PassMalformed)?;
    if u16::from_ne_bytes(udp.dst) != cfg.vxlan_port_be {
        return Err(Reason::PassNotTunnel);
    }
    let vxlan = read_at::<[u8; VXLAN_HLEN]>(pkt, VXLAN_OFF).ok_or(Reason::DropMalformedTunnel)?;
    if vni_of(&vxlan) != Some(cfg.vni) {
        return Err(Reason::PassForeignVni);
    }
    let inner_eth = read_at::<EthHdr>(pkt, INNER_ETH_OFF).ok_or(Reason::DropMalformedTunnel)?;
    if inner_eth.ether_type != ETH_P_IP.to_be() {
        return Err(Reason::DropInnerNotIpv4);
    }
    let inner_ip = read_at::<Ipv4Hdr>(pkt, INNER_IP_OFF).ok_or(Reason::DropMalformedTunnel)?;
    if inner_ip.vihl >> 4 != 4 || inner_ip.vihl & 0x0f < 5 {
        return Err(Reason::DropMalformedTunnel);
    }
    // A truncated tunnel packet would decapsulate into an inner packet
    // shorter than its own header claims: drop it here, counted, rather
    // than hand the stack a packet it can only discard.
    let outer_len = usize::from(u16::from_be_bytes(ip.tot_len));
    let inner_len = usize::from(u16::from_be_bytes(inner_ip.tot_len));
    if outer_len + ETH_HLEN > frame_len
        || inner_len + INNER_IP_OFF > frame_len
        || inner_len < usize::from(inner_ip.vihl & 0x0f) * 4
    {
        return Err(Reason::DropMalformedTunnel);
    }
    Ok(())
}
