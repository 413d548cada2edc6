//! VXLAN (RFC 7348) header construction and recognition.
//!
//! The encap program inserts [`ENCAP_LEN`] bytes right after the frame's
//! Ethernet header; [`build_headers`] produces exactly those bytes: outer IPv4,
//! UDP, VXLAN and the inner Ethernet header. The original Ethernet header in
//! front stays and becomes the outer one once its MACs are rewritten.

use crate::{
    checksum,
    headers::{
        ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, IPV4_VIHL_NO_OPTIONS, OUTER_TTL, UDP_HLEN,
        VXLAN_HLEN,
    },
};

/// Bytes inserted after the outer Ethernet header.
pub const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const _: () = assert!(ENCAP_LEN as u32 == weft_common::VXLAN_OVERHEAD);

/// The I flag of the VXLAN header: "VNI is valid" (RFC 7348 section 5).
pub const VXLAN_FLAG_I: u8 = 0x08;

/// Linux's default ephemeral port range (`net.ipv4.ip_local_port_range`),
/// which the kernel vxlan driver uses for source ports when none is set.
pub const SRC_PORT_MIN: u32 = 32768;
pub const SRC_PORT_MAX: u32 = 60999;

/// Everything that varies between encapsulated packets.
#[derive(Clone, Copy, Debug)]
pub struct VxlanParams {
    /// Outer source address (this node's PublicIP), network order.
    pub outer_src: [u8; 4],
    /// Outer destination (the remote PublicIP), network order.
    pub outer_dst: [u8; 4],
    /// Outer UDP source port, host order; see [`flow_src_port`].
    pub src_port: u16,
    /// Outer UDP destination port, network order.
    pub dst_port_be: u16,
    /// VXLAN network identifier (24 bits used).
    pub vni: u32,
    pub inner_dst_mac: [u8; 6],
    pub inner_src_mac: [u8; 6],
    /// Length of the inner IPv4 packet (the frame minus its Ethernet header).
    pub inner_l3_len: u32,
    /// Outer TOS byte; see [`outer_tos`].
    pub tos: u8,
    /// Outer flags/fragment field; see [`super::OUTER_FRAG_OFF`].
    pub frag_off: u16,
    /// Outer IP identification; see [`super::outer_ip_id`].
    pub ip_id: u16,
}

