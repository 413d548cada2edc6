//! Types shared between the BPF programs (`ebpf-prog`) and the node agent.
//!
//! Every type here is the exact byte layout of a BPF map key or value, so each
//! one is `#[repr(C)]`, carries its padding as named fields, avoids `bool`
//! (its bit patterns are not all valid), and has a size assertion. Byte order
//! is documented per field: addresses and ports stay in network order because
//! the data path copies them straight into headers.
#![no_std]

/// Name of the LPM trie that maps remote subnets to their node.
/// Key: `Key<[u8; 4]>` (prefix length in host order, then the subnet address
/// in network order). Value: [`RemoteNode`].
pub const MAP_SUBNETS: &str = "SUBNETS";
/// Name of the single-slot array holding this node's [`NodeConfig`].
pub const MAP_NODE_CONFIG: &str = "NODE_CONFIG";
/// Name of the per-CPU array of [`Counter`]s, one per (program, reason):
/// index [`counter_index`], [`COUNTER_SLOTS`] entries.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// Name of the hash of known nodes' PublicIPs (key `[u8; 4]`, network order;
/// value: `u32` count of subnets leased from that address). Tunnel packets
/// are only decapsulated from these sources, so no other host can inject
/// traffic.
pub const MAP_NODE_IPS: &str = "NODE_IPS";

/// Program (and pinned link) names, equal to the entry functions' names.
pub const PROG_ENCAP_TC: &str = "weft_encap_tc";
pub const PROG_DECAP_XDP: &str = "weft_decap_xdp";
pub const PROG_DECAP_TC: &str = "weft_decap_tc";
pub const PROG_MARK_TC: &str = "weft_mark_tc";

/// Name of the BPF global holding the firewall mark ORed into decapsulated
/// packets' `skb->mark` (host order); set at load time, 0 = no mark.
pub const GLOBAL_DECAP_MARK: &str = "DECAP_MARK";
/// Name of the BPF global saying how decapsulated packets reach their
/// container (host order): [`HOST_ROUTING_KERNEL`] or [`HOST_ROUTING_BPF`].
/// Set at load time from the agent's `--host-routing`.
pub const GLOBAL_HOST_ROUTING: &str = "HOST_ROUTING";
/// `--host-routing kernel` (the default): decapsulated packets go up the
/// host's stack on `--iface` and are IP-forwarded to the container, through
/// netfilter's PREROUTING and FORWARD hooks and conntrack.
pub const HOST_ROUTING_KERNEL: u32 = 0;
/// `--host-routing bpf`: the decap program looks the inner destination up in
/// the FIB itself and hands the frame straight to the container's bridge
/// (or device), skipping the host's IP forwarding and netfilter.
pub const HOST_ROUTING_BPF: u32 = 1;
/// Name of the BPF global saying whether the PublicIP is an address of
/// `--iface` (1) or not (0: the node sits behind 1:1 NAT, so peers' tunnel
/// packets arrive for its private address). With 1 the slow path accepts
/// tunnel packets for the PublicIP only. Set at load time.
pub const GLOBAL_PUBLIC_IP_IS_LOCAL: &str = "PUBLIC_IP_IS_LOCAL";
/// Default of the agent's `--decap-mark`: one bit that kube-proxy (0x4000,
/// 0x8000), Calico (0xffff0000) and Docker leave alone.
pub const DEFAULT_DECAP_MARK: u32 = 0x1000;
/// TC ingress of the slow-path VXLAN device: what the kernel decapsulated
/// (reassembled outer fragments, GRO aggregates) is checked as the fast path
/// checks it and re-injected into `--iface`'s ingress.
pub const PROG_SLOWPATH_RX_TC: &str = "weft_slowpath_rx_tc";
/// TC ingress of the agent's IP-in-IP tap: reassembled IP-in-IP packets the
/// agent read from a raw socket, decapsulated as on the fast path.
pub const PROG_SLOWPATH_IPIP_TC: &str = "weft_slowpath_ipip_tc";

