//! The etcd key layout flannel uses; the only place in weft that builds or parses those keys.
//!
//! flannel's etcd registry stores the network config at `<prefix>/config` and one lease per
//! node at `<prefix>/subnets/<a.b.c.d>-<len>` (its `MakeSubnetKey`, which writes the CIDR with
//! `-` instead of `/` so the key stays a single path segment). A dual-stack flannel node's key
//! also names its IPv6 subnet: `<a.b.c.d>-<len>&<IPv6>-<len>`.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

use super::echo::Echo;

/// flannel's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

const SUBNETS_DIR: &str = "subnets";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("etcd prefix {prefix}: must start with '/'")]
    PrefixNotAbsolute { prefix: Echo },
    #[error("etcd prefix {prefix}: must not contain empty, '.' or '..' path segments")]
    PrefixBadSegment { prefix: Echo },
    #[error("etcd key {key}: not under the subnets prefix {subnets_prefix}")]
    NotASubnetKey { key: Echo, subnets_prefix: Echo },
    #[error(
        "etcd key {key}: malformed subnet key ({reason}); expected <a.b.c.d>-<prefix length>, optionally followed by &<IPv6 address>-<prefix length>"
    )]
    MalformedSubnetKey { key: Echo, reason: &'static str },
    #[error("etcd key {key}: {subnet} is not a network address (host bits are set)")]
    NonCanonicalSubnet { key: Echo, subnet: IpNet },
}

/// The subnets a lease key names: flannel's `ParseSubnetKey` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetKey {
    pub ipv4: Ipv4Net,
    /// The IPv6 subnet of a dual-stack flannel node's lease (`10.244.5.0-24&fd00::-64`). weft
    /// forwards IPv4 only, but the key still takes its IPv4 subnet.
    pub ipv6: Option<Ipv6Net>,
}

impl SubnetKey {
    /// The last key segment, as flannel's `MakeSubnetKey` writes it.
    pub fn name(&self) -> String {
        let mut name = subnet_key_name(self.ipv4);
        if let Some(ipv6) = self.ipv6 {
            name.push_str(&format!("&{}-{}", ipv6.network(), ipv6.prefix_len()));
        }
        name
    }
}

/// Key names under one flannel etcd prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Normalised: starts with '/', no trailing '/' (so the root prefix is the empty string).
    prefix: String,
}

impl KeyLayout {
    /// `prefix` must be absolute; trailing slashes are dropped (flannel builds keys with Go's
    /// `path.Join`, so `/coreos.com/network/` and `/coreos.com/network` name the same keys).
    /// Empty, `.` and `..` segments are refused rather than cleaned like `path.Join` would,
    /// since such a prefix is almost certainly a typo.
    pub fn new(prefix: &str) -> Result<Self, KeyError> {
        if !prefix.starts_with('/') {
            return Err(KeyError::PrefixNotAbsolute {
                prefix: Echo::new(prefix),
            });
        }
        let trimmed = prefix.trim_end_matches('/');
        let bad_segment = trimmed
            .split('/')
            .skip(1)
            .any(|segment| matches!(segment, "" | "." | ".."));
        if bad_segment {
            return Err(KeyError::PrefixBadSegment {
                prefix: Echo::new(prefix),
            });
        }
        Ok(Self {
            prefix: trimmed.to_owned(),
        })
    }

    /// The normalised prefix ("" for the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// `<prefix>/subnets/`, suitable for an etcd prefix range read or watch.
    pub fn subnets_prefix(&self) -> String {
        format!("{}/{SUBNETS_DIR}/", self.prefix)
    }

