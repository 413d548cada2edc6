//! Encapsulation header builders, one module per tunnel type, and the
//! policies both tunnels share: the outer IPv4 header's fragmentation fields
//! and what happens to a packet too big for the underlay once encapsulated.

use crate::headers::IP_DF;

pub mod ipip;
pub mod vxlan;

/// Outer flags/fragment field of every tunnel packet: DF clear, as flannel's
/// kernel vxlan device sends (its `df` setting defaults to unset). A hop on
/// a routed underlay with a smaller MTU than the nodes' then fragments the
/// outer packet instead of dropping it; with DF set its ICMP "fragmentation
/// needed" would go to this node's PublicIP, where no socket owns the flow,
/// so the inner sender would never learn the smaller MTU and the flow would
/// black-hole. The receiver reassembles (see the decap programs and the
/// slow path).
pub const OUTER_FRAG_OFF: u16 = 0;
const _: () = assert!(OUTER_FRAG_OFF & IP_DF == 0);

/// A random outer IP identification, from a fresh random number
/// (`bpf_get_prandom_u32`); both halves are folded in so neither half's
/// quality alone decides. It seeds [`next_outer_ip_id`].
#[inline(always)]
pub fn outer_ip_id(random: u32) -> u16 {
    (random ^ (random >> 16)) as u16
}

/// How many packets a packet of `len` bytes leaves as: its GSO segment
/// count, or, where a GSO packet does not carry one (packets from a tap or
/// a packet socket with a virtio-net header have `gso_size` but
/// `gso_segs` 0), an upper bound from its length. Skipping an ID costs
/// nothing; reusing one would.
#[inline(always)]
pub fn segments(gso_segs: u32, gso_size: u32, len: u32) -> u32 {
    if gso_segs == 0 && gso_size != 0 {
        len / gso_size + 1
    } else {
        gso_segs
    }
}

/// Set in a [`next_outer_ip_id`] state once it has been seeded.
const ID_SEEDED: u32 = 1 << 16;

/// Outer IP identification. With DF clear every outer packet may be
/// fragmented, so RFC 791 / RFC 6864 section 4.1 want an ID that does not
/// repeat between packets of the same source, destination and protocol
/// while fragments may live; a constant would let the receiver splice
/// fragments of different packets. The kernel keeps counters for that
/// (`ip_select_ident`); here each CPU keeps one, `state` (0 when new),
/// seeded at random so that CPUs and restarts start far apart. A GSO
/// super-packet takes `segs` consecutive IDs: the kernel writes this ID into
/// its first segment and increments it per segment (`inet_gso_segment`),
/// so random IDs per super-packet would let the ranges of two overlap.
/// Returns the ID and the new state.
#[inline(always)]
pub fn next_outer_ip_id(state: u32, segs: u32, random: u32) -> (u16, u32) {
    let id = if state & ID_SEEDED == 0 {
        outer_ip_id(random)
    } else {
        state as u16
    };
    // At least one ID (a packet without GSO has gso_segs 0); a count past
    // 65535 cannot occur (GSO tops out at 64 KiB) and would only wrap.
    let next = id.wrapping_add(segs.max(1) as u16);
    (id, ID_SEEDED | u32::from(next))
}

/// What to do with a packet bound for a tunnel peer, given its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeVerdict {
    /// It fits the underlay once encapsulated (or is a GSO super-packet,
    /// which the kernel segments to the inner MSS after the hook).
    Fits,
    /// Too big with DF set: answer ICMP "fragmentation needed" so the
    /// sender's path-MTU discovery converges.
    FragNeeded,
    /// Too big without DF, with a slow path present: the kernel fragments
    /// the outer packet (the VXLAN device, or for IP-in-IP the agent's raw
    /// socket).
    SlowPath,
    /// Too big without DF and no slow path to fragment it.
    Drop,
}

