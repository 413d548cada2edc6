//! The hostile corpus (issue 9): generated packets through every program
//! that can meet them, under `BPF_PROG_TEST_RUN` on the real programs.
//!
//! Every packet goes through all three programs: `weft_decap_xdp`,
//! `weft_decap_tc` (once as a plain skb, once as a GSO aggregate) with the
//! bench configured as the receiving node, and `weft_encap_tc` with it
//! configured as the sending node (a tunnel packet can leave a node too, and
//! a container's packet can arrive at one). For each run the invariant is
//! exact: the packet is dropped, or passed byte-identical, or it is one that
//! must be transformed (a peer's tunnel packet decapsulated, a container's
//! packet encapsulated or routed) and comes out exactly so; and the
//! counters move by exactly one, in the expected reason.
//!
//! Where the reason is policy (outer IHL below 5; outer fragments, which
//! another change counts `pass_outer_fragment`) a set of reasons is
//! accepted; where the outcome itself is (an outer header the stack would
//! reject but whose lie gains nothing), decapsulation or a drop. Frames the
//! kernel will not build a context from (XDP: shorter than Ethernet; skb:
//! IPv4/IPv6 shorter than their header) must be refused by it, checked.
//!
//! Nested tunnels lose one layer, the outer one: each program runs once per
//! packet on `--iface`, so a tunnel a peer's container sends to a container
//! here is that container's payload, delivered as it is; one addressed to
//! this node itself is dropped as a foreign inner destination.
//!
//! Two benches, one per side: `decap_corpus` (what arrives from the
//! underlay) and `encap_corpus` (what leaves for a remote subnet). Each
//! collects every broken run before failing, so one run of the test shows
//! the whole damage.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Result, ensure};
use weft_common::{Mode, PROG_DECAP_TC, PROG_ENCAP_TC, Reason};
use weft_tests::test_run::*;

/// The receiver's (198.18.0.2) container that peers send to.
const RECEIVER_CONTAINER: [u8; 4] = [10, 244, 2, 7];
/// The sender's (198.18.0.1) container, in `LOCAL_SUBNET`.
const SENDER_CONTAINER: [u8; 4] = [10, 244, 1, 2];
/// Any gso_size makes the skb a GSO aggregate to the programs.
const GSO_SIZE: u32 = 1400;

/// A program, and how the bench runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Prog {
    Xdp,
    Tc,
    /// `weft_decap_tc` on a GSO aggregate (non-zero gso_size).
    TcGso,
    Encap,
    /// `weft_encap_tc` on a GSO aggregate.
    EncapGso,
}

impl Prog {
    fn is_decap(self) -> bool {
        matches!(self, Prog::Xdp | Prog::Tc | Prog::TcGso)
    }

    /// Whether BPF_PROG_TEST_RUN builds a context from `frame`: it refuses
    /// XDP frames shorter than an Ethernet header, and skbs per
    /// `skb_buildable`. The kernel must then refuse the run (checked), so
    /// those lengths cannot reach the programs from here.
    fn runnable(self, frame: &[u8]) -> bool {
        match self {
            Prog::Xdp => frame.len() >= ETH_HLEN,
            _ => skb_buildable(frame),
        }
    }

    fn run(self, b: &mut ProgramBench, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        match self {
            Prog::Xdp => b.run_xdp(frame),
            Prog::Tc => b.run_tc(PROG_DECAP_TC, frame, 0),
            Prog::TcGso => b.run_tc(PROG_DECAP_TC, frame, GSO_SIZE),
            Prog::Encap => b.run_tc(PROG_ENCAP_TC, frame, 0),
            Prog::EncapGso => b.run_tc(PROG_ENCAP_TC, frame, GSO_SIZE),
        }
    }

