//! The network config the runtime sends on stdin, and the delegate config built from it and
//! subnet.env.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use node_agent::flannel::SubnetEnv;
use node_agent::flannel::subnet_env::DEFAULT_PATH as DEFAULT_SUBNET_FILE;
use serde_json::{Map, Value, json};

use crate::error::CniError;

/// Versions whose results the delegate (Debian's bridge plugin, 1.1) can produce: the plugin
/// asks it for exactly the version it was asked for, so it never converts results itself.
/// 0.2.0 and older are left out: they have no CHECK and a different result shape.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The version the plugin speaks when the request has none it can use (VERSION, and error
/// results for a config that could not be read).
pub const CURRENT_VERSION: &str = "1.0.0";
/// Where the delegate config of each container is kept between ADD and DEL.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/weft";
/// The bridge every container on the node hangs off; node-agent's contract names it.
pub const BRIDGE: &str = "cni0";
/// The plugins the plugin delegates to, found in CNI_PATH.
pub const BRIDGE_PLUGIN: &str = "bridge";
const IPAM_PLUGIN: &str = "host-local";

/// What the plugin takes from the network config. Unknown keys are ignored, as the spec asks.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// `subnetFile`: where node-agent writes subnet.env.
    pub subnet_file: PathBuf,
    /// `dataDir`: where delegate configs are saved per container.
    pub data_dir: PathBuf,
    /// `isDefaultGateway`: whether containers get a default route via cni0 (on by default, as
    /// in flannel's usual conflist: containers need to reach more than the cluster network).
    pub is_default_gateway: bool,
    /// Passed to the delegate untouched: the runtime fills them per call.
    pub prev_result: Option<Value>,
    pub runtime_config: Option<Value>,
    pub args: Option<Value>,
}

impl NetConf {
    /// Parses stdin. Not JSON is a decoding error (6); JSON without the required fields, or
    /// with fields of the wrong type, is an invalid config (7); a version the plugin does not
    /// speak is code 1.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(CniError::Decoding)?;
        let Value::Object(map) = value else {
            return Err(CniError::InvalidConfig("expected a JSON object".to_owned()));
        };
        let cni_version = required_string(&map, "cniVersion")?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion {
                version: cni_version,
            });
        }
        let name = required_string(&map, "name")?;
        required_string(&map, "type")?;
        let path = |key: &str, default: &str| -> Result<PathBuf, CniError> {
            let path = PathBuf::from(optional_string(&map, key)?.unwrap_or_else(|| default.into()));
            if !path.is_absolute() {
                return Err(CniError::InvalidConfig(format!(
                    "{key} {}: must be an absolute path",
                    path.display()
                )));
            }
            Ok(path)
        };
        let is_default_gateway = match map.get("isDefaultGateway") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(CniError::InvalidConfig(format!(
                    "isDefaultGateway: expected true or false, got {other}"
                )));
            }
        };
        let passthrough = |key: &str| map.get(key).filter(|v| !v.is_null()).cloned();
        Ok(Self {
            subnet_file: path("subnetFile", DEFAULT_SUBNET_FILE)?,
            data_dir: path("dataDir", DEFAULT_DATA_DIR)?,
            is_default_gateway,
            prev_result: passthrough("prevResult"),
            runtime_config: passthrough("runtimeConfig"),
            args: passthrough("args"),
            cni_version,
            name,
        })
    }

    /// Whether this version has CHECK (added in 0.4.0).
    pub fn has_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }
}

fn optional_string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(CniError::InvalidConfig(format!(
            "{key}: expected a non-empty string, got {other}"
        ))),
    }
}

fn required_string(map: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    optional_string(map, key)?.ok_or_else(|| CniError::InvalidConfig(format!("{key} is missing")))
}

/// The bridge plugin's config for this node, as flannel's plugin derives it: cni0 as the
/// gateway with FLANNEL_MTU, host-local addresses from FLANNEL_SUBNET, a route for the whole
/// cluster network, hairpin mode (a pod reaching itself through a service), and the bridge's
/// masquerading only when node-agent does not masquerade itself. This is what gets saved per
/// container; per-call fields are added by [`for_call`].
pub fn bridge_config(conf: &NetConf, env: &SubnetEnv) -> Value {
    // host-local wants the network address; its default gateway is then the first host
    // address, which is FLANNEL_SUBNET's own address and so cni0's.
    let subnet = env.subnet.trunc();
    // The route names its gateway although the bridge plugin would fill it in: the plugin's
    // CHECK compares routes literally and fails on a route saved without one.
    let gateway = Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1));
    json!({
        "cniVersion": conf.cni_version,
        "name": conf.name,
        "type": BRIDGE_PLUGIN,
        "bridge": BRIDGE,
        "isGateway": true,
        "isDefaultGateway": conf.is_default_gateway,
        "ipMasq": !env.ipmasq,
        "hairpinMode": true,
        "mtu": env.mtu,
        "ipam": {
            "type": IPAM_PLUGIN,
            "ranges": [[{ "subnet": subnet.to_string() }]],
            "routes": [{ "dst": env.network.trunc().to_string(), "gw": gateway.to_string() }],
        },
    })
}