/// The size policy: `inner_l3_len` bytes of inner IPv4 plus `overhead`
/// against the underlay `mtu`. Senders that ignore the cluster route's MTU
/// (`IP_PMTUDISC_OMIT`, `IP_PMTUDISC_INTERFACE`, `IP_PMTUDISC_PROBE`) are the
/// ones that get here with a too-big packet.
#[inline(always)]
pub fn size_verdict(
    inner_l3_len: u32,
    overhead: u32,
    mtu: u32,
    gso: bool,
    inner_df: bool,
    slow_path: bool,
) -> SizeVerdict {
    if gso || inner_l3_len + overhead <= mtu {
        SizeVerdict::Fits
    } else if inner_df {
        SizeVerdict::FragNeeded
    } else if slow_path {
        SizeVerdict::SlowPath
    } else {
        SizeVerdict::Drop
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn outer_df_is_never_set() {
        assert_eq!(OUTER_FRAG_OFF & IP_DF, 0);
        assert_eq!(OUTER_FRAG_OFF, 0, "no MF or offset either: a whole packet");
    }

    #[test]
    fn outer_id_follows_the_random_input_in_both_halves() {
        assert_eq!(outer_ip_id(0x0000_1234), 0x1234);
        assert_eq!(outer_ip_id(0x1234_0000), 0x1234);
        assert_ne!(outer_ip_id(0x0001_0000), outer_ip_id(0x0002_0000));
        // A stream of random inputs gives (nearly) distinct IDs.
        let mut x: u32 = 0x9e37_79b9;
        let ids: std::collections::BTreeSet<u16> = (0..256)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                outer_ip_id(x)
            })
            .collect();
        assert!(ids.len() > 240, "only {} distinct IDs", ids.len());
    }

    #[test]
    fn outer_ids_are_consecutive_per_cpu_and_a_super_packet_takes_one_per_segment() {
        // A new CPU seeds from the random number.
        let (first, state) = next_outer_ip_id(0, 0, 0x0000_1234);
        assert_eq!(first, 0x1234);
        // The next packet follows; a 44-segment super-packet takes 44 IDs.
        let (second, state) = next_outer_ip_id(state, 1, 0xdead_beef);
        assert_eq!(second, 0x1235, "the seed is used once");
        let (third, state) = next_outer_ip_id(state, 44, 0);
        let (fourth, _) = next_outer_ip_id(state, 0, 0);
        assert_eq!((third, fourth), (0x1236, 0x1236 + 44));
        // It wraps, and stays seeded.
        let (last, state) = next_outer_ip_id(ID_SEEDED | 0xffff, 1, 7);
        assert_eq!((last, next_outer_ip_id(state, 1, 7).0), (0xffff, 0));
        // Segments of any mix of packets never share an ID until 65536
        // have been used.
        let mut used = std::collections::BTreeSet::new();
        let mut state = 0;
        let mut total = 0u32;
        let mut x: u32 = 0x9e37_79b9;
        while total < 60_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let segs = x % 45;
            let (id, next) = next_outer_ip_id(state, segs, x);
            state = next;
            for k in 0..segs.max(1) {
                assert!(
                    used.insert(id.wrapping_add(k as u16)),
                    "ID {id}+{k} repeated"
                );
            }
            total += segs.max(1);
        }
    }

    #[test]
    fn a_gso_packet_without_a_segment_count_is_counted_from_its_length() {
        assert_eq!(
            segments(0, 0, 1500),
            0,
            "no GSO: next_outer_ip_id takes one"
        );
        assert_eq!(segments(44, 1448, 64_000), 44);
        // 64,000 bytes in 1,448-byte segments: 45 at most (44.2).
        assert_eq!(segments(0, 1448, 64_000), 45);
    }

    #[test]
    fn size_policy() {
        use SizeVerdict::*;
        // 1450 + 50 fits a 1500 underlay exactly; one byte more does not.
        assert_eq!(size_verdict(1450, 50, 1500, false, true, true), Fits);
        assert_eq!(size_verdict(1451, 50, 1500, false, true, true), FragNeeded);
        assert_eq!(size_verdict(1500, 50, 1500, false, false, true), SlowPath);
        assert_eq!(size_verdict(1500, 50, 1500, false, false, false), Drop);
        assert_eq!(size_verdict(1500, 20, 1500, false, false, false), Drop);
        // GSO super-packets are segmented by the kernel afterwards.
        assert_eq!(size_verdict(64000, 50, 1500, true, false, false), Fits);
    }
}
