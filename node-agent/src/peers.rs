//! The remote-node table: etcd leases of other nodes, validated, mirrored into
//! the BPF maps (`SUBNETS`, and the known-source set `NODE_IPS`).
//!
//! Every write to the BPF maps goes through [`PeerTable`], which refuses what
//! would make the data path wrong: subnets outside the Network, overlapping
//! this node's subnet or another node's, leases of another backend or VNI,
//! host-gw peers that are not on this node's L2 segment. A refused lease is
//! reported and skipped; every other lease keeps forwarding. The forwarding
//! mode of each peer (VXLAN, IP-in-IP, or direct) is decided here, once per
//! lease change, never per packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::MapError;
use ipnet::Ipv4Net;
use weft_common::{Mode, RemoteNode};

use crate::flannel::{Backend, LeaseAttrs, NetworkConfig, subnet::overlaps};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error("lease {subnet}: PublicIP {public_ip} cannot be a node's address: {why}")]
    UnusablePublicIp {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        why: &'static str,
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
    #[error(
        "lease {subnet}: node {public_ip} is not on a subnet directly connected to this \
         node's interface ({onlink}), so host-gw cannot reach it"
    )]
    NotOnLink {
        subnet: Ipv4Net,
        public_ip: Ipv4Addr,
        onlink: String,
    },
    #[error("lease {subnet}: BPF map update failed: {message}")]
    Map { subnet: Ipv4Net, message: String },
}

impl PeerError {
    /// A stable snake-case name of the kind of refusal, for metrics
    /// (`weft_leases_skipped{cause}`) and `status`.
    pub const fn cause(&self) -> &'static str {
        match self {
            Self::OutsideNetwork { .. } => "outside_network",
            Self::OverlapsLocal { .. } => "overlaps_local",
            Self::OverlapsPeer { .. } => "overlaps_peer",
            Self::OwnAddress { .. } => "own_address",
            Self::UnusablePublicIp { .. } => "unusable_public_ip",
            Self::Backend { .. } => "backend_mismatch",
            Self::MissingVtep { .. } => "missing_vtep_mac",
            Self::Vni { .. } => "vni_mismatch",
            Self::NotOnLink { .. } => "not_on_link",
            Self::Map { .. } => "map_update_failed",
        }
    }
}

/// The map operations the table needs: the BPF maps in production, `BTreeMap`s in unit tests.
pub trait SubnetMap {
    fn put(&mut self, subnet: Ipv4Net, node: &RemoteNode) -> Result<(), MapError>;
    fn delete(&mut self, subnet: Ipv4Net) -> Result<(), MapError>;
    fn subnets(&self) -> Result<Vec<Ipv4Net>, MapError>;
    /// Adds and removes known node addresses, in one batch.
    fn update_node_ips(&mut self, add: &[Ipv4Addr], remove: &[Ipv4Addr]) -> Result<(), MapError>;
    fn node_ips(&self) -> Result<Vec<Ipv4Addr>, MapError>;
}

/// What happened to one map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Removed,
    Unchanged,
}

/// A lease as etcd holds it, parsed: what the rule decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub attrs: LeaseAttrs,
    /// Older leases win overlaps.
    pub create_revision: i64,
    /// Identifies this version of the lease, so a refusal is reported once
    /// per change of the lease.
    pub mod_revision: i64,
}

/// A lease the rule refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub subnet: Ipv4Net,
    pub mod_revision: i64,
    pub error: PeerError,
}

/// Counts from a full [`PeerTable::reconcile`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Every lease without an entry, and why.
    pub refused: Vec<Refusal>,
    pub map_errors: Vec<PeerError>,
}

/// What one event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EventReport {
    pub changes: Vec<(Ipv4Net, Change)>,
    /// The leases without an entry among those the event could affect.
    pub refused: Vec<Refusal>,
    pub map_errors: Vec<PeerError>,
}

