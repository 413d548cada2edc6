//! Choosing this node's subnet, in the order flannel's etcd subnet manager
//! (`LocalManager.tryAcquireLease`) uses: our own existing lease, then the subnet recorded in
//! the previous subnet.env, then a random free one.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use thiserror::Error;
use tracing::info;

use super::config::NetworkConfig;
use super::lease::LeaseAttrs;

/// flannel only collects the first 100 free subnets and picks randomly among those, which
/// bounds the scan on huge networks while still spreading concurrent joiners apart.
pub const MAX_RANDOM_CANDIDATES: usize = 100;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocError {
    #[error(
        "no free /{subnet_len} subnet left in Network {network} between SubnetMin {subnet_min} and SubnetMax {subnet_max} ({leases} leases held)"
    )]
    Exhausted {
        network: Ipv4Net,
        subnet_len: u8,
        subnet_min: Ipv4Addr,
        subnet_max: Ipv4Addr,
        leases: usize,
    },
}

/// Which subnet to lease and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A lease with our public IP already exists and still fits the config: renew it.
    OwnLease(Ipv4Net),
    /// Nobody holds the subnet from our previous subnet.env: take it back so running pods
    /// keep their addresses.
    FromSubnetFile(Ipv4Net),
    /// A newly picked free subnet.
    Fresh(Ipv4Net),
}

impl Reuse {
    pub fn subnet(&self) -> Ipv4Net {
        match *self {
            Reuse::OwnLease(subnet) | Reuse::FromSubnetFile(subnet) | Reuse::Fresh(subnet) => {
                subnet
            }
        }
    }
}

/// Whether two networks share any address (host bits are ignored).
pub fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    let (a, b) = (a.trunc(), b.trunc());
    a.contains(&b.network()) || b.contains(&a.network())
}

/// flannel's `isSubnetConfigCompat`: a subnet this config could hand out (right length, a
/// network address, between SubnetMin and SubnetMax, inside Network).
pub fn is_valid_candidate(cfg: &NetworkConfig, subnet: Ipv4Net) -> bool {
    subnet.prefix_len() == cfg.subnet_len
        && subnet.addr() == subnet.network()
        && (cfg.subnet_min..=cfg.subnet_max).contains(&subnet.addr())
        && cfg.network.contains(&subnet)
}

/// Every subnet the config may lease, from `subnet_min` to `subnet_max` inclusive.
pub fn candidates(cfg: &NetworkConfig) -> impl Iterator<Item = Ipv4Net> + use<> {
    let size = u64::from(cfg.subnet_size()).max(1);
    let start = align_up(u64::from(u32::from(cfg.subnet_min)), size);
    let end = u64::from(u32::from(cfg.subnet_max));
    let len = cfg.subnet_len;
    // Stepping by usize: the step is at most 2^32, which fits on the 64-bit targets weft runs on.
    let step = usize::try_from(size).unwrap_or(usize::MAX);
    (start..=end)
        .step_by(step)
        .filter_map(move |addr| Ipv4Net::new(to_addr(addr)?, len).ok())
}

