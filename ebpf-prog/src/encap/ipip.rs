//! IP-in-IP (RFC 2003) header construction.
//!
//! The encap program inserts [`ENCAP_LEN`] bytes between the frame's Ethernet
//! header and its IPv4 header; [`build_header`] produces them.

use crate::{
    checksum,
    headers::{IPV4_HLEN, IPV4_VIHL_NO_OPTIONS, OUTER_TTL},
};

/// Bytes inserted after the Ethernet header: one IPv4 header.
pub const ENCAP_LEN: usize = IPV4_HLEN;
const _: () = assert!(ENCAP_LEN as u32 == weft_common::IPIP_OVERHEAD);

/// IP protocol number of IPv4-in-IPv4 (RFC 2003 section 3.1).
pub const IPPROTO_IPIP: u8 = 4;

/// Everything that varies between encapsulated packets.
#[derive(Clone, Copy, Debug)]
pub struct IpipParams {
    /// This node's PublicIP, network order.
    pub outer_src: [u8; 4],
    /// The remote PublicIP, network order.
    pub outer_dst: [u8; 4],
    /// Length of the inner IPv4 packet.
    pub inner_l3_len: u32,
    /// Outer TOS; see [`super::vxlan::outer_tos`], the same rule applies.
    pub tos: u8,
    /// Outer flags/fragment field; see [`super::OUTER_FRAG_OFF`].
    pub frag_off: u16,
    /// Outer IP identification; see [`super::outer_ip_id`].
    pub ip_id: u16,
}

/// Builds the outer IPv4 header. Its length is truncated to 16 bits: GSO
/// super-packets get theirs rewritten per segment by the kernel.
#[inline(always)]
pub fn build_header(p: &IpipParams) -> [u8; ENCAP_LEN] {
    let mut h = [0u8; ENCAP_LEN];
    h[0] = IPV4_VIHL_NO_OPTIONS;
    h[1] = p.tos;
    h[2..4].copy_from_slice(&((p.inner_l3_len + IPV4_HLEN as u32) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&p.ip_id.to_be_bytes());
    h[6..8].copy_from_slice(&p.frag_off.to_be_bytes());
    h[8] = OUTER_TTL;
    h[9] = IPPROTO_IPIP;
    h[12..16].copy_from_slice(&p.outer_src);
    h[16..20].copy_from_slice(&p.outer_dst);
    let csum = checksum::ipv4_header(&h);
    h[10..12].copy_from_slice(&csum.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{checksum::ipv4_header_is_valid, headers::IP_DF};

    #[test]
    fn header_is_rfc2003() {
        let h = build_header(&IpipParams {
            outer_src: [198, 18, 0, 1],
            outer_dst: [198, 18, 0, 2],
            inner_l3_len: 84,
            tos: 0x02,
            frag_off: IP_DF,
            ip_id: 0,
        });
        assert_eq!(&h[0..4], &[0x45, 0x02, 0x00, 104]);
        assert_eq!(&h[6..10], &[0x40, 0x00, 64, 4]);
        assert_eq!(&h[12..20], &[198, 18, 0, 1, 198, 18, 0, 2]);
        assert!(ipv4_header_is_valid(&h));
    }
}
