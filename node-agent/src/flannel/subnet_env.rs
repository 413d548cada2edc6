//! `/run/flannel/subnet.env`, the file the flannel CNI plugin reads to configure pods, and
//! from which flannel recovers its previous subnet after a restart.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use thiserror::Error;

use super::config::{Backend, MAX_SUBNET_LEN, VxlanConfig};
use super::echo::Echo;

/// flannel's default `--subnet-file`, also where the CNI plugin looks.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

// The overheads are the data path's (weft-common), equal to flannel's
// vxlan and ipip `encapOverhead`.
use weft_common::{IPIP_OVERHEAD, VXLAN_OVERHEAD};

const NETWORK_VAR: &str = "FLANNEL_NETWORK";
const SUBNET_VAR: &str = "FLANNEL_SUBNET";
const MTU_VAR: &str = "FLANNEL_MTU";
const IPMASQ_VAR: &str = "FLANNEL_IPMASQ";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SubnetEnvError {
    #[error("{SUBNET_VAR}={value}: not an IPv4 CIDR ({reason})")]
    InvalidSubnet { value: Echo, reason: String },
    #[error("{var} is missing")]
    Missing { var: &'static str },
    #[error("{NETWORK_VAR}={value}: not an IPv4 CIDR ({reason})")]
    InvalidNetwork { value: Echo, reason: String },
    #[error("{MTU_VAR}={value}: not an MTU between {MIN_MTU} and {MAX_MTU}")]
    InvalidMtu { value: Echo },
    #[error("{IPMASQ_VAR}={value}: not a boolean")]
    InvalidIpMasq { value: Echo },
    #[error(
        "{SUBNET_VAR}={subnet}: longer than /{MAX_SUBNET_LEN}, no room for the bridge's address and a container"
    )]
    SubnetTooLong { subnet: Ipv4Net },
    #[error("{SUBNET_VAR}={subnet} is not inside {NETWORK_VAR}={network}")]
    SubnetOutsideNetwork { subnet: Ipv4Net, network: Ipv4Net },
}

/// IPv4's minimum link MTU (RFC 791); a smaller FLANNEL_MTU is a broken file, not a choice.
const MIN_MTU: u32 = 68;
/// The largest MTU Linux accepts on a bridge or veth.
const MAX_MTU: u32 = 65535;

/// Contents of subnet.env as flannel writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Net,
    /// The leased subnet, in network-address form (10.244.5.0/24).
    pub subnet: Ipv4Net,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// The file text, byte for byte what flannel's `WriteSubnetFile` produces for IPv4. The
    /// subnet is written as its first host address (10.244.5.1/24) because the CNI bridge
    /// plugin takes it as the gateway address for cni0.
    pub fn render(&self) -> String {
        let subnet = self.subnet.trunc();
        let gateway = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
        format!(
            "FLANNEL_NETWORK={}\n{SUBNET_VAR}={gateway}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network.trunc(),
            subnet.prefix_len(),
            self.mtu,
            self.ipmasq,
        )
    }

    /// Parses a whole subnet.env, as the CNI plugin needs it: all four IPv4 variables must be
    /// present and valid, and the subnet must lie inside the network. Lines are read like
    /// [`parse_subnet`] reads them; other variables (IPv6, comments) are ignored.
    pub fn parse(contents: &str) -> Result<Self, SubnetEnvError> {
        let vars = assignments(contents);
        let get = |var: &'static str| {
            vars.iter()
                .rev()
                .find(|(key, _)| *key == var)
                .map(|(_, value)| *value)
                .ok_or(SubnetEnvError::Missing { var })
        };
        let network_raw = get(NETWORK_VAR)?;
        let network = network_raw
            .parse::<Ipv4Net>()
            .map_err(|e| SubnetEnvError::InvalidNetwork {
                value: Echo::new(network_raw),
                reason: e.to_string(),
            })?
            .trunc();
        let subnet = parse_subnet(contents)?.ok_or(SubnetEnvError::Missing { var: SUBNET_VAR })?;
        // No flannel or weft node leases one (SubnetLen is at most 30), and the file of a
        // /32 would not even read back the same: its gateway is the next address.
        if subnet.prefix_len() > MAX_SUBNET_LEN {
            return Err(SubnetEnvError::SubnetTooLong { subnet });
        }
        let mtu_raw = get(MTU_VAR)?;
        let mtu = mtu_raw
            .parse::<u32>()
            .ok()
            .filter(|mtu| (MIN_MTU..=MAX_MTU).contains(mtu))
            .ok_or_else(|| SubnetEnvError::InvalidMtu {
                value: Echo::new(mtu_raw),
            })?;
        let ipmasq_raw = get(IPMASQ_VAR)?;
        let ipmasq = parse_go_bool(ipmasq_raw).ok_or_else(|| SubnetEnvError::InvalidIpMasq {
            value: Echo::new(ipmasq_raw),
        })?;
        if !network.contains(&subnet) {
            return Err(SubnetEnvError::SubnetOutsideNetwork { subnet, network });
        }
        Ok(Self {
            network,
            subnet,
            mtu,
            ipmasq,
        })
    }
}

