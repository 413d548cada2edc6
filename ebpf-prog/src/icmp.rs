//! ICMP "fragmentation needed" (RFC 792 type 3 code 4, with the next-hop MTU
//! of RFC 1191) for packets too big to encapsulate.

use crate::{
    checksum,
    headers::{IPV4_HLEN, IPV4_VIHL_NO_OPTIONS, OUTER_TTL},
};

/// What the error quotes: the offending IPv4 header (without options) and
/// the first 8 bytes of its payload (RFC 792), enough for TCP and UDP to
/// find their socket.
pub const QUOTE_LEN: usize = IPV4_HLEN + 8;
const ICMP_HLEN: usize = 8;
/// IPv4 + ICMP header + quote: what follows the Ethernet header.
pub const REPLY_LEN: usize = IPV4_HLEN + ICMP_HLEN + QUOTE_LEN;

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMP types that are errors (RFC 792): destination unreachable, source
/// quench, redirect, time exceeded, parameter problem.
const ICMP_ERROR_TYPES: [u8; 5] = [3, 4, 5, 11, 12];

/// Whether RFC 1122 section 3.2.2 allows an ICMP error in reply to the
/// packet whose first bytes (an IPv4 header without options, then 8 bytes of
/// payload) are `quote`. It does not for:
/// - an ICMP error message (errors about errors can loop);
/// - a fragment other than the first (only the first names the flow);
/// - a datagram to a multicast or the limited-broadcast address (one packet
///   would draw a storm of replies), or to class E space;
/// - a datagram whose source is not one host: 0.0.0.0/8, loopback,
///   multicast, class E, broadcast.
///
/// Subnet-directed broadcasts would need each subnet's prefix length, which
/// the programs do not keep; those packets only reach the encap program when
/// a container sends to a remote subnet's broadcast address, and the rate
/// limit bounds the replies.
#[inline(always)]
pub fn may_answer(quote: &[u8; QUOTE_LEN]) -> bool {
    let frag_offset = u16::from_be_bytes([quote[6], quote[7]]) & 0x1fff;
    let src = quote[12];
    let dst = quote[16];
    let is_icmp_error = quote[9] == IPPROTO_ICMP && ICMP_ERROR_TYPES.contains(&quote[IPV4_HLEN]);
    frag_offset == 0
        && !is_icmp_error
        // 224/4 multicast, 240/4 class E and 255.255.255.255.
        && dst < 224
        && src != 0
        && src != 127
        && src < 224
}

/// The IPv4 + ICMP part of a "fragmentation needed" reply to the packet
/// whose first bytes are `quote`. It comes from the packet's destination,
/// which lies behind the tunnel as far as the sender can tell; a source on
/// this host would be a martian when the reply re-enters at `--iface`.
#[inline(always)]
pub fn frag_needed(quote: &[u8; QUOTE_LEN], next_hop_mtu: u16) -> [u8; REPLY_LEN] {
    let mut r = [0u8; REPLY_LEN];
    r[0] = IPV4_VIHL_NO_OPTIONS;
    r[2..4].copy_from_slice(&(REPLY_LEN as u16).to_be_bytes());
    r[8] = OUTER_TTL;
    r[9] = IPPROTO_ICMP;
    r[12..16].copy_from_slice(&quote[16..20]);
    r[16..20].copy_from_slice(&quote[12..16]);
    let mut ip = [0u8; IPV4_HLEN];
    ip.copy_from_slice(&r[..IPV4_HLEN]);
    r[10..12].copy_from_slice(&checksum::ipv4_header(&ip).to_be_bytes());

    let i = IPV4_HLEN;
    r[i] = ICMP_DEST_UNREACH;
    r[i + 1] = ICMP_FRAG_NEEDED;
    r[i + 6..i + 8].copy_from_slice(&next_hop_mtu.to_be_bytes());
    r[i + ICMP_HLEN..].copy_from_slice(quote);
    let mut icmp = [0u8; ICMP_HLEN + QUOTE_LEN];
    icmp.copy_from_slice(&r[i..]);
    r[i + 2..i + 4].copy_from_slice(&checksum::internet(&icmp).to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::ipv4_header_is_valid;

    fn tcp_quote(src: [u8; 4], dst: [u8; 4]) -> [u8; QUOTE_LEN] {
        let mut q = [0u8; QUOTE_LEN];
        q[0] = 0x45;
        q[6] = 0x40;
        q[9] = 6;
        q[12..16].copy_from_slice(&src);
        q[16..20].copy_from_slice(&dst);
        q
    }

    #[test]
    fn rfc1122_forbidden_cases_are_not_answered() {
        let ok = tcp_quote([10, 244, 1, 2], [10, 244, 2, 7]);
        assert!(may_answer(&ok));

        let mut first_fragment = ok;
        first_fragment[6] = 0x20; // MF, offset 0
        assert!(
            may_answer(&first_fragment),
            "the first fragment is answered"
        );
        let mut later_fragment = ok;
        later_fragment[7] = 0xb9; // offset 185 * 8
        assert!(!may_answer(&later_fragment));

        for dst in [
            [224, 0, 0, 18],
            [239, 1, 2, 3],
            [255, 255, 255, 255],
            [240, 0, 0, 1],
        ] {
            assert!(!may_answer(&tcp_quote([10, 244, 1, 2], dst)), "{dst:?}");
        }
        for src in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 5],
            [255, 255, 255, 255],
        ] {
            assert!(!may_answer(&tcp_quote(src, [10, 244, 2, 7])), "{src:?}");
        }

        let mut icmp = ok;
        icmp[9] = IPPROTO_ICMP;
        for ty in ICMP_ERROR_TYPES {
            icmp[IPV4_HLEN] = ty;
            assert!(!may_answer(&icmp), "ICMP type {ty}");
        }
        icmp[IPV4_HLEN] = 8; // echo request: a query, answered
        assert!(may_answer(&icmp));
    }

    #[test]
    fn reply_swaps_addresses_quotes_and_checksums() {
        let mut quote = [0u8; QUOTE_LEN];
        quote[0] = 0x45;
        quote[9] = 6;
        quote[12..16].copy_from_slice(&[10, 244, 1, 2]);
        quote[16..20].copy_from_slice(&[10, 244, 2, 7]);
        quote[20..28].copy_from_slice(&[0x1f, 0x90, 0xc0, 0x01, 1, 2, 3, 4]);
        let r = frag_needed(&quote, 1450);
        let mut ip = [0u8; 20];
        ip.copy_from_slice(&r[..20]);
        assert!(ipv4_header_is_valid(&ip));
        assert_eq!(&r[12..20], &[10, 244, 2, 7, 10, 244, 1, 2]);
        assert_eq!(&r[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([r[26], r[27]]), 1450);
        assert_eq!(&r[28..], &quote);
        assert_eq!(checksum::internet(&r[20..]), 0, "ICMP checksum verifies");
    }
}
