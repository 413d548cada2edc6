//! The agent's one way to talk to the kernel's networking: rtnetlink.
//!
//! [`Netlink`] is the small typed surface the rest of the agent needs
//! (links, addresses, routes, neighbours); [`RtNetlink`] implements it over
//! the `rtnetlink` crate, as flannel does over vishvananda/netlink, and
//! [`NetlinkEvents`] follows the kernel's notifications for those objects.
//! Errors carry the kernel's errno, so callers decide on "already gone" by
//! number, never by message text. Unit tests drive the logic above this
//! trait with a fake.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use ipnet::Ipv4Net;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, MulticastGroup, RouteMessageBuilder,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourFlags,
            NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric},
    },
    sys::SocketAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a request; `errno` is positive (`libc::ENOENT`...).
    #[error("{op}: {source}")]
    Kernel {
        op: String,
        errno: i32,
        source: io::Error,
    },
    #[error("{op}: {detail}")]
    Protocol { op: String, detail: String },
    #[error("interface {0:?} not found")]
    NoSuchLink(String),
}

impl NetlinkError {
    fn from_rtnetlink(op: impl Into<String>, e: rtnetlink::Error) -> Self {
        let op = op.into();
        match e {
            rtnetlink::Error::NetlinkError(msg) => match msg.code {
                Some(code) => {
                    let errno = code.get().abs();
                    Self::Kernel {
                        op,
                        errno,
                        source: io::Error::from_raw_os_error(errno),
                    }
                }
                None => Self::Protocol {
                    op,
                    detail: "error message without an error code".to_owned(),
                },
            },
            other => Self::Protocol {
                op,
                detail: other.to_string(),
            },
        }
    }

    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// Whether the object (route, neighbour, link) does not exist: what a
    /// delete of something already gone answers.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ESRCH | libc::ENODEV)
        ) || matches!(self, Self::NoSuchLink(_))
    }
}

/// The facts of one network interface the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// All zeros for a link without an Ethernet address.
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
}

/// A collect-metadata ("external") VXLAN device: one UDP socket on `port`
/// for every VNI and remote, the tunnel parameters travelling with each
/// packet as metadata (`ip link add NAME type vxlan external dstport PORT
/// nolearning`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalVxlan {
    pub name: String,
    /// UDP port, host order.
    pub port: u16,
    pub mtu: u32,
}

/// What the kernel says of a link looked up by name, as far as deciding
/// whether it is a given [`ExternalVxlan`] goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanLink {
    pub link: Link,
    /// `None` when the link is not a VXLAN device at all.
    pub vxlan: Option<VxlanParams>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanParams {
    pub external: bool,
    pub learning: bool,
    /// UDP port, host order.
    pub port: u16,
}

impl VxlanLink {
    /// Whether this link is `want`, with the settings the slow path needs.
    pub fn matches(&self, want: &ExternalVxlan) -> bool {
        self.vxlan
            == Some(VxlanParams {
                external: true,
                learning: false,
                port: want.port,
            })
            && self.link.mtu == want.mtu
    }
}

/// How a neighbour entry the agent installs behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourKind {
    /// A fixed address that never expires (`nud permanent`).
    Permanent { mac: [u8; 6] },
    /// Resolved and kept resolved by the kernel (`managed extern_learn`,
    /// Linux 5.16+), so BPF FIB lookups find it valid; `extern_learn`
    /// marks it as the agent's, which cleanup relies on.
    Managed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub dst: Ipv4Addr,
    pub kind: NeighbourKind,
}

/// An IPv4 neighbour entry as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighbourEntry {
    pub dst: Ipv4Addr,
    /// `managed` and `extern_learn`: an entry [`NeighbourKind::Managed`] made.
    pub managed: bool,
}

/// A unicast IPv4 route in the main table with one gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub ifindex: u32,
    /// The gateway is reachable on the link without a connected subnet.
    pub onlink: bool,
    /// The route's MTU metric, if any.
    pub mtu: Option<u32>,
}

/// An IPv4 route as the kernel lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedRoute {
    pub dst: Ipv4Net,
    /// `None` for a connected route (`dev X scope link`).
    pub gateway: Option<Ipv4Addr>,
    pub ifindex: Option<u32>,
    pub table: u32,
    pub onlink: bool,
    pub mtu: Option<u32>,
}