/// Go's `strconv.ParseBool`, which flannel's plugin uses for FLANNEL_IPMASQ: a file written by
/// flanneld itself must read the same here.
pub fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The `KEY=value` assignments of a subnet.env in file order, read like the godotenv reader
/// flannel uses: blank lines and `#` comments skipped, an optional `export `, optional quotes.
fn assignments(contents: &str) -> Vec<(&str, &str)> {
    contents
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                return None;
            }
            let line = line
                .strip_prefix("export")
                .filter(|rest| rest.starts_with(char::is_whitespace))
                .unwrap_or(line);
            let (key, raw) = line.split_once('=')?;
            Some((key.trim(), unquote(raw.trim())))
        })
        .collect()
}

/// Reads `FLANNEL_SUBNET` back from a subnet.env (flannel's `ReadCIDRFromSubnetFile`), masked to
/// the network address. `Ok(None)` when the variable is absent. The file is parsed like the
/// godotenv reader flannel uses: blank lines and `#` comments skipped, an optional `export `,
/// optional quotes, and the last assignment wins.
pub fn parse_subnet(contents: &str) -> Result<Option<Ipv4Net>, SubnetEnvError> {
    let value = assignments(contents)
        .into_iter()
        .rev()
        .find(|(key, _)| *key == SUBNET_VAR)
        .map(|(_, value)| value);
    let Some(value) = value else {
        return Ok(None);
    };
    value
        .parse::<Ipv4Net>()
        .map(|subnet| Some(subnet.trunc()))
        .map_err(|e| SubnetEnvError::InvalidSubnet {
            value: Echo::new(value),
            reason: e.to_string(),
        })
}

/// A quoted value loses its quotes; an unquoted one ends at whitespace (where an inline
/// `# comment` would start).
fn unquote(raw: &str) -> &str {
    for quote in ['"', '\''] {
        if let Some(inner) = raw
            .strip_prefix(quote)
            .and_then(|rest| rest.strip_suffix(quote))
        {
            return inner;
        }
    }
    raw.split_whitespace().next().unwrap_or("")
}

/// Writes `contents` to `path` so that readers (the CNI plugin) never see a partial file:
/// write a temporary file in the same directory, fsync it, then rename it over `path`, as
/// flannel does. The parent directory is created if missing.
pub fn write_atomic(path: &Path, contents: &str) -> io::Result<()> {
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: path has no file name", path.display()),
        )
    })?;
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;

    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp_path = dir.join(tmp_name);

    let result = File::create(&tmp_path)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp_path, path));
    if result.is_err() {
        // Best effort: the original error is the one worth reporting.
        let _ = fs::remove_file(&tmp_path);
    }
    result
}

/// The underlay MTU the tunnel is sized for. flannel's vxlan backend takes its `MTU` setting
/// in place of the interface's (its device gets `MTU - 50`); the other backends always use
/// the interface's.
pub fn underlay_mtu(iface_mtu: u32, backend: &Backend) -> u32 {
    match backend {
        Backend::Vxlan(VxlanConfig { mtu: Some(mtu), .. }) => *mtu,
        _ => iface_mtu,
    }
}

/// The MTU to advertise to pods (`FLANNEL_MTU`), as flannel computes it: the underlay MTU
/// ([`underlay_mtu`]) minus the backend's encapsulation overhead. The cluster route carries
/// it too, as flannel's routes through its vxlan device do.
pub fn flannel_mtu(iface_mtu: u32, backend: &Backend) -> u32 {
    let underlay = underlay_mtu(iface_mtu, backend);
    match backend {
        Backend::Vxlan(_) => underlay.saturating_sub(VXLAN_OVERHEAD),
        Backend::Ipip => underlay.saturating_sub(IPIP_OVERHEAD),
        Backend::HostGw => underlay,
    }
}