    fn verdicts(self) -> (u32, u32) {
        match self {
            Prog::Xdp => (XDP_PASS, XDP_DROP),
            _ => (TC_ACT_OK, TC_ACT_SHOT),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tunnel {
    Vxlan,
    Ipip,
}

impl Tunnel {
    fn proto(self) -> u8 {
        match self {
            Tunnel::Vxlan => IPPROTO_UDP,
            Tunnel::Ipip => IPPROTO_IPIP,
        }
    }

    /// What follows the outer IPv4 header.
    fn payload(self, inner_ip: &[u8]) -> Vec<u8> {
        match self {
            Tunnel::Vxlan => vxlan_datagram(&vxlan_inner_frame(inner_ip)),
            Tunnel::Ipip => inner_ip.to_vec(),
        }
    }

    /// A tunnel packet from `outer_src` to the receiver around `inner_ip`.
    fn frame(self, outer_src: [u8; 4], inner_ip: &[u8]) -> Vec<u8> {
        self.frame_with(&outer_header(outer_src, self.proto()), inner_ip)
    }

    fn frame_with(self, outer: &Ipv4Header, inner_ip: &[u8]) -> Vec<u8> {
        underlay_frame(outer, &self.payload(inner_ip))
    }

    /// Where the inner IPv4 header starts in `frame` (outer IHL 5).
    fn inner_ip_offset(self) -> usize {
        match self {
            Tunnel::Vxlan => 14 + 20 + 8 + 8 + 14,
            Tunnel::Ipip => 14 + 20,
        }
    }

    /// What a decap program leaves of `frame`. XDP strips everything in
    /// front of the inner Ethernet header (VXLAN) or rebuilds one in front
    /// of the inner IPv4 header (IP-in-IP), addressed to the interface;
    /// TC keeps the outer Ethernet header and removes what lies between it
    /// and the inner IPv4 header.
    fn decapsulated(self, prog: Prog, frame: &[u8]) -> Vec<u8> {
        let inner = self.inner_ip_offset();
        match (self, prog) {
            (Tunnel::Vxlan, Prog::Xdp) => [&RECEIVER_MAC[..], &frame[inner - 8..]].concat(),
            (Tunnel::Ipip, Prog::Xdp) => {
                [&RECEIVER_MAC[..], &frame[6..12], &[8, 0], &frame[inner..]].concat()
            }
            _ => [&frame[..ETH_HLEN], &frame[inner..]].concat(),
        }
    }
}

/// A remote node's container, as the sender's SUBNETS knows it.
#[derive(Clone, Copy, Debug)]
struct Dest {
    addr: [u8; 4],
    mode: Mode,
    public_ip: [u8; 4],
    vtep: [u8; 6],
    /// TC_ACT_OK when the FIB has the next hop's MAC, TC_ACT_REDIRECT
    /// (bpf_redirect_neigh) when not.
    verdict: u32,
}

const TO_VXLAN: Dest = Dest {
    addr: [10, 244, 2, 7],
    mode: Mode::Vxlan,
    public_ip: PEER_IP,
    vtep: PEER_VTEP,
    verdict: TC_ACT_OK,
};
const TO_VXLAN_UNRESOLVED: Dest = Dest {
    addr: [10, 244, 3, 9],
    mode: Mode::Vxlan,
    public_ip: UNRESOLVED_IP,
    vtep: UNRESOLVED_VTEP,
    verdict: TC_ACT_REDIRECT,
};
const TO_IPIP: Dest = Dest {
    addr: [10, 244, 4, 7],
    mode: Mode::Ipip,
    public_ip: PEER_IP,
    vtep: [0; 6],
    verdict: TC_ACT_OK,
};
const TO_DIRECT: Dest = Dest {
    addr: [10, 244, 5, 7],
    mode: Mode::Direct,
    public_ip: PEER_IP,
    vtep: [0; 6],
    verdict: TC_ACT_OK,
};

impl Dest {
    fn reason(&self) -> Reason {
        if self.mode == Mode::Direct {
            Reason::ForwardedDirect
        } else {
            Reason::Encapsulated
        }
    }

    /// Whether `out` is `frame` sent to this node by its mode: the inner
    /// packet byte-identical behind a correct outer header (VXLAN, IP-in-IP)
    /// or with only the L2 header rewritten (direct).
    fn sent_correctly(&self, verdict: u32, frame: &[u8], out: &[u8], our_mac: [u8; 6]) -> bool {
        let overhead = match self.mode {
            Mode::Vxlan => 50,
            Mode::Ipip => 20,
            Mode::Direct => 0,
        };
        if verdict != self.verdict || out.len() != frame.len() + overhead {
            return false;
        }
        // With bpf_redirect_neigh the kernel writes L2 after the program.
        let l2 =
            self.verdict != TC_ACT_OK || (out[0..6] == PEER_UNDERLAY_MAC && out[6..12] == our_mac);
        let outer = |proto: u8| {
            let ip = &out[14..34];
            ip[0] == 0x45
                && usize::from(u16::from_be_bytes([ip[2], ip[3]])) == out.len() - 14
                && ip[9] == proto
                && ip[12..16] == LOCAL_IP
                && ip[16..20] == self.public_ip
                && checksum(ip) == 0
        };
        l2 && out[12..14] == [8, 0]
            && match self.mode {
                Mode::Direct => out[12..] == frame[12..],
                Mode::Ipip => outer(IPPROTO_IPIP) && out[34..] == frame[14..],
                Mode::Vxlan => {
                    outer(IPPROTO_UDP)
                        && out[36..38] == PORT.to_be_bytes()
                        && out[42..50] == vxlan_header(VXLAN_FLAG_I, VNI)
                        && out[50..56] == self.vtep
                        && out[56..62] == our_mac
                        && out[62..64] == [8, 0]
                        && out[64..] == frame[14..]
                }
            }
    }
}

/// What one run must produce. Every expectation also requires exactly one
/// counter to move by exactly one.
#[derive(Clone, Debug)]
enum Expect {
    /// Passed byte-identical, counted as this reason.
    Untouched(Reason),
    /// Passed byte-identical, counted as one of these (where the reason is
    /// policy, or changing under another change).
    UntouchedAs(&'static [Reason]),
    /// Dropped, counted as this reason.
    Dropped(Reason),
    /// Dropped with a drop reason, or passed byte-identical with a pass
    /// reason: for garbage, whose reason depends on its random bytes.
    DropOrUntouched,
    /// As `DropOrUntouched`, or correctly sent to `Dest`: garbage at the
    /// egress that may happen to be well-formed IPv4.
    DropUntouchedOrSent(Dest),
    /// A peer's tunnel packet: decapsulated, the inner packet byte-identical.
    Decap(Tunnel),
    /// A container's packet: sent to the remote node.
    Sent(Dest),
    /// Either of two outcomes (where it depends on the kernel, or on a
    /// policy not settled).
    Either(Box<Expect>, Box<Expect>),
}

struct Case {
    name: String,
    frame: Vec<u8>,
    runs: Vec<(Prog, Expect)>,
}

/// The corpus under construction: every frame with its expectation for
/// every program.
#[derive(Default)]
struct Corpus(Vec<Case>);

impl Corpus {
    /// A frame arriving on `--iface`: both decap hooks expect `decap`; a GSO
    /// aggregate is left to the stack whatever it holds (this kernel cannot
    /// pop a UDP tunnel off one from BPF: `pass_gso`); the egress program,
    /// should the node send it, sees no container's destination.
    fn arriving(&mut self, name: impl Into<String>, frame: Vec<u8>, decap: Expect) {
        let egress = egress_view(&frame);
        self.push(name, frame, decap, egress);
    }

    /// A frame leaving through `--iface`: the egress program expects
    /// `encap`; the decap hooks, should it arrive, see no tunnel packet for
    /// this node.
    fn leaving(&mut self, name: impl Into<String>, frame: Vec<u8>, encap: Expect) {
        let ingress = ingress_view(&frame);
        self.push(name, frame, ingress, encap);
    }

    fn push(&mut self, name: impl Into<String>, frame: Vec<u8>, decap: Expect, encap: Expect) {
        let gso = gso_view(&decap);
        self.0.push(Case {
            name: name.into(),
            frame,
            runs: vec![
                (Prog::Xdp, decap.clone()),
                (Prog::Tc, decap),
                (Prog::TcGso, gso),
                (Prog::Encap, encap),
            ],
        });
    }
}

/// What TC decap does with the frame as a GSO aggregate: it classifies
/// first, so everything is judged as without GSO, except that a tunnel
/// packet it would decapsulate is passed as `pass_gso` (this kernel cannot
/// pop a UDP tunnel off a GSO skb; the slow-path device's socket does).
fn gso_view(decap: &Expect) -> Expect {
    match decap {
        Expect::Decap(_) => Expect::Untouched(Reason::PassGso),
        Expect::Either(a, b) => Expect::Either(Box::new(gso_view(a)), Box::new(gso_view(b))),
        other => other.clone(),
    }
}

/// What the egress program does with a frame addressed to no container
/// (anything from the underlay): not ours to encapsulate.
fn egress_view(frame: &[u8]) -> Expect {
    match (frame.get(12..14), frame.get(30..34)) {
        (Some([8, 0]), Some(dst)) if dst[..2] == [10, 244] => Expect::DropOrUntouched,
        (Some([8, 0]), Some(_)) => Expect::Untouched(Reason::PassNoRemote),
        (Some([8, 0]), None) => Expect::Dropped(Reason::DropMalformedIp),
        (Some(_), _) => Expect::Untouched(Reason::PassNotIpv4),
        (None, _) => Expect::Untouched(Reason::PassMalformed),
    }
}

/// What the decap hooks do with a frame that is not addressed to this
/// node's PublicIP (a container's packet).
fn ingress_view(frame: &[u8]) -> Expect {
    match (frame.get(12..14), frame.get(14..34)) {
        (Some([8, 0]), Some(ip)) if ip[0] >> 4 != 4 => Expect::Untouched(Reason::PassMalformed),
        (Some([8, 0]), Some(ip)) if ip[16..20] == PEER_IP => Expect::DropOrUntouched,
        (Some([8, 0]), Some(_)) => Expect::Untouched(Reason::PassNotTunnel),
        (Some([8, 0]), None) | (None, _) => Expect::Untouched(Reason::PassMalformed),
        (Some(_), _) => Expect::Untouched(Reason::PassNotIpv4),
    }
}

/// A deterministic xorshift32, so that every run checks the same corpus.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A container's UDP packet from `src` to `dst`.
fn container_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    container_packet_with(&Ipv4Header::new(src, dst, IPPROTO_UDP))
}

fn container_packet_with(header: &Ipv4Header) -> Vec<u8> {
    let data: Vec<u8> = (0u8..24).collect();
    header.packet(&udp(4321, 5678, &data))
}

/// `ip` (an IPv4 packet with a 20-byte header) with its IHL field claiming
/// `ihl` words it does not have, and its checksum redone.
fn claiming_ihl(ip: &[u8], ihl: u8) -> Vec<u8> {
    let mut ip = ip.to_vec();
    ip[0] = 0x40 | ihl;
    reseal(&mut ip[..20]);
    ip
}

/// Recomputes the checksum of a 20-byte IPv4 header after an edit.
fn reseal(header: &mut [u8]) {
    header[10..12].copy_from_slice(&[0, 0]);
    let csum = checksum(header);
    header[10..12].copy_from_slice(&csum.to_be_bytes());
}

/// `frame` with the total length of its (first, outer) IPv4 header set to
/// `tot_len`, checksum redone.
fn with_total_length(frame: &[u8], tot_len: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[16..18].copy_from_slice(&tot_len.to_be_bytes());
    reseal(&mut f[14..34]);
    f
}

/// A truncated frame.
struct Cut {
    what: String,
    frame: Vec<u8>,
    len: usize,
    /// Whether the (outer) IPv4 total length was rewritten to agree.
    length_agrees: bool,
}

/// Every truncation of `frame` (each length short of the whole), then
/// each that holds an IPv4 header again with its total length agreeing.
fn truncations(frame: &[u8]) -> Vec<Cut> {
    let plain = (0..frame.len()).map(|n| Cut {
        what: format!("cut to {n} bytes"),
        frame: frame[..n].to_vec(),
        len: n,
        length_agrees: false,
    });
    let agreeing = (ETH_HLEN + 20..frame.len()).map(|n| Cut {
        what: format!("cut to {n} bytes, length agreeing"),
        frame: with_total_length(&frame[..n], (n - ETH_HLEN) as u16),
        len: n,
        length_agrees: true,
    });
    plain.chain(agreeing).collect()
}

/// One variant of an IPv4 packet, and whether it is well-formed.
struct Variant {
    what: String,
    ip: Vec<u8>,
    well_formed: bool,
}

/// The IPv4 header sweep both directions run on a container's packet with
/// header `base`: IHL 0..=15 with consistent lengths, an IHL beyond the
/// total length, an IHL past the packet's end, lying total lengths, other
/// versions, and fragments. Trailing bytes after the total length are
/// well-formed (Ethernet padding looks the same); options and fragments
/// are the packet's own business.
fn header_sweep(base: Ipv4Header) -> Vec<Variant> {
    let mut out = Vec::new();
    let mut add = |what: String, header: Ipv4Header, well_formed: bool| {
        let ip = container_packet_with(&header);
        out.push(Variant {
            what,
            ip,
            well_formed,
        });
    };
    for ihl in 0..=15u8 {
        add(format!("IHL {ihl}"), Ipv4Header { ihl, ..base }, ihl >= 5);
        if ihl > 5 {
            let tot_len = Some(u16::from(ihl) * 4 - 4);
            add(
                format!("IHL {ihl} over its total length"),
                Ipv4Header {
                    ihl,
                    tot_len,
                    ..base
                },
                false,
            );
        }
    }
    let real = container_packet_with(&base).len() as u16;
    for (what, tot_len, well_formed) in [
        ("zero", 0, false),
        ("1", 1, false),
        ("19, inside its own header", 19, false),
        ("one past the data", real + 1, false),
        ("65535", 0xffff, false),
        ("short of the data", 28, true),
    ] {
        let header = Ipv4Header {
            tot_len: Some(tot_len),
            ..base
        };
        add(format!("total length {what}"), header, well_formed);
    }
    for version in [0, 6, 15] {
        add(
            format!("version {version}"),
            Ipv4Header { version, ..base },
            false,
        );
    }
    for (what, frags) in [
        ("MF", IP_MF),
        ("offset 8", 1),
        ("MF and offset 1480", IP_MF | 185),
        ("DF", IP_DF),
    ] {
        add(
            format!("fragment ({what})"),
            Ipv4Header { frags, ..base },
            true,
        );
    }
    // Options the packet does not hold: a 20-byte header claiming more.
    for ihl in 6..=15u8 {
        let bare = Ipv4Header {
            tot_len: Some(u16::from(ihl) * 4),
            ..base
        }
        .packet(&[]);
        out.push(Variant {
            what: format!("IHL {ihl} past the packet"),
            ip: claiming_ihl(&bare, ihl),
            well_formed: false,
        });
    }
    out
}

/// Everything a host on the underlay can send to the node: peers, liars
/// and strangers.
fn arriving_corpus() -> Corpus {
    use Expect::*;
    use Reason::*;
    let mut c = Corpus::default();
    let valid_inner = container_packet(SENDER_CONTAINER, RECEIVER_CONTAINER);
    for t in [Tunnel::Vxlan, Tunnel::Ipip] {
        let wire = t.frame(LOCAL_IP, &valid_inner);
        c.arriving(
            format!("{t:?} from a peer's container"),
            wire.clone(),
            Decap(t),
        );

        // Every truncation. Up to the outer IPv4 header (and, for VXLAN, the
        // UDP header) the packet cannot be told from any other: the stack
        // owns it. From then on it is a tunnel packet for this node that is
        // broken.
        let classified = match t {
            Tunnel::Vxlan => 14 + 20 + 8,
            Tunnel::Ipip => 14 + 20,
        };
        let cut = |n: usize| {
            if n < classified {
                Untouched(PassMalformed)
            } else {
                Dropped(DropMalformedTunnel)
            }
        };
        // With the outer total length agreeing, the inner packet claims
        // more than the outer one holds: as broken.
        for cut_to in truncations(&wire) {
            let expect = cut(cut_to.len);
            c.arriving(format!("{t:?} {}", cut_to.what), cut_to.frame, expect);
        }

        // Outer total length lies.
        let real = (wire.len() - 14) as u16;
        for (what, tot_len) in [
            ("zero", 0),
            ("only the outer header", 20),
            ("8 bytes short of the inner packet's end", real - 8),
            ("one past the frame", real + 1),
            ("65535", 0xffff),
        ] {
            c.arriving(
                format!("{t:?}, outer total length {what}"),
                with_total_length(&wire, tot_len),
                Dropped(DropMalformedTunnel),
            );
        }
        // Ethernet padding after the outer packet is normal.
        let mut padded = wire.clone();
        padded.extend_from_slice(&[0; 6]);
        c.arriving(format!("{t:?} with Ethernet padding"), padded, Decap(t));

        // Policy, not asserted either way: the programs do not verify the
        // outer checksum (nor, for VXLAN, the UDP length), and take any
        // outer destination MAC, where the stack would drop such a frame
        // (ip_rcv: bad checksum, PACKET_OTHERHOST). The outer header is
        // discarded and the inner one is checked, so nothing is gained by
        // such a lie; whichever way it goes, it must go cleanly and once.
        let decap_or_drop = || Either(Box::new(Decap(t)), Box::new(Dropped(DropMalformedTunnel)));
        let mut bad_sum = wire.clone();
        bad_sum[24] ^= 0xff;
        c.arriving(
            format!("{t:?}, outer checksum wrong"),
            bad_sum,
            decap_or_drop(),
        );
        for (what, mac) in [
            ("another host's", [0x02, 0, 0, 0, 0x55, 0x55]),
            ("the broadcast", [0xff; 6]),
        ] {
            let mut frame = wire.clone();
            frame[..6].copy_from_slice(&mac);
            c.arriving(format!("{t:?} to {what} MAC"), frame, decap_or_drop());
        }
        if t == Tunnel::Vxlan {
            let udp_len = wire.len() - 34;
            for (what, len) in [
                ("0", 0),
                ("one past the datagram", udp_len + 1),
                ("short", 8),
            ] {
                let mut frame = wire.clone();
                frame[38..40].copy_from_slice(&(len as u16).to_be_bytes());
                c.arriving(format!("VXLAN, UDP length {what}"), frame, decap_or_drop());
            }
        }

        // Outer IHL: options (and lies below 5) are the stack's business.
        for ihl in (0..=15u8).filter(|&i| i != 5) {
            let mut outer = outer_header(LOCAL_IP, t.proto());
            outer.ihl = ihl;
            // The program says pass_not_tunnel for both; for IHL < 5 that
            // is a header the stack drops, so only the class is asserted.
            let expect = if ihl > 5 {
                Untouched(PassNotTunnel)
            } else {
                UntouchedAs(&[PassNotTunnel, PassMalformed])
            };
            c.arriving(
                format!("{t:?}, outer IHL {ihl}"),
                t.frame_with(&outer, &valid_inner),
                expect,
            );
        }
        // Outer fragments: for the stack to reassemble. Another change
        // counts these pass_outer_fragment instead of pass_not_tunnel;
        // either is right, as long as they pass untouched.
        for (what, frags) in [
            ("MF", IP_MF),
            ("offset 8", 1),
            ("MF and offset 1480", IP_MF | 185),
            ("the last offset", 0x1fff),
        ] {
            let mut outer = outer_header(LOCAL_IP, t.proto());
            outer.frags = frags;
            c.arriving(
                format!("{t:?}, outer fragment ({what})"),
                t.frame_with(&outer, &valid_inner),
                UntouchedAs(&[PassNotTunnel, PassOuterFragment]),
            );
        }
        let mut outer = outer_header(LOCAL_IP, t.proto());
        outer.frags = IP_DF;
        c.arriving(
            format!("{t:?}, outer DF"),
            t.frame_with(&outer, &valid_inner),
            Decap(t),
        );
        for version in [0, 6, 15] {
            let mut outer = outer_header(LOCAL_IP, t.proto());
            outer.version = version;
            c.arriving(
                format!("{t:?}, outer version {version}"),
                t.frame_with(&outer, &valid_inner),
                Untouched(PassMalformed),
            );
        }
        for dst in [
            [198, 18, 0, 77],
            LOCAL_IP,
            [255, 255, 255, 255],
            [224, 0, 0, 1],
        ] {
            let mut outer = outer_header(LOCAL_IP, t.proto());
            outer.dst = dst;
            c.arriving(
                format!("{t:?} to {dst:?}, not this node"),
                t.frame_with(&outer, &valid_inner),
                Untouched(PassNotTunnel),
            );
        }

        // VLAN tags in front of the outer header: not IPv4 to the programs.
        for (what, tags) in [
            ("802.1Q", &[ETH_P_8021Q][..]),
            ("802.1ad", &[ETH_P_8021AD]),
            ("802.1ad + 802.1Q", &[ETH_P_8021Q, ETH_P_8021AD]),
        ] {
            let frame = tags
                .iter()
                .fold(wire.clone(), |f, &tpid| vlan_tagged(&f, tpid, 100));
            c.arriving(
                format!("{t:?}, {what}-tagged"),
                frame,
                Untouched(PassNotIpv4),
            );
        }

        // The inner IPv4 header, swept: a peer carries what is well-formed
        // (the inner packet's options and fragments are its own business).
        for v in header_sweep(Ipv4Header::new(
            SENDER_CONTAINER,
            RECEIVER_CONTAINER,
            IPPROTO_UDP,
        )) {
            let expect = if v.well_formed {
                Decap(t)
            } else {
                Dropped(DropMalformedTunnel)
            };
            c.arriving(
                format!("{t:?}, inner {}", v.what),
                t.frame(LOCAL_IP, &v.ip),
                expect,
            );
        }

        // Outer sources that are no node's PublicIP, this node's own
        // included.
        for src in [
            [198, 18, 0, 77],
            PEER_IP,
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            SENDER_CONTAINER,
        ] {
            c.arriving(
                format!("{t:?} from {src:?}, no node"),
                t.frame(src, &valid_inner),
                Dropped(DropUnknownSource),
            );
        }
        // Inner sources the sending node could not have sent.
        let mut rng = Rng(0x9e37_79b9);
        let random_sources = std::iter::repeat_with(|| rng.next().to_be_bytes())
            .filter(|a| a[..3] != LOCAL_SUBNET[..3] && *a != LOCAL_IP)
            .take(8)
            .collect::<Vec<_>>();
        for src in [
            [10, 244, 3, 5],  // another node's container
            [10, 244, 2, 9],  // the receiver's own container
            [10, 244, 99, 1], // nobody's subnet
            [10, 244, 0, 0],  // the cluster route's gateway address
            UNRESOLVED_IP,    // another node's host
            PEER_IP,          // the receiver's host
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [127, 0, 0, 1],
            [224, 0, 0, 5],
        ]
        .into_iter()
        .chain(random_sources)
        {
            c.arriving(
                format!("{t:?}, inner source {src:?}"),
                t.frame(LOCAL_IP, &container_packet(src, RECEIVER_CONTAINER)),
                Dropped(DropSpoofedInnerSource),
            );
        }
        c.arriving(
            format!("{t:?} from a known node with another node's container as source"),
            t.frame(UNRESOLVED_IP, &valid_inner),
            Dropped(DropSpoofedInnerSource),
        );
        for (what, src) in [("host", LOCAL_IP), ("last container", [10, 244, 1, 254])] {
            c.arriving(
                format!("{t:?} from the peer's {what}"),
                t.frame(LOCAL_IP, &container_packet(src, RECEIVER_CONTAINER)),
                Decap(t),
            );
        }
        // Inner destinations that are no container of this node's.
        for dst in [
            [10, 244, 3, 9],      // another node's container
            [10, 244, 1, 9],      // the sender's own container, reflected
            [224, 0, 0, 18],      // VRRP
            [224, 0, 0, 1],       // all hosts
            [239, 255, 255, 250], // SSDP
            [255, 255, 255, 255], // limited broadcast
            [10, 244, 2, 255],    // this subnet's broadcast
            [10, 244, 2, 0],      // this subnet's network address
            PEER_IP,              // the receiver's host
            LOCAL_IP,             // the sender's host
            [127, 0, 0, 1],
            [10, 244, 0, 0],     // the cluster route's gateway address
            [10, 244, 255, 255], // the cluster network's broadcast
            [0, 0, 0, 0],
        ] {
            c.arriving(
                format!("{t:?}, inner destination {dst:?}"),
                t.frame(LOCAL_IP, &container_packet(SENDER_CONTAINER, dst)),
                Dropped(DropForeignInnerDestination),
            );
        }
        // The bridge's own address (the subnet's first host address) is in
        // the subnet: delivered, as flannel's kernel VXLAN delivers it.
        // Policy, not a container: the host's firewall governs what
        // listens there.
        for dst in [[10, 244, 2, 1], [10, 244, 2, 254]] {
            c.arriving(
                format!("{t:?}, inner destination {dst:?}"),
                t.frame(LOCAL_IP, &container_packet(SENDER_CONTAINER, dst)),
                Decap(t),
            );
        }

        // Nested tunnels. Each program removes one layer, once (it runs
        // once per packet on --iface): a tunnel inside a tunnel to a
        // container is that container's payload and is delivered to it as
        // it is; one addressed to this node (to be decapsulated a second
        // time) is a foreign inner destination.
        for n in [Tunnel::Vxlan, Tunnel::Ipip] {
            let nested =
                |src, dst| Ipv4Header::new(src, dst, n.proto()).packet(&n.payload(&valid_inner));
            c.arriving(
                format!("{n:?} inside {t:?}, to a container"),
                t.frame(LOCAL_IP, &nested(SENDER_CONTAINER, RECEIVER_CONTAINER)),
                Decap(t),
            );
            for src in [SENDER_CONTAINER, LOCAL_IP] {
                c.arriving(
                    format!("{n:?} inside {t:?} from {src:?}, to this node"),
                    t.frame(LOCAL_IP, &nested(src, PEER_IP)),
                    Dropped(DropForeignInnerDestination),
                );
            }
        }
    }

    // VXLAN only: the header, the port, the inner frame's type.
    let wire = Tunnel::Vxlan.frame(LOCAL_IP, &valid_inner);
    let vxlan_at = 14 + 20 + 8;
    for (what, header, expect) in [
        (
            "VNI 0",
            vxlan_header(VXLAN_FLAG_I, 0),
            Untouched(PassForeignVni),
        ),
        (
            "VNI 2",
            vxlan_header(VXLAN_FLAG_I, 2),
            Untouched(PassForeignVni),
        ),
        (
            "VNI 2^24-1",
            vxlan_header(VXLAN_FLAG_I, 0xff_ffff),
            Untouched(PassForeignVni),
        ),
        ("no I flag", vxlan_header(0, VNI), Untouched(PassForeignVni)),
        (
            "only reserved flags",
            vxlan_header(!VXLAN_FLAG_I, VNI),
            Untouched(PassForeignVni),
        ),
        // RFC 7348: reserved bits are ignored on receipt.
        ("every flag", vxlan_header(0xff, VNI), Decap(Tunnel::Vxlan)),
    ] {
        let mut frame = wire.clone();
        frame[vxlan_at..vxlan_at + 8].copy_from_slice(&header);
        c.arriving(format!("VXLAN, {what}"), frame, expect);
    }
    let mut reserved = wire.clone();
    reserved[vxlan_at + 1..vxlan_at + 4].copy_from_slice(&[0xff; 3]);
    reserved[vxlan_at + 7] = 0xff;
    c.arriving("VXLAN, reserved bytes set", reserved, Decap(Tunnel::Vxlan));
    let mut foreign_unknown = Tunnel::Vxlan.frame([198, 18, 0, 77], &valid_inner);
    foreign_unknown[vxlan_at + 6] = 2;
    c.arriving(
        "VXLAN, VNI 2 from no node",
        foreign_unknown,
        Untouched(PassForeignVni),
    );
    for port in [4789u16, 0, 8473, 0xffff] {
        let mut frame = wire.clone();
        frame[36..38].copy_from_slice(&port.to_be_bytes());
        c.arriving(
            format!("VXLAN to port {port}"),
            frame,
            Untouched(PassNotTunnel),
        );
    }
    for proto in [0u8, 1, 6, 47] {
        c.arriving(
            format!("IP protocol {proto} to this node"),
            Tunnel::Vxlan.frame_with(&outer_header(LOCAL_IP, proto), &valid_inner),
            Untouched(PassNotTunnel),
        );
    }
    for (what, ethertype, payload) in [
        ("IPv6", ETH_P_IPV6, ipv6_packet()),
        ("ARP", ETH_P_ARP, arp_request()),
        (
            "802.1Q-tagged IPv4",
            ETH_P_8021Q,
            [&[0, 100, 8, 0][..], &valid_inner].concat(),
        ),
        ("ethertype 0", 0, valid_inner.clone()),
    ] {
        let inner_l2 = ethernet(PEER_VTEP, SENDER_MAC, ethertype, &payload);
        c.arriving(
            format!("VXLAN carrying {what}"),
            underlay_frame(
                &outer_header(LOCAL_IP, IPPROTO_UDP),
                &vxlan_datagram(&inner_l2),
            ),
            Dropped(DropInnerNotIpv4),
        );
        // And the same unwrapped, on the underlay itself.
        if ethertype != 0 {
            c.arriving(
                format!("bare {what} to this node"),
                ethernet(RECEIVER_MAC, SENDER_MAC, ethertype, &payload),
                Untouched(PassNotIpv4),
            );
        }
    }
    let mut v6_outer = ethernet(RECEIVER_MAC, SENDER_MAC, ETH_P_IPV6, &ipv6_packet());
    v6_outer.extend_from_slice(&vxlan_datagram(&vxlan_inner_frame(&valid_inner)));
    c.arriving("VXLAN over IPv6", v6_outer, Untouched(PassNotIpv4));

    // Garbage: random bytes, some dressed as the start of a tunnel packet
    // for this node so that they get past the first checks.
    let ipip_wire = Tunnel::Ipip.frame(LOCAL_IP, &valid_inner);
    let mut rng = Rng(0x1234_5678);
    for i in 0..240usize {
        let len = 14 + (i * 7) % 140;
        let mut frame = rng.bytes(len);
        let dress: &[u8] = match i % 4 {
            0 => &wire[..42],
            1 => &wire[..50],
            2 => &ipip_wire[..34],
            _ => &[],
        };
        let n = dress.len().min(len);
        frame[..n].copy_from_slice(&dress[..n]);
        c.arriving(format!("garbage #{i}, {len} bytes"), frame, DropOrUntouched);
    }
    c
}

/// A minimal IPv6 header (next header UDP, no payload).
fn ipv6_packet() -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p
}

/// An ARP request for the receiver's PublicIP.
fn arp_request() -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4, 0, 1];
    p.extend_from_slice(&SENDER_MAC);
    p.extend_from_slice(&LOCAL_IP);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&PEER_IP);
    p
}