/// Picks this node's subnet; see [`Reuse`] for the order. `leases` is every lease currently
/// in etcd (ours included). `seed` stands in for flannel's random choice among free subnets
/// so callers can be deterministic in tests; pass a random value in production.
///
/// Any lease counts as taken, including an own lease that no longer fits the config: flannel
/// deletes such a lease but still avoids its range during that attempt, and the caller is
/// expected to delete it too (every own lease other than the returned `OwnLease`). So do the
/// subnets of `unusable` keys (a value that cannot be read, a dual-stack key with a bad IPv6
/// half): whoever wrote them may be using the subnet.
pub fn choose_subnet(
    cfg: &NetworkConfig,
    leases: &[(Ipv4Net, LeaseAttrs)],
    unusable: &[Ipv4Net],
    my_public_ip: Ipv4Addr,
    subnet_file: Option<Ipv4Net>,
    seed: u64,
) -> Result<Reuse, AllocError> {
    let mut own = leases
        .iter()
        .filter(|(_, lease)| lease.public_ip == my_public_ip)
        .map(|(subnet, _)| *subnet);
    if let Some(subnet) = own.clone().find(|subnet| is_valid_candidate(cfg, *subnet)) {
        return Ok(Reuse::OwnLease(subnet));
    }
    if let Some(stale) = own.next() {
        info!(%stale, public_ip = %my_public_ip, "own lease does not fit the network config; not reusing it");
    }

    let taken = merged_ranges(
        leases
            .iter()
            .map(|(subnet, _)| *subnet)
            .chain(unusable.iter().copied()),
    );

    if let Some(subnet) = subnet_file {
        if !is_valid_candidate(cfg, subnet) {
            info!(%subnet, "subnet from the subnet file does not fit the network config; ignoring it");
        } else if range_taken(&taken, range_of(subnet)) {
            info!(%subnet, "subnet from the subnet file is leased by another node; ignoring it");
        } else {
            return Ok(Reuse::FromSubnetFile(subnet));
        }
    }

    let free = free_candidates(cfg, &taken);
    let count = u64::try_from(free.len()).unwrap_or(u64::MAX);
    let index = seed
        .checked_rem(count)
        .and_then(|i| usize::try_from(i).ok());
    match index.and_then(|i| free.get(i)) {
        Some(subnet) => Ok(Reuse::Fresh(*subnet)),
        None => Err(AllocError::Exhausted {
            network: cfg.network,
            subnet_len: cfg.subnet_len,
            subnet_min: cfg.subnet_min,
            subnet_max: cfg.subnet_max,
            leases: leases.len(),
        }),
    }
}

/// Inclusive address range of a network, widened to u64 so `end + 1` cannot overflow.
fn range_of(subnet: Ipv4Net) -> (u64, u64) {
    (
        u64::from(u32::from(subnet.network())),
        u64::from(u32::from(subnet.broadcast())),
    )
}

