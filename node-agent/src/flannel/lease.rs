//! The lease value flannel stores under a subnet key, e.g.
//! `{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`.
//!
//! Mirrors flannel's `LeaseAttrs` and the vxlan backend's `vxlanLeaseAttrs`, so weft nodes and
//! flannel nodes can read each other's leases.

use std::net::Ipv4Addr;

use serde_json::Value;
use thiserror::Error;

use super::config::MAX_VNI;
use super::echo::Echo;
use super::json::{FieldError, field, field_int, field_str};

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("lease value is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("{field}: expected a JSON object")]
    NotAnObject { field: &'static str },
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("PublicIP {value}: not a valid IPv4 address")]
    InvalidPublicIp { value: Echo },
    #[error("BackendData.VNI {vni}: must be between 0 and {MAX_VNI}")]
    VniOutOfRange { vni: i128 },
    #[error(
        "MAC address {value}: {reason} (expected six hex octets separated by ':', e.g. aa:bb:cc:dd:ee:ff)"
    )]
    InvalidMac { value: Echo, reason: &'static str },
}

/// The vxlan backend's per-node data: the VTEP to send encapsulated traffic to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanLeaseData {
    /// `None` for leases written by flannel versions that predate the VNI field; the network
    /// config's VNI applies then.
    pub vni: Option<u32>,
    pub vtep_mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAttrs {
    pub public_ip: Ipv4Addr,
    /// flannel's backend name as stored ("vxlan", "host-gw", "ipip", or anything another
    /// flannel node wrote).
    pub backend_type: String,
    /// Present for vxlan leases; `None` for every other backend.
    pub backend_data: Option<VxlanLeaseData>,
}

impl LeaseAttrs {
    /// Same as [`parse`].
    pub fn parse(json: &str) -> Result<Self, LeaseError> {
        parse(json)
    }