/// Capacity of [`MAP_SUBNETS`]. flannel networks rarely hold more than a few
/// thousand nodes; 131072 leaves room for the 100k-lease scale benchmark.
pub const MAX_SUBNETS: u32 = 131_072;

/// VXLAN encapsulation overhead: outer IPv4 (20) + UDP (8) + VXLAN (8) +
/// inner Ethernet (14), RFC 7348 section 5.
pub const VXLAN_OVERHEAD: u32 = 50;
/// IP-in-IP overhead: one outer IPv4 header (RFC 2003).
pub const IPIP_OVERHEAD: u32 = 20;

/// How packets reach a remote node.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// RFC 7348 VXLAN over UDP.
    Vxlan = 1,
    /// No encapsulation: the remote PublicIP is the next hop (host-gw, and
    /// DirectRouting peers on this node's L2 segment).
    Direct = 2,
    /// RFC 2003 IP-in-IP.
    Ipip = 3,
}

/// Value of [`MAP_SUBNETS`]: where a remote subnet lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// The remote node's PublicIP, network byte order.
    pub public_ip: [u8; 4],
    /// The remote node's VtepMAC, wire order. Used as the inner destination
    /// MAC because a flannel vxlan peer only accepts frames addressed to it.
    pub vtep_mac: [u8; 6],
    /// A [`Mode`] discriminant.
    pub mode: u8,
    pub _pad0: u8,
    /// VXLAN network identifier, host byte order (24 significant bits).
    pub vni: u32,
}
const _: () = assert!(size_of::<RemoteNode>() == 16);

/// Value of [`MAP_NODE_CONFIG`] slot 0: this node's side of the tunnel.
/// An all-zero value (`configured == 0`) makes every program pass traffic
/// untouched, so a half-started agent never blackholes the host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Non-zero once the agent has filled this in.
    pub configured: u32,
    /// This node's PublicIP (outer source address), network byte order.
    pub public_ip: [u8; 4],
    /// The VtepMAC this node publishes (inner source MAC), wire order.
    pub vtep_mac: [u8; 6],
    /// VXLAN UDP destination port, network byte order.
    pub vxlan_port_be: u16,
    /// VXLAN network identifier, host byte order.
    pub vni: u32,
    /// ifindex of `--iface`, host byte order.
    pub iface_ifindex: u32,
    /// The largest outer packet the encap program builds, host byte order: `--iface`'s MTU,
    /// or the vxlan backend's `MTU` setting when that is smaller (as flannel sizes its vxlan
    /// device by it).
    pub iface_mtu: u32,
    /// MAC address of `--iface`, wire order. Decapsulated frames get it as
    /// their destination so the stack treats them as addressed to this host.
    pub iface_mac: [u8; 6],
    /// Prefix length of [`Self::cluster_network`].
    pub cluster_prefix_len: u8,
    /// Prefix length of [`Self::local_subnet`].
    pub local_prefix_len: u8,
    /// The flannel Network, network byte order.
    pub cluster_network: [u8; 4],
    /// This node's leased subnet, network byte order.
    pub local_subnet: [u8; 4],
    /// Which tunnels the decap programs accept: [`DECAP_VXLAN`] | [`DECAP_IPIP`].
    pub decap: u32,
    /// ifindex of the slow-path device, host byte order; 0 when there is
    /// none: the agent's collect-metadata VXLAN device (vxlan backend) or
    /// its IP-in-IP tap (ipip backend). Too-big packets without DF are
    /// handed to it, so that the kernel fragments the outer packet. Added
    /// after the 48-byte layout; the agent replaces a pinned map of the old
    /// size.
    pub slow_path_ifindex: u32,
}
const _: () = assert!(size_of::<NodeConfig>() == 52);

/// [`NodeConfig::decap`] bit: VXLAN to `vxlan_port_be` with `vni`.
pub const DECAP_VXLAN: u32 = 1;
/// [`NodeConfig::decap`] bit: IP-in-IP from a source in [`MAP_NODE_IPS`].
pub const DECAP_IPIP: u32 = 2;