/// The outer packet size the data path encapsulates up to (`NodeConfig::iface_mtu`): the
/// underlay MTU, but never more than `--iface`'s own, which no bigger packet can leave by.
/// With a vxlan `MTU` above the interface's, flannel's device sends such packets with DF
/// clear and the kernel fragments them; here they take the slow path, which does the same
/// (and DF packets between the two sizes are answered "fragmentation needed").
pub fn datapath_mtu(iface_mtu: u32, backend: &Backend) -> u32 {
    underlay_mtu(iface_mtu, backend).min(iface_mtu)
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use crate::flannel::echo::assert_bounded;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn env() -> SubnetEnv {
        SubnetEnv {
            network: net("10.244.0.0/16"),
            subnet: net("10.244.5.0/24"),
            mtu: 1450,
            ipmasq: false,
        }
    }

    #[test]
    fn render_is_exact() {
        assert_eq!(
            env().render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let other = SubnetEnv {
            network: net("10.0.0.0/28"),
            subnet: net("10.0.0.4/30"),
            mtu: 1480,
            ipmasq: true,
        };
        assert_eq!(
            other.render(),
            "FLANNEL_NETWORK=10.0.0.0/28\nFLANNEL_SUBNET=10.0.0.5/30\nFLANNEL_MTU=1480\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn render_then_parse_round_trips() {
        assert_eq!(
            parse_subnet(&env().render()),
            Ok(Some(net("10.244.5.0/24")))
        );
    }

    #[test]
    fn parse_variants() {
        assert_eq!(
            parse_subnet("FLANNEL_SUBNET=10.244.5.1/24"),
            Ok(Some(net("10.244.5.0/24")))
        );
        assert_eq!(
            parse_subnet("# comment\n\nexport FLANNEL_SUBNET=\"10.1.2.1/25\"\n"),
            Ok(Some(net("10.1.2.0/25")))
        );
        assert_eq!(
            parse_subnet("FLANNEL_SUBNET='10.1.2.129/25'"),
            Ok(Some(net("10.1.2.128/25")))
        );
        assert_eq!(
            parse_subnet("FLANNEL_SUBNET=10.1.2.1/24 # old\r\n"),
            Ok(Some(net("10.1.2.0/24")))
        );
        assert_eq!(
            parse_subnet("FLANNEL_SUBNET=10.1.1.1/24\nFLANNEL_SUBNET=10.1.9.1/24\n"),
            Ok(Some(net("10.1.9.0/24")))
        );
        assert_eq!(parse_subnet(""), Ok(None));
        assert_eq!(
            parse_subnet(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_IPV6_SUBNET=fd00::1/64\nXFLANNEL_SUBNET=1.2.3.4/24\n"
            ),
            Ok(None)
        );
        for bad in [
            "FLANNEL_SUBNET=",
            "FLANNEL_SUBNET=10.244.5.1",
            "FLANNEL_SUBNET=fd00::1/64",
        ] {
            let e = parse_subnet(bad).unwrap_err();
            assert!(e.to_string().starts_with("FLANNEL_SUBNET="), "{bad}: {e}");
        }
    }

    #[test]
    fn parse_whole_file() {
        assert_eq!(SubnetEnv::parse(&env().render()), Ok(env()));
        assert_eq!(
            SubnetEnv::parse(
                "# flanneld\nexport FLANNEL_NETWORK=\"10.1.0.0/16\"\nFLANNEL_SUBNET=10.1.7.1/24\n\
                 FLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1480 # ipip\nFLANNEL_IPMASQ=True\n"
            ),
            Ok(SubnetEnv {
                network: net("10.1.0.0/16"),
                subnet: net("10.1.7.0/24"),
                mtu: 1480,
                ipmasq: true,
            })
        );
        // The last assignment wins, for every variable.
        let later = format!("{}FLANNEL_MTU=1400\nFLANNEL_IPMASQ=1\n", env().render());
        let parsed = SubnetEnv::parse(&later).unwrap();
        assert_eq!((parsed.mtu, parsed.ipmasq), (1400, true));
    }

    #[test]
    fn parse_whole_file_errors() {
        let good = env().render();
        for (var, replacement, expected) in [
            ("FLANNEL_NETWORK", "", "FLANNEL_NETWORK is missing"),
            ("FLANNEL_SUBNET", "", "FLANNEL_SUBNET is missing"),
            ("FLANNEL_MTU", "", "FLANNEL_MTU is missing"),
            ("FLANNEL_IPMASQ", "", "FLANNEL_IPMASQ is missing"),
            (
                "FLANNEL_NETWORK",
                "FLANNEL_NETWORK=10.244.0.0",
                "FLANNEL_NETWORK=\"10.244.0.0\"",
            ),
            (
                "FLANNEL_SUBNET",
                "FLANNEL_SUBNET=banana",
                "FLANNEL_SUBNET=\"banana\"",
            ),
            ("FLANNEL_MTU", "FLANNEL_MTU=abc", "FLANNEL_MTU=\"abc\""),
            ("FLANNEL_MTU", "FLANNEL_MTU=0", "FLANNEL_MTU=\"0\""),
            ("FLANNEL_MTU", "FLANNEL_MTU=70000", "FLANNEL_MTU=\"70000\""),
            (
                "FLANNEL_IPMASQ",
                "FLANNEL_IPMASQ=yes",
                "FLANNEL_IPMASQ=\"yes\"",
            ),
            (
                "FLANNEL_SUBNET",
                "FLANNEL_SUBNET=10.9.0.1/24",
                "FLANNEL_SUBNET=10.9.0.0/24 is not inside FLANNEL_NETWORK=10.244.0.0/16",
            ),
            (
                "FLANNEL_SUBNET",
                "FLANNEL_SUBNET=10.244.5.5/32",
                "FLANNEL_SUBNET=10.244.5.5/32: longer than /30",
            ),
            (
                "FLANNEL_SUBNET",
                "FLANNEL_SUBNET=10.244.5.4/31",
                "FLANNEL_SUBNET=10.244.5.4/31: longer than /30",
            ),
        ] {
            let text: String = good
                .lines()
                .map(|l| {
                    if l.starts_with(&format!("{var}=")) {
                        format!("{replacement}\n")
                    } else {
                        format!("{l}\n")
                    }
                })
                .collect();
            let e = SubnetEnv::parse(&text).unwrap_err().to_string();
            assert!(e.starts_with(expected), "{text:?}: {e}");
        }
        assert_eq!(
            SubnetEnv::parse("garbage without equals\n"),
            Err(SubnetEnvError::Missing {
                var: "FLANNEL_NETWORK"
            })
        );
    }

    #[test]
    fn error_text_is_bounded_whatever_the_value() {
        let long = "1".repeat(1 << 20);
        for (var, expected) in [
            ("FLANNEL_NETWORK", "FLANNEL_NETWORK=\"111"),
            ("FLANNEL_SUBNET", "FLANNEL_SUBNET=\"111"),
            ("FLANNEL_MTU", "FLANNEL_MTU=\"111"),
            ("FLANNEL_IPMASQ", "FLANNEL_IPMASQ=\"111"),
        ] {
            let text: String = env()
                .render()
                .lines()
                .map(|l| match l.starts_with(&format!("{var}=")) {
                    true => format!("{var}={long}\n"),
                    false => format!("{l}\n"),
                })
                .collect();
            let e = assert_bounded(&SubnetEnv::parse(&text).unwrap_err());
            assert!(e.starts_with(expected), "{e}");
            assert!(e.contains("… (1048576 bytes)"), "{e}");
        }
    }

    #[test]
    fn write_atomic_creates_dir_and_replaces() {
        let root = std::env::temp_dir().join(format!("weft-subnet-env-{}", std::process::id()));
        let path = root.join("run/flannel/subnet.env");
        write_atomic(&path, "first\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "first\n");
        write_atomic(&path, &env().render()).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), env().render());
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![OsString::from("subnet.env")]);
        assert!(write_atomic(Path::new("/"), "x").is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn mtu_per_backend() {
        let vxlan = Backend::Vxlan(VxlanConfig::default());
        assert_eq!(flannel_mtu(1500, &vxlan), 1450);
        assert_eq!(flannel_mtu(9001, &vxlan), 8951);
        assert_eq!(flannel_mtu(1500, &Backend::Ipip), 1480);
        assert_eq!(flannel_mtu(1500, &Backend::HostGw), 1500);
        assert_eq!(datapath_mtu(1500, &vxlan), 1500);
        assert_eq!(flannel_mtu(40, &vxlan), 0);
        assert_eq!(flannel_mtu(10, &Backend::Ipip), 0);
    }

    #[test]
    fn vxlan_mtu_setting_replaces_the_interface_mtu_as_in_flannel() {
        let with = |mtu| {
            Backend::Vxlan(VxlanConfig {
                mtu: Some(mtu),
                ..VxlanConfig::default()
            })
        };
        // flannel: device MTU = MTU - 50, FLANNEL_MTU = the same.
        assert_eq!(flannel_mtu(1500, &with(1400)), 1350);
        assert_eq!(datapath_mtu(1500, &with(1400)), 1400);
        // Larger than the interface: advertised as configured, but the data path
        // never builds an outer packet the interface cannot send.
        assert_eq!(flannel_mtu(1500, &with(9000)), 8950);
        assert_eq!(datapath_mtu(1500, &with(9000)), 1500);
        assert_eq!(underlay_mtu(1500, &with(9000)), 9000);
        // host-gw and ipip have no such setting in flannel.
        assert_eq!(underlay_mtu(1500, &Backend::Ipip), 1500);
    }
}