/// A container's frame, as the egress hook sees it, from the sender's
/// container to `header.dst`.
fn container_frame(header: &Ipv4Header) -> Vec<u8> {
    leaving_frame(ETH_P_IP, &container_packet_with(header))
}

/// Everything a container or the host can send out of `--iface`.
fn leaving_corpus() -> Corpus {
    use Expect::*;
    use Reason::*;
    let mut c = Corpus::default();
    for d in [TO_VXLAN, TO_VXLAN_UNRESOLVED, TO_IPIP, TO_DIRECT] {
        let to = |d: Dest| Ipv4Header::new(SENDER_CONTAINER, d.addr, IPPROTO_UDP);
        let m = if d.verdict == TC_ACT_REDIRECT {
            format!("{:?} (next hop unresolved)", d.mode)
        } else {
            format!("{:?}", d.mode)
        };
        let valid = container_frame(&to(d));
        c.leaving(format!("to a {m} peer"), valid.clone(), Sent(d));

        // Every truncation: the header claims more than the packet holds.
        // Below 34 bytes the kernel builds no skb (checked in `run_corpus`).
        // With a total length that agrees, a short packet is a valid one.
        for cut_to in truncations(&valid) {
            let expect = if cut_to.length_agrees {
                Sent(d)
            } else {
                Dropped(DropMalformedIp)
            };
            c.leaving(format!("to {m}, {}", cut_to.what), cut_to.frame, expect);
        }

        for v in header_sweep(to(d)) {
            let expect = if v.well_formed {
                Sent(d)
            } else {
                Dropped(DropMalformedIp)
            };
            c.leaving(
                format!("to {m}, {}", v.what),
                leaving_frame(ETH_P_IP, &v.ip),
                expect,
            );
        }

        // A container's own tunnels are its payload: carried like any packet.
        for n in [Tunnel::Vxlan, Tunnel::Ipip] {
            let inner = container_packet(SENDER_CONTAINER, [10, 244, 9, 9]);
            let header = Ipv4Header::new(SENDER_CONTAINER, d.addr, n.proto());
            let frame = leaving_frame(ETH_P_IP, &header.packet(&n.payload(&inner)));
            c.leaving(format!("{n:?} from a container to {m}"), frame, Sent(d));
        }
        for (what, tags) in [
            ("802.1Q", &[ETH_P_8021Q][..]),
            ("802.1ad + 802.1Q", &[ETH_P_8021Q, ETH_P_8021AD]),
        ] {
            let frame = tags
                .iter()
                .fold(valid.clone(), |f, &tpid| vlan_tagged(&f, tpid, 100));
            c.leaving(
                format!("{what}-tagged, to {m}"),
                frame,
                Untouched(PassNotIpv4),
            );
        }
    }
    // A GSO super-packet may carry total length 0 (BIG TCP): not malformed.
    let big_tcp = container_frame(&Ipv4Header {
        tot_len: Some(0),
        ..Ipv4Header::new(SENDER_CONTAINER, TO_VXLAN.addr, IPPROTO_UDP)
    });
    let ingress = ingress_view(&big_tcp);
    // BPF_PROG_TEST_RUN cannot make a TCP GSO skb (gso_type stays 0), and
    // bpf_skb_adjust_room refuses to grow a GSO skb of no known type: the
    // run then shows that total length 0 got past the header check
    // (drop_nested_gso, the count of GSO packets BPF cannot encapsulate,
    // not drop_malformed_ip) and that nothing was left half-written. A
    // kernel that lets it through must send it correctly.
    c.0.push(Case {
        name: "GSO with total length 0 (BIG TCP)".into(),
        frame: big_tcp,
        runs: vec![
            (
                Prog::EncapGso,
                Either(Box::new(Sent(TO_VXLAN)), Box::new(Dropped(DropNestedGso))),
            ),
            (Prog::Xdp, ingress.clone()),
            (Prog::TcGso, gso_view(&ingress)),
            (Prog::Tc, ingress),
        ],
    });

    // Destinations no remote node leases: the stack's.
    for dst in [
        [10, 244, 9, 9], // no lease
        [10, 244, 1, 9], // this node's own subnet
        [10, 244, 0, 0], // the cluster route's gateway address
        [8, 8, 8, 8],
        [224, 0, 0, 18],
        [255, 255, 255, 255],
        [198, 18, 0, 9],
        [127, 0, 0, 1],
    ] {
        c.leaving(
            format!("to {dst:?}"),
            container_frame(&Ipv4Header::new(SENDER_CONTAINER, dst, IPPROTO_UDP)),
            Untouched(PassNoRemote),
        );
        // Broken, but not ours: the stack's to judge.
        c.leaving(
            format!("version 6 to {dst:?}"),
            container_frame(&Ipv4Header {
                version: 6,
                ..Ipv4Header::new(SENDER_CONTAINER, dst, IPPROTO_UDP)
            }),
            Untouched(PassNoRemote),
        );
    }
    for (what, ethertype, payload) in [
        ("IPv6", ETH_P_IPV6, ipv6_packet()),
        ("ARP", ETH_P_ARP, arp_request()),
    ] {
        c.leaving(
            what,
            leaving_frame(ethertype, &payload),
            Untouched(PassNotIpv4),
        );
    }

    // Tiny frames of every length, zero-filled: IPv4 headed to a remote
    // subnet (where the destination field exists), and two other types.
    for n in 0..=64usize {
        for (what, ethertype, expect) in [
            ("IPv4", ETH_P_IP, Dropped(DropMalformedIp)),
            ("ethertype 0", 0, Untouched(PassNotIpv4)),
            ("IPv6", ETH_P_IPV6, Untouched(PassNotIpv4)),
        ] {
            let mut frame = vec![0u8; n];
            if let Some(t) = frame.get_mut(12..14) {
                t.copy_from_slice(&ethertype.to_be_bytes());
            }
            if let Some(dst) = frame.get_mut(30..34).filter(|_| ethertype == ETH_P_IP) {
                dst.copy_from_slice(&TO_VXLAN.addr);
            }
            c.leaving(format!("{n} zero bytes, {what}"), frame, expect);
        }
    }

    // Garbage, half of it IPv4 to a remote container.
    let mut rng = Rng(0x0bad_cafe);
    for i in 0..240usize {
        let len = 14 + (i * 7) % 140;
        let mut frame = rng.bytes(len);
        if i % 2 == 0 {
            frame[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
            if let Some(dst) = frame.get_mut(30..34) {
                dst.copy_from_slice(&TO_VXLAN.addr);
            }
        }
        c.leaving(
            format!("garbage #{i}, {len} bytes"),
            frame,
            DropUntouchedOrSent(TO_VXLAN),
        );
    }
    c
}

/// Runs counted per program, and runs the kernel refused.
#[derive(Default)]
struct Tally {
    runs: BTreeMap<Prog, usize>,
    refused: BTreeMap<Prog, usize>,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (prog, n) in &self.runs {
            let refused = self.refused.get(prog).copied().unwrap_or_default();
            write!(
                f,
                "{prog:?}: {n} runs ({refused} too short for BPF_PROG_TEST_RUN); "
            )?;
        }
        Ok(())
    }
}

