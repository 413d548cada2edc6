//! Adopting a node that flanneld ran on, in place and without a gap.
//!
//! flanneld leaves its kernel state behind when it stops: the `flannel.1`
//! (and `flannel-v6.1`) VXLAN device with a route, a permanent neighbour and
//! an fdb entry per peer; host-gw's routes to the other leases via their
//! PublicIPs; its `FLANNEL-*` iptables chains; the subnet file; its lease.
//! The agent keeps the lease (subnet file and PublicIP lead it there) and
//! removes the rest, but only once its own data path forwards to every
//! subnet flannel's routes lead to. Until then flannel's more specific
//! routes keep carrying this node's outgoing traffic, and the XDP decap
//! hook, which rewrites the inner destination MAC, already receives frames
//! addressed to flannel.1's MAC as well as to weft's. So no packet meets a
//! node with neither data path. The lease keeps flannel's VtepMAC until the
//! data path is attached; only then does it get weft's, which flannel peers
//! follow as on any lease update (a replaced neighbour and fdb entry).

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use etcd_client::Client;
use ipnet::Ipv4Net;

use crate::{
    datapath::{Datapath, DatapathError, DecapMode},
    flannel::{KeyLayout, LeaseAttrs},
    lease_manager::{Acquired, LeaseError, LeaseManager, list_leases},
    netlink::{Link, ListedRoute, Netlink, NetlinkError, Route, RtNetlink},
    nft::{Nft, NftError},
    pinned::{PinnedError, PinnedState},
};

/// flanneld's VXLAN devices (IPv4 and IPv6, VNI 1).
pub const FLANNEL_DEVICES: [&str; 2] = ["flannel.1", "flannel-v6.1"];
/// flanneld's iptables chains (`FLANNEL-POSTRTG`, `FLANNEL-FWD`).
pub const CHAIN_PREFIX: &str = "FLANNEL-";
/// iptables-nft's tables (family ip) flanneld puts chains in.
const IPTABLES_TABLES: [&str; 3] = ["filter", "nat", "mangle"];
/// How often the peer map is checked while waiting to cover flannel's routes.
const COVER_POLL: Duration = Duration::from_millis(20);
/// How long flannel's state waits for the peer map to cover its routes;
/// after that the routes whose subnets no lease names any more go too.
const COVER_WAIT: Duration = Duration::from_secs(30);
const PUBLISH_RETRY: Duration = Duration::from_millis(500);
const PUBLISH_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Pinned(#[from] PinnedError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// What flanneld left on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlannelState {
    /// flanneld's VXLAN devices that exist.
    pub devices: Vec<Link>,
    /// Its routes to other nodes' subnets: via a flannel device (vxlan) or
    /// via a peer's PublicIP on the underlay (host-gw, DirectRouting).
    pub routes: Vec<ListedRoute>,
    /// Its iptables chains, as (table, chain).
    pub chains: Vec<(&'static str, String)>,
}

impl FlannelState {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.routes.is_empty() && self.chains.is_empty()
    }

    /// flannel.1's MAC: the VtepMAC flanneld published in this node's lease.
    pub fn vtep_mac(&self) -> Option<[u8; 6]> {
        self.devices
            .iter()
            .find(|d| d.name == FLANNEL_DEVICES[0])
            .map(|d| d.mac)
    }

    /// The subnets flannel's routes lead to.
    pub fn subnets(&self) -> BTreeSet<Ipv4Net> {
        self.routes.iter().map(|r| r.dst).collect()
    }
}

/// flannel's routes among `routes`: to a subnet inside `network` (not the
/// network itself, which is weft's cluster route) through one of
/// `devices`, or through a gateway on the underlay `underlay` (host-gw
/// routes carry no onlink flag; weft installs no per-subnet routes).
pub fn flannel_routes(
    routes: &[ListedRoute],
    network: Ipv4Net,
    underlay: u32,
    devices: &[u32],
) -> Vec<ListedRoute> {
    routes
        .iter()
        .filter(|r| r.dst != network && network.contains(&r.dst))
        .filter(|r| match r.ifindex {
            Some(i) if devices.contains(&i) => true,
            Some(i) => i == underlay && r.gateway.is_some() && !r.onlink,
            None => false,
        })
        .copied()
        .collect()
}

