//! Header sizes and field values used on the wire.

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const VXLAN_HLEN: usize = 8;

pub const ETH_P_IP: u16 = 0x0800;
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
