//! The flannel network config stored at `<prefix>/config`, e.g.
//! `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}`.
//!
//! Parsing and defaulting follow flannel's `pkg/subnet/config.go` (`ParseConfig` and
//! `CheckNetworkConfig`) and the vxlan backend's own config decoding, so that a config that
//! flannel accepts yields the same subnets here.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Map, Value};
use thiserror::Error;

use super::echo::Echo;
use super::json::{FieldError, field, field_bool, field_int, field_str, field_u64};

/// flannel's vxlan backend `defaultVNI`.
pub const DEFAULT_VXLAN_VNI: u32 = 1;
/// The Linux kernel's VXLAN port, which flannel ends up with when `Port` is unset or 0.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// The smallest vxlan `MTU`: flannel's device gets `MTU - 50`, and Linux refuses a device
/// MTU below IPv4's 68 (flannel would write a negative `FLANNEL_MTU` for 0).
pub const MIN_VXLAN_MTU: u32 = 68 + 50;
/// The largest MTU Linux accepts on a VXLAN device, a bridge or a veth.
pub const MAX_MTU: u32 = 65535;
/// VNIs are 24 bits on the wire.
pub const MAX_VNI: u32 = 0x00FF_FFFF;
/// flannel requires room for a tunnel and a bridge address per host, so nothing longer than /30.
pub const MAX_SUBNET_LEN: u8 = 30;
/// Shortest network flannel can default a SubnetLen for (four /30s, the first one unused).
pub const MAX_NETWORK_PREFIX_FOR_DEFAULT: u8 = 28;

const SUPPORTED: &str = "weft supports vxlan, host-gw, ipip";

/// Why a flannel network config was rejected. Field names are spelled as flannel documents them.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("network config is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("{field}: expected a JSON object")]
    NotAnObject { field: &'static str },
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("Network {value}: not a valid IPv4 CIDR ({reason})")]
    InvalidNetwork { value: Echo, reason: String },
    #[error("{field} {value}: not a valid IPv4 address")]
    InvalidAddress { field: &'static str, value: Echo },
    #[error("EnableIPv4 is false, but weft only supports IPv4 networks")]
    Ipv4Disabled,
    #[error("EnableIPv6 is true, but weft does not support IPv6 networks")]
    Ipv6Unsupported,
    #[error(
        "Network {network}: too small, the minimum useful network prefix is /{MAX_NETWORK_PREFIX_FOR_DEFAULT}"
    )]
    NetworkTooSmall { network: Ipv4Net },
    #[error("SubnetLen {subnet_len}: must be at most {MAX_SUBNET_LEN}")]
    SubnetLenTooLong { subnet_len: u64 },
    #[error(
        "SubnetLen {subnet_len}: Network {network} must hold at least four subnets, so SubnetLen must be at least {min}"
    )]
    SubnetLenTooShort {
        subnet_len: u8,
        network: Ipv4Net,
        min: u8,
    },
    #[error("{field} {addr}: not inside Network {network}")]
    OutsideNetwork {
        field: &'static str,
        addr: Ipv4Addr,
        network: Ipv4Net,
    },
    #[error("{field} {addr}: not on a /{subnet_len} subnet boundary")]
    Misaligned {
        field: &'static str,
        addr: Ipv4Addr,
        subnet_len: u8,
    },
    #[error("SubnetMin {min} is above SubnetMax {max}")]
    MinAboveMax { min: Ipv4Addr, max: Ipv4Addr },
    #[error("Backend.Type missing (flannel would default to its udp backend; {SUPPORTED})")]
    BackendTypeMissing,
    #[error("Backend.Type {backend_type}: unsupported ({SUPPORTED})")]
    UnsupportedBackend { backend_type: Echo },
    #[error("Backend.VNI {vni}: must be between 0 and {MAX_VNI}")]
    VniOutOfRange { vni: i128 },
    #[error("Backend.Port {port}: must be between 0 and 65535")]
    PortOutOfRange { port: i128 },
    #[error(
        "Backend.MTU {mtu}: must be between {MIN_VXLAN_MTU} (IPv4's minimum of 68 plus the \
         50-byte VXLAN header) and {MAX_MTU}"
    )]
    MtuOutOfRange { mtu: i128 },
}