/// Looks for flanneld's state. `network` is the cluster network, `underlay`
/// the interface weft uses.
pub async fn detect(
    nl: &impl Netlink,
    network: Ipv4Net,
    underlay: u32,
) -> Result<FlannelState, TakeoverError> {
    let mut devices = Vec::new();
    for name in FLANNEL_DEVICES {
        if let Some(link) = nl.vxlan_by_name(name).await?
            && link.vxlan.is_some()
        {
            devices.push(link.link);
        }
    }
    let indexes: Vec<u32> = devices.iter().map(|d| d.index).collect();
    let routes = flannel_routes(&nl.routes().await?, network, underlay, &indexes);
    let mut nft = Nft::open()?;
    let mut chains = Vec::new();
    for table in IPTABLES_TABLES {
        for chain in nft.chains(table)? {
            if chain.starts_with(CHAIN_PREFIX) {
                chains.push((table, chain));
            }
        }
    }
    Ok(FlannelState {
        devices,
        routes,
        chains,
    })
}

/// Keeps of `routes` those through a flannel device (`devices`) and those
/// via the PublicIP that the lease for their subnet names (`leases`): a
/// route someone else added inside the network is not flannel's to remove
/// (the capture check then refuses it, as on any node).
pub fn confirmed_by_leases(
    routes: Vec<ListedRoute>,
    devices: &[u32],
    leases: &[(Ipv4Net, Ipv4Addr)],
) -> Vec<ListedRoute> {
    routes
        .into_iter()
        .filter(|r| {
            r.ifindex.is_some_and(|i| devices.contains(&i))
                || leases.contains(&(r.dst, r.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)))
        })
        .collect()
}

/// [`detect`], with routes via the underlay checked against the leases in
/// etcd ([`confirmed_by_leases`]) and what it finds logged once; a failure
/// is logged and counts as nothing found (the agent then starts as on a
/// fresh node).
pub async fn detect_logged(
    nl: &impl Netlink,
    client: &mut Client,
    keys: &KeyLayout,
    network: Ipv4Net,
    underlay: u32,
) -> FlannelState {
    let detected = detect(nl, network, underlay).await;
    let confirmed = match detected {
        Ok(mut state) => {
            let devices: Vec<u32> = state.devices.iter().map(|d| d.index).collect();
            // Only a node with routes via the underlay pays for a listing.
            if state
                .routes
                .iter()
                .any(|r| r.ifindex.is_none_or(|i| !devices.contains(&i)))
            {
                let leases = match list_leases(client, keys).await {
                    Ok(listing) => listing
                        .leases
                        .iter()
                        .map(|l| (l.subnet, l.attrs.public_ip))
                        .collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot list leases to tell flannel's host-gw routes; leaving them alone");
                        Vec::new()
                    }
                };
                state.routes = confirmed_by_leases(state.routes, &devices, &leases);
            }
            Ok(state)
        }
        Err(e) => Err(e),
    };
    match confirmed {
        Ok(state) => {
            if !state.is_empty() {
                tracing::info!(
                    devices = ?names(&state.devices),
                    routes = ?route_texts(&state.routes),
                    chains = ?chain_texts(&state.chains),
                    "found flanneld's state on this node: adopting its lease, and replacing it once weft's data path forwards"
                );
            }
            state
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for flanneld's state; starting as on a fresh node");
            FlannelState::default()
        }
    }
}

/// The attributes to lease with while flannel's data path still carries
/// this node's traffic: weft's own, but with flannel.1's VtepMAC, so peers
/// keep addressing the device that still receives until weft's hook does.
pub fn adopted_attrs(weft: &LeaseAttrs, state: &FlannelState) -> LeaseAttrs {
    let mut attrs = weft.clone();
    if let (Some(data), Some(mac)) = (attrs.backend_data.as_mut(), state.vtep_mac()) {
        data.vtep_mac = mac;
    }
    attrs
}

/// The decap hook to attach at start. None yet where flannel's VXLAN device
/// exists: the hook only decapsulates from nodes in the peer map, which the
/// watcher fills after start, so attached at once it would drop every
/// peer's packets until then; flannel.1 keeps receiving them instead, and
/// [`adopt_then_renew`] attaches the hook once the map is programmed.
pub fn early_decap(state: &FlannelState, decap: Option<DecapMode>) -> Option<DecapMode> {
    if state.devices.is_empty() {
        decap
    } else {
        None
    }
}

/// What the agent does about flannel's state once its data path is attached.
pub struct Adoption {
    pub nl: RtNetlink,
    pub state: FlannelState,
    /// `--flannel-takeover`: remove flannel's state (else it is left for
    /// the user, and logged once).
    pub remove: bool,
    pub pin_path: PathBuf,
    /// The attributes the lease should end with (weft's VtepMAC).
    pub attrs: LeaseAttrs,
    /// The attributes it was acquired with.
    pub acquired_with: LeaseAttrs,
    /// The loaded programs, for the decap hook [`early_decap`] held back.
    pub datapath: std::sync::Arc<tokio::sync::Mutex<Datapath>>,
    /// The underlay interface.
    pub iface: String,
    /// The decap hook the backend needs, if any.
    pub decap: Option<DecapMode>,
}

