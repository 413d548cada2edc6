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
use node_agent::datapath::Datapath;
use node_agent::flannel::lease::format_mac;
use weft_common::{
    DECAP_IPIP, DECAP_VXLAN, Mode, NodeConfig, PROG_DECAP_TC, PROG_DECAP_XDP, PROG_ENCAP_TC,
    PROG_SLOWPATH_IPIP_TC, PROG_SLOWPATH_RX_TC, Reason, RemoteNode,
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
pub const SKB_IFINDEX: usize = 40;
pub const SKB_GSO_SIZE: usize = 176;

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
        let mut dp = Datapath::load(pins.path()).context("loading the BPF object")?;
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
        bench.add_peer(LOCAL_SUBNET, 24, LOCAL_IP, [0x02, 0, 0, 0, 0x11, 0x11])?;
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

    pub fn run_tc(&mut self, name: &str, frame: &[u8], gso_size: u32) -> Result<(u32, Vec<u8>)> {
        let run = self.run_tc_repeat(name, frame, gso_size, 1)?;
        Ok((run.verdict, run.output))
    }

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
        run_in_ns(&self.ns, |out| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(out),
                ctx_in: Some(&ctx),
                repeat,
                ..TestRunOptions::default()
            })
        })
    }

    /// Runs the XDP program `repeat` times on `frame`.
    pub fn run_xdp_repeat(&mut self, frame: &[u8], repeat: u32) -> Result<Run> {
        let prog: &Xdp = self
            .dp
            .ebpf_mut()
            .program(PROG_DECAP_XDP)
            .context("xdp")?
            .try_into()?;
        run_in_ns(&self.ns, |out| {
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(out),
                repeat,
                ..TestRunOptions::default()
            })
        })
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
}

/// One BPF_PROG_TEST_RUN: the verdict, the packet as the program left it,
/// and the kernel's mean time per repetition.
pub struct Run {
    pub verdict: u32,
    pub output: Vec<u8>,
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
            per_run: res.duration,
        })
    })?
}

/// An Ethernet + IPv4 + UDP frame from a local container to `dst`.
pub fn inner_frame(dst: [u8; 4], sport: u16, payload: usize, df: bool) -> Vec<u8> {
    let ip_len = 20 + 8 + payload;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // whatever the stack put there
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0x00];
    ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, if df { 0x40 } else { 0 }, 0, 63, 17, 0, 0]);
    ip.extend_from_slice(&[10, 244, 1, 2]);
    ip.extend_from_slice(&dst);
    let csum = checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&5678u16.to_be_bytes());
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend((0..payload).map(|i| i as u8));
    f
}

/// Whether BPF_PROG_TEST_RUN will build an skb from `frame`: it refuses
/// frames with nothing past L2, and IP frames too short for their header
/// (net/bpf/test_run.c), so TC programs never see those from it.
pub fn skb_buildable(frame: &[u8]) -> bool {
    let ip_min = match frame.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        _ => 1,
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
