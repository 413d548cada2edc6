//! The etcd key layout flannel uses; the only place in weft that builds or parses those keys.
//!
//! flannel's etcd registry stores the network config at `<prefix>/config` and one lease per
//! node at `<prefix>/subnets/<a.b.c.d>-<len>` (its `MakeSubnetKey`, which writes the CIDR with
//! `-` instead of `/` so the key stays a single path segment).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use thiserror::Error;

/// flannel's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

const SUBNETS_DIR: &str = "subnets";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("etcd prefix {prefix:?}: must start with '/'")]
    PrefixNotAbsolute { prefix: String },
    #[error("etcd prefix {prefix:?}: must not contain empty, '.' or '..' path segments")]
    PrefixBadSegment { prefix: String },
    #[error("etcd key {key:?}: not under the subnets prefix {subnets_prefix:?}")]
    NotASubnetKey { key: String, subnets_prefix: String },
    #[error(
        "etcd key {key:?}: dual-stack (IPv4&IPv6) subnet keys are not supported, weft is IPv4 only"
    )]
    DualStackKey { key: String },
    #[error(
        "etcd key {key:?}: malformed subnet key ({reason}); expected <a.b.c.d>-<prefix length>"
    )]
    MalformedSubnetKey { key: String, reason: String },
    #[error("etcd key {key:?}: {subnet} is not a network address (host bits are set)")]
    NonCanonicalSubnet { key: String, subnet: Ipv4Net },
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
                prefix: prefix.to_owned(),
            });
        }
        let trimmed = prefix.trim_end_matches('/');
        let bad_segment = trimmed
            .split('/')
            .skip(1)
            .any(|segment| matches!(segment, "" | "." | ".."));
        if bad_segment {
            return Err(KeyError::PrefixBadSegment {
                prefix: prefix.to_owned(),
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

    /// Parses a key under [`Self::subnets_prefix`] back into its subnet. Strict: the address
    /// must be a canonical dotted quad, the length plain decimal 0..=32, and no host bits set,
    /// because every key flannel or weft writes looks like that; anything else is not a lease.
    pub fn parse_subnet_key(&self, key: &str) -> Result<Ipv4Net, KeyError> {
        let subnets_prefix = self.subnets_prefix();
        let name =
            key.strip_prefix(subnets_prefix.as_str())
                .ok_or_else(|| KeyError::NotASubnetKey {
                    key: key.to_owned(),
                    subnets_prefix: subnets_prefix.clone(),
                })?;
        // flannel's MakeSubnetKey appends "&<ipv6>-<len>" when dual-stack is enabled.
        if name.contains('&') {
            return Err(KeyError::DualStackKey {
                key: key.to_owned(),
            });
        }
        let malformed = |reason: &str| KeyError::MalformedSubnetKey {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        let (addr_text, len_text) = name
            .split_once('-')
            .ok_or_else(|| malformed("no '-' between address and prefix length"))?;
        let addr: Ipv4Addr = addr_text
            .parse()
            .map_err(|_| malformed("invalid IPv4 address"))?;
        if addr.to_string() != addr_text {
            return Err(malformed("IPv4 address not in canonical form"));
        }
        let len: u8 = len_text
            .parse()
            .ok()
            .filter(|len: &u8| len.to_string() == len_text)
            .ok_or_else(|| malformed("prefix length is not a plain decimal number"))?;
        let subnet = Ipv4Net::new(addr, len).map_err(|_| malformed("prefix length is above 32"))?;
        if subnet.network() != addr {
            return Err(KeyError::NonCanonicalSubnet {
                key: key.to_owned(),
                subnet,
            });
        }
        Ok(subnet)
    }
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
                prefix: "coreos.com/network".into()
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
            parse("/coreos.com/network/subnets/10.244.5.0-24&fd00::-64"),
            KeyError::DualStackKey { .. }
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
}