/// VXLAN backend settings (flannel's `Backend` object when `Type` is `vxlan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// UDP destination port; an unset or 0 `Port` becomes [`DEFAULT_VXLAN_PORT`].
    pub port: u16,
    /// flannel's `DirectRouting`: route directly (no encapsulation) to hosts on the same L2.
    pub direct_routing: bool,
    /// flannel's `MTU`: the underlay MTU the tunnel is sized for, in place of `--iface`'s.
    /// flannel gives its vxlan device `MTU - 50` and writes the same into `FLANNEL_MTU`.
    pub mtu: Option<u32>,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            vni: DEFAULT_VXLAN_VNI,
            port: DEFAULT_VXLAN_PORT,
            direct_routing: false,
            mtu: None,
        }
    }
}

/// The backends weft implements. flannel's `udp`, `wireguard`, `alloc`, ... are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConfig),
    HostGw,
    Ipip,
}

impl Backend {
    /// flannel's `BackendType` string, as written into subnet leases.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Vxlan(_) => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Ipip => "ipip",
        }
    }
}

/// A validated flannel network config with flannel's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The whole pod network, in canonical (masked) form.
    pub network: Ipv4Net,
    /// Prefix length of each node's subnet.
    pub subnet_len: u8,
    /// Network address of the lowest subnet that may be leased.
    pub subnet_min: Ipv4Addr,
    /// Network address of the highest subnet that may be leased.
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config`.
    pub fn parse(json: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(json).map_err(ConfigError::InvalidJson)?;
        let obj = root
            .as_object()
            .ok_or(ConfigError::NotAnObject { field: "config" })?;

        if field_bool(obj, "EnableIPv4", "EnableIPv4")? == Some(false) {
            return Err(ConfigError::Ipv4Disabled);
        }
        if field_bool(obj, "EnableIPv6", "EnableIPv6")? == Some(true) {
            return Err(ConfigError::Ipv6Unsupported);
        }

        let network_str = field_str(obj, "Network", "Network")?
            .ok_or(ConfigError::Missing { field: "Network" })?;
        // flannel decodes Network with Go's net.ParseCIDR, which masks host bits away
        // (10.244.1.0/16 becomes 10.244.0.0/16) instead of rejecting them.
        let network = network_str
            .parse::<Ipv4Net>()
            .map_err(|e| ConfigError::InvalidNetwork {
                value: Echo::new(network_str),
                reason: e.to_string(),
            })?
            .trunc();

        let explicit_len = field_u64(obj, "SubnetLen", "SubnetLen")?;
        let subnet_len = subnet_len_for(network, explicit_len)?;
        let subnet_size = 1u64 << (32 - u32::from(subnet_len));
        let network_start = u64::from(u32::from(network.network()));
        let network_end = u64::from(u32::from(network.broadcast()));

        let subnet_min = match field_addr(obj, "SubnetMin", "SubnetMin")? {
            // flannel skips the first subnet by default: its network address would clash with
            // the network-wide one (e.g. 10.244.0.0 on a flannel.1 in 10.244.0.0/16).
            None => to_addr(network_start + subnet_size),
            Some(addr) => check_bound("SubnetMin", addr, network, subnet_len)?,
        };
        let subnet_max = match field_addr(obj, "SubnetMax", "SubnetMax")? {
            None => to_addr(network_end + 1 - subnet_size),
            Some(addr) => check_bound("SubnetMax", addr, network, subnet_len)?,
        };
        if subnet_min > subnet_max {
            return Err(ConfigError::MinAboveMax {
                min: subnet_min,
                max: subnet_max,
            });
        }

        let backend = parse_backend(obj)?;

        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// Number of addresses in one node subnet (256 for a /24).
    ///
    /// Valid configs have `subnet_len` in 2..=30; a hand-built /0 saturates to `u32::MAX`.
    pub fn subnet_size(&self) -> u32 {
        let host_bits = 32u32.saturating_sub(u32::from(self.subnet_len));
        1u32.checked_shl(host_bits).unwrap_or(u32::MAX)
    }

    /// Number of leasable subnets between `subnet_min` and `subnet_max` inclusive.
    pub fn subnet_count(&self) -> u32 {
        let min = u32::from(self.subnet_min);
        let max = u32::from(self.subnet_max);
        if min > max {
            return 0;
        }
        (max - min) / self.subnet_size().max(1) + 1
    }
}

/// flannel's SubnetLen rules from `CheckNetworkConfig`. An explicit 0 counts as unset, because
/// flannel only looks at `SubnetLen > 0`.
fn subnet_len_for(network: Ipv4Net, explicit: Option<u64>) -> Result<u8, ConfigError> {
    let prefix = network.prefix_len();
    match explicit {
        Some(len) if len > 0 => {
            let len = u8::try_from(len)
                .ok()
                .filter(|len| *len <= MAX_SUBNET_LEN)
                .ok_or(ConfigError::SubnetLenTooLong { subnet_len: len })?;
            // The subnet must fit more than twice, since the first subnet is never handed out.
            let min = prefix + 2;
            if len < min {
                return Err(ConfigError::SubnetLenTooShort {
                    subnet_len: len,
                    network,
                    min,
                });
            }
            Ok(len)
        }
        _ if prefix > MAX_NETWORK_PREFIX_FOR_DEFAULT => {
            Err(ConfigError::NetworkTooSmall { network })
        }
        // Big enough to give every host a /24.
        _ if prefix <= 22 => Ok(24),
        // Otherwise split the network into four, as flannel does.
        _ => Ok(prefix + 2),
    }
}

/// Validates an explicit SubnetMin/SubnetMax. An explicit 0.0.0.0 is flannel's zero value and
/// therefore means "use the default", which the caller handles via `None` from [`field_addr`].
fn check_bound(
    field: &'static str,
    addr: Ipv4Addr,
    network: Ipv4Net,
    subnet_len: u8,
) -> Result<Ipv4Addr, ConfigError> {
    if !network.contains(&addr) {
        return Err(ConfigError::OutsideNetwork {
            field,
            addr,
            network,
        });
    }
    let aligned = Ipv4Net::new(addr, subnet_len).map(|net| net.network() == addr);
    if aligned != Ok(true) {
        return Err(ConfigError::Misaligned {
            field,
            addr,
            subnet_len,
        });
    }
    Ok(addr)
}

fn parse_backend(obj: &Map<String, Value>) -> Result<Backend, ConfigError> {
    let Some(backend) = field(obj, "Backend", "Backend")? else {
        return Err(ConfigError::BackendTypeMissing);
    };
    let backend = backend
        .as_object()
        .ok_or(ConfigError::NotAnObject { field: "Backend" })?;
    let type_name = field_str(backend, "Type", "Backend.Type")?
        .filter(|t| !t.is_empty())
        .ok_or(ConfigError::BackendTypeMissing)?;

    // flannel's backend manager lower-cases the type before looking the backend up.
    match type_name.to_ascii_lowercase().as_str() {
        "vxlan" => parse_vxlan(backend).map(Backend::Vxlan),
        "host-gw" => Ok(Backend::HostGw),
        "ipip" => Ok(Backend::Ipip),
        _ => Err(ConfigError::UnsupportedBackend {
            backend_type: Echo::new(type_name),
        }),
    }
}

fn parse_vxlan(backend: &Map<String, Value>) -> Result<VxlanConfig, ConfigError> {
    let mut cfg = VxlanConfig::default();
    if let Some(vni) = field_int(backend, "VNI", "Backend.VNI")? {
        cfg.vni = u32::try_from(vni)
            .ok()
            .filter(|vni| *vni <= MAX_VNI)
            .ok_or(ConfigError::VniOutOfRange { vni })?;
    }
    if let Some(port) = field_int(backend, "Port", "Backend.Port")? {
        let port = u16::try_from(port).map_err(|_| ConfigError::PortOutOfRange { port })?;
        // flannel passes Port 0 to netlink, where it means "kernel default" (8472).
        if port != 0 {
            cfg.port = port;
        }
    }
    if let Some(direct) = field_bool(backend, "DirectRouting", "Backend.DirectRouting")? {
        cfg.direct_routing = direct;
    }
    if let Some(mtu) = field_int(backend, "MTU", "Backend.MTU")? {
        cfg.mtu = Some(
            u32::try_from(mtu)
                .ok()
                .filter(|m| (MIN_VXLAN_MTU..=MAX_MTU).contains(m))
                .ok_or(ConfigError::MtuOutOfRange { mtu })?,
        );
    }
    Ok(cfg)
}

/// An IPv4 address field; 0.0.0.0 is returned as `None` because flannel treats its zero value
/// as "not set".
fn field_addr(
    obj: &Map<String, Value>,
    name: &str,
    field: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    let Some(text) = field_str(obj, name, field)? else {
        return Ok(None);
    };
    let addr = text
        .parse::<Ipv4Addr>()
        .map_err(|_| ConfigError::InvalidAddress {
            field,
            value: Echo::new(text),
        })?;
    Ok((!addr.is_unspecified()).then_some(addr))
}

/// Callers only pass values derived from a `/0..=/32` network, which fit in 32 bits.
fn to_addr(value: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))
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

    fn addr(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn err(json: &str) -> ConfigError {
        NetworkConfig::parse(json).unwrap_err()
    }

    #[test]
    fn minimal_vxlan_gets_flannel_defaults() {
        let cfg =
            NetworkConfig::parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#)
                .unwrap();
        assert_eq!(
            cfg,
            NetworkConfig {
                network: net("10.244.0.0/16"),
                subnet_len: 24,
                subnet_min: addr("10.244.1.0"),
                subnet_max: addr("10.244.255.0"),
                backend: Backend::Vxlan(VxlanConfig {
                    vni: 1,
                    port: 8472,
                    direct_routing: false,
                    mtu: None
                }),
            }
        );
        assert_eq!(cfg.subnet_size(), 256);
        assert_eq!(cfg.subnet_count(), 255);
        assert_eq!(cfg.backend.type_name(), "vxlan");
    }

    #[test]
    fn full_example_from_brief() {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":7,"Port":4789,"DirectRouting":true}}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 7,
                port: 4789,
                direct_routing: true,
                mtu: None
            })
        );
    }

    #[test]
    fn flannel_documented_udp_example_is_rejected_but_vxlan_variant_parses() {
        let udp = r#"{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}"#;
        let e = err(udp);
        assert!(
            matches!(&e, ConfigError::UnsupportedBackend { backend_type } if *backend_type == Echo::new("udp")),
            "{e:?}"
        );
        assert!(e.to_string().contains("\"udp\""), "{e}");

        let cfg = NetworkConfig::parse(&udp.replace("udp", "vxlan")).unwrap();
        assert_eq!(cfg.network, net("10.0.0.0/8"));
        assert_eq!(cfg.subnet_len, 20);
        assert_eq!(cfg.subnet_min, addr("10.10.0.0"));
        assert_eq!(cfg.subnet_max, addr("10.99.0.0"));
        assert_eq!(
            cfg.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 1,
                port: 7890,
                direct_routing: false,
                mtu: None
            })
        );
        assert_eq!(cfg.subnet_size(), 4096);
        // (10.99.0.0 - 10.10.0.0) / 4096 + 1
        assert_eq!(cfg.subnet_count(), (89 * 65536) / 4096 + 1);
    }

    #[test]
    fn keys_are_case_insensitive_at_every_level() {
        let cfg = NetworkConfig::parse(
            r#"{"network":"10.1.0.0/16","subnetlen":25,"SUBNETMIN":"10.1.2.0","subnetMax":"10.1.3.128",
                "backend":{"TYPE":"VXLAN","vni":42,"port":9000,"directRouting":true}}"#,
        )
        .unwrap();
        assert_eq!(cfg.network, net("10.1.0.0/16"));
        assert_eq!(cfg.subnet_len, 25);
        assert_eq!(cfg.subnet_min, addr("10.1.2.0"));
        assert_eq!(cfg.subnet_max, addr("10.1.3.128"));
        assert_eq!(
            cfg.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 42,
                port: 9000,
                direct_routing: true,
                mtu: None
            })
        );
    }

    #[test]
    fn duplicate_key_spellings_are_refused() {
        let e =
            err(r#"{"Network":"10.1.0.0/16","network":"10.2.0.0/16","Backend":{"Type":"vxlan"}}"#);
        assert!(
            matches!(
                e,
                ConfigError::Field(FieldError::AmbiguousKey {
                    field: "Network",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_keys_and_nulls_are_ignored() {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":null,"IPv6Network":null,"EnableIPv4":true,"EnableIPv6":false,
                "Whatever":[1,2],"Backend":{"Type":"vxlan","GBP":false,"Learning":false,"MTU":1400,"VNI":null}}"#,
        )
        .unwrap();
        assert_eq!(cfg.subnet_len, 24);
        // MTU is read (flannel's vxlan backend honours it); GBP and Learning
        // mean nothing without a kernel vxlan device.
        assert_eq!(
            cfg.backend,
            Backend::Vxlan(VxlanConfig {
                mtu: Some(1400),
                ..VxlanConfig::default()
            })
        );
    }

    #[test]
    fn port_zero_means_kernel_default() {
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Port":0}}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 1,
                port: 8472,
                direct_routing: false,
                mtu: None
            })
        );
    }

    #[test]
    fn other_backend_types() {
        let hostgw =
            NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
                .unwrap();
        assert_eq!(hostgw.backend, Backend::HostGw);
        assert_eq!(hostgw.backend.type_name(), "host-gw");
        let ipip = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"IPIP","DirectRouting":true}}"#,
        )
        .unwrap();
        assert_eq!(ipip.backend, Backend::Ipip);
        assert_eq!(ipip.backend.type_name(), "ipip");
        for unsupported in ["udp", "wireguard", "alloc", "extension"] {
            let json =
                format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{unsupported}"}}}}"#);
            let e = err(&json);
            assert!(e.to_string().contains(unsupported), "{e}");
        }
    }

    #[test]
    fn missing_backend_or_type_is_an_error() {
        for json in [
            r#"{"Network":"10.244.0.0/16"}"#,
            r#"{"Network":"10.244.0.0/16","Backend":null}"#,
            r#"{"Network":"10.244.0.0/16","Backend":{}}"#,
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":""}}"#,
        ] {
            let e = err(json);
            assert!(
                matches!(e, ConfigError::BackendTypeMissing),
                "{json}: {e:?}"
            );
            assert!(e.to_string().starts_with("Backend.Type missing"), "{e}");
        }
        assert!(matches!(
            err(r#"{"Network":"10.244.0.0/16","Backend":"vxlan"}"#),
            ConfigError::NotAnObject { field: "Backend" }
        ));
    }

    #[test]
    fn default_subnet_len_by_network_size() {
        let parse = |network: &str| {
            NetworkConfig::parse(&format!(
                r#"{{"Network":"{network}","Backend":{{"Type":"host-gw"}}}}"#
            ))
        };
        let c16 = parse("10.244.0.0/16").unwrap();
        assert_eq!(c16.subnet_len, 24);
        let c22 = parse("10.244.0.0/22").unwrap();
        assert_eq!(c22.subnet_len, 24);
        assert_eq!(c22.subnet_min, addr("10.244.1.0"));
        assert_eq!(c22.subnet_max, addr("10.244.3.0"));
        let c23 = parse("10.244.0.0/23").unwrap();
        assert_eq!(c23.subnet_len, 25);
        assert_eq!(c23.subnet_min, addr("10.244.0.128"));
        assert_eq!(c23.subnet_max, addr("10.244.1.128"));
        let c28 = parse("10.244.0.0/28").unwrap();
        assert_eq!(c28.subnet_len, 30);
        assert_eq!(c28.subnet_min, addr("10.244.0.4"));
        assert_eq!(c28.subnet_max, addr("10.244.0.12"));
        assert_eq!(c28.subnet_count(), 3);
        let e = parse("10.244.0.0/29").unwrap_err();
        assert!(matches!(e, ConfigError::NetworkTooSmall { .. }), "{e:?}");
        assert!(e.to_string().contains("/28"), "{e}");
    }

    #[test]
    fn whole_address_space_does_not_overflow() {
        let cfg =
            NetworkConfig::parse(r#"{"Network":"0.0.0.0/0","Backend":{"Type":"ipip"}}"#).unwrap();
        assert_eq!(cfg.subnet_len, 24);
        assert_eq!(cfg.subnet_min, addr("0.0.1.0"));
        assert_eq!(cfg.subnet_max, addr("255.255.255.0"));
    }

    #[test]
    fn non_canonical_network_is_masked() {
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.1.0/16","Backend":{"Type":"vxlan"}}"#)
            .unwrap();
        assert_eq!(cfg.network, net("10.244.0.0/16"));
        assert_eq!(cfg.network.addr(), addr("10.244.0.0"));
    }

    #[test]
    fn explicit_subnet_len_limits() {
        let parse = |len: &str| {
            NetworkConfig::parse(&format!(
                r#"{{"Network":"10.244.0.0/16","SubnetLen":{len},"Backend":{{"Type":"vxlan"}}}}"#
            ))
        };
        assert_eq!(parse("30").unwrap().subnet_len, 30);
        assert_eq!(parse("18").unwrap().subnet_len, 18);
        // 0 is flannel's "unset".
        assert_eq!(parse("0").unwrap().subnet_len, 24);
        let e = parse("31").unwrap_err();
        assert_eq!(e.to_string(), "SubnetLen 31: must be at most 30");
        assert!(matches!(
            parse("300").unwrap_err(),
            ConfigError::SubnetLenTooLong { subnet_len: 300 }
        ));
        let e = parse("17").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::SubnetLenTooShort {
                    subnet_len: 17,
                    min: 18,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("at least 18"), "{e}");
        for bad in ["-1", "24.5", "\"24\""] {
            assert!(
                matches!(
                    parse(bad).unwrap_err(),
                    ConfigError::Field(FieldError::WrongType {
                        field: "SubnetLen",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn explicit_subnet_len_on_small_network() {
        // The /28 floor only applies to the default; an explicit /30 in a /28 is fine.
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.0.0.0/28","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.subnet_min, addr("10.0.0.4"));
        // ...but a /29 cannot hold four /30s.
        let e = err(r#"{"Network":"10.0.0.0/29","SubnetLen":30,"Backend":{"Type":"vxlan"}}"#);
        assert!(matches!(e, ConfigError::SubnetLenTooShort { .. }), "{e:?}");
    }

    #[test]
    fn subnet_min_max_validation() {
        let parse = |min: &str, max: &str| {
            NetworkConfig::parse(&format!(
                r#"{{"Network":"10.244.0.0/16","SubnetMin":"{min}","SubnetMax":"{max}","Backend":{{"Type":"vxlan"}}}}"#
            ))
        };
        let cfg = parse("10.244.10.0", "10.244.20.0").unwrap();
        assert_eq!(
            (cfg.subnet_min, cfg.subnet_max),
            (addr("10.244.10.0"), addr("10.244.20.0"))
        );
        assert_eq!(cfg.subnet_count(), 11);
        // Explicit 0.0.0.0 is flannel's zero value, i.e. the default.
        let cfg = parse("0.0.0.0", "0.0.0.0").unwrap();
        assert_eq!(
            (cfg.subnet_min, cfg.subnet_max),
            (addr("10.244.1.0"), addr("10.244.255.0"))
        );
        // The first subnet may be chosen explicitly.
        assert_eq!(parse("10.244.0.0", "10.244.0.0").unwrap().subnet_count(), 1);

        let e = parse("10.244.10.5", "10.244.20.0").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Misaligned {
                    field: "SubnetMin",
                    subnet_len: 24,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "SubnetMin 10.244.10.5: not on a /24 subnet boundary"
        );
        let e = parse("10.244.10.0", "10.244.20.128").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Misaligned {
                    field: "SubnetMax",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse("10.243.0.0", "10.244.20.0").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::OutsideNetwork {
                    field: "SubnetMin",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "SubnetMin 10.243.0.0: not inside Network 10.244.0.0/16"
        );
        let e = parse("10.244.10.0", "10.245.0.0").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::OutsideNetwork {
                    field: "SubnetMax",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = parse("10.244.20.0", "10.244.10.0").unwrap_err();
        assert!(matches!(e, ConfigError::MinAboveMax { .. }), "{e:?}");
        let e = parse("10.244.x.0", "10.244.10.0").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::InvalidAddress {
                    field: "SubnetMin",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn error_text_is_bounded_whatever_the_config() {
        let long = "x".repeat(1 << 20);
        for json in [
            format!(r#"{{"Network":"{long}","Backend":{{"Type":"vxlan"}}}}"#),
            format!(
                r#"{{"Network":"10.0.0.0/8","SubnetMin":"{long}","Backend":{{"Type":"vxlan"}}}}"#
            ),
            format!(
                r#"{{"Network":"10.0.0.0/8","SubnetMax":"{long}","Backend":{{"Type":"vxlan"}}}}"#
            ),
            format!(r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{long}"}}}}"#),
            format!(
                r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"vxlan","VNI":{}}}}}"#,
                "9".repeat(1 << 20)
            ),
            format!(r#"{{"Network":"10.0.0.0/8",{long}}}"#),
        ] {
            assert_bounded(&err(&json));
        }
        let e = err(&format!(
            r#"{{"Network":"10.0.0.0/8","Backend":{{"Type":"{long}"}}}}"#
        ));
        assert!(
            e.to_string().starts_with(&format!(
                "Backend.Type \"{}\"… (1048576 bytes): unsupported",
                "x".repeat(100)
            )),
            "{e}"
        );
    }

    #[test]
    fn network_errors() {
        let e = err(r#"{"Backend":{"Type":"vxlan"}}"#);
        assert_eq!(e.to_string(), "Network: missing");
        for bad in ["10.244.0.0", "10.244.0.0/33", "fd00::/64", "banana", ""] {
            let json = format!(r#"{{"Network":"{bad}","Backend":{{"Type":"vxlan"}}}}"#);
            let e = err(&json);
            assert!(
                matches!(e, ConfigError::InvalidNetwork { .. }),
                "{bad}: {e:?}"
            );
        }
        let e = err(r#"{"Network":16,"Backend":{"Type":"vxlan"}}"#);
        assert!(
            matches!(
                e,
                ConfigError::Field(FieldError::WrongType {
                    field: "Network",
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn vxlan_mtu_is_read_in_any_case_and_bounded() {
        let parse = |backend: &str| {
            NetworkConfig::parse(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#
            ))
        };
        for key in ["MTU", "mtu", "Mtu"] {
            let cfg = parse(&format!(r#"{{"Type":"vxlan","{key}":1400}}"#)).unwrap();
            assert!(
                matches!(
                    cfg.backend,
                    Backend::Vxlan(VxlanConfig {
                        mtu: Some(1400),
                        ..
                    })
                ),
                "{key}: {cfg:?}"
            );
        }
        assert!(matches!(
            parse(r#"{"Type":"vxlan"}"#).unwrap().backend,
            Backend::Vxlan(VxlanConfig { mtu: None, .. })
        ));
        assert!(matches!(
            parse(r#"{"Type":"vxlan","MTU":118}"#).unwrap().backend,
            Backend::Vxlan(VxlanConfig { mtu: Some(118), .. })
        ));
        for bad in [0, 117, -1, 65536] {
            let e = parse(&format!(r#"{{"Type":"vxlan","MTU":{bad}}}"#)).unwrap_err();
            assert!(
                matches!(e, ConfigError::MtuOutOfRange { mtu } if mtu == bad),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains("Backend.MTU"), "{e}");
        }
        assert!(matches!(
            parse(r#"{"Type":"vxlan","MTU":"1400"}"#).unwrap_err(),
            ConfigError::Field(FieldError::WrongType {
                field: "Backend.MTU",
                ..
            })
        ));
    }

    #[test]
    fn vni_and_port_ranges() {
        let parse = |backend: &str| {
            NetworkConfig::parse(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{backend}}}"#
            ))
        };
        let ok = parse(r#"{"Type":"vxlan","VNI":16777215}"#).unwrap();
        assert!(matches!(
            ok.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 16_777_215,
                ..
            })
        ));
        let e = parse(r#"{"Type":"vxlan","VNI":16777216}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Backend.VNI 16777216: must be between 0 and 16777215"
        );
        assert!(matches!(
            parse(r#"{"Type":"vxlan","VNI":-1}"#).unwrap_err(),
            ConfigError::VniOutOfRange { vni: -1 }
        ));
        assert!(matches!(
            parse(r#"{"Type":"vxlan","VNI":"1"}"#).unwrap_err(),
            ConfigError::Field(FieldError::WrongType {
                field: "Backend.VNI",
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"Type":"vxlan","Port":65536}"#).unwrap_err(),
            ConfigError::PortOutOfRange { port: 65536 }
        ));
        assert!(matches!(
            parse(r#"{"Type":"vxlan","DirectRouting":"yes"}"#).unwrap_err(),
            ConfigError::Field(FieldError::WrongType {
                field: "Backend.DirectRouting",
                ..
            })
        ));
    }

    #[test]
    fn invalid_json_and_ip_family_flags() {
        assert!(matches!(err("{"), ConfigError::InvalidJson(_)));
        assert!(
            err("{")
                .to_string()
                .starts_with("network config is not valid JSON")
        );
        assert!(matches!(
            err("[]"),
            ConfigError::NotAnObject { field: "config" }
        ));
        assert!(matches!(
            err(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#),
            ConfigError::Ipv6Unsupported
        ));
        assert!(matches!(
            err(r#"{"Network":"10.244.0.0/16","enableipv4":false,"Backend":{"Type":"vxlan"}}"#),
            ConfigError::Ipv4Disabled
        ));
    }
}