/// Why a program did what it did. Each (program, variant) pair has its slot
/// in [`MAP_COUNTERS`], so the counters double as metrics.
/// Numbers are part of the pinned-map ABI: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Encapsulated towards a remote node (success).
    Encapsulated = 0,
    /// Decapsulated and handed to the stack (success).
    Decapsulated = 1,
    /// Passed: the agent has not configured this node yet.
    PassNotConfigured = 2,
    /// Passed: not IPv4 (ARP, IPv6, ...).
    PassNotIpv4 = 3,
    /// Passed: destination is not in any remote node's subnet.
    PassNoRemote = 4,
    /// Passed: not VXLAN traffic for this node (other UDP, other address,
    /// other port, outer IP options, outer fragments).
    PassNotTunnel = 5,
    /// Passed: VXLAN for this node but with another VNI or without the I flag.
    PassForeignVni = 6,
    /// Passed: a GRO/GSO aggregate on the TC decap path; this kernel lacks
    /// `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, so the stack handles it.
    PassGso = 7,
    /// Dropped: IPv4 header truncated or invalid (version, IHL, length).
    DropMalformedIp = 8,
    /// Dropped: tunnel packet too short to hold its inner Ethernet header.
    DropMalformedTunnel = 9,
    /// Dropped: the FIB has no route or neighbour path to the remote node.
    DropFibLookup = 10,
    /// Dropped: `bpf_skb_adjust_room` / `bpf_xdp_adjust_head` failed.
    DropAdjustRoom = 11,
    /// Dropped: writing the new headers failed.
    DropStoreBytes = 12,
    /// Dropped: a non-GSO packet that would exceed the underlay MTU once
    /// encapsulated.
    DropTooBig = 13,
    /// Dropped: a tunnel packet for this node whose inner frame is not IPv4;
    /// weft carries IPv4 only and the stack has no use for it.
    DropInnerNotIpv4 = 14,
    /// Passed untouched: too short or invalid to classify; the stack, which
    /// owns such packets, drops them itself.
    PassMalformed = 15,
    /// Sent to a remote node without encapsulation (host-gw, DirectRouting).
    ForwardedDirect = 16,
    /// Dropped: a tunnel packet (VXLAN or IP-in-IP) from an address that is
    /// no known node's PublicIP; decapsulating it would let anyone inject
    /// packets into containers.
    DropUnknownSource = 17,
    /// A DF packet too big once encapsulated was answered with ICMP
    /// "fragmentation needed" carrying the tunnel's MTU.
    FragNeeded = 18,
    /// Dropped: a tunnel packet whose inner source is neither in the sending
    /// node's subnet nor that node's PublicIP: a spoofed container address.
    DropSpoofedInnerSource = 19,
    /// Dropped: a tunnel packet whose inner destination is not in this
    /// node's subnet (another node's container, multicast, broadcast, the
    /// host's own services): no peer sends such a packet here.
    DropForeignInnerDestination = 20,
    /// Passed to the stack: an outer IPv4 fragment addressed to this node.
    /// The stack reassembles it and the slow path decapsulates the whole.
    PassOuterFragment = 21,
    /// Encapsulated by the kernel slow path (a packet BPF cannot send
    /// itself, e.g. too big for the underlay without DF: the kernel
    /// fragments the outer packet).
    EncapsulatedSlowPath = 22,
    /// Decapsulated on the slow path (a reassembled outer packet) and
    /// handed to the stack as if the fast path had done it.
    DecapsulatedSlowPath = 23,
    /// Dropped: a GSO packet the kernel will not encapsulate from BPF,
    /// above all one that already is a tunnel packet (a container's own
    /// VXLAN or GRE): `bpf_skb_adjust_room` cannot add a second tunnel.
    DropNestedGso = 24,
    /// Dropped, not answered: a too-big packet RFC 1122 section 3.2.2 forbids
    /// answering with an ICMP error (an ICMP error itself, a non-first
    /// fragment, a broadcast or multicast, a non-unicast source).
    DropTooBigNoReply = 25,
    /// Dropped, not answered: the ICMP "fragmentation needed" rate limit was
    /// exceeded.
    DropIcmpRateLimited = 26,
    /// Dropped: a tunnel packet with another VNI reached the slow path.
    DropForeignVni = 27,
    /// Decapsulated and handed by BPF straight to the device the FIB
    /// chose for the inner destination (`--host-routing bpf`), skipping
    /// the host's IP forwarding and netfilter.
    DeliveredDirect = 28,
    /// Dropped: a tunnel packet the slow-path device's socket received for
    /// a local address other than this node's PublicIP (the socket listens
    /// on every address; a peer only sends to the PublicIP).
    DropForeignOuterDestination = 29,
}

