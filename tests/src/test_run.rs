//! A bench for BPF_PROG_TEST_RUN: the real programs, loaded by the agent's
//! own loader, run on crafted packets inside a private network namespace.
//!
//! The namespace holds one veth (`u0`, 198.18.0.1/24) so that the encap
//! program's FIB lookups see a known underlay: 198.18.0.2 has a permanent
//! neighbour entry, 198.18.0.3 none. `BPF_PROG_TEST_RUN` never transmits, so
//! nothing leaves the namespace. Used by the byte-level tests and by
//! `cargo xtask bench` for per-packet cost.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::{
    maps::lpm_trie::Key,
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use node_agent::datapath::{Datapath, LoadOptions};
use node_agent::flannel::lease::format_mac;
pub use node_agent::pinned::CounterRow;
use weft_common::{
    DECAP_IPIP, DECAP_VXLAN, Mode, NodeConfig, PROG_DECAP_TC, PROG_DECAP_XDP, PROG_ENCAP_TC,
    PROG_SLOWPATH_IPIP_TC, PROG_SLOWPATH_RX_TC, Program, Reason, RemoteNode,
};

use crate::{Netns, PinDir, ns_name, require_bpffs, require_root, unique_tag};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

pub const LOCAL_IP: [u8; 4] = [198, 18, 0, 1];
pub const PEER_IP: [u8; 4] = [198, 18, 0, 2];
pub const UNRESOLVED_IP: [u8; 4] = [198, 18, 0, 3];
pub const PEER_UNDERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
pub const PEER_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x22, 0x22];
pub const UNRESOLVED_VTEP: [u8; 6] = [0x02, 0, 0, 0, 0x33, 0x33];
pub const RECEIVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x44, 0x44];
/// The sender's (198.18.0.1) subnet, where `inner_frame`'s source lives.
pub const LOCAL_SUBNET: [u8; 4] = [10, 244, 1, 0];
/// The receiver's (198.18.0.2) subnet.
pub const PEER_SUBNET: [u8; 4] = [10, 244, 2, 0];
pub const VNI: u32 = 1;
pub const PORT: u16 = 8472;

/// `struct __sk_buff` as BPF_PROG_TEST_RUN's ctx_in: only the fields the
/// kernel accepts there may be non-zero (net/bpf/test_run.c,
/// convert___skb_to_skb).
pub const SKB_CTX_LEN: usize = 192;
pub const ETH_HLEN: usize = 14;
pub const SKB_MARK: usize = 8;
pub const SKB_IFINDEX: usize = 40;
pub const SKB_GSO_SIZE: usize = 176;
/// `struct xdp_md`: six u32 fields.
pub const XDP_MD_LEN: usize = 24;

pub struct ProgramBench {
    ns: Netns,
    pub dp: Datapath,
    _pins: PinDir,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl ProgramBench {
    pub fn new() -> Result<Self> {
        require_root()?;
        require_bpffs()?;
        // The name's shape is one the stale-resource sweep recognises.
        let ns = Netns::new(&ns_name(&unique_tag(), "tr"))?;
        // bpf_fib_lookup answers FWD_DISABLED unless the egress device
        // forwards; the agent turns forwarding on for the same reason.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.add_veth("u0", &ns, "u1", 1500)?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", Ipv4Addr::from(LOCAL_IP)),
            "dev",
            "u0",
        ])?;
        ns.ip(&["link", "set", "u0", "up"])?;
        ns.ip(&["link", "set", "u1", "up"])?;
        ns.ip(&[
            "neigh",
            "replace",
            &Ipv4Addr::from(PEER_IP).to_string(),
            "lladdr",
            &format_mac(&PEER_UNDERLAY_MAC),
            "dev",
            "u0",
            "nud",
            "permanent",
        ])?;
        let (ifindex, mac) = ns.link("u0")?;
        let pins = PinDir::new()?;
        let mut dp = Datapath::load(pins.path(), LoadOptions::default())
            .context("loading the BPF object")?;
        for name in [
            PROG_ENCAP_TC,
            PROG_DECAP_TC,
            PROG_SLOWPATH_RX_TC,
            PROG_SLOWPATH_IPIP_TC,
        ] {
            let prog: &mut SchedClassifier = dp
                .ebpf_mut()
                .program_mut(name)
                .with_context(|| name.to_owned())?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let xdp: &mut Xdp = dp
            .ebpf_mut()
            .program_mut(PROG_DECAP_XDP)
            .context("xdp")?
            .try_into()?;
        xdp.load().context("verifier rejected the XDP program")?;

        let mut bench = Self {
            ns,
            dp,
            _pins: pins,
            ifindex,
            mac,
        };
        bench.add_peer(PEER_SUBNET, 24, PEER_IP, PEER_VTEP)?;
        bench.add_peer([10, 244, 3, 0], 24, UNRESOLVED_IP, UNRESOLVED_VTEP)?;
        // What the receiver knows of the sender: its subnet, where the
        // crafted packets come from (`inner_frame`), and its PublicIP.
        bench.add_peer(LOCAL_SUBNET, 24, LOCAL_IP, SENDER_MAC)?;
        bench.configure_as_sender()?;
        Ok(bench)
    }

