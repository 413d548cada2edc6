//! The remote-node table: etcd leases of other nodes, validated, mirrored into
//! the `SUBNETS` LPM trie.
//!
//! Every write to the BPF map goes through [`PeerTable`], which refuses what
//! would make the data path wrong: subnets outside the Network, overlapping
//! this node's subnet or another node's, leases of another backend. A refused
//! lease is reported and skipped; every other lease keeps forwarding.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{LpmTrie, MapData, MapError, lpm_trie::Key};
use ipnet::Ipv4Net;
use weft_common::{Mode, RemoteNode};

use crate::flannel::{LeaseAttrs, NetworkConfig, subnet::overlaps};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("lease {subnet}: outside the network {network}")]
    OutsideNetwork { subnet: Ipv4Net, network: Ipv4Net },
    #[error("lease {subnet}: overlaps this node's subnet {local}")]
    OverlapsLocal { subnet: Ipv4Net, local: Ipv4Net },
    #[error("lease {subnet}: overlaps {other}, leased by another node")]
    OverlapsPeer { subnet: Ipv4Net, other: Ipv4Net },
    #[error("lease {subnet}: PublicIP {public_ip} is this node's own address")]
    OwnAddress {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
    },
    #[error("lease {subnet}: backend {got:?}, but the network uses {want:?}")]
    Backend {
        subnet: Ipv4Net,
        got: String,
        want: &'static str,
    },
    #[error("lease {subnet}: vxlan lease without BackendData.VtepMAC")]
    MissingVtep { subnet: Ipv4Net },
    #[error("lease {subnet}: VNI {got} differs from the network's VNI {want}")]
    Vni {
        subnet: Ipv4Net,
        got: u32,
        want: u32,
    },
    #[error("lease {subnet}: BPF map update failed: {message}")]
    Map { subnet: Ipv4Net, message: String },
}

/// The subset of map operations the table needs; the BPF map in production,
/// a `BTreeMap` in unit tests.
pub trait SubnetMap {
    fn put(&mut self, subnet: Ipv4Net, node: &RemoteNode) -> Result<(), MapError>;
    fn delete(&mut self, subnet: Ipv4Net) -> Result<(), MapError>;
    fn subnets(&self) -> Result<Vec<Ipv4Net>, MapError>;
}

impl SubnetMap for LpmTrie<MapData, [u8; 4], RemoteNode> {
    fn put(&mut self, subnet: Ipv4Net, node: &RemoteNode) -> Result<(), MapError> {
        self.insert(&key(subnet), node, 0)
    }

    fn delete(&mut self, subnet: Ipv4Net) -> Result<(), MapError> {
        match self.remove(&key(subnet)) {
            Err(MapError::KeyNotFound) => Ok(()),
            other => other,
        }
    }

    fn subnets(&self) -> Result<Vec<Ipv4Net>, MapError> {
        self.keys()
            .map(|k| {
                let k = k?;
                let data = k.data();
                Ipv4Net::new(Ipv4Addr::from(data), k.prefix_len() as u8)
                    .map_err(|_| MapError::KeyNotFound)
            })
            .collect()
    }
}

fn key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

/// What [`PeerTable::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Unchanged,
}

/// Counts from a full [`PeerTable::reconcile`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub skipped: Vec<PeerError>,
}

pub struct PeerTable {
    network: Ipv4Net,
    local: Ipv4Net,
    local_ip: Ipv4Addr,
    vni: u32,
    peers: BTreeMap<Ipv4Net, RemoteNode>,
}