impl Reason {
    /// Number of counter slots; the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 30;

    /// Every reason, in index order; for dumping counters.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Encapsulated,
        Reason::Decapsulated,
        Reason::PassNotConfigured,
        Reason::PassNotIpv4,
        Reason::PassNoRemote,
        Reason::PassNotTunnel,
        Reason::PassForeignVni,
        Reason::PassGso,
        Reason::DropMalformedIp,
        Reason::DropMalformedTunnel,
        Reason::DropFibLookup,
        Reason::DropAdjustRoom,
        Reason::DropStoreBytes,
        Reason::DropTooBig,
        Reason::DropInnerNotIpv4,
        Reason::PassMalformed,
        Reason::ForwardedDirect,
        Reason::DropUnknownSource,
        Reason::FragNeeded,
        Reason::DropSpoofedInnerSource,
        Reason::DropForeignInnerDestination,
        Reason::PassOuterFragment,
        Reason::EncapsulatedSlowPath,
        Reason::DecapsulatedSlowPath,
        Reason::DropNestedGso,
        Reason::DropTooBigNoReply,
        Reason::DropIcmpRateLimited,
        Reason::DropForeignVni,
        Reason::DeliveredDirect,
        Reason::DropForeignOuterDestination,
    ];

    /// Stable snake-case name, for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Encapsulated => "encapsulated",
            Reason::Decapsulated => "decapsulated",
            Reason::PassNotConfigured => "pass_not_configured",
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassNoRemote => "pass_no_remote",
            Reason::PassNotTunnel => "pass_not_tunnel",
            Reason::PassForeignVni => "pass_foreign_vni",
            Reason::PassGso => "pass_gso",
            Reason::DropMalformedIp => "drop_malformed_ip",
            Reason::DropMalformedTunnel => "drop_malformed_tunnel",
            Reason::DropFibLookup => "drop_fib_lookup",
            Reason::DropAdjustRoom => "drop_adjust_room",
            Reason::DropStoreBytes => "drop_store_bytes",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropInnerNotIpv4 => "drop_inner_not_ipv4",
            Reason::PassMalformed => "pass_malformed",
            Reason::ForwardedDirect => "forwarded_direct",
            Reason::DropUnknownSource => "drop_unknown_source",
            Reason::FragNeeded => "frag_needed",
            Reason::DropSpoofedInnerSource => "drop_spoofed_inner_source",
            Reason::DropForeignInnerDestination => "drop_foreign_inner_destination",
            Reason::PassOuterFragment => "pass_outer_fragment",
            Reason::EncapsulatedSlowPath => "encapsulated_slow_path",
            Reason::DecapsulatedSlowPath => "decapsulated_slow_path",
            Reason::DropNestedGso => "drop_nested_gso",
            Reason::DropTooBigNoReply => "drop_too_big_no_reply",
            Reason::DropIcmpRateLimited => "drop_icmp_rate_limited",
            Reason::DropForeignVni => "drop_foreign_vni",
            Reason::DeliveredDirect => "delivered_direct",
            Reason::DropForeignOuterDestination => "drop_foreign_outer_destination",
        }
    }

    /// Whether the packet is dropped (as opposed to passed on untouched).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropMalformedIp
                | Reason::DropMalformedTunnel
                | Reason::DropFibLookup
                | Reason::DropAdjustRoom
                | Reason::DropStoreBytes
                | Reason::DropTooBig
                | Reason::DropInnerNotIpv4
                | Reason::DropUnknownSource
                | Reason::DropSpoofedInnerSource
                | Reason::DropForeignInnerDestination
                | Reason::DropNestedGso
                | Reason::DropTooBigNoReply
                | Reason::DropIcmpRateLimited
                | Reason::DropForeignVni
                | Reason::DropForeignOuterDestination
        )
    }
}