    pub fn node_config(
        &self,
        public_ip: [u8; 4],
        iface_mac: [u8; 6],
        local_subnet: [u8; 4],
    ) -> NodeConfig {
        NodeConfig {
            configured: 1,
            public_ip,
            vtep_mac: self.mac,
            vxlan_port_be: PORT.to_be(),
            vni: VNI,
            iface_ifindex: self.ifindex,
            iface_mtu: 1500,
            iface_mac,
            cluster_prefix_len: 16,
            local_prefix_len: 24,
            cluster_network: [10, 244, 0, 0],
            local_subnet,
            decap: DECAP_VXLAN | DECAP_IPIP,
            slow_path_ifindex: 0,
        }
    }

    pub fn configure_as_sender(&mut self) -> Result<()> {
        let cfg = self.node_config(LOCAL_IP, self.mac, LOCAL_SUBNET);
        Ok(self.dp.write_node_config(&cfg)?)
    }

    /// The sender again, with a slow-path device at `ifindex` (0: none).
    pub fn configure_slow_path(&mut self, ifindex: u32) -> Result<()> {
        let cfg = NodeConfig {
            slow_path_ifindex: ifindex,
            ..self.node_config(LOCAL_IP, self.mac, LOCAL_SUBNET)
        };
        Ok(self.dp.write_node_config(&cfg)?)
    }

    /// Makes the programs behave as the node at 198.18.0.2 leasing
    /// `local_subnet`, so that what the encap program produced is addressed
    /// to "us".
    pub fn configure_as_receiver(&mut self, local_subnet: [u8; 4]) -> Result<()> {
        let cfg = self.node_config(PEER_IP, RECEIVER_MAC, local_subnet);
        Ok(self.dp.write_node_config(&cfg)?)
    }

    pub fn counter(&self, reason: Reason) -> Result<u64> {
        Ok(self
            .dp
            .counters()?
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .unwrap_or_default())
    }

    /// One (program, reason) slot of `COUNTERS`: packets, bytes and the
    /// last failed helper's return code.
    pub fn counter_row(&self, program: Program, reason: Reason) -> Result<CounterRow> {
        self.dp
            .counter_table()?
            .into_iter()
            .find(|row| row.program == program && row.reason == reason)
            .context("no such counter slot")
    }

    pub fn run_tc(&mut self, name: &str, frame: &[u8], gso_size: u32) -> Result<(u32, Vec<u8>)> {
        let run = self.run_tc_repeat(name, frame, gso_size, 1)?;
        Ok((run.verdict, run.output))
    }

    /// Runs the XDP program once: the verdict and the frame it leaves (any
    /// XDP metadata it added is cut off; see [`Run::meta`]).
    pub fn run_xdp(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let run = self.run_xdp_repeat(frame, 1)?;
        Ok((run.verdict, run.output))
    }

    pub fn encap(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_tc(PROG_ENCAP_TC, frame, 0)
    }

