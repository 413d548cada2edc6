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
//! No agent runs on these hosts; the subnet file is written here so that
//! [`Host::attach_container`] attaches containers as usual.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{Host, SubnetEnv, parse_cidr, switch_port};

/// The cluster network both baselines use (as the weft modes do).
pub const BASELINE_NETWORK: &str = "10.244.0.0/16";
const FLANNEL_DEVICE: &str = "flannel.1";

/// Writes `host`'s subnet file for subnet `10.244.<subnet>.0/24` with `mtu`.
pub fn write_subnet_file(host: &Host<'_>, subnet: u8, mtu: u32) -> Result<SubnetEnv> {
    let text = format!(
        "FLANNEL_NETWORK={BASELINE_NETWORK}\nFLANNEL_SUBNET=10.244.{subnet}.1/24\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n"
    );
    std::fs::write(host.subnet_file(), &text)
        .with_context(|| format!("writing {}", host.subnet_file().display()))?;
    SubnetEnv::parse(&text)
}

/// A host-gw node: forwarding on, subnet file with the full underlay MTU
/// (host-gw has no encapsulation overhead).
pub fn host_gw_node(host: &Host<'_>, subnet: u8) -> Result<SubnetEnv> {
    host.ns()
        .run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    write_subnet_file(host, subnet, 1500)
}

/// Adds flanneld host-gw's route for `peer`'s subnet on `host`.
pub fn host_gw_add_peer(host: &Host<'_>, peer: &Host<'_>, peer_env: &SubnetEnv) -> Result<()> {
    host.ns().ip(&[
        "route",
        "replace",
        &peer_env.subnet_network()?,
        "via",
        &peer.ip().to_string(),
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// A flanneld vxlan node: `flannel.1` as flanneld creates it, its address
/// `10.244.<subnet>.0/32`, forwarding on, subnet file with MTU 1450.
/// Returns the subnet file and the device's MAC (its VtepMAC).
pub fn flannel_vxlan_node(host: &Host<'_>, subnet: u8) -> Result<(SubnetEnv, String)> {
    let ns = host.ns();
    let local = host.ip().to_string();
    ns.ip(&[
        "link",
        "add",
        FLANNEL_DEVICE,
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", FLANNEL_DEVICE, "mtu", "1450", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("10.244.{subnet}.0/32"),
        "dev",
        FLANNEL_DEVICE,
    ])?;
    ns.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
    let link: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", FLANNEL_DEVICE])?)
        .context("parsing `ip -j link show flannel.1`")?;
    let vtep = link[0]["address"]
        .as_str()
        .context("flannel.1 has no MAC")?
        .to_owned();
    Ok((write_subnet_file(host, subnet, 1450)?, vtep))
}

/// What flanneld's vxlan backend installs on `host` for a peer with
/// PublicIP `public_ip`, VtepMAC `vtep` and subnet `peer_env`.
pub fn flannel_vxlan_add_peer(
    host: &Host<'_>,
    public_ip: Ipv4Addr,
    vtep: &str,
    peer_env: &SubnetEnv,
) -> Result<()> {
    let (net, len) = parse_cidr(&peer_env.subnet_network()?)?;
    let gw = net.to_string();
    let ns = host.ns();
    ns.ip(&[
        "neigh",
        "replace",
        &gw,
        "lladdr",
        vtep,
        "dev",
        FLANNEL_DEVICE,
        "nud",
        "permanent",
    ])?;
    ns.run(&[
        "bridge",
        "fdb",
        "replace",
        vtep,
        "dev",
        FLANNEL_DEVICE,
        "dst",
        &public_ip.to_string(),
        "self",
        "permanent",
    ])?;
    ns.ip(&[
        "route",
        "replace",
        &format!("{net}/{len}"),
        "via",
        &gw,
        "dev",
        FLANNEL_DEVICE,
        "onlink",
    ])?;
    Ok(())
}

/// Turns TSO and GSO on `host`'s underlay cable (both ends) on or off.
/// Off is [`Host::use_realistic_wire`]; on restores the veth default.
pub fn set_wire_offloads(host: &Host<'_>, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    let args = ["-K", "eth0", "tso", state, "gso", state];
    host.ns()
        .run(&[&["ethtool"], &args[..]].concat())
        .context("ethtool on the host side")?;
    let port = switch_port(host.index());
    host.cluster()
        .switch()
        .run(&["ethtool", "-K", &port, "tso", state, "gso", state])
        .context("ethtool on the switch side")?;
    Ok(())
}