impl ListedRoute {
    /// Whether it is `route`, as far as the kernel identifies a route.
    pub fn is(&self, route: &Route) -> bool {
        self.dst == route.dst
            && self.gateway == Some(route.gateway)
            && self.ifindex == Some(route.ifindex)
    }
}

/// What the agent needs from the kernel's networking. Every call answers
/// for the caller's network namespace.
#[expect(
    async_fn_in_trait,
    reason = "used with static dispatch on the agent's current-thread runtime; no Send bound needed"
)]
pub trait Netlink {
    async fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError>;
    /// `None` when no interface has this index.
    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError>;
    /// Every link, in ifindex order.
    async fn links(&self) -> Result<Vec<Link>, NetlinkError>;
    /// IPv4 addresses of the interface with their prefixes, primary first.
    async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<Ipv4Net>, NetlinkError>;
    /// Creates or replaces the entry (`ip neigh replace`).
    async fn neighbour_replace(&self, neighbour: &Neighbour) -> Result<(), NetlinkError>;
    /// Deletes the entry; `Ok(false)` when there was none.
    async fn neighbour_delete(&self, ifindex: u32, dst: Ipv4Addr) -> Result<bool, NetlinkError>;
    async fn neighbours(&self, ifindex: u32) -> Result<Vec<NeighbourEntry>, NetlinkError>;
    /// Creates or replaces the route (`ip route replace`).
    async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError>;
    /// Deletes the route; `Ok(false)` when there was none.
    async fn route_delete(&self, route: &Route) -> Result<bool, NetlinkError>;
    /// The main table's IPv4 routes.
    async fn routes(&self) -> Result<Vec<ListedRoute>, NetlinkError>;
    /// The link called `name` with its VXLAN settings; `None` if absent.
    async fn vxlan_by_name(&self, name: &str) -> Result<Option<VxlanLink>, NetlinkError>;
    /// Creates the device, up (fails with EEXIST if the name is taken).
    async fn vxlan_add(&self, dev: &ExternalVxlan) -> Result<(), NetlinkError>;
    /// Deletes the link; `Ok(false)` when there was none.
    async fn link_delete(&self, index: u32) -> Result<bool, NetlinkError>;
    /// Brings the link up (`ip link set ... up`).
    async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError>;
}

/// [`Netlink`] over an rtnetlink socket of the caller's network namespace.
#[derive(Clone)]
pub struct RtNetlink {
    handle: Handle,
}

impl RtNetlink {
    /// Opens the socket and spawns its connection task on the current tokio
    /// runtime. The socket is bound to the namespace the thread is in now.
    pub fn open() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }
}

fn link_from(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: [0; 6],
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(a) => {
                if let Ok(mac) = <[u8; 6]>::try_from(a.as_slice()) {
                    link.mac = mac;
                }
            }
            _ => {}
        }
    }
    link
}

