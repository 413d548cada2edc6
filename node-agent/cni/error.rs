//! The plugin's errors and their CNI error results.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use node_agent::flannel::SubnetEnvError;
use serde_json::{Value, json};
use thiserror::Error;

use crate::config::SUPPORTED_VERSIONS;

/// Everything that makes the plugin answer with an error result. Each variant maps to one
/// code: the spec's well-known codes where one fits, 100 and up for weft's own.
#[derive(Debug, Error)]
pub enum CniError {
    #[error("incompatible CNI version {version:?}: weft-cni supports {}", SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion { version: String },
    #[error(
        "container {container_id} interface {ifname}: unknown to weft (no saved config in {dir})"
    )]
    ContainerUnknown {
        container_id: String,
        ifname: String,
        dir: PathBuf,
    },
    #[error("{var}: {problem}")]
    InvalidEnv { var: &'static str, problem: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("network config is not valid JSON: {0}")]
    Decoding(#[source] serde_json::Error),
    #[error("invalid network config: {0}")]
    InvalidConfig(String),
    #[error("subnet.env missing: is node-agent running? ({} does not exist)", path.display())]
    SubnetEnvMissing { path: PathBuf },
    #[error("subnet.env malformed: {}: {source}", path.display())]
    SubnetEnvMalformed {
        path: PathBuf,
        #[source]
        source: SubnetEnvError,
    },
    #[error("delegate plugin {plugin:?} not found in CNI_PATH {search_path:?}")]
    PluginNotFound { plugin: String, search_path: String },
    #[error("delegate plugin {plugin} failed: {msg}")]
    Delegate {
        plugin: String,
        code: u64,
        msg: String,
        details: Option<String>,
    },
    #[error("delegate plugin {plugin} exited with {status} without a CNI result: {output:?}")]
    DelegateCrashed {
        plugin: String,
        status: ExitStatus,
        output: String,
    },
    #[error("saved delegate config {} is corrupt: {reason}", path.display())]
    SavedConfigCorrupt { path: PathBuf, reason: String },
}

/// weft's own codes (the spec reserves 100 and up for plugins).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u64 = 1;
    pub const CONTAINER_UNKNOWN: u64 = 3;
    pub const INVALID_ENV: u64 = 4;
    pub const IO: u64 = 5;
    pub const DECODING: u64 = 6;
    pub const INVALID_CONFIG: u64 = 7;
    pub const SUBNET_ENV_MISSING: u64 = 100;
    pub const SUBNET_ENV_MALFORMED: u64 = 101;
    pub const PLUGIN_NOT_FOUND: u64 = 102;
    pub const DELEGATE_CRASHED: u64 = 103;
    pub const SAVED_CONFIG_CORRUPT: u64 = 104;
}

impl CniError {
    pub fn code(&self) -> u64 {
        match self {
            Self::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            Self::ContainerUnknown { .. } => code::CONTAINER_UNKNOWN,
            Self::InvalidEnv { .. } => code::INVALID_ENV,
            Self::Io { .. } => code::IO,
            Self::Decoding(_) => code::DECODING,
            Self::InvalidConfig(_) => code::INVALID_CONFIG,
            Self::SubnetEnvMissing { .. } => code::SUBNET_ENV_MISSING,
            Self::SubnetEnvMalformed { .. } => code::SUBNET_ENV_MALFORMED,
            Self::PluginNotFound { .. } => code::PLUGIN_NOT_FOUND,
            // The delegate's own code says more than any of ours would (host-local's
            // "no IP addresses available", bridge's invalid config...).
            Self::Delegate { code, .. } => *code,
            Self::DelegateCrashed { .. } => code::DELEGATE_CRASHED,
            Self::SavedConfigCorrupt { .. } => code::SAVED_CONFIG_CORRUPT,
        }
    }

    /// The error result the spec defines, in `cni_version` (the request's when it was valid).
    pub fn to_result(&self, cni_version: &str) -> Value {
        let mut result = json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
        });
        let details = match self {
            Self::Delegate { details, .. } => details.clone(),
            Self::Io { source, .. } => Some(format!("{source:?}")),
            _ => None,
        };
        if let Some(details) = details {
            result["details"] = Value::String(details);
        }
        result
    }

    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use super::*;

    #[test]
    fn error_results_follow_the_spec() {
        let e = CniError::SubnetEnvMissing {
            path: "/run/flannel/subnet.env".into(),
        };
        assert_eq!(
            e.to_result("1.0.0"),
            json!({
                "cniVersion": "1.0.0",
                "code": 100,
                "msg": "subnet.env missing: is node-agent running? (/run/flannel/subnet.env does not exist)",
            })
        );
        let e = CniError::Delegate {
            plugin: "bridge".into(),
            code: 7,
            msg: "bad bridge".into(),
            details: Some("why".into()),
        };
        let r = e.to_result("0.4.0");
        assert_eq!(r["code"], 7);
        assert_eq!(r["cniVersion"], "0.4.0");
        assert_eq!(r["msg"], "delegate plugin bridge failed: bad bridge");
        assert_eq!(r["details"], "why");
        let e = CniError::Decoding(serde_json::from_str::<Value>("{").unwrap_err());
        assert_eq!(e.code(), 6);
        assert_eq!(
            CniError::IncompatibleVersion {
                version: "9.9.9".into()
            }
            .to_string(),
            "incompatible CNI version \"9.9.9\": weft-cni supports 0.3.0, 0.3.1, 0.4.0, 1.0.0"
        );
    }
}