impl PeerTable {
    pub fn new(cfg: &NetworkConfig, local: Ipv4Net, local_ip: Ipv4Addr) -> Self {
        let vni = match &cfg.backend {
            crate::flannel::Backend::Vxlan(v) => v.vni,
            _ => 0,
        };
        Self {
            network: cfg.network,
            local,
            local_ip,
            vni,
            peers: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn get(&self, subnet: Ipv4Net) -> Option<&RemoteNode> {
        self.peers.get(&subnet)
    }

    /// Whether a lease for `subnet` is this node's own.
    pub fn is_local(&self, subnet: Ipv4Net) -> bool {
        subnet == self.local
    }

    /// Validates a lease against the network and this node, and turns it into
    /// a map value. Overlaps with other peers are checked by the caller, which
    /// knows the rest of the table.
    pub fn remote_node(
        &self,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
    ) -> Result<RemoteNode, PeerError> {
        if !self.network.contains(&subnet) {
            return Err(PeerError::OutsideNetwork {
                subnet,
                network: self.network,
            });
        }
        if overlaps(subnet, self.local) {
            return Err(PeerError::OverlapsLocal {
                subnet,
                local: self.local,
            });
        }
        if attrs.public_ip == self.local_ip {
            return Err(PeerError::OwnAddress {
                subnet,
                public_ip: attrs.public_ip,
            });
        }
        if !attrs.backend_type.eq_ignore_ascii_case("vxlan") {
            return Err(PeerError::Backend {
                subnet,
                got: attrs.backend_type.clone(),
                want: "vxlan",
            });
        }
        let data = attrs
            .backend_data
            .as_ref()
            .ok_or(PeerError::MissingVtep { subnet })?;
        // flannel releases before 0.10 published no VNI; they used the
        // network's, so that is what a missing one means.
        let vni = data.vni.unwrap_or(self.vni);
        if vni != self.vni {
            return Err(PeerError::Vni {
                subnet,
                got: vni,
                want: self.vni,
            });
        }
        Ok(RemoteNode {
            public_ip: attrs.public_ip.octets(),
            vtep_mac: data.vtep_mac,
            mode: Mode::Vxlan as u8,
            _pad0: 0,
            vni,
        })
    }

    fn overlapping_peer(&self, subnet: Ipv4Net) -> Option<Ipv4Net> {
        self.peers
            .keys()
            .copied()
            .find(|&other| other != subnet && overlaps(other, subnet))
    }

    /// Adds or updates one lease (a watch PUT event).
    pub fn upsert(
        &mut self,
        map: &mut impl SubnetMap,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
    ) -> Result<Change, PeerError> {
        let node = self.remote_node(subnet, attrs)?;
        if let Some(other) = self.overlapping_peer(subnet) {
            return Err(PeerError::OverlapsPeer { subnet, other });
        }
        let change = match self.peers.get(&subnet) {
            None => Change::Added,
            Some(old) if *old == node => return Ok(Change::Unchanged),
            Some(_) => Change::Updated,
        };
        map.put(subnet, &node).map_err(|e| PeerError::Map {
            subnet,
            message: e.to_string(),
        })?;
        self.peers.insert(subnet, node);
        Ok(change)
    }

    /// Removes one lease (a watch DELETE event). Returns whether it was known.
    pub fn remove(&mut self, map: &mut impl SubnetMap, subnet: Ipv4Net) -> Result<bool, PeerError> {
        if self.peers.remove(&subnet).is_none() {
            return Ok(false);
        }
        map.delete(subnet).map_err(|e| PeerError::Map {
            subnet,
            message: e.to_string(),
        })?;
        Ok(true)
    }

    /// Makes the table and the map equal to exactly `leases` (a full listing,
    /// oldest lease first): entries for leases that vanished, including ones a
    /// previous agent left in the pinned map, are removed. Of overlapping
    /// leases the first (oldest) keeps its entry, as it would have when the
    /// later one arrived as a watch event.
    pub fn reconcile(
        &mut self,
        map: &mut impl SubnetMap,
        leases: &[(Ipv4Net, LeaseAttrs)],
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        let mut desired: BTreeMap<Ipv4Net, RemoteNode> = BTreeMap::new();
        for (subnet, attrs) in leases {
            if self.is_local(*subnet) {
                continue;
            }
            match self.remote_node(*subnet, attrs) {
                Ok(node) => {
                    if let Some(other) = overlapping(&desired, *subnet) {
                        report.skipped.push(PeerError::OverlapsPeer {
                            subnet: *subnet,
                            other,
                        });
                    } else {
                        desired.insert(*subnet, node);
                    }
                }
                Err(e) => report.skipped.push(e),
            }
        }

        let mut stale: BTreeSet<Ipv4Net> = self.peers.keys().copied().collect();
        match map.subnets() {
            Ok(in_map) => stale.extend(in_map),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list SUBNETS; reconciling known entries only")
            }
        }
        for subnet in stale.into_iter().filter(|s| !desired.contains_key(s)) {
            match map.delete(subnet) {
                Ok(()) => report.removed += 1,
                Err(e) => report.skipped.push(PeerError::Map {
                    subnet,
                    message: e.to_string(),
                }),
            }
            self.peers.remove(&subnet);
        }
        for (subnet, node) in desired {
            let change = match self.peers.get(&subnet) {
                None => Change::Added,
                Some(old) if *old == node => continue,
                Some(_) => Change::Updated,
            };
            if let Err(e) = map.put(subnet, &node) {
                report.skipped.push(PeerError::Map {
                    subnet,
                    message: e.to_string(),
                });
                continue;
            }
            self.peers.insert(subnet, node);
            match change {
                Change::Added => report.added += 1,
                _ => report.updated += 1,
            }
        }
        report
    }
}

/// A key of `table` other than `subnet` that overlaps it, in O(33 log n)
/// rather than a scan, so that 100k leases reconcile in well under a second.
fn overlapping<V>(table: &BTreeMap<Ipv4Net, V>, subnet: Ipv4Net) -> Option<Ipv4Net> {
    // Keys are canonical, so at most one per prefix length can contain
    // `subnet`: its network address truncated to that length.
    for len in 0..=subnet.prefix_len() {
        let outer = Ipv4Net::new(subnet.network(), len)
            .map(|n| n.trunc())
            .ok()?;
        if outer != subnet && table.contains_key(&outer) {
            return Some(outer);
        }
    }
    // Keys order by address, then length: everything `subnet` contains lies
    // between its own key and its broadcast address as a /32.
    let last = Ipv4Net::new(subnet.broadcast(), 32).ok()?;
    table
        .range(subnet..=last)
        .map(|(k, _)| *k)
        .find(|k| *k != subnet && overlaps(*k, subnet))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use crate::flannel::VxlanLeaseData;

    #[derive(Default)]
    struct FakeMap(BTreeMap<Ipv4Net, RemoteNode>);

    impl SubnetMap for FakeMap {
        fn put(&mut self, subnet: Ipv4Net, node: &RemoteNode) -> Result<(), MapError> {
            self.0.insert(subnet, *node);
            Ok(())
        }
        fn delete(&mut self, subnet: Ipv4Net) -> Result<(), MapError> {
            self.0.remove(&subnet);
            Ok(())
        }
        fn subnets(&self) -> Result<Vec<Ipv4Net>, MapError> {
            Ok(self.0.keys().copied().collect())
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn table() -> PeerTable {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#,
        )
        .unwrap();
        PeerTable::new(&cfg, net("10.244.1.0/24"), Ipv4Addr::new(198, 18, 0, 1))
    }

    fn lease(ip: [u8; 4], vni: Option<u32>) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::from(ip),
            backend_type: "vxlan".into(),
            backend_data: Some(VxlanLeaseData {
                vni,
                vtep_mac: [2, 0, 0, 0, 0, ip[3]],
            }),
        }
    }