/// Sorted, disjoint ranges covered by `subnets`, so a lookup is a binary search rather than a
/// scan of every lease for every candidate (a /8 with /24s can hold 65k leases).
fn merged_ranges(subnets: impl Iterator<Item = Ipv4Net>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = subnets.map(range_of).collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 + 1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// The first merged range ending at or after `start`, if it begins at or before `end`.
fn first_overlap(taken: &[(u64, u64)], (start, end): (u64, u64)) -> Option<(u64, u64)> {
    let i = taken.partition_point(|&(_, taken_end)| taken_end < start);
    taken
        .get(i)
        .copied()
        .filter(|&(taken_start, _)| taken_start <= end)
}

fn range_taken(taken: &[(u64, u64)], range: (u64, u64)) -> bool {
    first_overlap(taken, range).is_some()
}

/// The first [`MAX_RANDOM_CANDIDATES`] free candidates in address order, jumping over taken
/// ranges instead of testing every subnet inside them.
fn free_candidates(cfg: &NetworkConfig, taken: &[(u64, u64)]) -> Vec<Ipv4Net> {
    let size = u64::from(cfg.subnet_size()).max(1);
    let max = u64::from(u32::from(cfg.subnet_max));
    let mut pos = align_up(u64::from(u32::from(cfg.subnet_min)), size);
    let mut free = Vec::new();
    while pos <= max && free.len() < MAX_RANDOM_CANDIDATES {
        match first_overlap(taken, (pos, pos + size - 1)) {
            Some((_, taken_end)) => pos = align_up(taken_end + 1, size),
            None => {
                if let Some(subnet) =
                    to_addr(pos).and_then(|a| Ipv4Net::new(a, cfg.subnet_len).ok())
                {
                    free.push(subnet);
                }
                pos += size;
            }
        }
    }
    free
}

fn align_up(value: u64, size: u64) -> u64 {
    value.div_ceil(size) * size
}

fn to_addr(value: u64) -> Option<Ipv4Addr> {
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use crate::flannel::config::Backend;
    use crate::flannel::lease::VxlanLeaseData;

    const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn cfg(json: &str) -> NetworkConfig {
        NetworkConfig::parse(json).unwrap()
    }

    /// 10.244.0.0/16 with SubnetMin .1.0 and SubnetMax .4.0: candidates .1, .2, .3, .4.
    fn small() -> NetworkConfig {
        cfg(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.4.0","Backend":{"Type":"vxlan"}}"#,
        )
    }

    fn lease(subnet: &str, ip: Ipv4Addr) -> (Ipv4Net, LeaseAttrs) {
        (
            net(subnet),
            LeaseAttrs {
                public_ip: ip,
                backend_type: "vxlan".into(),
                backend_data: Some(VxlanLeaseData {
                    vni: Some(1),
                    vtep_mac: [2, 0, 0, 0, 0, 1],
                }),
            },
        )
    }

    #[test]
    fn dual_stack_leases_take_their_ipv4_subnet() {
        // Three of the four candidates leased by dual-stack flannel nodes, as listed from etcd:
        // only the fourth may be chosen, whatever the seed.
        let keys = crate::flannel::KeyLayout::default();
        let value = r#"{"PublicIP":"198.18.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#;
        let leases: Vec<(Ipv4Net, LeaseAttrs)> = [
            "10.244.1.0-24&fd00:0:0:1::-64",
            "10.244.2.0-24&fd00:0:0:2::-64",
            "10.244.4.0-24&fd00:0:0:4::-64",
        ]
        .iter()
        .map(|name| {
            let key = format!("{}{name}", keys.subnets_prefix());
            (
                keys.parse_subnet_key(&key).unwrap(),
                LeaseAttrs::parse(value).unwrap(),
            )
        })
        .collect();
        for seed in 0..16 {
            assert_eq!(
                choose_subnet(&small(), &leases, &[], ME, None, seed).unwrap(),
                Reuse::Fresh(net("10.244.3.0/24"))
            );
        }
        // Nor is a subnet file naming one of them reused.
        assert_eq!(
            choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.2.0/24")), 0).unwrap(),
            Reuse::Fresh(net("10.244.3.0/24"))
        );
    }

    #[test]
    fn overlap_rules() {
        assert!(overlaps(net("10.244.0.0/16"), net("10.244.5.0/24")));
        assert!(overlaps(net("10.244.5.0/24"), net("10.244.0.0/16")));
        assert!(overlaps(net("10.244.5.0/24"), net("10.244.5.0/24")));
        assert!(overlaps(net("10.244.5.128/25"), net("10.244.5.0/24")));
        assert!(!overlaps(net("10.244.5.0/24"), net("10.244.6.0/24")));
        assert!(!overlaps(net("10.244.4.0/24"), net("10.244.5.0/25")));
        // Host bits are ignored.
        assert!(overlaps(net("10.244.5.77/24"), net("10.244.5.200/30")));
        assert!(overlaps(net("0.0.0.0/0"), net("255.255.255.255/32")));
    }

    #[test]
    fn candidates_honour_min_max() {
        let all: Vec<_> = candidates(&small()).collect();
        assert_eq!(
            all,
            vec![
                net("10.244.1.0/24"),
                net("10.244.2.0/24"),
                net("10.244.3.0/24"),
                net("10.244.4.0/24")
            ]
        );
        let c28 = cfg(r#"{"Network":"10.0.0.0/28","Backend":{"Type":"vxlan"}}"#);
        let all: Vec<_> = candidates(&c28).collect();
        assert_eq!(
            all,
            vec![net("10.0.0.4/30"), net("10.0.0.8/30"), net("10.0.0.12/30")]
        );
        let whole = cfg(r#"{"Network":"0.0.0.0/0","SubnetLen":2,"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(candidates(&whole).last(), Some(net("192.0.0.0/2")));
        assert_eq!(candidates(&whole).count(), 3);
        let default = cfg(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert_eq!(candidates(&default).count(), 255);
        assert_eq!(candidates(&default).next(), Some(net("10.244.1.0/24")));
    }

    #[test]
    fn valid_candidate_checks() {
        let c = small();
        assert!(is_valid_candidate(&c, net("10.244.1.0/24")));
        assert!(is_valid_candidate(&c, net("10.244.4.0/24")));
        assert!(!is_valid_candidate(&c, net("10.244.0.0/24")));
        assert!(!is_valid_candidate(&c, net("10.244.5.0/24")));
        assert!(!is_valid_candidate(&c, net("10.244.2.0/25")));
        assert!(!is_valid_candidate(&c, net("10.244.2.1/24")));
    }

    #[test]
    fn own_lease_beats_subnet_file_and_fresh() {
        let leases = [lease("10.244.2.0/24", OTHER), lease("10.244.3.0/24", ME)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.4.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::OwnLease(net("10.244.3.0/24")));
        assert_eq!(got.subnet(), net("10.244.3.0/24"));
    }

    #[test]
    fn incompatible_own_lease_is_skipped_and_still_avoided() {
        // Our old lease is outside SubnetMin..SubnetMax: not reused, and a wrong-length one is
        // skipped in favour of a later compatible one.
        let leases = [lease("10.244.9.0/24", ME), lease("10.244.1.0/24", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.4.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::FromSubnetFile(net("10.244.4.0/24")));

        let leases = [lease("10.244.2.0/25", ME), lease("10.244.3.0/24", ME)];
        let got = choose_subnet(&small(), &leases, &[], ME, None, 0).unwrap();
        assert_eq!(got, Reuse::OwnLease(net("10.244.3.0/24")));

        // An own /25 that no longer fits still blocks the /24 around it.
        let leases = [lease("10.244.1.0/25", ME)];
        let got = choose_subnet(&small(), &leases, &[], ME, None, 0).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.2.0/24")));
    }

    #[test]
    fn subnet_file_beats_fresh() {
        let leases = [lease("10.244.1.0/24", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.3.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::FromSubnetFile(net("10.244.3.0/24")));
    }

    #[test]
    fn subnet_file_taken_or_invalid_falls_back_to_fresh() {
        // Leased by someone else.
        let leases = [lease("10.244.3.0/24", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.3.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.1.0/24")));
        // Overlapped by someone else's lease of a different length.
        let leases = [lease("10.244.3.128/25", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.3.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.1.0/24")));
        let leases = [lease("10.244.0.0/22", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.3.0/24")), 0).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.4.0/24")));
        // Outside SubnetMin..SubnetMax, or the wrong length.
        for file in ["10.244.9.0/24", "10.244.0.0/24", "10.244.3.0/25"] {
            let got = choose_subnet(&small(), &[], &[], ME, Some(net(file)), 0).unwrap();
            assert_eq!(got, Reuse::Fresh(net("10.244.1.0/24")), "{file}");
        }
    }

    #[test]
    fn fresh_pick_is_seeded_among_free_subnets() {
        let leases = [lease("10.244.2.0/24", OTHER)];
        let free = [
            net("10.244.1.0/24"),
            net("10.244.3.0/24"),
            net("10.244.4.0/24"),
        ];
        for seed in 0..9u64 {
            let got = choose_subnet(&small(), &leases, &[], ME, None, seed).unwrap();
            let expected = free[usize::try_from(seed % 3).unwrap()];
            assert_eq!(got, Reuse::Fresh(expected), "seed {seed}");
        }
        assert_eq!(
            choose_subnet(&small(), &leases, &[], ME, None, u64::MAX).unwrap(),
            Reuse::Fresh(free[usize::try_from(u64::MAX % 3).unwrap()])
        );
    }

    #[test]
    fn overlapping_lease_of_other_length_counts_as_taken() {
        let leases = [
            lease("10.244.1.64/26", OTHER),
            lease("10.244.2.0/23", OTHER),
            lease("10.244.0.0/28", OTHER),
        ];
        let got = choose_subnet(&small(), &leases, &[], ME, None, 0).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.4.0/24")));
        // A lease outside the range does not matter.
        let leases = [lease("10.245.0.0/16", OTHER)];
        let got = choose_subnet(&small(), &leases, &[], ME, None, 3).unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.4.0/24")));
    }

    #[test]
    fn exhaustion() {
        let leases = [
            lease("10.244.1.0/24", OTHER),
            lease("10.244.2.0/24", Ipv4Addr::new(198, 18, 0, 3)),
            lease("10.244.3.0/24", Ipv4Addr::new(198, 18, 0, 4)),
            lease("10.244.4.0/24", Ipv4Addr::new(198, 18, 0, 5)),
        ];
        let e =
            choose_subnet(&small(), &leases, &[], ME, Some(net("10.244.2.0/24")), 7).unwrap_err();
        assert_eq!(
            e,
            AllocError::Exhausted {
                network: net("10.244.0.0/16"),
                subnet_len: 24,
                subnet_min: Ipv4Addr::new(10, 244, 1, 0),
                subnet_max: Ipv4Addr::new(10, 244, 4, 0),
                leases: 4,
            }
        );
        assert_eq!(
            e.to_string(),
            "no free /24 subnet left in Network 10.244.0.0/16 between SubnetMin 10.244.1.0 and SubnetMax 10.244.4.0 (4 leases held)"
        );
        // One big lease covering the whole range exhausts it too.
        let leases = [lease("10.244.0.0/16", OTHER)];
        assert!(choose_subnet(&small(), &leases, &[], ME, None, 0).is_err());
    }

    #[test]
    fn unusable_keys_keep_their_subnets_taken() {
        // 10.244.2.0/24 and 10.244.3.0/24 are held by keys whose values cannot be read: neither
        // the subnet file nor any seed may hand them out.
        let leases = [lease("10.244.1.0/24", OTHER)];
        let unusable = [net("10.244.2.0/24"), net("10.244.3.0/24")];
        let got = choose_subnet(
            &small(),
            &leases,
            &unusable,
            ME,
            Some(net("10.244.2.0/24")),
            0,
        )
        .unwrap();
        assert_eq!(got, Reuse::Fresh(net("10.244.4.0/24")));
        for seed in 0..16 {
            let got = choose_subnet(&small(), &leases, &unusable, ME, None, seed).unwrap();
            assert_eq!(got, Reuse::Fresh(net("10.244.4.0/24")), "seed {seed}");
        }
        let all = [unusable[0], unusable[1], net("10.244.4.0/24")];
        assert!(choose_subnet(&small(), &leases, &all, ME, None, 0).is_err());
    }

    #[test]
    fn random_choice_is_limited_to_first_hundred_free() {
        let c = cfg(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}"#);
        assert_eq!(c.backend, Backend::HostGw);
        // 10.0.1.0 .. 10.0.100.0 are the first 100 free; seed 100 wraps to index 0.
        assert_eq!(
            choose_subnet(&c, &[], &[], ME, None, 99).unwrap(),
            Reuse::Fresh(net("10.0.100.0/24"))
        );
        assert_eq!(
            choose_subnet(&c, &[], &[], ME, None, 100).unwrap(),
            Reuse::Fresh(net("10.0.1.0/24"))
        );
        // Taken ranges are skipped over, including a huge one.
        let leases = [lease("10.0.0.0/9", OTHER), lease("10.128.0.0/24", OTHER)];
        assert_eq!(
            choose_subnet(&c, &leases, &[], ME, None, 0).unwrap(),
            Reuse::Fresh(net("10.128.1.0/24"))
        );
    }

    #[test]
    fn many_leases_scale() {
        // A full /8 of /24s minus one: must finish quickly and find the single hole.
        let c = cfg(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#);
        let hole = net("10.200.7.0/24");
        let leases: Vec<_> = candidates(&c)
            .filter(|subnet| *subnet != hole)
            .map(|subnet| (subnet, lease("10.0.0.0/32", OTHER).1))
            .collect();
        assert_eq!(leases.len(), 65_534);
        assert_eq!(
            choose_subnet(&c, &leases, &[], ME, None, 12345).unwrap(),
            Reuse::Fresh(hole)
        );
    }
}