/// The programs that count, in [`MAP_COUNTERS`] order. `weft_mark_tc` only
/// turns a tag into a mark and counts nothing. Numbers are part of the
/// pinned-map ABI: append, never renumber.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    EncapTc = 0,
    DecapXdp = 1,
    DecapTc = 2,
    SlowpathRxTc = 3,
    SlowpathIpipTc = 4,
}

impl Program {
    pub const COUNT: u32 = 5;

    /// Every counting program, in index order.
    pub const ALL: [Program; Self::COUNT as usize] = [
        Program::EncapTc,
        Program::DecapXdp,
        Program::DecapTc,
        Program::SlowpathRxTc,
        Program::SlowpathIpipTc,
    ];

    /// The program's (entry function's) name, e.g. `weft_encap_tc`.
    pub const fn name(self) -> &'static str {
        match self {
            Program::EncapTc => PROG_ENCAP_TC,
            Program::DecapXdp => PROG_DECAP_XDP,
            Program::DecapTc => PROG_DECAP_TC,
            Program::SlowpathRxTc => PROG_SLOWPATH_RX_TC,
            Program::SlowpathIpipTc => PROG_SLOWPATH_IPIP_TC,
        }
    }
}

/// Entries of [`MAP_COUNTERS`]: one per (program, reason).
pub const COUNTER_SLOTS: u32 = Program::COUNT * Reason::COUNT;

/// The [`MAP_COUNTERS`] index of `reason` counted by `program`:
/// `program * Reason::COUNT + reason`. Appending a reason moves every
/// index, so the agent replaces a pinned map of another size (the counts
/// restart; they are statistics).
pub const fn counter_index(program: Program, reason: Reason) -> u32 {
    program as u32 * Reason::COUNT + reason as u32
}

/// Value of one [`MAP_COUNTERS`] slot on one CPU. All fields host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Their bytes at the point of counting: `skb->len` at TC, the frame
    /// (`data_end - data`) at XDP; after encapsulation or decapsulation
    /// for the packets that got it.
    pub bytes: u64,
    /// The return code of the last kernel helper that failed with this
    /// reason on this CPU (Cilium's `ext_err`): a negative errno, or for
    /// [`Reason::DropFibLookup`] a positive `BPF_FIB_LKUP_RET_*`. 0: none.
    pub ext_err: i64,
    /// `bpf_ktime_get_ns()` when `ext_err` was recorded, so that a reader
    /// can tell which CPU's code is the latest. 0: none.
    pub ext_err_ns: u64,
}
const _: () = assert!(size_of::<Counter>() == 32);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are #[repr(C)] with explicit padding fields and only
    // integer/byte-array members, so every bit pattern is valid.
    unsafe impl aya::Pod for super::RemoteNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above (integers only, no padding).
    unsafe impl aya::Pod for super::Counter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_table_is_dense_and_ordered() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{} out of place", r.name());
            assert_eq!(r.is_drop(), r.name().starts_with("drop_"), "{}", r.name());
        }
    }

    #[test]
    fn counter_slots_are_dense_and_distinct() {
        let mut seen = [false; COUNTER_SLOTS as usize];
        for (i, p) in Program::ALL.iter().enumerate() {
            assert_eq!(*p as u32, i as u32, "{} out of place", p.name());
            for r in Reason::ALL {
                let slot = counter_index(*p, r) as usize;
                assert!(!seen[slot], "{} {} shares slot {slot}", p.name(), r.name());
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