fn route_message(route: &Route) -> RouteMessage {
    let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(route.dst.network(), route.dst.prefix_len())
        .gateway(route.gateway)
        .output_interface(route.ifindex);
    if route.onlink {
        builder = builder.onlink();
    }
    let mut msg = builder.build();
    if let Some(mtu) = route.mtu {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    msg
}

fn vxlan_params_from(msg: &LinkMessage) -> Option<VxlanParams> {
    let infos = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    // The kernel reports every setting; these defaults only apply to a
    // message that omits one.
    let mut params = VxlanParams {
        external: false,
        learning: true,
        port: 0,
    };
    for info in infos {
        if let LinkInfo::Data(InfoData::Vxlan(data)) = info {
            for d in data {
                match d {
                    InfoVxlan::CollectMetadata(on) => params.external = *on,
                    InfoVxlan::Learning(on) => params.learning = *on,
                    InfoVxlan::Port(port) => params.port = *port,
                    _ => {}
                }
            }
        }
    }
    Some(params)
}

/// The kernel's main routing table (`RT_TABLE_MAIN`).
const RT_TABLE_MAIN: u32 = 254;

/// The IPv4 route in `msg`, whatever its next hop.
fn listed_route_from(msg: &RouteMessage) -> Option<ListedRoute> {
    if msg.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let (mut gateway, mut ifindex, mut mtu) = (None, None, None);
    // Tables above 255 are only in the attribute.
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Metrics(metrics) => {
                mtu = metrics.iter().find_map(|m| match m {
                    RouteMetric::Mtu(v) => Some(*v),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(ListedRoute {
        dst: Ipv4Net::new(dst, msg.header.destination_prefix_length).ok()?,
        gateway,
        ifindex,
        table,
        onlink: msg
            .header
            .flags
            .contains(rtnetlink::packet_route::route::RouteFlags::Onlink),
        mtu,
    })
}

/// The route in `msg`, if it is an IPv4 route with one gateway.
fn route_from(msg: &RouteMessage) -> Option<Route> {
    let listed = listed_route_from(msg)?;
    Some(Route {
        dst: listed.dst,
        gateway: listed.gateway?,
        ifindex: listed.ifindex?,
        onlink: listed.onlink,
        mtu: listed.mtu,
    })
}

fn neighbour_dst(msg: &NeighbourMessage) -> Option<Ipv4Addr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn neighbour_managed(msg: &NeighbourMessage) -> bool {
    let managed = msg.attributes.iter().any(
        |a| matches!(a, NeighbourAttribute::ExtFlags(f) if f.contains(NeighbourExtFlags::Managed)),
    );
    managed && msg.header.flags.contains(NeighbourFlags::ExtLearned)
}

impl RtNetlink {
    /// The kernel's message for the link called `name`; `None` if absent.
    async fn link_message_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(found) => Ok(found),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(format!("looking up interface {name:?}"), e);
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }
}

impl Netlink for RtNetlink {
    async fn link_by_name(&self, name: &str) -> Result<Link, NetlinkError> {
        self.link_message_by_name(name)
            .await?
            .map(|msg| link_from(&msg))
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))
    }

    async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(found) => Ok(found.as_ref().map(link_from)),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(format!("looking up ifindex {index}"), e);
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing interfaces", e))?;
        let mut links: Vec<Link> = msgs.iter().map(link_from).collect();
        links.sort_by_key(|l| l.index);
        Ok(links)
    }

    async fn ipv4_addrs(&self, ifindex: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let op = || format!("listing addresses of ifindex {ifindex}");
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(op(), e))?;
        // The kernel lists a link's addresses primary first, in the order
        // they were added, as `ip addr` shows them.
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet && m.header.index == ifindex)
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Ipv4Net::new(local, m.header.prefix_len).ok()
            })
            .collect())
    }

    async fn neighbour_replace(&self, n: &Neighbour) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .neighbours()
            .add(n.ifindex, IpAddr::V4(n.dst))
            .replace();
        match n.kind {
            NeighbourKind::Permanent { mac } => {
                req = req
                    .state(NeighbourState::Permanent)
                    .link_layer_address(&mac);
            }
            NeighbourKind::Managed => {
                // The kernel refuses NTF_EXT_MANAGED on a permanent entry; with
                // no state it creates the entry and starts resolving it.
                req = req
                    .state(NeighbourState::None)
                    .flags(NeighbourFlags::ExtLearned);
                req.message_mut()
                    .attributes
                    .push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
            }
        }
        req.execute().await.map_err(|e| {
            NetlinkError::from_rtnetlink(
                format!("neighbour replace {} ifindex {}", n.dst, n.ifindex),
                e,
            )
        })
    }

    async fn neighbour_delete(&self, ifindex: u32, dst: Ipv4Addr) -> Result<bool, NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(
                    format!("neighbour delete {dst} ifindex {ifindex}"),
                    e,
                );
                if e.is_not_found() { Ok(false) } else { Err(e) }
            }
        }
    }

    async fn neighbours(&self, ifindex: u32) -> Result<Vec<NeighbourEntry>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing neighbours", e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == ifindex)
            .filter_map(|m| {
                Some(NeighbourEntry {
                    dst: neighbour_dst(m)?,
                    managed: neighbour_managed(m),
                })
            })
            .collect())
    }

    async fn route_replace(&self, route: &Route) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(route_message(route))
            .replace()
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    format!("route replace {} via {}", route.dst, route.gateway),
                    e,
                )
            })
    }

    async fn route_delete(&self, route: &Route) -> Result<bool, NetlinkError> {
        let mut msg = route_message(route);
        // The kernel deletes only a route whose protocol matches, unless
        // the request leaves it unspecified: a route another build (or `ip`)
        // installed with another protocol must go too.
        msg.header.protocol = rtnetlink::packet_route::route::RouteProtocol::Unspec;
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(
                    format!("route delete {} via {}", route.dst, route.gateway),
                    e,
                );
                if e.is_not_found() { Ok(false) } else { Err(e) }
            }
        }
    }

    async fn routes(&self) -> Result<Vec<ListedRoute>, NetlinkError> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink("listing routes", e))?;
        Ok(msgs
            .iter()
            .filter_map(listed_route_from)
            .filter(|r| r.table == RT_TABLE_MAIN)
            .collect())
    }

    async fn vxlan_by_name(&self, name: &str) -> Result<Option<VxlanLink>, NetlinkError> {
        Ok(self.link_message_by_name(name).await?.map(|msg| VxlanLink {
            link: link_from(&msg),
            vxlan: vxlan_params_from(&msg),
        }))
    }

    async fn vxlan_add(&self, dev: &ExternalVxlan) -> Result<(), NetlinkError> {
        // No VNI, no remote, no lower device: with collect_metadata the
        // packet's metadata names all three.
        let msg = LinkMessageBuilder::<LinkVxlan>::new(&dev.name)
            .collect_metadata(true)
            .learning(false)
            .port(dev.port)
            .mtu(dev.mtu)
            .up()
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NetlinkError::from_rtnetlink(
                format!(
                    "creating vxlan device {:?} (external, port {})",
                    dev.name, dev.port
                ),
                e,
            )
        })
    }

    async fn link_set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(format!("setting ifindex {index} up"), e))
    }

    async fn link_delete(&self, index: u32) -> Result<bool, NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = NetlinkError::from_rtnetlink(format!("deleting ifindex {index}"), e);
                if e.is_not_found() { Ok(false) } else { Err(e) }
            }
        }
    }
}