/// How this node reaches its peers, from the network config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerBackend {
    Vxlan { vni: u32, direct_routing: bool },
    HostGw,
    Ipip,
}

pub struct PeerTable {
    network: Ipv4Net,
    local: Ipv4Net,
    local_ip: Ipv4Addr,
    backend: PeerBackend,
    type_name: &'static str,
    /// Subnets directly connected to `--iface`: host-gw and DirectRouting
    /// peers must be in one of them.
    onlink: Vec<Ipv4Net>,
    peers: BTreeMap<Ipv4Net, RemoteNode>,
    /// Every other node's lease known to be in etcd, accepted or not: the
    /// input of the rule, kept so that an event can re-check the leases it
    /// affects.
    leases: BTreeMap<Ipv4Net, Candidate>,
    /// Known node addresses, with the number of leases naming each.
    node_ips: BTreeMap<Ipv4Addr, usize>,
}

impl PeerTable {
    pub fn new(
        cfg: &NetworkConfig,
        local: Ipv4Net,
        local_ip: Ipv4Addr,
        onlink: Vec<Ipv4Net>,
    ) -> Self {
        let backend = match &cfg.backend {
            Backend::Vxlan(v) => PeerBackend::Vxlan {
                vni: v.vni,
                direct_routing: v.direct_routing,
            },
            Backend::HostGw => PeerBackend::HostGw,
            Backend::Ipip => PeerBackend::Ipip,
        };
        Self {
            network: cfg.network,
            local,
            local_ip,
            backend,
            type_name: cfg.backend.type_name(),
            onlink,
            peers: BTreeMap::new(),
            leases: BTreeMap::new(),
            node_ips: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Every known node's PublicIP.
    pub fn node_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.node_ips.keys().copied()
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

    /// Why `ip` cannot be another node's PublicIP, if it cannot: tunnels to
    /// it would go nowhere, or loop back into this host or the overlay.
    fn unusable_public_ip(&self, ip: Ipv4Addr) -> Option<&'static str> {
        if ip.is_unspecified() {
            Some("the unspecified address")
        } else if ip.is_loopback() {
            Some("a loopback address")
        } else if ip.is_multicast() {
            Some("a multicast address")
        } else if ip.is_broadcast() {
            Some("the broadcast address")
        } else if ip.is_link_local() {
            Some("a link-local address")
        } else if self.network.contains(&ip) {
            Some("inside the cluster network, which is carried over the tunnels themselves")
        } else {
            None
        }
    }

    fn is_onlink(&self, ip: Ipv4Addr) -> bool {
        self.onlink.iter().any(|net| net.contains(&ip))
    }

    /// Validates a lease against the network and this node, and turns it into
    /// a map value, choosing how to reach the node. Overlaps with other peers
    /// are checked by the caller, which knows the rest of the table.
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
        if attrs.public_ip == self.local_ip
            || self.onlink.iter().any(|n| n.addr() == attrs.public_ip)
        {
            return Err(PeerError::OwnAddress {
                subnet,
                public_ip: attrs.public_ip,
            });
        }
        if let Some(why) = self.unusable_public_ip(attrs.public_ip) {
            return Err(PeerError::UnusablePublicIp {
                subnet,
                public_ip: attrs.public_ip,
                why,
            });
        }
        if !attrs.backend_type.eq_ignore_ascii_case(self.type_name) {
            return Err(PeerError::Backend {
                subnet,
                got: attrs.backend_type.clone(),
                want: self.type_name,
            });
        }
        let mut node = RemoteNode {
            public_ip: attrs.public_ip.octets(),
            vtep_mac: [0; 6],
            mode: Mode::Direct as u8,
            _pad0: 0,
            vni: 0,
        };
        match self.backend {
            PeerBackend::Vxlan {
                vni: own_vni,
                direct_routing,
            } => {
                let data = attrs
                    .backend_data
                    .as_ref()
                    .ok_or(PeerError::MissingVtep { subnet })?;
                // flannel releases before 0.10 published no VNI; they used the
                // network's, so that is what a missing one means.
                let vni = data.vni.unwrap_or(own_vni);
                if vni != own_vni {
                    return Err(PeerError::Vni {
                        subnet,
                        got: vni,
                        want: own_vni,
                    });
                }
                node.vtep_mac = data.vtep_mac;
                node.vni = vni;
                // DirectRouting: peers on this L2 segment need no tunnel.
                if !(direct_routing && self.is_onlink(attrs.public_ip)) {
                    node.mode = Mode::Vxlan as u8;
                }
            }
            PeerBackend::HostGw => {
                if !self.is_onlink(attrs.public_ip) {
                    return Err(PeerError::NotOnLink {
                        subnet,
                        public_ip: attrs.public_ip,
                        onlink: self
                            .onlink
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
            PeerBackend::Ipip => node.mode = Mode::Ipip as u8,
        }
        Ok(node)
    }

    /// Adds or updates one entry the rule accepted.
    fn set(
        &mut self,
        map: &mut impl SubnetMap,
        subnet: Ipv4Net,
        node: RemoteNode,
    ) -> Result<Change, PeerError> {
        let old = self.peers.get(&subnet).copied();
        let change = match old {
            None => Change::Added,
            Some(old) if old == node => return Ok(Change::Unchanged),
            Some(_) => Change::Updated,
        };
        // The source first: an IP-in-IP packet from the new node must not be
        // dropped as unknown once its subnet is routable.
        let map_err = |e: MapError| PeerError::Map {
            subnet,
            message: e.to_string(),
        };
        let ip = Ipv4Addr::from(node.public_ip);
        if !self.node_ips.contains_key(&ip) {
            map.update_node_ips(&[ip], &[]).map_err(map_err)?;
        }
        map.put(subnet, &node).map_err(map_err)?;
        *self.node_ips.entry(ip).or_default() += 1;
        self.peers.insert(subnet, node);
        if let Some(old) = old {
            self.release_ip(map, Ipv4Addr::from(old.public_ip))
                .map_err(map_err)?;
        }
        Ok(change)
    }

    /// Removes one entry. Returns whether it was known.
    fn remove(&mut self, map: &mut impl SubnetMap, subnet: Ipv4Net) -> Result<bool, PeerError> {
        let Some(old) = self.peers.remove(&subnet) else {
            return Ok(false);
        };
        let map_err = |e: MapError| PeerError::Map {
            subnet,
            message: e.to_string(),
        };
        map.delete(subnet).map_err(map_err)?;
        self.release_ip(map, Ipv4Addr::from(old.public_ip))
            .map_err(map_err)?;
        Ok(true)
    }

    fn release_ip(&mut self, map: &mut impl SubnetMap, ip: Ipv4Addr) -> Result<(), MapError> {
        let Some(count) = self.node_ips.get_mut(&ip) else {
            return Ok(());
        };
        *count -= 1;
        if *count == 0 {
            self.node_ips.remove(&ip);
            map.update_node_ips(&[], &[ip])?;
        }
        Ok(())
    }

    /// Makes the table and the maps equal to exactly `leases` (a full
    /// listing; this node's own lease in it is ignored): entries for leases
    /// that vanished, including ones a previous agent left in the pinned
    /// maps, are removed. Which leases get an entry is [`accepted`]'s rule,
    /// the same one [`Self::put`] and [`Self::delete`] apply to events.
    pub fn reconcile(
        &mut self,
        map: &mut impl SubnetMap,
        leases: BTreeMap<Ipv4Net, Candidate>,
    ) -> ReconcileReport {
        let mut report = ReconcileReport::default();
        self.leases = leases;
        self.leases.remove(&self.local);
        let (desired, refused) = self.accepted(self.leases.iter());
        report.refused = refused;
        let mut want_ips: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for node in desired.values() {
            *want_ips.entry(Ipv4Addr::from(node.public_ip)).or_default() += 1;
        }

        // Sources before routes (see upsert); stale sources after them.
        let mut have_ips: BTreeSet<Ipv4Addr> = self.node_ips.keys().copied().collect();
        match map.node_ips() {
            Ok(in_map) => have_ips.extend(in_map),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list NODE_IPS; reconciling known entries only")
            }
        }
        let add: Vec<Ipv4Addr> = want_ips.keys().copied().collect();
        let remove: Vec<Ipv4Addr> = have_ips
            .into_iter()
            .filter(|ip| !want_ips.contains_key(ip))
            .collect();
        if let Err(e) = map.update_node_ips(&add, &[]) {
            tracing::error!(error = %e, "cannot update NODE_IPS");
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
                Err(e) => report.map_errors.push(PeerError::Map {
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
                report.map_errors.push(PeerError::Map {
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
        if let Err(e) = map.update_node_ips(&[], &remove) {
            tracing::error!(error = %e, "cannot remove stale NODE_IPS entries");
        }
        self.node_ips = want_ips;
        report
    }

    /// The one rule deciding which leases get a map entry, for a relist and
    /// for events alike: in order of creation (etcd's create_revision, then
    /// the subnet), a lease that passes [`Self::remote_node`] and overlaps
    /// no lease accepted before it is accepted. Refused leases block
    /// nothing. Returns the accepted entries and the refusals.
    fn accepted<'a>(
        &self,
        leases: impl Iterator<Item = (&'a Ipv4Net, &'a Candidate)>,
    ) -> (BTreeMap<Ipv4Net, RemoteNode>, Vec<Refusal>) {
        let mut ordered: Vec<(&Ipv4Net, &Candidate)> = leases.collect();
        ordered.sort_by_key(|(subnet, c)| (c.create_revision, **subnet));
        let mut desired = BTreeMap::new();
        let mut refused = Vec::new();
        for (subnet, cand) in ordered {
            let verdict =
                self.remote_node(*subnet, &cand.attrs).and_then(|node| {
                    match overlapping(&desired, *subnet) {
                        Some(other) => Err(PeerError::OverlapsPeer {
                            subnet: *subnet,
                            other,
                        }),
                        None => Ok(node),
                    }
                });
            match verdict {
                Ok(node) => {
                    desired.insert(*subnet, node);
                }
                Err(error) => refused.push(Refusal {
                    subnet: *subnet,
                    mod_revision: cand.mod_revision,
                    error,
                }),
            }
        }
        (desired, refused)
    }

    /// A watch PUT of a lease that parsed. The map then holds what
    /// [`Self::reconcile`] of the leases known now would give it: leases this
    /// one now blocks lose their entry, and ones its old value blocked are
    /// checked again.
    pub fn put(
        &mut self,
        map: &mut impl SubnetMap,
        subnet: Ipv4Net,
        candidate: Candidate,
    ) -> EventReport {
        if self.is_local(subnet) {
            return EventReport::default();
        }
        self.leases.insert(subnet, candidate);
        self.settle(map, subnet)
    }

    /// A watch DELETE, or a PUT whose value no relist would accept as a
    /// lease (malformed, too large): the subnet has no lease any more, and
    /// leases it blocked are checked again.
    pub fn delete(&mut self, map: &mut impl SubnetMap, subnet: Ipv4Net) -> EventReport {
        if self.is_local(subnet) {
            return EventReport::default();
        }
        self.leases.remove(&subnet);
        self.settle(map, subnet)
    }

    /// Applies the rule again to every lease whose acceptance a change of
    /// `subnet` can affect. Overlap between prefixes is containment, so the
    /// leases that can be affected are those inside the largest known prefix
    /// containing `subnet` (or `subnet` itself): any lease overlapping one
    /// of them is inside it too, or would contain `subnet` and be larger.
    fn settle(&mut self, map: &mut impl SubnetMap, subnet: Ipv4Net) -> EventReport {
        let mut outer = subnet;
        for len in 0..subnet.prefix_len() {
            if let Ok(n) = Ipv4Net::new(subnet.network(), len).map(|n| n.trunc())
                && (self.leases.contains_key(&n) || self.peers.contains_key(&n))
            {
                outer = n;
                break;
            }
        }
        let inside = |k: &Ipv4Net| outer.contains(k);
        let last = Ipv4Net::new(outer.broadcast(), 32).unwrap_or(outer);
        let (desired, refused) =
            self.accepted(self.leases.range(outer..=last).filter(|(k, _)| inside(k)));
        let mut report = EventReport {
            refused,
            ..EventReport::default()
        };
        let gone: Vec<Ipv4Net> = self
            .peers
            .range(outer..=last)
            .map(|(k, _)| *k)
            .filter(|k| inside(k) && !desired.contains_key(k))
            .collect();
        for s in gone {
            match self.remove(map, s) {
                Ok(_) => report.changes.push((s, Change::Removed)),
                Err(e) => report.map_errors.push(e),
            }
        }
        for (s, node) in desired {
            match self.set(map, s, node) {
                Ok(Change::Unchanged) => {}
                Ok(change) => report.changes.push((s, change)),
                Err(e) => report.map_errors.push(e),
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

    /// Also the map of the `one_rule` proptest.
    #[derive(Default)]
    pub(super) struct FakeMap(
        pub(super) BTreeMap<Ipv4Net, RemoteNode>,
        pub(super) BTreeSet<Ipv4Addr>,
    );

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
        fn update_node_ips(
            &mut self,
            add: &[Ipv4Addr],
            remove: &[Ipv4Addr],
        ) -> Result<(), MapError> {
            self.1.extend(add);
            for ip in remove {
                self.1.remove(ip);
            }
            Ok(())
        }
        fn node_ips(&self) -> Result<Vec<Ipv4Addr>, MapError> {
            Ok(self.1.iter().copied().collect())
        }
    }

    /// A watch PUT as the old single-lease API reported it.
    fn up(
        t: &mut PeerTable,
        m: &mut FakeMap,
        subnet: Ipv4Net,
        attrs: &LeaseAttrs,
    ) -> Result<Change, PeerError> {
        let rev = t
            .leases
            .get(&subnet)
            .map_or(t.leases.len() as i64 + 100, |c| c.create_revision);
        let r = t.put(
            m,
            subnet,
            Candidate {
                attrs: attrs.clone(),
                create_revision: rev,
                mod_revision: rev,
            },
        );
        if let Some(refused) = r.refused.into_iter().find(|x| x.subnet == subnet) {
            return Err(refused.error);
        }
        Ok(r.changes
            .iter()
            .find(|(s, _)| *s == subnet)
            .map_or(Change::Unchanged, |(_, c)| *c))
    }

    fn down(t: &mut PeerTable, m: &mut FakeMap, subnet: Ipv4Net) -> Result<bool, PeerError> {
        let r = t.delete(m, subnet);
        Ok(r.changes.contains(&(subnet, Change::Removed)))
    }

    /// A listing, oldest first.
    fn rec(
        t: &mut PeerTable,
        m: &mut FakeMap,
        leases: &[(Ipv4Net, LeaseAttrs)],
    ) -> ReconcileReport {
        t.reconcile(m, listing(leases))
    }

    fn listing(leases: &[(Ipv4Net, LeaseAttrs)]) -> BTreeMap<Ipv4Net, Candidate> {
        leases
            .iter()
            .enumerate()
            .map(|(i, (s, a))| {
                (
                    *s,
                    Candidate {
                        attrs: a.clone(),
                        create_revision: i as i64 + 1,
                        mod_revision: i as i64 + 1,
                    },
                )
            })
            .collect()
    }

    fn onlink() -> Vec<Ipv4Net> {
        vec![net("198.18.0.0/24")]
    }

    fn table_for(config: &str) -> PeerTable {
        let cfg = NetworkConfig::parse(config).unwrap();
        PeerTable::new(
            &cfg,
            net("10.244.1.0/24"),
            Ipv4Addr::new(198, 18, 0, 1),
            onlink(),
        )
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn table() -> PeerTable {
        table_for(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#)
    }

    pub(super) fn lease(ip: [u8; 4], vni: Option<u32>) -> LeaseAttrs {
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
            up(&mut t, &mut m, s, &lease([198, 18, 0, 2], Some(1))),
            Ok(Change::Added)
        );
        assert_eq!(
            up(&mut t, &mut m, s, &lease([198, 18, 0, 2], None)),
            Ok(Change::Unchanged)
        );
        assert_eq!(
            up(&mut t, &mut m, s, &lease([198, 18, 0, 9], Some(1))),
            Ok(Change::Updated)
        );
        assert_eq!(m.0[&s].public_ip, [198, 18, 0, 9]);
        assert_eq!(m.0[&s].vtep_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(down(&mut t, &mut m, s), Ok(true));
        assert!(m.0.is_empty());
        assert_eq!(down(&mut t, &mut m, s), Ok(false));
    }

    #[test]
    fn public_ips_no_peer_could_have_are_refused() {
        let t = PeerTable::new(
            &NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
                .unwrap(),
            net("10.244.1.0/24"),
            Ipv4Addr::new(198, 18, 0, 1),
            // The interface's addresses as the agent reads them: host/prefix.
            vec![net("198.18.0.1/24"), net("198.18.7.1/24")],
        );
        let s = net("10.244.3.0/24");
        for (ip, why) in [
            ([0, 0, 0, 0], "unspecified"),
            ([127, 0, 0, 1], "loopback"),
            ([224, 0, 0, 18], "multicast"),
            ([255, 255, 255, 255], "broadcast"),
            ([169, 254, 1, 1], "link-local"),
            ([10, 244, 9, 1], "cluster network"),
        ] {
            match t.remote_node(s, &lease(ip, Some(1))) {
                Err(PeerError::UnusablePublicIp { why: w, .. }) => {
                    assert!(w.contains(why), "{ip:?}: {w}")
                }
                other => panic!("{ip:?} accepted or refused for another reason: {other:?}"),
            }
        }
        // Any of this node's own addresses, not just the PublicIP.
        assert!(matches!(
            t.remote_node(s, &lease([198, 18, 7, 1], Some(1))),
            Err(PeerError::OwnAddress { .. })
        ));
        assert!(t.remote_node(s, &lease([198, 18, 7, 2], Some(1))).is_ok());
    }

    #[test]
    fn bad_leases_are_refused_and_leave_the_map_alone() {
        let (mut t, mut m) = (table(), FakeMap::default());
        let ok = lease([198, 18, 0, 2], Some(1));
        assert!(matches!(
            up(&mut t, &mut m, net("10.245.0.0/24"), &ok),
            Err(PeerError::OutsideNetwork { .. })
        ));
        assert!(matches!(
            up(&mut t, &mut m, net("10.244.0.0/23"), &ok),
            Err(PeerError::OverlapsLocal { .. })
        ));
        assert!(matches!(
            up(
                &mut t,
                &mut m,
                net("10.244.3.0/24"),
                &lease([198, 18, 0, 1], Some(1))
            ),
            Err(PeerError::OwnAddress { .. })
        ));
        assert!(matches!(
            up(
                &mut t,
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
            up(&mut t, &mut m, net("10.244.3.0/24"), &hostgw),
            Err(PeerError::Backend { .. })
        ));
        assert_eq!(
            up(&mut t, &mut m, net("10.244.4.0/24"), &ok),
            Ok(Change::Added)
        );
        assert!(matches!(
            up(&mut t, &mut m, net("10.244.4.0/23"), &ok),
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
        let report = rec(&mut t, &mut m, &leases);
        assert_eq!(report.added, 2, "{report:?}");
        assert_eq!(report.removed, 1);
        assert_eq!(report.refused.len(), 1);
        let keys: Vec<_> = m.0.keys().map(ToString::to_string).collect();
        assert!(
            keys.len() == 2 && keys.iter().all(|k| k != "10.244.9.0/24"),
            "{keys:?}"
        );
        // A second identical listing changes nothing.
        let again = rec(&mut t, &mut m, &leases);
        assert_eq!((again.added, again.updated, again.removed), (0, 0, 0));
    }

    fn bare(ip: [u8; 4], backend_type: &str) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::from(ip),
            backend_type: backend_type.into(),
            backend_data: None,
        }
    }

    #[test]
    fn known_sources_follow_the_leases() {
        let (mut t, mut m) = (table(), FakeMap::default());
        let ip2 = Ipv4Addr::new(198, 18, 0, 2);
        up(
            &mut t,
            &mut m,
            net("10.244.2.0/24"),
            &lease([198, 18, 0, 2], None),
        )
        .unwrap();
        up(
            &mut t,
            &mut m,
            net("10.244.3.0/24"),
            &lease([198, 18, 0, 2], None),
        )
        .unwrap();
        assert!(m.1.contains(&ip2));
        down(&mut t, &mut m, net("10.244.2.0/24")).unwrap();
        assert!(m.1.contains(&ip2), "still named by 10.244.3.0/24");
        up(
            &mut t,
            &mut m,
            net("10.244.3.0/24"),
            &lease([198, 18, 0, 7], None),
        )
        .unwrap();
        assert_eq!(
            m.1.iter().copied().collect::<Vec<_>>(),
            vec![Ipv4Addr::new(198, 18, 0, 7)]
        );
        // A pinned map left with a stale source loses it on reconcile.
        m.1.insert(Ipv4Addr::new(198, 18, 0, 99));
        rec(
            &mut t,
            &mut m,
            &[(net("10.244.3.0/24"), lease([198, 18, 0, 7], None))],
        );
        assert_eq!(m.1.len(), 1);
    }

    #[test]
    fn modes_follow_the_backend_and_the_link() {
        let far = [198, 19, 7, 7];
        let t = table_for(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        );
        let near = t
            .remote_node(net("10.244.2.0/24"), &lease([198, 18, 0, 2], None))
            .unwrap();
        assert_eq!(near.mode, Mode::Direct as u8, "same L2: no tunnel");
        let routed = t
            .remote_node(net("10.244.3.0/24"), &lease(far, None))
            .unwrap();
        assert_eq!(routed.mode, Mode::Vxlan as u8, "behind a router: VXLAN");

        let t = table_for(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
        let near = t
            .remote_node(net("10.244.2.0/24"), &bare([198, 18, 0, 2], "host-gw"))
            .unwrap();
        assert_eq!(near.mode, Mode::Direct as u8);
        assert!(matches!(
            t.remote_node(net("10.244.3.0/24"), &bare(far, "host-gw")),
            Err(PeerError::NotOnLink { .. })
        ));
        assert!(matches!(
            t.remote_node(net("10.244.3.0/24"), &lease([198, 18, 0, 3], None)),
            Err(PeerError::Backend { .. })
        ));

        let t = table_for(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}"#);
        let any = t
            .remote_node(net("10.244.3.0/24"), &bare(far, "ipip"))
            .unwrap();
        assert_eq!((any.mode, any.public_ip), (Mode::Ipip as u8, far));
    }
}

/// The one rule, checked: any sequence of watch events leaves the table and
/// the maps exactly as a fresh relist of the same etcd state would.
#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "test code")]
mod one_rule {
    use proptest::prelude::*;

    use super::tests::FakeMap;
    use super::*;

    /// Nested and neighbouring prefixes, this node's own subnet, one
    /// overlapping it and one outside the network.
    const SUBNETS: &[&str] = &[
        "10.244.2.0/24",
        "10.244.2.0/23",
        "10.244.0.0/22",
        "10.244.2.128/25",
        "10.244.3.0/24",
        "10.244.8.0/24",
        "10.244.8.0/21",
        "10.244.1.0/24",
        "10.244.0.0/16",
        "10.245.0.0/24",
    ];

    /// Valid peers (two sharing an address), this node's address, another VNI.
    fn attrs(i: usize) -> LeaseAttrs {
        let (ip, vni) = [
            ([198, 18, 0, 2], Some(1)),
            ([198, 18, 0, 3], None),
            ([198, 18, 0, 3], Some(1)),
            ([198, 18, 0, 4], Some(1)),
            ([198, 18, 0, 1], Some(1)),
            ([198, 18, 0, 5], Some(2)),
        ][i % 6];
        super::tests::lease(ip, vni)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(usize, usize),
        /// A value that does not parse (or is too large): no lease.
        PutMalformed(usize),
        Delete(usize),
        Relist,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..SUBNETS.len(), 0..6usize).prop_map(|(s, a)| Op::Put(s, a)),
            1 => (0..SUBNETS.len()).prop_map(Op::PutMalformed),
            2 => (0..SUBNETS.len()).prop_map(Op::Delete),
            1 => Just(Op::Relist),
        ]
    }

    fn table() -> PeerTable {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":1}}"#,
        )
        .unwrap();
        PeerTable::new(
            &cfg,
            "10.244.1.0/24".parse().unwrap(),
            Ipv4Addr::new(198, 18, 0, 1),
            vec!["198.18.0.0/24".parse().unwrap()],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn events_end_where_a_relist_would(ops in proptest::collection::vec(op(), 0..40)) {
            // etcd: subnet -> (value, create_revision, mod_revision).
            let mut etcd: BTreeMap<Ipv4Net, (Option<LeaseAttrs>, i64, i64)> = BTreeMap::new();
            let mut revision = 0;
            let (mut t, mut m) = (table(), FakeMap::default());
            let listing = |etcd: &BTreeMap<Ipv4Net, (Option<LeaseAttrs>, i64, i64)>| {
                etcd.iter()
                    .filter_map(|(s, (a, c, m))| a.clone().map(|attrs| (*s, Candidate {
                        attrs, create_revision: *c, mod_revision: *m,
                    })))
                    .collect::<BTreeMap<_, _>>()
            };
            for op in ops {
                revision += 1;
                match op {
                    Op::Put(s, a) | Op::PutMalformed(s @ a) => {
                        let subnet: Ipv4Net = SUBNETS[s].parse().unwrap();
                        let value = matches!(op, Op::Put(..)).then(|| attrs(a));
                        let created = etcd.get(&subnet).map_or(revision, |e| e.1);
                        etcd.insert(subnet, (value.clone(), created, revision));
                        match value {
                            Some(attrs) => {
                                t.put(&mut m, subnet, Candidate {
                                    attrs, create_revision: created, mod_revision: revision,
                                });
                            }
                            None => {
                                t.delete(&mut m, subnet);
                            }
                        }
                    }
                    Op::Delete(s) => {
                        let subnet: Ipv4Net = SUBNETS[s].parse().unwrap();
                        etcd.remove(&subnet);
                        t.delete(&mut m, subnet);
                    }
                    Op::Relist => {
                        t.reconcile(&mut m, listing(&etcd));
                    }
                }
            }
            let (mut fresh, mut fresh_map) = (table(), FakeMap::default());
            fresh.reconcile(&mut fresh_map, listing(&etcd));
            prop_assert_eq!(&t.peers, &fresh.peers);
            prop_assert_eq!(&m.0, &fresh_map.0);
            prop_assert_eq!(&m.1, &fresh_map.1);
            prop_assert_eq!(&t.node_ips, &fresh.node_ips);
        }
    }
}