/// Takes over from flannel (see the module comment), publishes weft's
/// VtepMAC if the lease still carries flannel's, then renews the lease for
/// as long as the agent runs.
pub async fn adopt_then_renew(
    mut leases: LeaseManager,
    held: Acquired,
    mut adoption: Adoption,
) -> Result<(), LeaseError> {
    if !adoption.state.is_empty() {
        let started = Instant::now();
        let deferred = early_decap(&adoption.state, adoption.decap) != adoption.decap;
        let ready = async {
            wait_covered(&adoption).await?;
            if deferred {
                let hook = adoption
                    .datapath
                    .lock()
                    .await
                    .attach_decap(&adoption.iface, adoption.decap)?;
                tracing::info!(
                    ?hook,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "peer map programmed; decapsulation attached, in front of flannel's device"
                );
            }
            Ok::<(), TakeoverError>(())
        };
        if let Err(e) = ready.await {
            tracing::error!(error = %e, "cannot attach decapsulation after adopting flannel's node; flannel's state stays and keeps receiving");
            adoption.remove = false;
        }
        if adoption.remove {
            if let Err(e) = take_over(&adoption).await {
                tracing::error!(error = %e, "taking over from flannel failed part-way; what is left of its state stays (remove it by hand, see the README)");
            }
        } else {
            tracing::warn!(
                devices = ?names(&adoption.state.devices),
                routes = ?route_texts(&adoption.state.routes),
                chains = ?chain_texts(&adoption.state.chains),
                "--flannel-takeover=false: flanneld's state stays; its routes keep carrying this node's traffic to those subnets until removed by hand"
            );
        }
    }
    if adoption.attrs != adoption.acquired_with {
        publish(&mut leases, &held, adoption.attrs).await?;
    }
    leases.keep_renewed(held).await
}