    #[test]
    fn upsert_update_remove() {
        let (mut t, mut m) = (table(), FakeMap::default());
        let s = net("10.244.2.0/24");
        assert_eq!(
            t.upsert(&mut m, s, &lease([198, 18, 0, 2], Some(1))),
            Ok(Change::Added)
        );
        assert_eq!(
            t.upsert(&mut m, s, &lease([198, 18, 0, 2], None)),
            Ok(Change::Unchanged)
        );
        assert_eq!(
            t.upsert(&mut m, s, &lease([198, 18, 0, 9], Some(1))),
            Ok(Change::Updated)
        );
        assert_eq!(m.0[&s].public_ip, [198, 18, 0, 9]);
        assert_eq!(m.0[&s].vtep_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(t.remove(&mut m, s), Ok(true));
        assert!(m.0.is_empty());
        assert_eq!(t.remove(&mut m, s), Ok(false));
    }

    #[test]
    fn bad_leases_are_refused_and_leave_the_map_alone() {
        let (mut t, mut m) = (table(), FakeMap::default());
        let ok = lease([198, 18, 0, 2], Some(1));
        assert!(matches!(
            t.upsert(&mut m, net("10.245.0.0/24"), &ok),
            Err(PeerError::OutsideNetwork { .. })
        ));
        assert!(matches!(
            t.upsert(&mut m, net("10.244.0.0/23"), &ok),
            Err(PeerError::OverlapsLocal { .. })
        ));
        assert!(matches!(
            t.upsert(
                &mut m,
                net("10.244.3.0/24"),
                &lease([198, 18, 0, 1], Some(1))
            ),
            Err(PeerError::OwnAddress { .. })
        ));
        assert!(matches!(
            t.upsert(
                &mut m,
                net("10.244.3.0/24"),
                &lease([198, 18, 0, 3], Some(2))
            ),
            Err(PeerError::Vni {
                got: 2,
                want: 1,
                ..
            })
        ));
        let mut hostgw = ok.clone();
        hostgw.backend_type = "host-gw".into();
        hostgw.backend_data = None;
        assert!(matches!(
            t.upsert(&mut m, net("10.244.3.0/24"), &hostgw),
            Err(PeerError::Backend { .. })
        ));
        assert_eq!(
            t.upsert(&mut m, net("10.244.4.0/24"), &ok),
            Ok(Change::Added)
        );
        assert!(matches!(
            t.upsert(&mut m, net("10.244.4.0/23"), &ok),
            Err(PeerError::OverlapsPeer { .. })
        ));
        assert_eq!(m.0.len(), 1);
    }

    #[test]
    fn overlap_lookup_finds_containing_and_contained_keys() {
        let mut t: BTreeMap<Ipv4Net, ()> = BTreeMap::new();
        for s in ["10.244.2.0/24", "10.244.8.0/22", "10.244.64.0/18"] {
            t.insert(net(s), ());
        }
        assert_eq!(
            overlapping(&t, net("10.244.2.0/24")),
            None,
            "itself is no overlap"
        );
        assert_eq!(
            overlapping(&t, net("10.244.2.128/25")),
            Some(net("10.244.2.0/24"))
        );
        assert_eq!(
            overlapping(&t, net("10.244.0.0/22")),
            Some(net("10.244.2.0/24"))
        );
        assert_eq!(
            overlapping(&t, net("10.244.9.0/24")),
            Some(net("10.244.8.0/22"))
        );
        assert_eq!(
            overlapping(&t, net("10.244.0.0/16")),
            Some(net("10.244.2.0/24"))
        );
        assert_eq!(
            overlapping(&t, net("10.244.100.7/32")),
            Some(net("10.244.64.0/18"))
        );
        assert_eq!(overlapping(&t, net("10.244.3.0/24")), None);
        assert_eq!(overlapping(&t, net("10.244.12.0/22")), None);
    }

    #[test]
    fn reconcile_removes_stale_and_skips_overlaps() {
        let (mut t, mut m) = (table(), FakeMap::default());
        // Left in the pinned map by a previous run, no longer leased.
        m.0.insert(
            net("10.244.9.0/24"),
            t.remote_node(net("10.244.9.0/24"), &lease([198, 18, 0, 9], None))
                .unwrap(),
        );
        let leases = vec![
            (net("10.244.1.0/24"), lease([198, 18, 0, 1], Some(1))), // our own
            (net("10.244.2.0/24"), lease([198, 18, 0, 2], Some(1))),
            (net("10.244.2.0/23"), lease([198, 18, 0, 3], Some(1))), // overlaps .2/24
            (net("10.244.5.0/24"), lease([198, 18, 0, 5], Some(1))),
        ];
        let report = t.reconcile(&mut m, &leases);
        assert_eq!(report.added, 2, "{report:?}");
        assert_eq!(report.removed, 1);
        assert_eq!(report.skipped.len(), 1);
        let keys: Vec<_> = m.0.keys().map(ToString::to_string).collect();
        assert!(
            keys.len() == 2 && keys.iter().all(|k| k != "10.244.9.0/24"),
            "{keys:?}"
        );
        // A second identical listing changes nothing.
        let again = t.reconcile(&mut m, &leases);
        assert_eq!((again.added, again.updated, again.removed), (0, 0, 0));
    }
}