/// Runs every case's runs for the programs in `progs`, which must all run
/// under the configuration the bench has now; returns the broken ones.
fn run_corpus(
    b: &mut ProgramBench,
    corpus: &Corpus,
    progs: impl Fn(Prog) -> bool,
    tally: &mut Tally,
) -> Result<Vec<String>> {
    let mut broken = Vec::new();
    for case in &corpus.0 {
        for (prog, expect) in case.runs.iter().filter(|(p, _)| progs(*p)) {
            let (ran, moved) = b.counted(|b| Ok(prog.run(b, &case.frame)))?;
            let describe = |what: String| {
                format!(
                    "{prog:?}, {} ({} bytes): {what}; counters moved {:?}; want {expect:?}",
                    case.name,
                    case.frame.len(),
                    moved.iter().map(|(r, n)| (r.name(), n)).collect::<Vec<_>>(),
                )
            };
            let runnable = prog.runnable(&case.frame);
            match ran {
                Err(_) if !runnable && moved.is_empty() => {
                    // The kernel refused to build the context: no program ran.
                    *tally.refused.entry(*prog).or_default() += 1;
                }
                Err(e) => broken.push(describe(format!("run failed: {e:#}"))),
                Ok((verdict, _)) if !runnable => broken.push(describe(format!(
                    "the kernel ran a frame skb_buildable() says it refuses (verdict {verdict}): fix skb_buildable"
                ))),
                Ok((verdict, out)) => {
                    *tally.runs.entry(*prog).or_default() += 1;
                    if let Err(why) = judge(*prog, expect, &case.frame, verdict, &out, &moved, b.mac) {
                        broken.push(describe(why));
                    }
                }
            }
        }
    }
    Ok(broken)
}