/// A change the kernel announced that the agent may have to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetlinkEvent {
    /// A link appeared or changed (e.g. came up again after a flap).
    LinkChanged(Link),
    LinkRemoved {
        index: u32,
    },
    RouteRemoved(Route),
    NeighbourRemoved {
        ifindex: u32,
        dst: Ipv4Addr,
    },
    /// The kernel dropped notifications (the socket's buffer overflowed):
    /// whatever they said must be found out by listing.
    Overrun,
}

/// The kernel's link, IPv4 route and neighbour notifications (what
/// `ip monitor link route neigh` shows), for the caller's namespace.
pub struct NetlinkEvents {
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl NetlinkEvents {
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Neigh,
        ])
        .map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { messages })
    }

    /// The next event the agent cares about; `None` if the socket closed.
    pub async fn next(&mut self) -> Option<NetlinkEvent> {
        loop {
            let (msg, _) = self.messages.next().await?;
            let inner = match msg.payload {
                NetlinkPayload::InnerMessage(inner) => inner,
                // The socket's buffer overflowed: notifications were lost.
                NetlinkPayload::Overrun(_) => return Some(NetlinkEvent::Overrun),
                _ => continue,
            };
            let event = match inner {
                RouteNetlinkMessage::NewLink(l) => Some(NetlinkEvent::LinkChanged(link_from(&l))),
                RouteNetlinkMessage::DelLink(l) => Some(NetlinkEvent::LinkRemoved {
                    index: l.header.index,
                }),
                RouteNetlinkMessage::DelRoute(r) => route_from(&r).map(NetlinkEvent::RouteRemoved),
                RouteNetlinkMessage::DelNeighbour(n) => {
                    neighbour_dst(&n).map(|dst| NetlinkEvent::NeighbourRemoved {
                        ifindex: n.header.ifindex,
                        dst,
                    })
                }
                _ => None,
            };
            if event.is_some() {
                return event;
            }
        }
    }
}
