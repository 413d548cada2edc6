//! The host networking the agent reads and sets up: the underlay interface's
//! facts, the single cluster route, and IP forwarding.
//!
//! Route and neighbour changes go through iproute2 (`ip`), present on every
//! host flannel runs on; each call is idempotent (`replace`), so restarts and
//! adoption never fail on "File exists".

use std::{fs, net::Ipv4Addr, process::Command};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("interface {iface:?} not found")]
    NoInterface { iface: String },
    #[error("interface {iface:?}: cannot parse {what} {value:?}")]
    BadAttribute {
        iface: String,
        what: &'static str,
        value: String,
    },
    #[error("interface {iface:?} has no IPv4 address; pass --public-ip")]
    NoIpv4 { iface: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot enable IPv4 forwarding: {0}")]
    Forwarding(#[source] std::io::Error),
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
    /// Reads the interface through netlink (`ip -j`), which answers for the
    /// caller's network namespace; sysfs would answer for whichever
    /// namespace mounted it.
    pub fn lookup(name: &str) -> Result<Self, NetconfError> {
        let links = ip_json(&["link", "show", "dev", name])?;
        let link = links.first().ok_or_else(|| NetconfError::NoInterface {
            iface: name.to_owned(),
        })?;
        let bad = |what, value: &serde_json::Value| NetconfError::BadAttribute {
            iface: name.to_owned(),
            what,
            value: value.to_string(),
        };
        let field = |key: &str| link.get(key).cloned().unwrap_or(serde_json::Value::Null);
        let ifindex = field("ifindex");
        let ifindex = ifindex
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad("ifindex", &ifindex))?;
        let mtu = field("mtu");
        let mtu = mtu
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad("mtu", &mtu))?;
        let address = field("address");
        let mac = address
            .as_str()
            .and_then(|a| crate::flannel::lease::parse_mac(a).ok())
            .ok_or_else(|| bad("address", &address))?;
        let addrs = ipv4_addrs(name)?;
        Ok(Self {
            name: name.to_owned(),
            ifindex,
            mac,
            mtu,
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

fn ipv4_addrs(iface: &str) -> Result<Vec<Ipv4Net>, NetconfError> {
    let mut addrs = Vec::new();
    for link in ip_json(&["-4", "addr", "show", "dev", iface])? {
        let Some(infos) = link.get("addr_info").and_then(|v| v.as_array()) else {
            continue;
        };
        for a in infos {
            let local = a
                .get("local")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok());
            let len = a.get("prefixlen").and_then(serde_json::Value::as_u64);
            if let (Some(local), Some(len)) = (local, len)
                && let Ok(net) = Ipv4Net::new(local, len as u8)
            {
                addrs.push(net);
            }
        }
    }
    Ok(addrs)
}

/// The one route that sends the whole cluster network to `--iface`, where the
/// encap program picks it up at TC egress. Its gateway is the Network's own
/// address, which flannel never leases (SubnetMin skips the first subnet), so
/// it cannot collide with a real host; a permanent neighbour entry for it
/// keeps the stack from ever ARPing (the encap program rewrites the L2 header
/// anyway). The route MTU leaves room for the encapsulation, so host-originated
/// packets and forwarded DF packets get correct PMTU feedback from the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRoute {
    pub network: Ipv4Net,
    pub iface: String,
    pub iface_mac: [u8; 6],
    pub mtu: u32,
}

impl ClusterRoute {
    fn gateway(&self) -> Ipv4Addr {
        self.network.network()
    }

    pub fn install(&self) -> Result<(), NetconfError> {
        let gw = self.gateway().to_string();
        let mac = crate::flannel::lease::format_mac(&self.iface_mac);
        ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            &self.iface,
            "nud",
            "permanent",
        ])?;
        ip(&[
            "route",
            "replace",
            &self.network.to_string(),
            "via",
            &gw,
            "dev",
            &self.iface,
            "onlink",
            "mtu",
            &self.mtu.to_string(),
        ])?;
        Ok(())
    }

    /// Removes the route and neighbour entry; absent ones are not an error.
    pub fn remove(&self) -> Result<(), NetconfError> {
        let gw = self.gateway().to_string();
        let ignore_missing = |r: Result<String, NetconfError>| match r {
            Err(NetconfError::Command { stderr, .. })
                if stderr.contains("No such process")
                    || stderr.contains("No such file")
                    || stderr.contains("Cannot find device") =>
            {
                Ok(())
            }
            other => other.map(drop),
        };
        ignore_missing(ip(&[
            "route",
            "del",
            &self.network.to_string(),
            "via",
            &gw,
            "dev",
            &self.iface,
        ]))?;
        ignore_missing(ip(&["neigh", "del", &gw, "dev", &self.iface]))?;
        Ok(())
    }
}

/// Installs "managed" neighbour entries for `add` (the kernel resolves them
/// and keeps them resolved, for BPF FIB lookups) and deletes `remove`, all
/// in one `ip -batch` run.
pub fn managed_neighbours(
    iface: &str,
    add: &[Ipv4Addr],
    remove: &[Ipv4Addr],
) -> Result<(), NetconfError> {
    use std::{fmt::Write as _, io::Write as _};
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let mut script = String::new();
    for ip in add {
        let _ = writeln!(
            script,
            "neigh replace {ip} dev {iface} managed extern_learn"
        );
    }
    for ip in remove {
        let _ = writeln!(script, "neigh del {ip} dev {iface}");
    }
    let command = || {
        format!(
            "ip -force -batch - ({} neighbour changes)",
            add.len() + remove.len()
        )
    };
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(NetconfError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NetconfError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NetconfError::Spawn)?;
    // Deleting an entry the kernel already dropped is fine.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let real: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            !l.trim().is_empty() && !l.contains("No such file") && !l.contains("Command failed")
        })
        .collect();
    if !real.is_empty() {
        return Err(NetconfError::Command {
            command: command(),
            stderr: real.join("; "),
        });
    }
    Ok(())
}

/// Deletes every managed, externally learned neighbour entry on `iface`: the
/// ones [`managed_neighbours`] created (cleanup no longer knows the peers).
pub fn remove_managed_neighbours(iface: &str) -> Result<(), NetconfError> {
    let entries = ip_json(&["neigh", "show", "dev", iface])?;
    let ours: Vec<Ipv4Addr> = entries
        .iter()
        .filter(|n| n.get("managed").is_some() && n.get("extern_learn").is_some())
        .filter_map(|n| n.get("dst")?.as_str()?.parse().ok())
        .collect();
    managed_neighbours(iface, &[], &ours)
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

/// The name of the interface with this ifindex, if it still exists.
pub fn ifname_of(ifindex: u32) -> Option<String> {
    ip_json(&["link", "show"]).ok()?.into_iter().find_map(|l| {
        (l.get("ifindex")?.as_u64()? == u64::from(ifindex))
            .then(|| l.get("ifname")?.as_str().map(str::to_owned))?
    })
}

fn ip_json(args: &[&str]) -> Result<Vec<serde_json::Value>, NetconfError> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = match ip(&full) {
        Err(NetconfError::Command { stderr, .. }) if stderr.contains("does not exist") => {
            return Err(NetconfError::NoInterface {
                iface: args.last().copied().unwrap_or_default().to_owned(),
            });
        }
        other => other?,
    };
    serde_json::from_str(&out).map_err(|e| NetconfError::Command {
        command: format!("ip {}", full.join(" ")),
        stderr: format!("unparsable output: {e}"),
    })
}

fn ip(args: &[&str]) -> Result<String, NetconfError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(NetconfError::Spawn)?;
    if !out.status.success() {
        return Err(NetconfError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