/// Checks one run against its expectation: exactly one counter moved, by
/// one, and the verdict and bytes are what the expectation says.
fn judge(
    prog: Prog,
    expect: &Expect,
    frame: &[u8],
    verdict: u32,
    out: &[u8],
    moved: &[(Reason, u64)],
    our_mac: [u8; 6],
) -> std::result::Result<(), String> {
    let outcome = || {
        let bytes = if out == frame {
            "byte-identical".to_owned()
        } else {
            format!("{} bytes out, changed", out.len())
        };
        format!("verdict {verdict}, {bytes}")
    };
    let reason = match moved {
        [(r, 1)] => *r,
        _ => return Err(format!("{}; not exactly one counter +1", outcome())),
    };
    if let Expect::Either(a, b) = expect {
        return judge(prog, a, frame, verdict, out, moved, our_mac)
            .or_else(|_| judge(prog, b, frame, verdict, out, moved, our_mac));
    }
    let (pass, drop) = prog.verdicts();
    let untouched = verdict == pass && out == frame && !reason.is_drop();
    let dropped = verdict == drop && reason.is_drop();
    let sent = |d: &Dest| reason == d.reason() && d.sent_correctly(verdict, frame, out, our_mac);
    let ok = match expect {
        Expect::Untouched(r) => untouched && reason == *r,
        Expect::UntouchedAs(rs) => untouched && rs.contains(&reason),
        Expect::Dropped(r) => dropped && reason == *r,
        Expect::DropOrUntouched => untouched || dropped,
        Expect::DropUntouchedOrSent(d) => untouched || dropped || sent(d),
        Expect::Decap(t) => {
            verdict == pass && reason == Reason::Decapsulated && out == t.decapsulated(prog, frame)
        }
        Expect::Sent(d) => sent(d),
        Expect::Either(..) => unreachable!("judged above"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{}, counted {}", outcome(), reason.name()))
    }
}

/// Runs `corpus` with the bench as the receiver (decap hooks), then as the
/// sender (egress hook), and fails listing every broken run.
fn run_both_sides(b: &mut ProgramBench, corpus: &Corpus, what: &str) -> Result<()> {
    let mut tally = Tally::default();
    b.configure_as_receiver(PEER_SUBNET)?;
    let mut broken = run_corpus(b, corpus, Prog::is_decap, &mut tally)?;
    b.configure_as_sender()?;
    broken.extend(run_corpus(b, corpus, |p| !p.is_decap(), &mut tally)?);
    println!("{what}: {} packets; {tally}", corpus.0.len());
    let total: usize = tally.runs.values().sum();
    ensure!(
        broken.is_empty(),
        "{what}: {} of {total} runs broke the invariant:\n{}",
        broken.len(),
        broken.join("\n")
    );
    // A corpus the kernel refused wholesale would prove nothing.
    ensure!(
        tally.runs.len() == corpus_programs(corpus) && total > corpus.0.len(),
        "{what}: only {total} runs for {} packets: {tally}",
        corpus.0.len()
    );
    Ok(())
}

fn corpus_programs(corpus: &Corpus) -> usize {
    let mut progs: Vec<Prog> = corpus
        .0
        .iter()
        .flat_map(|c| c.runs.iter().map(|(p, _)| *p))
        .collect();
    progs.sort();
    progs.dedup();
    progs.len()
}

/// What arrives from the underlay, through the decap hooks as the receiver
/// (198.18.0.2, 10.244.2.0/24) and the egress hook as the sender.
#[test]
fn decap_corpus() -> Result<()> {
    let mut b = ProgramBench::new()?;
    // The receiver knows the other nodes, not itself: a real agent never
    // puts its own lease or address in SUBNETS and NODE_IPS.
    b.remove_peer(PEER_SUBNET, 24, PEER_IP)?;
    run_both_sides(&mut b, &arriving_corpus(), "arriving")
}

/// What leaves for remote subnets of every mode, through the egress hook as
/// the sender (198.18.0.1, 10.244.1.0/24) and the decap hooks as the
/// receiver.
#[test]
fn encap_corpus() -> Result<()> {
    let mut b = ProgramBench::new()?;
    b.remove_peer(LOCAL_SUBNET, 24, LOCAL_IP)?;
    b.add_peer_with_mode([10, 244, 4, 0], 24, PEER_IP, [0; 6], Mode::Ipip)?;
    b.add_peer_with_mode([10, 244, 5, 0], 24, PEER_IP, [0; 6], Mode::Direct)?;
    run_both_sides(&mut b, &leaving_corpus(), "leaving")
}