    /// Runs TC program `name` `repeat` times on `frame`; the kernel reports
    /// the mean time per run.
    pub fn run_tc_repeat(
        &mut self,
        name: &str,
        frame: &[u8],
        gso_size: u32,
        repeat: u32,
    ) -> Result<Run> {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx[SKB_GSO_SIZE..SKB_GSO_SIZE + 4].copy_from_slice(&gso_size.to_ne_bytes());
        let prog: &SchedClassifier = self
            .dp
            .ebpf_mut()
            .program(name)
            .with_context(|| name.to_owned())?
            .try_into()?;
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut run = run_in_ns(&self.ns, |out| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(out),
                ctx_in: Some(&ctx),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..TestRunOptions::default()
            })
        })?;
        run.mark = u32::from_ne_bytes([
            ctx_out[SKB_MARK],
            ctx_out[SKB_MARK + 1],
            ctx_out[SKB_MARK + 2],
            ctx_out[SKB_MARK + 3],
        ]);
        Ok(run)
    }

    /// Runs the XDP program `repeat` times on `frame`.
    pub fn run_xdp_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<Run> {
        let prog: &Xdp = self
            .dp
            .ebpf_mut()
            .program(PROG_DECAP_XDP)
            .context("xdp")?
            .try_into()?;
        // `struct xdp_md` in: no metadata, the whole frame. Out, its `data`
        // is the metadata's length: the kernel returns the bytes from
        // data_meta on (net/bpf/test_run.c, bpf_prog_test_run_xdp).
        let mut ctx_in = [0u8; XDP_MD_LEN];
        ctx_in[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        let mut ctx_out = [0u8; XDP_MD_LEN];
        let mut run = run_in_ns(&self.ns, |out| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(out),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                repeat,
                ..TestRunOptions::default()
            })
        })?;
        let meta_len = u32::from_ne_bytes([ctx_out[0], ctx_out[1], ctx_out[2], ctx_out[3]]);
        let frame_out = run
            .output
            .split_off((meta_len as usize).min(run.output.len()));
        run.meta = std::mem::replace(&mut run.output, frame_out);
        Ok(run)
    }

    /// Adds a VXLAN node's subnet to `SUBNETS` (e.g. for scale runs).
    pub fn add_peer(
        &mut self,
        subnet: [u8; 4],
        prefix_len: u32,
        public_ip: [u8; 4],
        vtep_mac: [u8; 6],
    ) -> Result<()> {
        self.add_peer_with_mode(subnet, prefix_len, public_ip, vtep_mac, Mode::Vxlan)
    }

    /// Adds a remote node reached by `mode`, and its PublicIP to the known
    /// sources, as the agent does.
    pub fn add_peer_with_mode(
        &mut self,
        subnet: [u8; 4],
        prefix_len: u32,
        public_ip: [u8; 4],
        vtep_mac: [u8; 6],
        mode: Mode,
    ) -> Result<()> {
        let node = RemoteNode {
            public_ip,
            vtep_mac,
            mode: mode as u8,
            _pad0: 0,
            vni: if mode == Mode::Vxlan { VNI } else { 0 },
        };
        self.dp.node_ips()?.insert(public_ip, 1, 0)?;
        self.dp
            .subnets()?
            .insert(&Key::new(prefix_len, subnet), node, 0)?;
        Ok(())
    }

    /// Forgets a remote node's subnet and PublicIP, as the agent does when
    /// its lease goes (e.g. to make the bench's receiver know only what a
    /// real one would: not its own subnet and address).
    pub fn remove_peer(
        &mut self,
        subnet: [u8; 4],
        prefix_len: u32,
        public_ip: [u8; 4],
    ) -> Result<()> {
        self.dp
            .subnets()?
            .remove(&Key::new(prefix_len, subnet))
            .with_context(|| format!("removing {}/{prefix_len}", Ipv4Addr::from(subnet)))?;
        self.dp
            .node_ips()?
            .remove(&public_ip)
            .with_context(|| format!("removing {}", Ipv4Addr::from(public_ip)))?;
        Ok(())
    }

    /// Runs `run` and returns its result with every counter it moved, and
    /// by how much: what a test needs to say "counted once, as this".
    pub fn counted<T>(
        &mut self,
        run: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<(T, Vec<(Reason, u64)>)> {
        let before = self.dp.counters()?;
        let out = run(self)?;
        let after = self.dp.counters()?;
        let moved = after
            .iter()
            .zip(&before)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((r, a), (_, b))| (*r, a.wrapping_sub(*b)))
            .collect();
        Ok((out, moved))
    }
}

/// One BPF_PROG_TEST_RUN: the verdict, the packet as the program left it,
/// and the kernel's mean time per repetition.
pub struct Run {
    pub verdict: u32,
    /// The frame as the program left it.
    pub output: Vec<u8>,
    /// XDP metadata the program put in front of the frame (empty for TC).
    pub meta: Vec<u8>,
    /// `skb->mark` as the TC program left it (0 for XDP).
    pub mark: u32,
    pub per_run: Duration,
}

fn run_in_ns(
    ns: &Netns,
    run: impl FnOnce(&mut [u8]) -> Result<aya::programs::TestRunResult, ProgramError> + Send,
) -> Result<Run> {
    ns.run_in(|| {
        let mut output = vec![0u8; 4096];
        let res = run(&mut output)?;
        output.truncate(res.data_size_out as usize);
        Ok(Run {
            verdict: res.return_value,
            output,
            meta: Vec::new(),
            mark: 0,
            per_run: res.duration,
        })
    })?
}

/// An Ethernet + IPv4 + UDP frame from a local container to `dst`.
pub fn inner_frame(dst: [u8; 4], sport: u16, payload: usize, df: bool) -> Vec<u8> {
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut ip = Ipv4Header::new([10, 244, 1, 2], dst, IPPROTO_UDP);
    ip.ttl = 63;
    ip.frags = if df { IP_DF } else { 0 };
    leaving_frame(ETH_P_IP, &ip.packet(&udp(sport, 5678, &data)))
}

/// A frame as the egress hook meets it: `payload` behind whatever L2
/// header the stack wrote (the program rewrites it when it sends).
pub fn leaving_frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ethernet(
        [0x02, 0, 0, 0, 0, 0x99],
        [0x02, 0, 0, 0, 0, 0x01],
        ethertype,
        payload,
    )
}