    /// The JSON flannel writes, with flannel's key order. `BackendData` is written only when
    /// `backend_data` is set, and `VNI` inside it only when known.
    pub fn to_json(&self) -> String {
        let mut out = format!(
            r#"{{"PublicIP":"{}","BackendType":{}"#,
            self.public_ip,
            Value::String(self.backend_type.clone())
        );
        if let Some(data) = &self.backend_data {
            out.push_str(r#","BackendData":{"#);
            if let Some(vni) = data.vni {
                out.push_str(&format!(r#""VNI":{vni},"#));
            }
            out.push_str(&format!(r#""VtepMAC":"{}"}}"#, format_mac(&data.vtep_mac)));
        }
        out.push('}');
        out
    }

    /// Whether this lease is for flannel's vxlan backend (flannel writes the type lower-case,
    /// but its backend lookup lower-cases anyway, so compare the same way).
    pub fn is_vxlan(&self) -> bool {
        self.backend_type.eq_ignore_ascii_case("vxlan")
    }
}

/// Parses a lease value. Keys are matched case-insensitively (flannel decodes with Go's
/// `encoding/json`), and the fields weft does not use (`PublicIPv6`, `BackendV6Data`, ...)
/// are ignored, whatever their value, so dual-stack flannel nodes' leases still parse.
pub fn parse(json: &str) -> Result<LeaseAttrs, LeaseError> {
    let root: Value = serde_json::from_str(json).map_err(LeaseError::InvalidJson)?;
    let obj = root
        .as_object()
        .ok_or(LeaseError::NotAnObject { field: "lease" })?;

    let ip_text =
        field_str(obj, "PublicIP", "PublicIP")?.ok_or(LeaseError::Missing { field: "PublicIP" })?;
    let public_ip = ip_text
        .parse::<Ipv4Addr>()
        .map_err(|_| LeaseError::InvalidPublicIp {
            value: Echo::new(ip_text),
        })?;
    let backend_type = field_str(obj, "BackendType", "BackendType")?
        .ok_or(LeaseError::Missing {
            field: "BackendType",
        })?
        .to_owned();

    let mut lease = LeaseAttrs {
        public_ip,
        backend_type,
        backend_data: None,
    };
    if lease.is_vxlan() {
        let data = field(obj, "BackendData", "BackendData")?.ok_or(LeaseError::Missing {
            field: "BackendData",
        })?;
        lease.backend_data = Some(parse_vxlan_data(data)?);
    }
    Ok(lease)
}

fn parse_vxlan_data(data: &Value) -> Result<VxlanLeaseData, LeaseError> {
    let obj = data.as_object().ok_or(LeaseError::NotAnObject {
        field: "BackendData",
    })?;
    let vni = match field_int(obj, "VNI", "BackendData.VNI")? {
        None => None,
        Some(vni) => Some(
            u32::try_from(vni)
                .ok()
                .filter(|vni| *vni <= MAX_VNI)
                .ok_or(LeaseError::VniOutOfRange { vni })?,
        ),
    };
    let mac_text =
        field_str(obj, "VtepMAC", "BackendData.VtepMAC")?.ok_or(LeaseError::Missing {
            field: "BackendData.VtepMAC",
        })?;
    Ok(VxlanLeaseData {
        vni,
        vtep_mac: parse_mac(mac_text)?,
    })
}

/// `aa:bb:cc:dd:ee:ff`, lower-case, as Go's `net.HardwareAddr.String` writes it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Parses a 6-byte MAC written as two-digit hex octets (either case). Go's `net.ParseMAC`,
/// which flannel uses, also takes '-' as separator, so that is accepted too (one separator
/// throughout); its dotted and 8/20-byte forms are not, since a VTEP MAC is always Ethernet.
pub fn parse_mac(text: &str) -> Result<[u8; 6], LeaseError> {
    let invalid = |reason| LeaseError::InvalidMac {
        value: Echo::new(text),
        reason,
    };
    let separator = if text.contains('-') { '-' } else { ':' };
    let mut mac = [0u8; 6];
    let mut octets = text.split(separator);
    for byte in &mut mac {
        let octet = octets
            .next()
            .ok_or_else(|| invalid("fewer than six octets"))?;
        if octet.len() != 2 || !octet.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("each octet must be exactly two hex digits"));
        }
        *byte = u8::from_str_radix(octet, 16)
            .map_err(|_| invalid("each octet must be exactly two hex digits"))?;
    }
    if octets.next().is_some() {
        return Err(invalid("more than six octets"));
    }
    Ok(mac)
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use crate::flannel::echo::assert_bounded;

    const MAC: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];

    fn vxlan_lease() -> LeaseAttrs {
        LeaseAttrs {
            public_ip: Ipv4Addr::new(198, 18, 0, 1),
            backend_type: "vxlan".into(),
            backend_data: Some(VxlanLeaseData {
                vni: Some(1),
                vtep_mac: MAC,
            }),
        }
    }

    #[test]
    fn vxlan_to_json_is_exactly_flannels_format() {
        let json = r#"{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        assert_eq!(vxlan_lease().to_json(), json);
        assert_eq!(parse(json).unwrap(), vxlan_lease());
        assert_eq!(LeaseAttrs::parse(json).unwrap(), vxlan_lease());
    }

    #[test]
    fn non_vxlan_omits_backend_data() {
        for backend_type in ["host-gw", "ipip"] {
            let lease = LeaseAttrs {
                public_ip: Ipv4Addr::new(198, 18, 0, 1),
                backend_type: backend_type.into(),
                backend_data: None,
            };
            let json = lease.to_json();
            assert_eq!(
                json,
                format!(r#"{{"PublicIP":"198.18.0.1","BackendType":"{backend_type}"}}"#)
            );
            assert_eq!(parse(&json).unwrap(), lease);
        }
    }

    #[test]
    fn lease_without_vni_round_trips() {
        let json = r#"{"PublicIP":"10.0.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"02:42:ac:11:00:02"}}"#;
        let lease = parse(json).unwrap();
        assert_eq!(
            lease.backend_data,
            Some(VxlanLeaseData {
                vni: None,
                vtep_mac: [0x02, 0x42, 0xac, 0x11, 0x00, 0x02]
            })
        );
        assert_eq!(lease.to_json(), json);
    }

    #[test]
    fn tolerates_flannel_extras_case_and_nulls() {
        let json = r#"{"publicip":"198.18.0.1","PublicIPv6":null,"backendtype":"vxlan",
            "BACKENDDATA":{"vni":null,"vtepmac":"AA:BB:CC:DD:EE:FF","Extra":1},
            "BackendV6Data":{"VNI":1,"VtepMAC":"11:22:33:44:55:66"}}"#;
        let lease = parse(json).unwrap();
        assert_eq!(lease.public_ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(
            lease.backend_data,
            Some(VxlanLeaseData {
                vni: None,
                vtep_mac: MAC
            })
        );
        let dual = r#"{"PublicIP":"198.18.0.1","PublicIPv6":"fd00::1","BackendType":"host-gw","BackendData":null}"#;
        assert_eq!(parse(dual).unwrap().backend_data, None);
    }

    #[test]
    fn string_escaping_in_backend_type() {
        let lease = LeaseAttrs {
            public_ip: Ipv4Addr::new(1, 2, 3, 4),
            backend_type: "we\"ird".into(),
            backend_data: None,
        };
        assert_eq!(
            lease.to_json(),
            r#"{"PublicIP":"1.2.3.4","BackendType":"we\"ird"}"#
        );
        assert_eq!(parse(&lease.to_json()).unwrap(), lease);
    }

    #[test]
    fn field_errors_name_the_field() {
        let cases: [(&str, &str); 9] = [
            (r#"{"BackendType":"vxlan"}"#, "PublicIP: missing"),
            (r#"{"PublicIP":"1.2.3.4"}"#, "BackendType: missing"),
            (
                r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#,
                "BackendData: missing",
            ),
            (
                r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
                "BackendData.VtepMAC: missing",
            ),
            (
                r#"{"PublicIP":"fd00::1","BackendType":"host-gw"}"#,
                "PublicIP \"fd00::1\"",
            ),
            (
                r#"{"PublicIP":7,"BackendType":"host-gw"}"#,
                "PublicIP: expected a string",
            ),
            (
                r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
                "BackendData.VNI 16777216",
            ),
            (
                r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":"x"}"#,
                "BackendData: expected a JSON object",
            ),
            ("not json", "lease value is not valid JSON"),
        ];
        for (json, message) in cases {
            let e = parse(json).unwrap_err();
            assert!(e.to_string().contains(message), "{json}: {e}");
        }
    }

    #[test]
    fn shared_field_errors_are_wrapped() {
        let e = parse(r#"{"PublicIP":"1.2.3.4","publicip":"1.2.3.5","BackendType":"host-gw"}"#)
            .unwrap_err();
        assert!(
            matches!(
                e,
                LeaseError::Field(FieldError::AmbiguousKey {
                    field: "PublicIP",
                    ..
                })
            ),
            "{e:?}"
        );
        let json = r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1.5,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#;
        let e = parse(json).unwrap_err();
        assert!(
            matches!(
                e,
                LeaseError::Field(FieldError::WrongType {
                    field: "BackendData.VNI",
                    expected: "an integer",
                })
            ),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "BackendData.VNI: expected an integer");
    }

    #[test]
    fn error_text_is_bounded_whatever_the_value() {
        let long = "7".repeat(1 << 20);
        for json in [
            format!(r#"{{"PublicIP":"{long}","BackendType":"host-gw"}}"#),
            format!(
                r#"{{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{{"VtepMAC":"{long}"}}}}"#
            ),
            format!(r#"{{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":"{long}"}}"#),
            format!(r#"{{"PublicIP":"1.2.3.4""{long}"}}"#),
            format!(r#"{{"PublicIP":"1.2.3.4","BackendType":{long}}}"#),
        ] {
            assert_bounded(&parse(&json).unwrap_err());
        }
        let e = parse(&format!(
            r#"{{"PublicIP":"{long}","BackendType":"host-gw"}}"#
        ))
        .unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "PublicIP \"{}\"… (1048576 bytes)",
                "7".repeat(100)
            )),
            "{e}"
        );
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff").unwrap(), MAC);
        assert_eq!(parse_mac("AA:Bb:cC:DD:EE:FF").unwrap(), MAC);
        assert_eq!(parse_mac("aa-bb-cc-dd-ee-ff").unwrap(), MAC);
        assert_eq!(format_mac(&MAC), "aa:bb:cc:dd:ee:ff");
        assert_eq!(
            format_mac(&[0, 1, 2, 0x0a, 0xb0, 0xff]),
            "00:01:02:0a:b0:ff"
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:gg",
            "aa:bb-cc:dd:ee:ff",
            "aabb.ccdd.eeff",
            " aa:bb:cc:dd:ee:ff",
            "+a:bb:cc:dd:ee:ff",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(matches!(e, LeaseError::InvalidMac { .. }), "{bad}: {e:?}");
        }
        let json = r#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:bb:cc:dd:ee:ff"}}"#;
        assert!(matches!(
            parse(json).unwrap_err(),
            LeaseError::InvalidMac { .. }
        ));
    }
}
