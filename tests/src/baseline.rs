//! Kernel baselines for `cargo xtask bench`, set up on the same [`Host`]s
//! as weft runs on, exactly as their users would set them up:
//!
//! - plain routing (flannel's host-gw): one route per remote subnet via the
//!   peer's underlay address;
//! - the kernel vxlan device as flanneld's vxlan backend creates it:
//!   `flannel.1`, VNI 1, dstport 8472, nolearning, MTU 1450, and per peer a
//!   permanent neighbour entry, an fdb entry and a route via `<subnet>.0`
//!   onlink.
//!
//! No agent runs on these hosts; the subnet file is written here, by the
//! agent's own renderer, so that [`Host::attach_container`] attaches
//! containers as usual.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use node_agent::flannel::lease::format_mac;
use node_agent::flannel::{LeaseAttrs, SubnetEnv, VxlanLeaseData};
use weft_common::VXLAN_OVERHEAD;

use crate::Host;

/// The cluster network both baselines use (as the weft modes do).
pub const BASELINE_NETWORK: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
const FLANNEL_DEVICE: &str = "flannel.1";
const FLANNEL_VNI: u32 = 1;
const UNDERLAY_MTU: u32 = 1500;

/// Writes `host`'s subnet file for subnet `10.244.<subnet>.0/24` with `mtu`.
pub fn write_subnet_file(host: &Host<'_>, subnet: u8, mtu: u32) -> Result<SubnetEnv> {
    let env = SubnetEnv {
        network: BASELINE_NETWORK,
        subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, subnet, 0), 24)?,
        mtu,
        ipmasq: false,
    };
    std::fs::write(host.subnet_file(), env.render())
        .with_context(|| format!("writing {}", host.subnet_file().display()))?;
    Ok(env)
}

/// A host-gw node: forwarding on, subnet file with the full underlay MTU
/// (host-gw has no encapsulation overhead).
pub fn host_gw_node(host: &Host<'_>, subnet: u8) -> Result<SubnetEnv> {
    host.ns().sysctl("net.ipv4.ip_forward", "1")?;
    write_subnet_file(host, subnet, UNDERLAY_MTU)
}

/// Adds flanneld host-gw's route for `peer`'s subnet on `host`.
pub fn host_gw_add_peer(host: &Host<'_>, peer: &Host<'_>, peer_env: &SubnetEnv) -> Result<()> {
    host.ns().ip(&[
        "route",
        "replace",
        &peer_env.subnet.to_string(),
        "via",
        &peer.ip().to_string(),
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// A flanneld vxlan node: `flannel.1` as flanneld creates it, its address
/// `10.244.<subnet>.0/32`, forwarding on, subnet file with MTU 1450.
/// Returns the subnet file and the lease flanneld would publish for it.
pub fn flannel_vxlan_node(host: &Host<'_>, subnet: u8) -> Result<(SubnetEnv, LeaseAttrs)> {
    let ns = host.ns();
    let local = host.ip().to_string();
    let vni = FLANNEL_VNI.to_string();
    let mtu = (UNDERLAY_MTU - VXLAN_OVERHEAD).to_string();
    ns.ip(&[
        "link",
        "add",
        FLANNEL_DEVICE,
        "type",
        "vxlan",
        "id",
        &vni,
        "local",
        &local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", FLANNEL_DEVICE, "mtu", &mtu, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("10.244.{subnet}.0/32"),
        "dev",
        FLANNEL_DEVICE,
    ])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    let (_, vtep_mac) = ns.link(FLANNEL_DEVICE)?;
    let lease = LeaseAttrs {
        public_ip: host.ip(),
        backend_type: "vxlan".to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: Some(FLANNEL_VNI),
            vtep_mac,
        }),
    };
    let env = write_subnet_file(host, subnet, UNDERLAY_MTU - VXLAN_OVERHEAD)?;
    Ok((env, lease))
}

/// What flanneld's vxlan backend installs on `host` for a peer whose lease
/// is `peer` (PublicIP, VtepMAC) and subnet file `peer_env`.
pub fn flannel_vxlan_add_peer(
    host: &Host<'_>,
    peer: &LeaseAttrs,
    peer_env: &SubnetEnv,
) -> Result<()> {
    let data = peer
        .backend_data
        .with_context(|| format!("lease {} has no VtepMAC", peer.to_json()))?;
    let vtep = format_mac(&data.vtep_mac);
    let gw = peer_env.subnet.network().to_string();
    let ns = host.ns();
    ns.ip(&[
        "neigh",
        "replace",
        &gw,
        "lladdr",
        &vtep,
        "dev",
        FLANNEL_DEVICE,
        "nud",
        "permanent",
    ])?;
    ns.run(&[
        "bridge",
        "fdb",
        "replace",
        &vtep,
        "dev",
        FLANNEL_DEVICE,
        "dst",
        &peer.public_ip.to_string(),
        "self",
        "permanent",
    ])?;
    ns.ip(&[
        "route",
        "replace",
        &peer_env.subnet.to_string(),
        "via",
        &gw,
        "dev",
        FLANNEL_DEVICE,
        "onlink",
    ])?;
    Ok(())
}
