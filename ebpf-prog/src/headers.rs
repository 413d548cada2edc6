//! Header sizes and field values used on the wire.

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
/// Address family of `bpf_fib_lookup` and `bpf_redir_neigh` for IPv4.
pub const AF_INET: u8 = 2;
pub const IPPROTO_UDP: u8 = 17;

/// IPv4 flags/fragment-offset field: Don't Fragment.
pub const IP_DF: u16 = 0x4000;
/// IPv4 flags/fragment-offset field: More Fragments bit plus offset bits.
/// Non-zero under this mask means the packet is a fragment.
pub const IP_MF_OFFSET: u16 = 0x3fff;

/// TTL of outer headers; the kernel's default `ip_default_ttl`.
pub const OUTER_TTL: u8 = 64;

/// `version = 4, IHL = 5`: an IPv4 header without options.
pub const IPV4_VIHL_NO_OPTIONS: u8 = 0x45;

/// Whether `addr` lies in `net`/`prefix_len` (both network order). A prefix
/// length over 32 matches nothing.
#[inline(always)]
pub fn in_prefix(addr: [u8; 4], net: [u8; 4], prefix_len: u8) -> bool {
    if prefix_len > 32 {
        return false;
    }
    // `checked_shl` keeps a /0 (shift by 32) from overflowing.
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
}

/// Whether `addr` is a host address of `net`/`prefix_len`: inside it, and
/// neither its network nor its broadcast address, which address no
/// container (the stack takes both as broadcasts to the host itself). /31
/// and /32 have no such addresses (RFC 3021).
#[inline(always)]
pub fn is_host_in(addr: [u8; 4], net: [u8; 4], prefix_len: u8) -> bool {
    if !in_prefix(addr, net, prefix_len) {
        return false;
    }
    if prefix_len >= 31 {
        return true;
    }
    let host_mask = u32::MAX >> prefix_len;
    let host = u32::from_be_bytes(addr) & host_mask;
    host != 0 && host != host_mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_by_their_length() {
        assert!(in_prefix([10, 244, 1, 7], [10, 244, 1, 0], 24));
        assert!(!in_prefix([10, 244, 2, 7], [10, 244, 1, 0], 24));
        assert!(in_prefix([10, 244, 2, 7], [10, 244, 0, 0], 16));
        assert!(in_prefix([1, 2, 3, 4], [0, 0, 0, 0], 0));
        assert!(in_prefix([10, 244, 1, 7], [10, 244, 1, 7], 32));
        assert!(!in_prefix([10, 244, 1, 8], [10, 244, 1, 7], 32));
        assert!(!in_prefix([10, 244, 1, 7], [10, 244, 1, 7], 33));
    }

    #[test]
    fn host_addresses_exclude_network_and_broadcast() {
        assert!(is_host_in([10, 244, 1, 7], [10, 244, 1, 0], 24));
        assert!(is_host_in([10, 244, 1, 1], [10, 244, 1, 0], 24));
        assert!(is_host_in([10, 244, 1, 254], [10, 244, 1, 0], 24));
        assert!(!is_host_in([10, 244, 1, 0], [10, 244, 1, 0], 24));
        assert!(!is_host_in([10, 244, 1, 255], [10, 244, 1, 0], 24));
        assert!(!is_host_in([10, 244, 2, 7], [10, 244, 1, 0], 24));
        assert!(!is_host_in([10, 244, 1, 15], [10, 244, 1, 0], 28));
        assert!(is_host_in([10, 244, 1, 1], [10, 244, 1, 0], 31));
        assert!(is_host_in([10, 244, 1, 0], [10, 244, 1, 0], 31));
        assert!(is_host_in([10, 244, 1, 7], [10, 244, 1, 7], 32));
        assert!(!is_host_in([10, 244, 1, 7], [10, 244, 1, 7], 33));
    }
}