/// Builds the outer IPv4 + UDP + VXLAN + inner Ethernet headers.
///
/// The UDP checksum is 0, which RFC 7348 allows for IPv4 and the kernel
/// vxlan driver sends by default. Lengths are truncated to 16 bits: for GSO
/// super-packets the kernel rewrites them per segment anyway.
#[inline(always)]
pub fn build_headers(p: &VxlanParams) -> [u8; ENCAP_LEN] {
    let mut h = [0u8; ENCAP_LEN];
    let udp_len = p.inner_l3_len + (UDP_HLEN + VXLAN_HLEN + ETH_HLEN) as u32;
    let ip_len = udp_len + IPV4_HLEN as u32;

    // Outer IPv4.
    h[0] = IPV4_VIHL_NO_OPTIONS;
    h[1] = p.tos;
    h[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    h[4..6].copy_from_slice(&p.ip_id.to_be_bytes());
    h[6..8].copy_from_slice(&p.frag_off.to_be_bytes());
    h[8] = OUTER_TTL;
    h[9] = IPPROTO_UDP;
    h[12..16].copy_from_slice(&p.outer_src);
    h[16..20].copy_from_slice(&p.outer_dst);
    let mut ip = [0u8; IPV4_HLEN];
    ip.copy_from_slice(&h[..IPV4_HLEN]);
    h[10..12].copy_from_slice(&checksum::ipv4_header(&ip).to_be_bytes());

    // UDP.
    let u = IPV4_HLEN;
    h[u..u + 2].copy_from_slice(&p.src_port.to_be_bytes());
    h[u + 2..u + 4].copy_from_slice(&p.dst_port_be.to_ne_bytes());
    h[u + 4..u + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());

    // VXLAN: flags, 24 reserved bits, VNI, 8 reserved bits.
    let v = u + UDP_HLEN;
    h[v] = VXLAN_FLAG_I;
    let vni = (p.vni & 0x00ff_ffff).to_be_bytes();
    h[v + 4..v + 7].copy_from_slice(&vni[1..4]);

    // Inner Ethernet.
    let e = v + VXLAN_HLEN;
    h[e..e + 6].copy_from_slice(&p.inner_dst_mac);
    h[e + 6..e + 12].copy_from_slice(&p.inner_src_mac);
    h[e + 12..e + 14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h
}

/// Outer UDP source port from a flow hash, as the kernel's
/// `udp_flow_src_port()` computes it: scale the hash into the port range so
/// every packet of a flow takes the same underlay path (ECMP, RSS) while
/// different flows spread.
#[inline(always)]
pub fn flow_src_port(hash: u32) -> u16 {
    let span = u64::from(SRC_PORT_MAX - SRC_PORT_MIN);
    (((u64::from(hash) * span) >> 32) as u32 + SRC_PORT_MIN) as u16
}

/// Outer TOS from the inner one, like the kernel's `INET_ECN_encapsulate()`:
/// DSCP is not copied (flannel's vxlan device has `tos 0`), ECN is, except
/// that CE becomes ECT(0) so the outer header never claims congestion the
/// underlay did not see (RFC 6040 compatibility mode).
#[inline(always)]
pub fn outer_tos(inner_tos: u8) -> u8 {
    let ecn = inner_tos & 0x03;
    if ecn == 0x03 { 0x02 } else { ecn }
}

/// The VNI of a VXLAN header, or `None` when the I flag is clear (RFC 7348:
/// receivers must then not use the VNI).
#[inline(always)]
pub fn vni_of(hdr: &[u8; VXLAN_HLEN]) -> Option<u32> {
    if hdr[0] & VXLAN_FLAG_I == 0 {
        return None;
    }
    Some(u32::from_be_bytes([0, hdr[4], hdr[5], hdr[6]]))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::{checksum::ipv4_header_is_valid, headers::IP_DF};

    fn params() -> VxlanParams {
        VxlanParams {
            outer_src: [198, 18, 0, 1],
            outer_dst: [198, 18, 0, 2],
            src_port: 40000,
            dst_port_be: 8472u16.to_be(),
            vni: 1,
            inner_dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            inner_src_mac: [0x02, 0, 0, 0, 0, 0x01],
            inner_l3_len: 84,
            tos: 0,
            frag_off: IP_DF,
            ip_id: 0,
        }
    }

    #[test]
    fn headers_are_rfc7348_layout() {
        let h = build_headers(&params());
        // IPv4: total = 84 + 50.
        assert_eq!(&h[0..4], &[0x45, 0x00, 0x00, 134]);
        assert_eq!(&h[6..10], &[0x40, 0x00, 64, 17]);
        assert_eq!(&h[12..20], &[198, 18, 0, 1, 198, 18, 0, 2]);
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&h[..20]);
        assert!(ipv4_header_is_valid(&ip));
        // UDP: ports, length 84 + 30, checksum 0.
        assert_eq!(&h[20..28], &[0x9c, 0x40, 0x21, 0x18, 0x00, 114, 0, 0]);
        // VXLAN: I flag, VNI 1.
        assert_eq!(&h[28..36], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        // Inner Ethernet.
        assert_eq!(&h[36..42], &[0x02, 0, 0, 0, 0, 0x02]);
        assert_eq!(&h[42..48], &[0x02, 0, 0, 0, 0, 0x01]);
        assert_eq!(&h[48..50], &[0x08, 0x00]);
    }

    #[test]
    fn vni_is_24_bits_and_round_trips() {
        let mut p = params();
        p.vni = 0x00ab_cdef;
        let h = build_headers(&p);
        let mut v = [0u8; 8];
        v.copy_from_slice(&h[28..36]);
        assert_eq!(vni_of(&v), Some(0x00ab_cdef));
        v[0] = 0;
        assert_eq!(vni_of(&v), None);
    }

    #[test]
    fn src_port_stays_in_range_and_spreads() {
        assert_eq!(u32::from(flow_src_port(0)), SRC_PORT_MIN);
        assert!(u32::from(flow_src_port(u32::MAX)) < SRC_PORT_MAX);
        let distinct: std::collections::BTreeSet<u16> = (0..64u32)
            .map(|i| flow_src_port(i.wrapping_mul(0x9e37_79b9)))
            .collect();
        assert!(distinct.len() > 60);
    }

    #[test]
    fn ecn_inheritance() {
        assert_eq!(outer_tos(0xb8), 0x00); // DSCP EF is not copied.
        assert_eq!(outer_tos(0x01), 0x01);
        assert_eq!(outer_tos(0x03), 0x02); // CE -> ECT(0).
    }
}
