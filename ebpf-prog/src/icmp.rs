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
