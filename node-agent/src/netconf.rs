//! The host networking the agent reads and keeps in place: the underlay
//! interface's facts, the single cluster route, the peers' neighbour
//! entries, and IP forwarding. Everything goes through [`Netlink`]; every
//! change is idempotent (`replace`), so restarts and adoption never fail on
//! "File exists", and [`HostNetworking`] puts back what someone else removes.

use std::{collections::BTreeSet, fs, net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;

use crate::netlink::{
    ExternalVxlan, Link, ListedRoute, Neighbour, NeighbourKind, Netlink, NetlinkError,
    NetlinkEvent, NetlinkEvents, Route,
};

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("interface {iface:?} not found")]
    NoInterface { iface: String },
    #[error("interface {iface:?} has no Ethernet address")]
    NoMac { iface: String },
    #[error("interface {iface:?} has no IPv4 address; pass --public-ip")]
    NoIpv4 { iface: String },
    #[error(
        "the Network {network} would capture {what}: its one route would send that \
         traffic into the overlay. Choose a Network that overlaps no route or address \
         this node needs"
    )]
    NetworkCaptures { network: Ipv4Net, what: String },
    #[error("no interface matches {tried}")]
    NoMatch { tried: String },
    #[error(
        "no default route to take the interface from; name one with --iface, \
         --iface-regex or --iface-can-reach"
    )]
    NoDefaultRoute,
    #[error("--iface-regex {pattern:?}: {source}")]
    BadRegex {
        pattern: String,
        source: regex::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot enable IPv4 forwarding: {0}")]
    Forwarding(#[source] std::io::Error),
    #[error("the slow-path VXLAN device {name:?} did not appear after it was created")]
    SlowPathDeviceMissing { name: String },
}

/// How the underlay interface is picked, as flanneld's flags do. With none
/// of `--iface`, `--iface-regex` and `--iface-can-reach`: the interface
/// holding `--public-ip` when that is given, else the default route's.
/// Otherwise each is tried in that order and the first match wins: the
/// `--iface` names or addresses in order, then each `--iface-regex` pattern
/// (against addresses, then names, as flanneld's `ipmatch` does), then the
/// interface routing to `--iface-can-reach`. flanneld tries them the same
/// way and stops only when none matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceChoice {
    pub ifaces: Vec<String>,
    pub regexes: Vec<String>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

impl IfaceChoice {
    fn names_an_interface(&self) -> bool {
        !self.ifaces.is_empty() || !self.regexes.is_empty() || self.can_reach.is_some()
    }
}

/// The chosen interface, and the address that chose it (an `--iface` IP, an
/// address a regex matched, or `--public-ip`), which then defaults the
/// PublicIP.
pub async fn choose_interface(
    nl: &impl Netlink,
    choice: &IfaceChoice,
) -> Result<(Interface, Option<Ipv4Addr>), NetconfError> {
    if !choice.names_an_interface() {
        return match choice.public_ip {
            Some(ip) => match interface_with_addr(nl, |a| a == ip).await? {
                Some(found) => Ok((found, Some(ip))),
                None => Err(NetconfError::NoMatch {
                    tried: format!(
                        "--public-ip {ip} (no interface holds it; name the underlay with --iface)"
                    ),
                }),
            },
            None => {
                let routes = nl.routes().await?;
                let ifindex = routes
                    .iter()
                    .find(|r| r.dst.prefix_len() == 0)
                    .and_then(|r| r.ifindex)
                    .ok_or(NetconfError::NoDefaultRoute)?;
                Ok((interface_by_index(nl, ifindex).await?, None))
            }
        };
    }
    let mut tried = Vec::new();
    for want in &choice.ifaces {
        if let Ok(ip) = want.parse::<Ipv4Addr>() {
            if let Some(found) = interface_with_addr(nl, |a| a == ip).await? {
                return Ok((found, Some(ip)));
            }
        } else {
            match Interface::lookup(nl, want).await {
                Ok(found) => return Ok((found, None)),
                Err(NetconfError::NoInterface { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        tried.push(format!("--iface {want}"));
    }
    for pattern in &choice.regexes {
        let re = regex::Regex::new(pattern).map_err(|source| NetconfError::BadRegex {
            pattern: pattern.clone(),
            source,
        })?;
        if let Some(found) = interface_with_addr(nl, |a| re.is_match(&a.to_string())).await? {
            let ip = found
                .addrs
                .iter()
                .map(Ipv4Net::addr)
                .find(|a| re.is_match(&a.to_string()));
            return Ok((found, ip));
        }
        for link in nl.links().await? {
            if re.is_match(&link.name) {
                return Ok((Interface::lookup(nl, &link.name).await?, None));
            }
        }
        tried.push(format!("--iface-regex {pattern}"));
    }
    if let Some(target) = choice.can_reach {
        // The longest listed prefix that holds the target: the main table's
        // answer. flanneld asks the kernel (RTM_GETROUTE), which also
        // follows policy rules; weft reads the table it lists.
        let routes = nl.routes().await?;
        let ifindex = routes
            .iter()
            .filter(|r| r.dst.contains(&target))
            .max_by_key(|r| r.dst.prefix_len())
            .and_then(|r| r.ifindex);
        if let Some(ifindex) = ifindex {
            return Ok((interface_by_index(nl, ifindex).await?, None));
        }
        tried.push(format!("--iface-can-reach {target} (no route to it)"));
    }
    Err(NetconfError::NoMatch {
        tried: tried.join(", "),
    })
}

async fn interface_by_index(nl: &impl Netlink, ifindex: u32) -> Result<Interface, NetconfError> {
    let link = nl
        .link_by_index(ifindex)
        .await?
        .ok_or_else(|| NetconfError::NoMatch {
            tried: format!("the route's ifindex {ifindex}"),
        })?;
    Interface::lookup(nl, &link.name).await
}

/// The first interface (by ifindex) holding an IPv4 address `matches`.
async fn interface_with_addr(
    nl: &impl Netlink,
    matches: impl Fn(Ipv4Addr) -> bool,
) -> Result<Option<Interface>, NetconfError> {
    for link in nl.links().await? {
        let addrs = nl.ipv4_addrs(link.index).await?;
        if addrs.iter().any(|a| matches(a.addr())) {
            return Ok(Some(Interface::lookup(nl, &link.name).await?));
        }
    }
    Ok(None)
}

/// What the data path needs to know about `--iface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// IPv4 addresses with their prefixes, primary first.
    pub addrs: Vec<Ipv4Net>,
}

impl Interface {
    /// Reads the interface through netlink, which answers for the caller's
    /// network namespace; sysfs would answer for whichever namespace
    /// mounted it.
    pub async fn lookup(nl: &impl Netlink, name: &str) -> Result<Self, NetconfError> {
        let link = nl.link_by_name(name).await.map_err(|e| match e {
            NetlinkError::NoSuchLink(_) => NetconfError::NoInterface {
                iface: name.to_owned(),
            },
            other => other.into(),
        })?;
        if link.mac == [0; 6] {
            return Err(NetconfError::NoMac {
                iface: name.to_owned(),
            });
        }
        let addrs = nl.ipv4_addrs(link.index).await?;
        Ok(Self {
            name: link.name,
            ifindex: link.index,
            mac: link.mac,
            mtu: link.mtu,
            addrs,
        })
    }

    /// The address flannel would publish: the interface's primary IPv4.
    pub fn primary_ipv4(&self) -> Result<Ipv4Addr, NetconfError> {
        self.addrs
            .first()
            .map(Ipv4Net::addr)
            .ok_or_else(|| NetconfError::NoIpv4 {
                iface: self.name.clone(),
            })
    }
}

/// The one route that sends the whole cluster network to `--iface`, where the
/// encap program picks it up at TC egress. Its gateway is the Network's own
/// address, which flannel never leases (SubnetMin skips the first subnet), so
/// it cannot collide with a real host; a permanent neighbour entry for it
/// keeps the stack from ever ARPing (the encap program rewrites the L2 header
/// anyway). The route MTU leaves room for the encapsulation, so host-originated
/// packets and forwarded DF packets get correct PMTU feedback from the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterRoute {
    pub network: Ipv4Net,
    pub ifindex: u32,
    pub iface_mac: [u8; 6],
    /// The route's MTU; `None` when only removing it.
    pub mtu: Option<u32>,
}

impl ClusterRoute {
    fn gateway(&self) -> Ipv4Addr {
        self.network.network()
    }

    fn route(&self) -> Route {
        Route {
            dst: self.network,
            gateway: self.gateway(),
            ifindex: self.ifindex,
            onlink: true,
            mtu: self.mtu,
        }
    }

    fn neighbour(&self) -> Neighbour {
        Neighbour {
            ifindex: self.ifindex,
            dst: self.gateway(),
            kind: NeighbourKind::Permanent {
                mac: self.iface_mac,
            },
        }
    }

    /// Whether a route event or listing entry is this route.
    fn is(&self, route: &Route) -> bool {
        route.dst == self.network
            && route.gateway == self.gateway()
            && route.ifindex == self.ifindex
    }

    pub async fn install(&self, nl: &impl Netlink) -> Result<(), NetconfError> {
        nl.neighbour_replace(&self.neighbour()).await?;
        nl.route_replace(&self.route()).await?;
        Ok(())
    }

    /// Whether the route is in the main table with the MTU it should carry.
    pub async fn is_installed(&self, nl: &impl Netlink) -> Result<bool, NetconfError> {
        let ours = self.route();
        Ok(nl
            .routes()
            .await?
            .iter()
            .any(|r| r.is(&ours) && r.mtu == self.mtu))
    }

    /// Removes the route and neighbour entry; absent ones are not an error.
    pub async fn remove(&self, nl: &impl Netlink) -> Result<(), NetconfError> {
        nl.route_delete(&self.route()).await?;
        nl.neighbour_delete(self.ifindex, self.gateway()).await?;
        Ok(())
    }
}

/// Refuses a Network whose single route would take over traffic this node
/// needs: an address of `--iface`, etcd's address, the default route's
/// gateway, or any route already in the main table that overlaps it (an
/// underlay route, or another route to the same prefix, which installing
/// with `replace` would silently overwrite). Skipped: the cluster route
/// itself (a restart), routes inside this node's subnet (its container
/// bridge's) and `adopted`, flanneld's routes, which the agent replaces.
pub async fn check_network_capture(
    nl: &impl Netlink,
    route: &ClusterRoute,
    local_subnet: Ipv4Net,
    iface_addrs: &[Ipv4Net],
    etcd: &[Ipv4Addr],
    adopted: &[ListedRoute],
) -> Result<(), NetconfError> {
    let network = route.network;
    let captures = |what: String| NetconfError::NetworkCaptures { network, what };
    if let Some(a) = iface_addrs.iter().find(|a| network.contains(&a.addr())) {
        return Err(captures(format!("this node's own address {a}")));
    }
    if let Some(ip) = etcd.iter().find(|ip| network.contains(*ip)) {
        return Err(captures(format!("etcd's address {ip}")));
    }
    let ours = route.route();
    for r in nl.routes().await? {
        if r.is(&ours) || local_subnet.contains(&r.dst) || adopted.contains(&r) {
            continue;
        }
        let via = match (r.gateway, r.ifindex) {
            (Some(gw), _) => format!("via {gw}"),
            (None, Some(i)) => format!("on ifindex {i}"),
            (None, None) => String::new(),
        };
        if r.dst.prefix_len() == 0 {
            if let Some(gw) = r.gateway.filter(|gw| network.contains(gw)) {
                return Err(captures(format!("the default route's gateway {gw}")));
            }
        } else if crate::flannel::subnet::overlaps(r.dst, network) {
            return Err(captures(format!("the existing route {} {via}", r.dst)));
        }
    }
    Ok(())
}

/// Name of the slow-path device: a collect-metadata VXLAN device the agent
/// creates for the VXLAN backend (15 characters at most, `IFNAMSIZ`). It
/// carries what eBPF cannot: its UDP socket on the VXLAN port receives
/// reassembled outer fragments (and GRO aggregates), and its transmit path
/// sends too-big packets without DF with a fragmentable outer header.
pub const SLOW_PATH_DEVICE: &str = "weft.vxlan";
const _: () = assert!(SLOW_PATH_DEVICE.len() <= 15);

/// The slow-path device for a VXLAN `port`, sized for `mtu`-byte inner
/// packets (the underlay's MTU: the slow path exists for packets that do
/// not fit it once encapsulated).
pub fn slow_path_device(port: u16, mtu: u32) -> ExternalVxlan {
    ExternalVxlan {
        name: SLOW_PATH_DEVICE.to_owned(),
        port,
        mtu,
    }
}

/// Makes sure `dev` exists as specified and is up, and returns its ifindex
/// and whether it was (re)created now (then programs attached to an
/// earlier device are gone with it). A link of that name with other
/// settings (another port after a config change, or not VXLAN at all) is
/// replaced: the name is weft's.
pub async fn ensure_slow_path_device(
    nl: &impl Netlink,
    dev: &ExternalVxlan,
) -> Result<(u32, bool), NetconfError> {
    if let Some(existing) = nl.vxlan_by_name(&dev.name).await? {
        if existing.matches(dev) && existing.link.up {
            return Ok((existing.link.index, false));
        }
        tracing::info!(
            name = %dev.name,
            found = ?existing.vxlan,
            up = existing.link.up,
            "replacing the slow-path device, whose settings differ"
        );
        nl.link_delete(existing.link.index).await?;
    }
    nl.vxlan_add(dev).await?;
    let created =
        nl.vxlan_by_name(&dev.name)
            .await?
            .ok_or_else(|| NetconfError::SlowPathDeviceMissing {
                name: dev.name.clone(),
            })?;
    Ok((created.link.index, true))
}

/// Deletes the slow-path device if it exists; `Ok(false)` when it did not.
pub async fn remove_slow_path_device(nl: &impl Netlink) -> Result<bool, NetconfError> {
    match nl.vxlan_by_name(SLOW_PATH_DEVICE).await? {
        Some(existing) => Ok(nl.link_delete(existing.link.index).await?),
        None => Ok(false),
    }
}

/// Deletes every managed, externally learned neighbour entry on `ifindex`:
/// the ones [`HostNetworking`] created for peers (cleanup no longer knows
/// the peers).
pub async fn remove_managed_neighbours(
    nl: &impl Netlink,
    ifindex: u32,
) -> Result<usize, NetconfError> {
    let mut removed = 0;
    for entry in nl.neighbours(ifindex).await? {
        if entry.managed && nl.neighbour_delete(ifindex, entry.dst).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// How often the route is checked even without events, in case the kernel
/// dropped notifications (a full socket buffer loses them silently).
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Keeps the host networking the data path depends on in place for as long
/// as the agent runs: the cluster route with its neighbour entry, and a
/// "managed" neighbour entry for each on-link peer. The kernel keeps managed
/// entries resolved (they exist for BPF FIB lookups), so sends to a peer
/// rarely find its neighbour unresolved.
///
/// The peers come from the watcher as a set of PublicIPs; the kernel's
/// events say when something of ours was removed: the route by a link going
/// down (the kernel flushes its routes) or by hand, a neighbour by a flush.
/// Each is put back, and said so once.
pub struct HostNetworking {
    route: ClusterRoute,
    /// The subnets directly on `--iface`: peers there get neighbour entries.
    onlink: Vec<Ipv4Net>,
    /// Managed neighbour entries in the kernel, as far as this process
    /// knows, so syncs touch only what changed.
    neighbours: BTreeSet<Ipv4Addr>,
    route_missing: bool,
    /// What events say may be out of date: after lost notifications, a link
    /// coming back up (the kernel flushes a link's routes silently when it
    /// goes down), and on every periodic check. Settled by listing.
    unverified: bool,
    /// `--iface`'s last known state, to see a down→up transition.
    link_up: Option<bool>,
    /// The last repair failure logged, so an outage is reported once.
    last_failure: Option<String>,
    /// `--iface`'s name, and who is told when an interface of that name
    /// appears with another ifindex (deleted and created again).
    recreation: Option<(String, tokio::sync::mpsc::UnboundedSender<Link>)>,
}

impl HostNetworking {
    pub fn new(route: ClusterRoute, onlink: Vec<Ipv4Net>) -> Self {
        Self {
            route,
            onlink,
            neighbours: BTreeSet::new(),
            route_missing: true,
            unverified: false,
            link_up: None,
            last_failure: None,
            recreation: None,
        }
    }

    /// Follows `--iface` by `name`: when it is deleted and created again,
    /// the route and neighbour entries move to the new interface and `tx`
    /// gets its link, for the data path to be attached to it.
    pub fn follow_recreation(
        mut self,
        name: String,
        tx: tokio::sync::mpsc::UnboundedSender<Link>,
    ) -> Self {
        self.recreation = Some((name, tx));
        self
    }

    /// Whether `link` is `--iface` under another ifindex.
    fn is_recreated(&self, link: &Link) -> bool {
        link.index != self.route.ifindex
            && self
                .recreation
                .as_ref()
                .is_some_and(|(name, _)| *name == link.name)
    }

    /// Moves everything of ours to the re-created `--iface`: what was on
    /// the old one went with it.
    fn move_to(&mut self, link: &Link) {
        tracing::warn!(
            iface = %link.name,
            old_ifindex = self.route.ifindex,
            ifindex = link.index,
            "--iface was deleted and created again; moving the route and the data path to it"
        );
        self.route.ifindex = link.index;
        self.route.iface_mac = link.mac;
        self.route_missing = true;
        self.neighbours.clear();
        self.link_up = Some(link.up);
        if let Some((_, tx)) = &self.recreation {
            // Closed only when the agent is stopping.
            let _ = tx.send(link.clone());
        }
    }

    /// Installs the cluster route (and its neighbour entry) if it is marked
    /// missing; on failure it stays marked, for the next event or resync.
    pub async fn ensure_route(&mut self, nl: &impl Netlink) -> Result<(), NetconfError> {
        if self.route_missing {
            self.route.install(nl).await?;
            self.route_missing = false;
        }
        Ok(())
    }

    /// Makes the managed neighbour entries match the on-link members of
    /// `peers`: adds the new ones, deletes the ones no longer wanted.
    pub async fn sync_neighbours(
        &mut self,
        nl: &impl Netlink,
        peers: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), NetconfError> {
        let wanted: BTreeSet<Ipv4Addr> = peers
            .iter()
            .filter(|ip| self.onlink.iter().any(|n| n.contains(*ip)))
            .copied()
            .collect();
        let gone: Vec<Ipv4Addr> = self.neighbours.difference(&wanted).copied().collect();
        for ip in gone {
            nl.neighbour_delete(self.route.ifindex, ip).await?;
            self.neighbours.remove(&ip);
        }
        let new: Vec<Ipv4Addr> = wanted.difference(&self.neighbours).copied().collect();
        for ip in new {
            nl.neighbour_replace(&Neighbour {
                ifindex: self.route.ifindex,
                dst: ip,
                kind: NeighbourKind::Managed,
            })
            .await?;
            self.neighbours.insert(ip);
        }
        Ok(())
    }

    /// Notes what an event removed of ours. Returns whether anything needs
    /// putting back or checking.
    pub fn on_event(&mut self, event: &NetlinkEvent) -> bool {
        let ifindex = self.route.ifindex;
        match event {
            NetlinkEvent::RouteRemoved(r) if self.route.is(r) => {
                tracing::warn!(route = %self.route.network, "cluster route was removed; putting it back");
                self.route_missing = true;
            }
            NetlinkEvent::NeighbourRemoved { ifindex: i, dst } if *i == ifindex => {
                if *dst == self.route.gateway() {
                    tracing::warn!(gateway = %dst, "cluster route's neighbour entry was removed; putting it back");
                    self.route_missing = true;
                } else if self.neighbours.remove(dst) {
                    tracing::info!(peer = %dst, "peer neighbour entry was removed; putting it back");
                } else {
                    return false;
                }
            }
            // Only the transition matters: an up link changes for many
            // reasons (MTU, carrier, an XDP program attached).
            NetlinkEvent::LinkChanged(Link { index, up, .. }) if *index == ifindex => {
                let was = self.link_up.replace(*up);
                if !(*up && was == Some(false)) {
                    return false;
                }
                self.unverified = true;
            }
            NetlinkEvent::LinkChanged(link) if self.is_recreated(link) => self.move_to(link),
            NetlinkEvent::Overrun => {
                tracing::warn!(
                    "netlink notifications were lost; checking the route and neighbours"
                );
                self.unverified = true;
            }
            _ => return false,
        }
        true
    }

    /// Settles what events may have missed by listing: the route and its
    /// neighbour entry (marked missing if gone) and the managed neighbour
    /// entries (taken as they are, so the next sync adds what is gone and
    /// deletes what is unwanted, including leftovers of a failed delete).
    pub async fn verify(&mut self, nl: &impl Netlink) -> Result<(), NetconfError> {
        // A re-creation whose notification was lost.
        if let Some((name, _)) = &self.recreation {
            match nl.link_by_name(name).await {
                Ok(link) if self.is_recreated(&link) => self.move_to(&link),
                Ok(_) | Err(NetlinkError::NoSuchLink(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let entries = nl.neighbours(self.route.ifindex).await?;
        if !self.route_missing {
            let gateway = entries
                .iter()
                .any(|e| e.dst == self.route.gateway() && !e.managed);
            if !gateway || !self.route.is_installed(nl).await? {
                tracing::warn!(route = %self.route.network, "cluster route or its neighbour entry is missing; putting it back");
                self.route_missing = true;
            }
        }
        self.neighbours = entries
            .into_iter()
            .filter(|e| e.managed)
            .map(|e| e.dst)
            .collect();
        self.unverified = false;
        Ok(())
    }

    /// Puts everything back that is missing.
    async fn repair(&mut self, nl: &impl Netlink, peers: &BTreeSet<Ipv4Addr>) {
        let verified = if self.unverified {
            self.verify(nl).await
        } else {
            Ok(())
        };
        // Typically the link is down; its coming up is an event.
        let route = match verified {
            Ok(()) => self.ensure_route(nl).await,
            Err(e) => Err(e),
        }
        .err()
        .map(|e| format!("cannot install the cluster route yet: {e}"));
        let neighbours = self
            .sync_neighbours(nl, peers)
            .await
            .err()
            .map(|e| format!("cannot update neighbour entries for peers: {e}"));
        let failure = match (route, neighbours) {
            (Some(r), Some(n)) => Some(format!("{r}; {n}")),
            (r, n) => r.or(n),
        };
        match (&failure, &self.last_failure) {
            (Some(now), last) if last.as_ref() != Some(now) => {
                tracing::warn!("{now}; retrying on the next change or resync");
            }
            (None, Some(_)) => tracing::info!("host networking repaired"),
            _ => {}
        }
        self.last_failure = failure;
    }

    /// Whether the last repair left something undone.
    fn failing(&self) -> bool {
        self.last_failure.is_some()
    }

    /// Runs until the peer set's sender is dropped: follows kernel events
    /// (`None`: only the periodic check) and the watcher's peer set, and
    /// checks everything every [`RESYNC_INTERVAL`]. While a repair keeps
    /// failing, every wake-up retries it.
    pub async fn run(
        mut self,
        nl: &impl Netlink,
        mut events: Option<NetlinkEvents>,
        mut peers: tokio::sync::watch::Receiver<BTreeSet<Ipv4Addr>>,
    ) {
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut needed = true;
        loop {
            if needed {
                let current = peers.borrow_and_update().clone();
                self.repair(nl, &current).await;
            }
            let next_event = async {
                match events.as_mut() {
                    Some(e) => e.next().await,
                    None => std::future::pending().await,
                }
            };
            needed = tokio::select! {
                changed = peers.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                event = next_event => match event {
                    Some(event) => self.on_event(&event),
                    None => {
                        tracing::warn!("netlink event socket closed; subscribing again");
                        events = match NetlinkEvents::subscribe() {
                            Ok(e) => Some(e),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot follow netlink events; relying on the periodic check");
                                None
                            }
                        };
                        self.unverified = true;
                        true
                    }
                },
                _ = resync.tick() => {
                    self.unverified = true;
                    true
                }
            } || self.failing();
        }
    }
}

/// Containers behind the bridge need the host to forward their packets.
pub fn enable_ipv4_forwarding() -> Result<(), NetconfError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if fs::read_to_string(PATH)
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
    {
        return Ok(());
    }
    fs::write(PATH, "1").map_err(NetconfError::Forwarding)
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;
    use crate::netlink::{NeighbourEntry, VxlanLink, VxlanParams};

    /// The kernel's tables as a fake netlink sees them: enough state to
    /// check what the logic above installs, deletes and puts back.
    #[derive(Default)]
    struct FakeNetlink {
        links: Vec<(Link, Vec<Ipv4Net>)>,
        routes: RefCell<Vec<Route>>,
        neighbours: RefCell<BTreeMap<(u32, Ipv4Addr), NeighbourKind>>,
        /// Every mutating call, in order, to check for churn.
        calls: RefCell<Vec<String>>,
        /// Makes route_replace fail with this errno, as a down link does.
        route_errno: RefCell<Option<i32>>,
        /// Routes someone else installed.
        foreign_routes: Vec<ListedRoute>,
        /// VXLAN devices by name.
        vxlans: RefCell<BTreeMap<String, VxlanLink>>,
    }

    fn kernel_error(op: &str, errno: i32) -> NetlinkError {
        NetlinkError::Kernel {
            op: op.to_owned(),
            errno,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    impl Netlink for FakeNetlink {
        async fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError> {
            self.links
                .iter()
                .find(|(l, _)| l.name == name)
                .map(|(l, _)| l.clone())
                .ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))
        }
        async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
            Ok(self.links.iter().map(|(l, _)| l.clone()).collect())
        }
        async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
            Ok(self
                .links
                .iter()
                .find(|(l, _)| l.index == index)
                .map(|(l, _)| l.clone()))
        }
        async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
            Ok(self
                .links
                .iter()
                .find(|(l, _)| l.index == ifindex)
                .map(|(_, a)| a.clone())
                .unwrap_or_default())
        }
        async fn neighbour_replace(&self, n: &Neighbour) -> Result<(), NetlinkError> {
            self.calls
                .borrow_mut()
                .push(format!("neigh replace {}", n.dst));
            self.neighbours
                .borrow_mut()
                .insert((n.ifindex, n.dst), n.kind);
            Ok(())
        }
        async fn neighbour_delete(
            &self,
            ifindex: u32,
            dst: Ipv4Addr,
        ) -> Result<bool, NetlinkError> {
            self.calls.borrow_mut().push(format!("neigh del {dst}"));
            Ok(self
                .neighbours
                .borrow_mut()
                .remove(&(ifindex, dst))
                .is_some())
        }
        async fn neighbours(&self, ifindex: u32) -> Result<Vec<NeighbourEntry>, NetlinkError> {
            Ok(self
                .neighbours
                .borrow()
                .iter()
                .filter(|((i, _), _)| *i == ifindex)
                .map(|((_, dst), kind)| NeighbourEntry {
                    dst: *dst,
                    managed: *kind == NeighbourKind::Managed,
                })
                .collect())
        }
        async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError> {
            if let Some(errno) = *self.route_errno.borrow() {
                return Err(kernel_error("route replace", errno));
            }
            self.calls
                .borrow_mut()
                .push(format!("route replace {}", route.dst));
            let mut routes = self.routes.borrow_mut();
            routes.retain(|r| r.dst != route.dst);
            routes.push(*route);
            Ok(())
        }
        async fn route_delete(&self, route: &Route) -> Result<bool, NetlinkError> {
            self.calls
                .borrow_mut()
                .push(format!("route del {}", route.dst));
            let mut routes = self.routes.borrow_mut();
            let before = routes.len();
            routes.retain(|r| !(r.dst == route.dst && r.gateway == route.gateway));
            Ok(routes.len() != before)
        }
        async fn routes(&self) -> Result<Vec<ListedRoute>, NetlinkError> {
            let routes = self.routes.borrow();
            let installed = routes.iter().map(|r| ListedRoute {
                dst: r.dst,
                gateway: Some(r.gateway),
                ifindex: Some(r.ifindex),
                table: 254,
                onlink: r.onlink,
                mtu: r.mtu,
            });
            Ok(installed
                .chain(self.foreign_routes.iter().copied())
                .collect())
        }
        async fn vxlan_by_name(&self, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
            Ok(self.vxlans.borrow().get(name).cloned())
        }
        async fn vxlan_add(&self, dev: &ExternalVxlan) -> Result<(), NetlinkError> {
            self.calls
                .borrow_mut()
                .push(format!("vxlan add {} port {}", dev.name, dev.port));
            let mut vxlans = self.vxlans.borrow_mut();
            if vxlans.contains_key(&dev.name) {
                return Err(kernel_error("vxlan add", libc::EEXIST));
            }
            let index = 100 + vxlans.len() as u32 + self.calls.borrow().len() as u32;
            vxlans.insert(
                dev.name.clone(),
                VxlanLink {
                    link: Link {
                        index,
                        name: dev.name.clone(),
                        mac: [2, 0, 0, 0, 0, 9],
                        mtu: dev.mtu,
                        up: true,
                    },
                    vxlan: Some(VxlanParams {
                        external: true,
                        learning: false,
                        port: dev.port,
                    }),
                },
            );
            Ok(())
        }
        async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
            self.calls.borrow_mut().push(format!("link up {index}"));
            Ok(())
        }
        async fn link_delete(&self, index: u32) -> Result<bool, NetlinkError> {
            self.calls.borrow_mut().push(format!("link del {index}"));
            let mut vxlans = self.vxlans.borrow_mut();
            let before = vxlans.len();
            vxlans.retain(|_, v| v.link.index != index);
            Ok(vxlans.len() != before)
        }
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test network")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn eth0() -> FakeNetlink {
        FakeNetlink {
            links: vec![(
                Link {
                    index: 7,
                    name: "eth0".to_owned(),
                    mac: MAC,
                    mtu: 1500,
                    up: true,
                },
                vec![net("198.18.0.1/24"), net("198.18.5.1/24")],
            )],
            ..FakeNetlink::default()
        }
    }

    fn cluster_route() -> ClusterRoute {
        ClusterRoute {
            network: net("10.244.0.0/16"),
            ifindex: 7,
            iface_mac: MAC,
            mtu: Some(1450),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn interface_lookup_reads_link_and_addresses_primary_first() {
        let nl = eth0();
        let iface = block_on(Interface::lookup(&nl, "eth0")).expect("lookup");
        assert_eq!(iface.ifindex, 7);
        assert_eq!(iface.mac, MAC);
        assert_eq!(iface.mtu, 1500);
        assert_eq!(iface.primary_ipv4().expect("primary"), ip("198.18.0.1"));
    }

    /// eth0 (index 7, the default route's) and ens5 (index 8, the route to
    /// 198.19.0.0/16), each with one address.
    fn two_interfaces() -> FakeNetlink {
        let link = |index, name: &str| Link {
            index,
            name: name.to_owned(),
            mac: MAC,
            mtu: 1500,
            up: true,
        };
        let route = |dst: &str, ifindex| ListedRoute {
            dst: net(dst),
            gateway: None,
            ifindex: Some(ifindex),
            table: 254,
            onlink: false,
            mtu: None,
        };
        FakeNetlink {
            links: vec![
                (link(7, "eth0"), vec![net("198.18.0.1/24")]),
                (link(8, "ens5"), vec![net("198.19.1.1/24")]),
            ],
            foreign_routes: vec![route("0.0.0.0/0", 7), route("198.19.0.0/16", 8)],
            ..FakeNetlink::default()
        }
    }

    fn chosen(choice: IfaceChoice) -> Result<(String, Option<Ipv4Addr>), NetconfError> {
        let nl = two_interfaces();
        block_on(choose_interface(&nl, &choice)).map(|(iface, by)| (iface.name, by))
    }

    fn names(ifaces: &[&str]) -> Vec<String> {
        ifaces.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn with_no_interface_flag_the_public_ip_or_else_the_default_route_chooses() {
        let (name, by) = chosen(IfaceChoice::default()).expect("default route");
        assert_eq!((name.as_str(), by), ("eth0", None));
        let public = IfaceChoice {
            public_ip: Some(ip("198.19.1.1")),
            ..IfaceChoice::default()
        };
        let (name, by) = chosen(public).expect("--public-ip");
        assert_eq!((name.as_str(), by), ("ens5", Some(ip("198.19.1.1"))));
        let elsewhere = IfaceChoice {
            public_ip: Some(ip("203.0.113.9")),
            ..IfaceChoice::default()
        };
        let err = chosen(elsewhere).expect_err("no interface holds it");
        assert!(err.to_string().contains("--public-ip 203.0.113.9"), "{err}");
    }

    #[test]
    fn iface_then_regex_then_can_reach_each_used_when_the_one_before_matches_nothing() {
        let by_iface = IfaceChoice {
            ifaces: names(&["eth9", "198.19.1.1"]),
            regexes: names(&["^eth0$"]),
            ..IfaceChoice::default()
        };
        let (name, by) = chosen(by_iface).expect("--iface by address");
        assert_eq!((name.as_str(), by), ("ens5", Some(ip("198.19.1.1"))));
        let by_regex = IfaceChoice {
            ifaces: names(&["eth9"]),
            regexes: names(&["^wlan", "^ens"]),
            can_reach: Some(ip("198.18.0.7")),
            ..IfaceChoice::default()
        };
        let (name, by) = chosen(by_regex).expect("--iface-regex by name");
        assert_eq!((name.as_str(), by), ("ens5", None));
        let by_route = IfaceChoice {
            ifaces: names(&["eth9"]),
            regexes: names(&["^wlan"]),
            can_reach: Some(ip("198.19.7.7")),
            ..IfaceChoice::default()
        };
        let (name, by) = chosen(by_route).expect("--iface-can-reach");
        assert_eq!((name.as_str(), by), ("ens5", None));
    }

    #[test]
    fn a_regex_matches_addresses_before_names_and_nothing_matching_names_every_try() {
        // ens5's name and eth0's address both match: the address wins, as
        // in flanneld's ipmatch.
        let both = IfaceChoice {
            regexes: names(&[r"^(ens5|198\.18\.0\.1)$"]),
            ..IfaceChoice::default()
        };
        let (name, by) = chosen(both).expect("a match");
        assert_eq!((name.as_str(), by), ("eth0", Some(ip("198.18.0.1"))));
        // Without a default route nothing reaches 203.0.113.9.
        let nl = FakeNetlink {
            foreign_routes: vec![],
            ..two_interfaces()
        };
        let none = IfaceChoice {
            ifaces: names(&["eth9"]),
            regexes: names(&["^wlan"]),
            can_reach: Some(ip("203.0.113.9")),
            ..IfaceChoice::default()
        };
        let err = block_on(choose_interface(&nl, &none)).expect_err("nothing matches");
        let text = err.to_string();
        for part in [
            "--iface eth9",
            "--iface-regex ^wlan",
            "--iface-can-reach 203.0.113.9",
        ] {
            assert!(text.contains(part), "{text}");
        }
        let bad = IfaceChoice {
            regexes: names(&["("]),
            ..IfaceChoice::default()
        };
        assert!(matches!(chosen(bad), Err(NetconfError::BadRegex { .. })));
    }

    #[test]
    fn missing_interface_and_missing_address_are_named_errors() {
        let nl = eth0();
        let err = block_on(Interface::lookup(&nl, "eth9")).expect_err("no eth9");
        assert!(matches!(err, NetconfError::NoInterface { ref iface } if iface == "eth9"));
        let bare = Interface {
            name: "eth1".to_owned(),
            ifindex: 8,
            mac: MAC,
            mtu: 1500,
            addrs: vec![],
        };
        assert!(matches!(
            bare.primary_ipv4(),
            Err(NetconfError::NoIpv4 { .. })
        ));
    }

    #[test]
    fn cluster_route_is_onlink_via_the_network_address_with_a_permanent_neighbour() {
        let nl = eth0();
        let route = cluster_route();
        block_on(route.install(&nl)).expect("install");
        let routes = nl.routes.borrow().clone();
        assert_eq!(
            routes,
            vec![Route {
                dst: net("10.244.0.0/16"),
                gateway: ip("10.244.0.0"),
                ifindex: 7,
                onlink: true,
                mtu: Some(1450),
            }]
        );
        assert_eq!(
            nl.neighbours.borrow().get(&(7, ip("10.244.0.0"))),
            Some(&NeighbourKind::Permanent { mac: MAC })
        );
        assert!(block_on(route.is_installed(&nl)).expect("check"));
        // Installing again replaces, never fails on "File exists".
        block_on(route.install(&nl)).expect("install again");
        assert_eq!(nl.routes.borrow().len(), 1);
    }

    #[test]
    fn removing_an_absent_cluster_route_is_not_an_error() {
        let nl = eth0();
        let route = ClusterRoute {
            mtu: None,
            ..cluster_route()
        };
        block_on(route.remove(&nl)).expect("remove of nothing");
        block_on(cluster_route().install(&nl)).expect("install");
        block_on(route.remove(&nl)).expect("remove");
        assert!(nl.routes.borrow().is_empty());
        assert!(nl.neighbours.borrow().is_empty());
    }

    #[test]
    fn a_route_with_another_mtu_counts_as_not_installed() {
        let nl = eth0();
        block_on(
            ClusterRoute {
                mtu: Some(1500),
                ..cluster_route()
            }
            .install(&nl),
        )
        .expect("install");
        assert!(!block_on(cluster_route().is_installed(&nl)).expect("check"));
    }

    #[test]
    fn neighbours_follow_on_link_peers_without_churn() {
        let nl = eth0();
        let mut host = HostNetworking::new(cluster_route(), vec![net("198.18.0.0/24")]);
        let peers: BTreeSet<_> = [ip("198.18.0.2"), ip("198.18.0.3"), ip("203.0.113.9")].into();
        block_on(host.sync_neighbours(&nl, &peers)).expect("sync");
        let managed: Vec<_> = nl.neighbours.borrow().keys().map(|(_, d)| *d).collect();
        // The routed peer (not on any of eth0's subnets) gets no entry.
        assert_eq!(managed, vec![ip("198.18.0.2"), ip("198.18.0.3")]);

        nl.calls.borrow_mut().clear();
        block_on(host.sync_neighbours(&nl, &peers)).expect("resync");
        assert!(
            nl.calls.borrow().is_empty(),
            "a resync with no change touches nothing"
        );

        let fewer: BTreeSet<_> = [ip("198.18.0.3")].into();
        block_on(host.sync_neighbours(&nl, &fewer)).expect("shrink");
        assert_eq!(*nl.calls.borrow(), vec!["neigh del 198.18.0.2".to_owned()]);
    }

    #[test]
    fn cleanup_removes_only_managed_entries() {
        let nl = eth0();
        block_on(cluster_route().install(&nl)).expect("install");
        let mut host = HostNetworking::new(cluster_route(), vec![net("198.18.0.0/24")]);
        block_on(host.sync_neighbours(&nl, &[ip("198.18.0.2")].into())).expect("sync");
        assert_eq!(
            block_on(remove_managed_neighbours(&nl, 7)).expect("cleanup"),
            1
        );
        // The cluster route's permanent entry is not a peer's.
        assert_eq!(nl.neighbours.borrow().len(), 1);
    }

    #[test]
    fn removed_route_neighbour_or_link_flap_is_put_back() {
        let nl = eth0();
        let mut host = HostNetworking::new(cluster_route(), vec![net("198.18.0.0/24")]);
        let peers: BTreeSet<_> = [ip("198.18.0.2")].into();
        block_on(host.repair(&nl, &peers));
        assert_eq!(nl.routes.borrow().len(), 1);

        // Someone deletes the route: the event marks it, repair restores it.
        let removed = nl.routes.borrow_mut().remove(0);
        assert!(host.on_event(&NetlinkEvent::RouteRemoved(removed)));
        block_on(host.repair(&nl, &peers));
        assert!(block_on(cluster_route().is_installed(&nl)).expect("check"));

        // A peer's neighbour entry is flushed.
        nl.neighbours.borrow_mut().remove(&(7, ip("198.18.0.2")));
        assert!(host.on_event(&NetlinkEvent::NeighbourRemoved {
            ifindex: 7,
            dst: ip("198.18.0.2"),
        }));
        block_on(host.repair(&nl, &peers));
        assert!(nl.neighbours.borrow().contains_key(&(7, ip("198.18.0.2"))));

        // Events about other routes, links and neighbours change nothing.
        let mut other = removed;
        other.dst = net("10.99.0.0/16");
        assert!(!host.on_event(&NetlinkEvent::RouteRemoved(other)));
        assert!(!host.on_event(&NetlinkEvent::NeighbourRemoved {
            ifindex: 9,
            dst: ip("198.18.0.2"),
        }));
        let mut lo = nl.links[0].0.clone();
        lo.index = 1;
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(lo)));

        // The link goes down and comes back up: the kernel flushed the route
        // and the neighbour entries without a word.
        let up = nl.links[0].0.clone();
        let down = Link {
            up: false,
            ..up.clone()
        };
        assert!(
            !host.on_event(&NetlinkEvent::LinkChanged(up.clone())),
            "no transition"
        );
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(down)));
        nl.routes.borrow_mut().clear();
        nl.neighbours.borrow_mut().clear();
        assert!(host.on_event(&NetlinkEvent::LinkChanged(up.clone())));
        block_on(host.repair(&nl, &peers));
        assert!(block_on(cluster_route().is_installed(&nl)).expect("check"));
        assert!(nl.neighbours.borrow().contains_key(&(7, ip("10.244.0.0"))));
        assert!(nl.neighbours.borrow().contains_key(&(7, ip("198.18.0.2"))));
        // Changes of an up link (MTU, XDP attached) are no reason to act.
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(up)));
    }

    #[test]
    fn a_recreated_iface_takes_the_route_and_is_reported_once_by_event_or_listing() {
        let mut nl = eth0();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut host = HostNetworking::new(cluster_route(), vec![net("198.18.0.0/24")])
            .follow_recreation("eth0".to_owned(), tx);
        let peers: BTreeSet<_> = [ip("198.18.0.2")].into();
        block_on(host.repair(&nl, &peers));
        // Another interface's changes, and eth0's own, are not a re-creation.
        let other = Link {
            index: 8,
            name: "eth1".to_owned(),
            ..nl.links[0].0.clone()
        };
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(other)));
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(nl.links[0].0.clone())));
        assert!(rx.try_recv().is_err());

        // eth0 deleted and added again: ifindex 9, another MAC.
        let new = Link {
            index: 9,
            mac: [2, 0, 0, 0, 0, 9],
            ..nl.links[0].0.clone()
        };
        nl.links[0].0 = new.clone();
        nl.routes.borrow_mut().clear();
        nl.neighbours.borrow_mut().clear();
        assert!(host.on_event(&NetlinkEvent::LinkChanged(new.clone())));
        assert_eq!(rx.try_recv().ok(), Some(new.clone()));
        block_on(host.repair(&nl, &peers));
        let moved = ClusterRoute {
            ifindex: 9,
            iface_mac: new.mac,
            ..cluster_route()
        };
        assert!(block_on(moved.is_installed(&nl)).expect("check"));
        assert!(nl.neighbours.borrow().contains_key(&(9, ip("198.18.0.2"))));
        assert!(!host.on_event(&NetlinkEvent::LinkChanged(new)));
        assert!(rx.try_recv().is_err(), "reported once");

        // Again, with the notification lost: the listing finds it.
        nl.links[0].0.index = 11;
        assert!(host.on_event(&NetlinkEvent::Overrun));
        block_on(host.repair(&nl, &peers));
        assert_eq!(rx.try_recv().map(|l| l.index).ok(), Some(11));
        assert!(nl.neighbours.borrow().contains_key(&(11, ip("198.18.0.2"))));
    }

    #[test]
    fn lost_notifications_are_settled_by_listing() {
        let nl = eth0();
        let mut host = HostNetworking::new(cluster_route(), vec![net("198.18.0.0/24")]);
        let peers: BTreeSet<_> = [ip("198.18.0.2")].into();
        block_on(host.repair(&nl, &peers));
        // Unseen by events: the gateway entry and the peer's entry vanish,
        // and a stale managed entry (a failed delete) is left behind.
        nl.neighbours.borrow_mut().clear();
        nl.neighbours
            .borrow_mut()
            .insert((7, ip("198.18.0.9")), NeighbourKind::Managed);
        assert!(host.on_event(&NetlinkEvent::Overrun));
        block_on(host.repair(&nl, &peers));
        let entries: Vec<Ipv4Addr> = nl.neighbours.borrow().keys().map(|(_, d)| *d).collect();
        assert_eq!(entries, vec![ip("10.244.0.0"), ip("198.18.0.2")]);
    }

    #[test]
    fn a_failed_install_stays_pending_until_it_succeeds() {
        let nl = eth0();
        let mut host = HostNetworking::new(cluster_route(), vec![]);
        *nl.route_errno.borrow_mut() = Some(libc::ENETDOWN);
        let err = block_on(host.ensure_route(&nl)).expect_err("link down");
        assert_eq!(
            match err {
                NetconfError::Netlink(e) => e.errno(),
                _ => None,
            },
            Some(libc::ENETDOWN)
        );
        *nl.route_errno.borrow_mut() = None;
        block_on(host.ensure_route(&nl)).expect("link up again");
        assert_eq!(nl.routes.borrow().len(), 1);
    }

    #[test]
    fn resync_notices_a_route_removed_without_an_event() {
        let nl = eth0();
        let mut host = HostNetworking::new(cluster_route(), vec![]);
        block_on(host.ensure_route(&nl)).expect("install");
        nl.routes.borrow_mut().clear();
        block_on(host.verify(&nl)).expect("check");
        block_on(host.ensure_route(&nl)).expect("reinstall");
        assert!(block_on(cluster_route().is_installed(&nl)).expect("check"));
    }

    fn foreign(dst: &str, gateway: Option<&str>) -> ListedRoute {
        ListedRoute {
            dst: net(dst),
            gateway: gateway.map(ip),
            ifindex: Some(7),
            table: 254,
            onlink: false,
            mtu: None,
        }
    }

    #[test]
    fn a_network_that_would_capture_what_the_node_needs_is_refused() {
        let check = |nl: &FakeNetlink, addrs: &[Ipv4Net], etcd: &[Ipv4Addr]| {
            block_on(check_network_capture(
                nl,
                &cluster_route(),
                net("10.244.5.0/24"),
                addrs,
                etcd,
                &[],
            ))
        };
        let underlay = [net("198.18.0.1/24")];
        let mut nl = eth0();
        nl.foreign_routes = vec![
            foreign("198.18.0.0/24", None),
            foreign("0.0.0.0/0", Some("198.18.0.254")),
            // The container bridge's route, inside this node's subnet.
            foreign("10.244.5.0/24", None),
        ];
        block_on(cluster_route().install(&nl)).expect("install");
        check(&nl, &underlay, &[ip("198.18.0.254")]).expect("nothing captured, a restart");

        let captured =
            |nl: &FakeNetlink, addrs: &[Ipv4Net], etcd: &[Ipv4Addr]| match check(nl, addrs, etcd) {
                Err(NetconfError::NetworkCaptures { what, .. }) => what,
                other => panic!("not refused: {other:?}"),
            };
        assert!(captured(&nl, &[net("10.244.9.9/24")], &[]).contains("own address"));
        assert!(captured(&nl, &underlay, &[ip("10.244.0.10")]).contains("etcd"));
        let mut routed = eth0();
        routed.foreign_routes = vec![foreign("10.244.77.0/24", Some("198.18.0.254"))];
        assert!(captured(&routed, &underlay, &[]).contains("10.244.77.0/24 via 198.18.0.254"));
        // The same route found as flanneld's (host-gw) is the agent's to replace.
        block_on(check_network_capture(
            &routed,
            &cluster_route(),
            net("10.244.5.0/24"),
            &underlay,
            &[],
            &routed.foreign_routes,
        ))
        .expect("flannel's routes are adopted, not refused");
        let mut wider = eth0();
        wider.foreign_routes = vec![foreign("10.0.0.0/8", Some("198.18.0.254"))];
        assert!(captured(&wider, &underlay, &[]).contains("10.0.0.0/8"));
        let mut gateway = eth0();
        gateway.foreign_routes = vec![foreign("0.0.0.0/0", Some("10.244.3.1"))];
        assert!(captured(&gateway, &underlay, &[]).contains("default route"));
        // Another route to exactly the Network would be overwritten.
        let mut same = eth0();
        same.foreign_routes = vec![foreign("10.244.0.0/16", Some("198.18.0.9"))];
        assert!(captured(&same, &underlay, &[]).contains("10.244.0.0/16"));
    }

    #[test]
    fn errno_classification_is_by_number() {
        assert!(kernel_error("x", libc::ENOENT).is_not_found());
        assert!(kernel_error("x", libc::ESRCH).is_not_found());
        assert!(kernel_error("x", libc::ENODEV).is_not_found());
        assert!(!kernel_error("x", libc::EPERM).is_not_found());
        assert!(NetlinkError::NoSuchLink("eth9".to_owned()).is_not_found());
    }

    #[test]
    fn slow_path_device_is_created_once_and_replaced_when_it_differs() {
        let nl = eth0();
        let dev = slow_path_device(8472, 1500);
        let (index, created) = block_on(ensure_slow_path_device(&nl, &dev)).expect("create");
        assert!(created);
        // A restart adopts it: no churn, same ifindex.
        let calls = nl.calls.borrow().len();
        assert_eq!(
            block_on(ensure_slow_path_device(&nl, &dev)).expect("adopt"),
            (index, false)
        );
        assert_eq!(nl.calls.borrow().len(), calls, "adopting changed something");
        // Another port (the config changed): replaced.
        let other = slow_path_device(4789, 1500);
        let (new_index, created) = block_on(ensure_slow_path_device(&nl, &other)).expect("port");
        assert!(created);
        assert_ne!(new_index, index);
        assert_eq!(
            nl.vxlans.borrow()[SLOW_PATH_DEVICE].vxlan.map(|v| v.port),
            Some(4789)
        );
        // A link of that name that is no VXLAN device is replaced too.
        nl.vxlans.borrow_mut().insert(
            SLOW_PATH_DEVICE.to_owned(),
            VxlanLink {
                link: Link {
                    index: 55,
                    name: SLOW_PATH_DEVICE.to_owned(),
                    mac: MAC,
                    mtu: 1500,
                    up: true,
                },
                vxlan: None,
            },
        );
        let (index, created) = block_on(ensure_slow_path_device(&nl, &dev)).expect("replace");
        assert!(created && index != 55);
        assert!(nl.calls.borrow().contains(&"link del 55".to_owned()));
    }

    #[test]
    fn slow_path_device_removal_is_idempotent() {
        let nl = eth0();
        block_on(ensure_slow_path_device(&nl, &slow_path_device(8472, 1500))).expect("create");
        assert!(block_on(remove_slow_path_device(&nl)).expect("remove"));
        assert!(!block_on(remove_slow_path_device(&nl)).expect("remove again"));
        assert!(nl.vxlans.borrow().is_empty());
    }

    #[test]
    fn a_learning_or_non_external_vxlan_is_not_the_slow_path_device() {
        let want = slow_path_device(8472, 1500);
        let mut link = VxlanLink {
            link: Link {
                index: 1,
                name: want.name.clone(),
                mac: MAC,
                mtu: 1500,
                up: true,
            },
            vxlan: Some(VxlanParams {
                external: true,
                learning: false,
                port: 8472,
            }),
        };
        assert!(link.matches(&want));
        link.vxlan = Some(VxlanParams {
            external: false,
            learning: false,
            port: 8472,
        });
        assert!(!link.matches(&want));
        link.vxlan = Some(VxlanParams {
            external: true,
            learning: true,
            port: 8472,
        });
        assert!(!link.matches(&want));
    }
}