/// The fields of a crafted IPv4 header; [`Ipv4Header::packet`] writes it
/// with its checksum. Every field may lie, which is what hostile packets
/// are made of.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Header {
    pub version: u8,
    /// The IHL field, in 32-bit words. Above 5 the header carries that many
    /// words, the extra ones NOP options; below 5 the field lies and 20
    /// bytes are written.
    pub ihl: u8,
    pub tos: u8,
    /// The total length field; `None` writes the real length.
    pub tot_len: Option<u16>,
    pub id: u16,
    /// Flags and fragment offset, as on the wire.
    pub frags: u16,
    pub ttl: u8,
    pub proto: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Header {
    /// A plain header: version 4, no options, not a fragment, TTL 64.
    pub fn new(src: [u8; 4], dst: [u8; 4], proto: u8) -> Self {
        Self {
            version: 4,
            ihl: 5,
            tos: 0,
            tot_len: None,
            id: 0x1234,
            frags: 0,
            ttl: 64,
            proto,
            src,
            dst,
        }
    }

    /// The header, then `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        let header_len = usize::from(self.ihl.max(5)) * 4;
        let real_len = header_len + payload.len();
        let tot_len = self.tot_len.unwrap_or(real_len as u16);
        let mut ip = Vec::with_capacity(real_len);
        ip.extend_from_slice(&[(self.version << 4) | (self.ihl & 0x0f), self.tos]);
        ip.extend_from_slice(&tot_len.to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frags.to_be_bytes());
        ip.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        ip.extend_from_slice(&self.src);
        ip.extend_from_slice(&self.dst);
        // IPOPT_NOP: options a receiver may skip one byte at a time.
        ip.resize(header_len, 1);
        let csum = checksum(&ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 flags field: Don't Fragment, More Fragments.
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
/// RFC 7348's I flag: the VNI is valid.
pub const VXLAN_FLAG_I: u8 = 0x08;
/// The sender's (198.18.0.1) MAC: the source of crafted underlay frames and
/// of their inner VXLAN frames, and the VtepMAC the receiver knows for it.
pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x11, 0x11];

/// An Ethernet frame around `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `frame` with one VLAN tag (`tpid`, `vid`) after its MAC addresses.
pub fn vlan_tagged(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let split = frame.len().min(12);
    let mut f = frame[..split].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[split..]);
    f
}

/// A UDP header (checksum 0, as VXLAN senders write it) and `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + payload.len());
    d.extend_from_slice(&sport.to_be_bytes());
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    d
}

/// A VXLAN header: `flags`, then the 24-bit `vni`.
pub fn vxlan_header(flags: u8, vni: u32) -> [u8; 8] {
    let [_, a, b, c] = vni.to_be_bytes();
    [flags, 0, 0, 0, a, b, c, 0]
}

/// The UDP datagram a VXLAN peer sends: to [`PORT`], I flag, [`VNI`].
pub fn vxlan_datagram(inner_l2: &[u8]) -> Vec<u8> {
    let mut d = vxlan_header(VXLAN_FLAG_I, VNI).to_vec();
    d.extend_from_slice(inner_l2);
    udp(49152, PORT, &d)
}

/// The outer IPv4 header of a tunnel packet from `src` to the receiver
/// ([`PEER_IP`]).
pub fn outer_header(src: [u8; 4], proto: u8) -> Ipv4Header {
    Ipv4Header::new(src, PEER_IP, proto)
}

/// An underlay frame to the receiver's interface ([`RECEIVER_MAC`]) from
/// [`SENDER_MAC`]: `outer` around `payload`.
pub fn underlay_frame(outer: &Ipv4Header, payload: &[u8]) -> Vec<u8> {
    ethernet(RECEIVER_MAC, SENDER_MAC, ETH_P_IP, &outer.packet(payload))
}

/// The inner frame of a VXLAN packet a peer sends: `inner_ip` addressed to
/// the receiver's VtepMAC ([`PEER_VTEP`]) from the sender's.
pub fn vxlan_inner_frame(inner_ip: &[u8]) -> Vec<u8> {
    ethernet(PEER_VTEP, SENDER_MAC, ETH_P_IP, inner_ip)
}

/// Whether BPF_PROG_TEST_RUN will build an skb from `frame`: it refuses
/// frames shorter than an Ethernet header, and IP frames too short for
/// their IP header (net/bpf/test_run.c), so TC programs never see those
/// from it. A frame of other type with nothing past L2 is built (the
/// hostile corpus checks both sides of this line on the running kernel).
pub fn skb_buildable(frame: &[u8]) -> bool {
    let ip_min = match frame.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        _ => 0,
    };
    frame.len() >= ETH_HLEN + ip_min
}

pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