/// Writes `attrs` into the lease, retrying a few times; a failure leaves
/// flannel's VtepMAC, which the XDP hook keeps receiving, so it is logged.
async fn publish(
    leases: &mut LeaseManager,
    held: &Acquired,
    attrs: LeaseAttrs,
) -> Result<(), LeaseError> {
    let mut delay = PUBLISH_RETRY;
    for attempt in 1..=PUBLISH_ATTEMPTS {
        match leases.publish(held, attrs.clone()).await {
            Ok(()) => {
                tracing::info!(subnet = %held.subnet, lease = %attrs.to_json(), "lease now carries weft's VtepMAC");
                return Ok(());
            }
            Err(e @ LeaseError::Lost(..)) => return Err(e),
            Err(e) if attempt == PUBLISH_ATTEMPTS => {
                tracing::warn!(error = %e, "cannot publish weft's VtepMAC; the lease keeps flannel's (still received) until the next renewal writes it");
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    Ok(())
}

/// Waits until weft's peer map covers flannel's routes (at most
/// [`COVER_WAIT`]: a subnet no lease names any more is logged).
async fn wait_covered(a: &Adoption) -> Result<(), TakeoverError> {
    let want = a.state.subnets();
    let started = Instant::now();
    loop {
        let have: BTreeSet<Ipv4Net> = PinnedState::open(&a.pin_path)?
            .peers()?
            .into_iter()
            .map(|(net, _)| net)
            .collect();
        let missing: Vec<Ipv4Net> = want.difference(&have).copied().collect();
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > COVER_WAIT {
            tracing::warn!(subnets = ?missing, "no lease names these subnets flannel routed to; their routes go too");
            return Ok(());
        }
        tokio::time::sleep(COVER_POLL).await;
    }
}

/// Removes flannel's routes, devices (their neighbour and fdb entries go
/// with them) and chains, and logs what went, once.
async fn take_over(a: &Adoption) -> Result<(), TakeoverError> {
    let started = Instant::now();
    for r in &a.state.routes {
        if let (Some(gateway), Some(ifindex)) = (r.gateway, r.ifindex) {
            a.nl.route_delete(&Route {
                dst: r.dst,
                gateway,
                ifindex,
                onlink: r.onlink,
                mtu: r.mtu,
            })
            .await?;
        }
    }
    for dev in &a.state.devices {
        a.nl.link_delete(dev.index).await?;
    }
    let mut nft = Nft::open()?;
    let mut jumps = 0;
    for table in IPTABLES_TABLES {
        if a.state.chains.iter().any(|(t, _)| *t == table) {
            jumps += nft.remove_chains_with_prefix(table, CHAIN_PREFIX)?.1;
        }
    }
    tracing::info!(
        devices = ?names(&a.state.devices),
        routes = ?route_texts(&a.state.routes),
        chains = ?chain_texts(&a.state.chains),
        jumps,
        took_ms = started.elapsed().as_millis() as u64,
        "took over from flannel: removed its devices (with their neighbour and fdb entries), routes and iptables chains"
    );
    Ok(())
}

fn names(links: &[Link]) -> Vec<&str> {
    links.iter().map(|l| l.name.as_str()).collect()
}

fn route_texts(routes: &[ListedRoute]) -> Vec<String> {
    routes
        .iter()
        .map(|r| match r.gateway {
            Some(gw) => format!("{} via {gw}", r.dst),
            None => r.dst.to_string(),
        })
        .collect()
}

fn chain_texts(chains: &[(&str, String)]) -> Vec<String> {
    chains.iter().map(|(t, c)| format!("{t} {c}")).collect()
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn route(dst: &str, gw: Option<&str>, ifindex: u32, onlink: bool) -> ListedRoute {
        ListedRoute {
            dst: dst.parse().unwrap(),
            gateway: gw.map(|g| g.parse::<Ipv4Addr>().unwrap()),
            ifindex: Some(ifindex),
            table: 254,
            onlink,
            mtu: None,
        }
    }

    #[test]
    fn flannels_routes_are_told_from_weft_and_the_hosts() {
        let network: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let (eth0, flannel1, cni0) = (2, 5, 7);
        let routes = [
            // flannel vxlan: <subnet> via <subnet>.0 dev flannel.1 onlink
            route("10.244.2.0/24", Some("10.244.2.0"), flannel1, true),
            // flannel host-gw / DirectRouting: <subnet> via <PublicIP>
            route("10.244.3.0/24", Some("198.18.0.3"), eth0, false),
            // weft's cluster route
            route("10.244.0.0/16", Some("10.244.0.0"), eth0, true),
            // this node's bridge
            route("10.244.1.0/24", None, cni0, false),
            // outside the network
            route("10.245.0.0/24", Some("198.18.0.9"), eth0, false),
            route("0.0.0.0/0", Some("198.18.0.254"), eth0, false),
        ];
        let found = flannel_routes(&routes, network, eth0, &[flannel1]);
        assert_eq!(found, routes[..2].to_vec());
        // Without the device, its routes are not recognised as flannel's.
        assert_eq!(
            flannel_routes(&routes, network, eth0, &[]),
            routes[1..2].to_vec()
        );
    }

    #[test]
    fn underlay_routes_are_flannels_only_via_their_leases_public_ip() {
        let (eth0, flannel1) = (2, 5);
        let routes = vec![
            route("10.244.2.0/24", Some("10.244.2.0"), flannel1, true),
            route("10.244.3.0/24", Some("198.18.0.3"), eth0, false),
            // An admin's route, or one to a subnet leased by another node.
            route("10.244.4.0/24", Some("198.18.0.9"), eth0, false),
            route("10.244.5.0/24", Some("198.18.0.5"), eth0, false),
        ];
        let leases = [
            (
                "10.244.3.0/24".parse().unwrap(),
                "198.18.0.3".parse().unwrap(),
            ),
            (
                "10.244.5.0/24".parse().unwrap(),
                "198.18.0.6".parse().unwrap(),
            ),
        ];
        assert_eq!(
            confirmed_by_leases(routes.clone(), &[flannel1], &leases),
            routes[..2].to_vec()
        );
    }

    #[test]
    fn the_lease_keeps_flannels_vtep_mac_until_weft_publishes_its_own() {
        let weft = LeaseAttrs::parse(
            r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#,
        )
        .unwrap();
        let mut state = FlannelState::default();
        assert_eq!(adopted_attrs(&weft, &state), weft, "no flannel.1: weft's");
        state.devices.push(Link {
            index: 5,
            name: "flannel.1".to_owned(),
            mac: [0x0a, 0, 0, 0, 0, 9],
            mtu: 1450,
            up: true,
        });
        let adopted = adopted_attrs(&weft, &state);
        assert_eq!(adopted.public_ip, weft.public_ip);
        assert_eq!(
            adopted.backend_data.map(|d| d.vtep_mac),
            Some([0x0a, 0, 0, 0, 0, 9])
        );
        let host_gw =
            LeaseAttrs::parse(r#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#).unwrap();
        assert_eq!(adopted_attrs(&host_gw, &state), host_gw);
    }
}