    /// `<prefix>/subnets/10.244.5.0-24`. Host bits are masked off so the key is canonical.
    pub fn subnet_key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key_name(subnet))
    }

    /// Parses a key under [`Self::subnets_prefix`] back into its IPv4 subnet (see
    /// [`Self::parse_lease_key`]).
    pub fn parse_subnet_key(&self, key: &str) -> Result<Ipv4Net, KeyError> {
        self.parse_lease_key(key).map(|parsed| parsed.ipv4)
    }

    /// Parses a key under [`Self::subnets_prefix`] into the subnets it names, in the two shapes
    /// flannel's `MakeSubnetKey` writes: `10.244.5.0-24` and, on dual-stack nodes,
    /// `10.244.5.0-24&fd00::-64`. Strict otherwise: addresses in canonical form (dotted quad;
    /// IPv6 as Go and RFC 5952 write it), lengths plain decimal within the family's width, no
    /// host bits set, because every key flannel or weft writes looks like that; anything else is
    /// not a lease. (flannel's own parser is a looser regular expression, but what it accepts
    /// beyond this no flannel writes.)
    pub fn parse_lease_key(&self, key: &str) -> Result<SubnetKey, KeyError> {
        let subnets_prefix = self.subnets_prefix();
        let name =
            key.strip_prefix(subnets_prefix.as_str())
                .ok_or_else(|| KeyError::NotASubnetKey {
                    key: Echo::new(key),
                    subnets_prefix: Echo::new(&subnets_prefix),
                })?;
        let malformed = |reason: &'static str| KeyError::MalformedSubnetKey {
            key: Echo::new(key),
            reason,
        };
        let (ipv4_text, ipv6_text) = match name.split_once('&') {
            Some((ipv4, ipv6)) => (ipv4, Some(ipv6)),
            None => (name, None),
        };
        let (addr_text, len_text) = ipv4_text
            .split_once('-')
            .ok_or_else(|| malformed("no '-' between address and prefix length"))?;
        let addr: Ipv4Addr = addr_text
            .parse()
            .map_err(|_| malformed("invalid IPv4 address"))?;
        if addr.to_string() != addr_text {
            return Err(malformed("IPv4 address not in canonical form"));
        }
        let len = plain_decimal(len_text)
            .ok_or_else(|| malformed("prefix length is not a plain decimal number"))?;
        let ipv4 = Ipv4Net::new(addr, len).map_err(|_| malformed("prefix length is above 32"))?;
        if ipv4.network() != addr {
            return Err(KeyError::NonCanonicalSubnet {
                key: Echo::new(key),
                subnet: IpNet::V4(ipv4),
            });
        }
        let ipv6 = match ipv6_text {
            None => None,
            Some(text) => {
                let (addr_text, len_text) = text
                    .split_once('-')
                    .ok_or_else(|| malformed("no '-' between IPv6 address and prefix length"))?;
                // flannel's parser takes only hex digits and colons here (Go writes no
                // upper case and no embedded dotted quad).
                let addr: Ipv6Addr = addr_text
                    .parse()
                    .ok()
                    .filter(|addr: &Ipv6Addr| addr.to_string() == addr_text)
                    .filter(|_| !addr_text.contains('.'))
                    .ok_or_else(|| malformed("IPv6 address invalid or not in canonical form"))?;
                let len = plain_decimal(len_text)
                    .ok_or_else(|| malformed("IPv6 prefix length is not a plain decimal number"))?;
                let ipv6 = Ipv6Net::new(addr, len)
                    .map_err(|_| malformed("IPv6 prefix length is above 128"))?;
                if ipv6.network() != addr {
                    return Err(KeyError::NonCanonicalSubnet {
                        key: Echo::new(key),
                        subnet: IpNet::V6(ipv6),
                    });
                }
                Some(ipv6)
            }
        };
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

/// A prefix length as flannel writes it: decimal digits, no sign, no leading zero.
fn plain_decimal(text: &str) -> Option<u8> {
    text.parse().ok().filter(|len: &u8| len.to_string() == text)
}

impl Default for KeyLayout {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

/// The last key segment for a subnet, flannel's `<a.b.c.d>-<len>` (e.g. `10.244.5.0-24`).
pub fn subnet_key_name(subnet: Ipv4Net) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
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

    #[test]
    fn default_layout_matches_flannel() {
        let keys = KeyLayout::default();
        assert_eq!(keys, KeyLayout::new("/coreos.com/network").unwrap());
        assert_eq!(keys.config_key(), "/coreos.com/network/config");
        assert_eq!(keys.subnets_prefix(), "/coreos.com/network/subnets/");
        assert_eq!(
            keys.subnet_key(net("10.244.5.0/24")),
            "/coreos.com/network/subnets/10.244.5.0-24"
        );
    }