/// The saved delegate config as sent for one call: in the version this request speaks (so the
/// delegate's result needs no conversion), with the runtime's per-call fields. The saved
/// config's name stays: host-local keeps its leases under that name.
pub fn for_call(saved: &Value, conf: &NetConf) -> Value {
    let mut config = saved.clone();
    if let Value::Object(map) = &mut config {
        map.insert("cniVersion".into(), conf.cni_version.clone().into());
        for (key, value) in [
            ("prevResult", &conf.prev_result),
            ("runtimeConfig", &conf.runtime_config),
            ("args", &conf.args),
        ] {
            match value {
                Some(value) => map.insert(key.into(), value.clone()),
                None => map.remove(key),
            };
        }
    }
    config
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;
    use crate::error::code;

    fn conf(json: &str) -> Result<NetConf, CniError> {
        NetConf::parse(json.as_bytes())
    }

    const MINIMAL: &str = r#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"}"#;

    fn env(ipmasq: bool) -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.5.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq,
        }
    }

    #[test]
    fn defaults() {
        let c = conf(MINIMAL).unwrap();
        assert_eq!(c.cni_version, "1.0.0");
        assert_eq!(c.name, "weft");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/weft"));
        assert!(c.is_default_gateway);
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn keys_and_passthrough() {
        let c = conf(
            r#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni","subnetFile":"/x/subnet.env",
                "dataDir":"/d","isDefaultGateway":false,"prevResult":{"ips":[]},
                "runtimeConfig":{"mac":"aa"},"args":{"cni":{}},"unknown":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/x/subnet.env"));
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert!(!c.is_default_gateway);
        assert_eq!(c.prev_result, Some(json!({"ips":[]})));
        assert_eq!(c.runtime_config, Some(json!({"mac":"aa"})));
        assert!(c.has_check());
        assert!(
            !conf(&MINIMAL.replace("1.0.0", "0.3.1"))
                .unwrap()
                .has_check()
        );
    }

    #[test]
    fn errors_carry_spec_codes() {
        for (input, expected_code, needle) in [
            ("", code::DECODING, "not valid JSON"),
            ("{\"cniVersion\":", code::DECODING, "not valid JSON"),
            ("[1]", code::INVALID_CONFIG, "JSON object"),
            (
                r#"{"name":"n","type":"t"}"#,
                code::INVALID_CONFIG,
                "cniVersion is missing",
            ),
            (
                r#"{"cniVersion":"1.0.0","type":"t"}"#,
                code::INVALID_CONFIG,
                "name is missing",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                code::INVALID_CONFIG,
                "type is missing",
            ),
            (
                r#"{"cniVersion":1,"name":"n","type":"t"}"#,
                code::INVALID_CONFIG,
                "cniVersion",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#,
                code::INCOMPATIBLE_VERSION,
                "9.9.9",
            ),
            (
                r#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#,
                code::INCOMPATIBLE_VERSION,
                "0.2.0",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","dataDir":"rel"}"#,
                code::INVALID_CONFIG,
                "dataDir rel: must be an absolute path",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","subnetFile":7}"#,
                code::INVALID_CONFIG,
                "subnetFile",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","isDefaultGateway":"yes"}"#,
                code::INVALID_CONFIG,
                "isDefaultGateway",
            ),
        ] {
            let e = conf(input).unwrap_err();
            assert_eq!(e.code(), expected_code, "{input}: {e}");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn delegate_config_follows_subnet_env() {
        let c = conf(MINIMAL).unwrap();
        assert_eq!(
            bridge_config(&c, &env(false)),
            json!({
                "cniVersion": "1.0.0",
                "name": "weft",
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "isDefaultGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.5.0/24"}]],
                    "routes": [{"dst": "10.244.0.0/16", "gw": "10.244.5.1"}],
                },
            })
        );
        // node-agent masquerades: the bridge must not do it a second time.
        assert_eq!(bridge_config(&c, &env(true))["ipMasq"], false);
    }

    #[test]
    fn per_call_fields_replace_saved_ones() {
        let add = conf(MINIMAL).unwrap();
        let saved = bridge_config(&add, &env(false));
        let check = conf(
            r#"{"cniVersion":"0.4.0","name":"renamed","type":"weft-cni","prevResult":{"ips":[]}}"#,
        )
        .unwrap();
        let call = for_call(&saved, &check);
        assert_eq!(call["cniVersion"], "0.4.0");
        assert_eq!(call["name"], "weft");
        assert_eq!(call["prevResult"], json!({"ips":[]}));
        assert_eq!(call["mtu"], 1450);
        let del = for_call(&call, &add);
        assert!(del.get("prevResult").is_none());
    }
}