    #[test]
    fn prefix_normalisation() {
        let keys = KeyLayout::new("/weft/net//").unwrap();
        assert_eq!(keys.prefix(), "/weft/net");
        assert_eq!(keys.config_key(), "/weft/net/config");
        let root = KeyLayout::new("/").unwrap();
        assert_eq!(root.config_key(), "/config");
        assert_eq!(root.subnets_prefix(), "/subnets/");
        assert_eq!(
            KeyLayout::new("coreos.com/network").unwrap_err(),
            KeyError::PrefixNotAbsolute {
                prefix: Echo::new("coreos.com/network")
            }
        );
        assert!(matches!(
            KeyLayout::new(""),
            Err(KeyError::PrefixNotAbsolute { .. })
        ));
        for bad in ["/a//b", "/a/./b", "/a/.."] {
            assert!(
                matches!(KeyLayout::new(bad), Err(KeyError::PrefixBadSegment { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn subnet_key_masks_host_bits() {
        assert_eq!(subnet_key_name(net("10.244.5.7/24")), "10.244.5.0-24");
        assert_eq!(subnet_key_name(net("10.0.0.0/8")), "10.0.0.0-8");
    }

    #[test]
    fn round_trips() {
        let keys = KeyLayout::new("/coreos.com/network/").unwrap();
        for subnet in [
            "10.244.5.0/24",
            "0.0.0.0/0",
            "10.0.0.4/30",
            "192.168.1.1/32",
        ] {
            let subnet = net(subnet);
            assert_eq!(
                keys.parse_subnet_key(&keys.subnet_key(subnet)).unwrap(),
                subnet
            );
        }
        let root = KeyLayout::new("/").unwrap();
        assert_eq!(
            root.parse_subnet_key("/subnets/10.1.2.0-23").unwrap(),
            net("10.1.2.0/23")
        );
    }

    #[test]
    fn bad_subnet_keys() {
        let keys = KeyLayout::default();
        let parse = |key: &str| keys.parse_subnet_key(key).unwrap_err();

        assert!(matches!(
            parse("/coreos.com/network/config"),
            KeyError::NotASubnetKey { .. }
        ));
        assert!(matches!(
            parse("/other/subnets/10.244.5.0-24"),
            KeyError::NotASubnetKey { .. }
        ));
        assert!(matches!(
            parse("/coreos.com/network/subnets/10.244.5.1-24"),
            KeyError::NonCanonicalSubnet { .. }
        ));
        for bad in [
            "",
            "10.244.5.0",
            "10.244.5.0/24",
            "10.244.5.0-",
            "-24",
            "10.244.5.0-33",
            "10.244.5.0-024",
            "10.244.5.0-+24",
            "10.244.5.0-24-1",
            "10.244.005.0-24",
            "10.244.5-24",
            "10.244.5.0-24/x",
            "::1-128",
            // Dual-stack keys with a bad IPv6 part are refused whole, as flannel does.
            "10.244.5.0-24&",
            "10.244.5.0-24&fd00::",
            "10.244.5.0-24&fd00::-",
            "10.244.5.0-24&fd00::-129",
            "10.244.5.0-24&fd00::-064",
            "10.244.5.0-24&FD00::-64",
            "10.244.5.0-24&fd00:0::-64",
            "10.244.5.0-24&fd00::-64&fd01::-64",
            "10.244.5.0-24&::ffff:10.0.0.0-96",
            "10.244.5.0-24&10.0.0.0-8",
            "&fd00::-64",
        ] {
            let key = format!("/coreos.com/network/subnets/{bad}");
            let e = parse(&key);
            assert!(
                matches!(e, KeyError::MalformedSubnetKey { .. }),
                "{bad}: {e:?}"
            );
            assert!(e.to_string().contains(&key), "{e}");
        }
    }

    #[test]
    fn dual_stack_keys_name_their_ipv4_subnet() {
        let keys = KeyLayout::default();
        let key = "/coreos.com/network/subnets/10.244.5.0-24&fd00::-64";
        assert_eq!(keys.parse_subnet_key(key).unwrap(), net("10.244.5.0/24"));
        let parsed = keys.parse_lease_key(key).unwrap();
        assert_eq!(
            parsed,
            SubnetKey {
                ipv4: net("10.244.5.0/24"),
                ipv6: Some("fd00::/64".parse().unwrap()),
            }
        );
        assert_eq!(parsed.name(), "10.244.5.0-24&fd00::-64");
        // Shapes of flannel's dual-stack allocator (IPv6SubnetLen up to /128).
        for name in [
            "10.42.0.0-24&2001:db8:42::-64",
            "10.244.0.0-16&fd00:10:244:1::-64",
            "192.168.1.0-30&2001:db8::1-128",
            "10.0.0.0-8&::-0",
        ] {
            let parsed = keys.parse_lease_key(&format!("{}{name}", keys.subnets_prefix()));
            let parsed = parsed.unwrap();
            assert!(parsed.ipv6.is_some(), "{name}");
            assert_eq!(parsed.name(), name);
        }
        // IPv4-only keys have no IPv6 part.
        let parsed = keys
            .parse_lease_key("/coreos.com/network/subnets/10.244.5.0-24")
            .unwrap();
        assert_eq!(parsed.ipv6, None);
        assert_eq!(parsed.name(), "10.244.5.0-24");
        // Host bits in the IPv6 part.
        assert!(matches!(
            keys.parse_lease_key("/coreos.com/network/subnets/10.244.5.0-24&fd00::1-64"),
            Err(KeyError::NonCanonicalSubnet {
                subnet: IpNet::V6(_),
                ..
            })
        ));
    }

    #[test]
    fn error_text_is_bounded_whatever_the_key() {
        let keys = KeyLayout::default();
        let long = format!("/coreos.com/network/subnets/{}", "9".repeat(1 << 20));
        let e = keys.parse_subnet_key(&long).unwrap_err();
        assert!(matches!(e, KeyError::MalformedSubnetKey { .. }), "{e:?}");
        let text = assert_bounded(&e);
        assert!(text.contains("(1048604 bytes)"), "{text}");
        // Both the key and the operator's prefix are quoted, each bounded.
        let long_prefix = KeyLayout::new(&format!("/{}", "p".repeat(5000))).unwrap();
        let e = long_prefix.parse_subnet_key(&long).unwrap_err();
        assert!(matches!(e, KeyError::NotASubnetKey { .. }), "{e:?}");
        assert_bounded(&e);
        assert_bounded(&KeyLayout::new(&"x".repeat(5000)).unwrap_err());
    }
}
