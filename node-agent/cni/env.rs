//! The CNI_* environment a runtime sets for each call.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::CniError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The variables ADD, DEL and CHECK need, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    /// Absent only on DEL, where the spec lets the runtime omit it.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// CNI_PATH split at colons, empty entries dropped.
    pub path: Vec<PathBuf>,
    /// CNI_PATH as given, for messages.
    pub raw_path: String,
}

/// The command alone: VERSION needs nothing else, and the other variables are checked only
/// after the config, so that their error results carry the request's version.
pub fn command(get: &impl Fn(&str) -> Option<OsString>) -> Result<Command, CniError> {
    let raw = get("CNI_COMMAND").ok_or(CniError::InvalidEnv {
        var: "CNI_COMMAND",
        problem: "not set".to_owned(),
    })?;
    match raw.to_str() {
        Some("ADD") => Ok(Command::Add),
        Some("DEL") => Ok(Command::Del),
        Some("CHECK") => Ok(Command::Check),
        Some("VERSION") => Ok(Command::Version),
        _ => Err(CniError::InvalidEnv {
            var: "CNI_COMMAND",
            problem: format!("unknown command {raw:?} (expected ADD, DEL, CHECK or VERSION)"),
        }),
    }
}

impl CniEnv {
    pub fn from_vars(
        command: Command,
        get: &impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, CniError> {
        let string = |var: &'static str| -> Result<Option<String>, CniError> {
            match get(var) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v.into_string().map(Some).map_err(|v| CniError::InvalidEnv {
                    var,
                    problem: format!("not UTF-8: {v:?}"),
                }),
            }
        };
        let required = |var: &'static str| {
            string(var)?.ok_or(CniError::InvalidEnv {
                var,
                problem: "not set".to_owned(),
            })
        };
        let container_id = required("CNI_CONTAINERID")?;
        // The spec's alphabet; it also makes the id safe as a file name in the data dir.
        if !container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || !container_id
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
        {
            return Err(CniError::InvalidEnv {
                var: "CNI_CONTAINERID",
                problem: format!(
                    "{container_id:?}: must start with a letter or digit and contain only letters, digits, '-', '_' and '.'"
                ),
            });
        }
        let ifname = required("CNI_IFNAME")?;
        // Linux's own rule for interface names (dev_valid_name); it also keeps the name safe
        // as a file name.
        if ifname.len() > 15
            || ifname == "."
            || ifname == ".."
            || ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(CniError::InvalidEnv {
                var: "CNI_IFNAME",
                problem: format!("{ifname:?} is not a valid interface name"),
            });
        }
        let netns = match (command, string("CNI_NETNS")?) {
            (_, Some(netns)) => Some(PathBuf::from(netns)),
            (Command::Del, None) => None,
            (_, None) => {
                return Err(CniError::InvalidEnv {
                    var: "CNI_NETNS",
                    problem: "not set".to_owned(),
                });
            }
        };
        let raw_path = required("CNI_PATH")?;
        let path = raw_path
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        Ok(Self {
            container_id,
            netns,
            ifname,
            path,
            raw_path,
        })
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::error::code;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin::/usr/lib/cni"),
    ];

    #[test]
    fn parses_a_full_environment() {
        let get = vars(FULL);
        assert_eq!(command(&get).unwrap(), Command::Add);
        let env = CniEnv::from_vars(Command::Add, &get).unwrap();
        assert_eq!(env.container_id, "abc123");
        assert_eq!(env.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(env.ifname, "eth0");
        assert_eq!(
            env.path,
            vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")]
        );
    }

    #[test]
    fn del_may_omit_the_netns() {
        let without: Vec<_> = FULL
            .iter()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .copied()
            .collect();
        let get = vars(&without);
        assert_eq!(CniEnv::from_vars(Command::Del, &get).unwrap().netns, None);
        let e = CniEnv::from_vars(Command::Add, &get).unwrap_err();
        assert_eq!(e.code(), code::INVALID_ENV);
        assert!(e.to_string().starts_with("CNI_NETNS"), "{e}");
        assert!(CniEnv::from_vars(Command::Check, &get).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert_eq!(command(&vars(&[])).unwrap_err().code(), code::INVALID_ENV);
        assert_eq!(
            command(&vars(&[("CNI_COMMAND", "GC")])).unwrap_err().code(),
            code::INVALID_ENV
        );
        for (var, value) in [
            ("CNI_CONTAINERID", "../etc"),
            ("CNI_CONTAINERID", "-x"),
            ("CNI_CONTAINERID", ""),
            ("CNI_IFNAME", "a/b"),
            ("CNI_IFNAME", ".."),
            ("CNI_IFNAME", "sixteen-chars-xx"),
            ("CNI_IFNAME", "eth 0"),
            ("CNI_PATH", ""),
        ] {
            let changed: Vec<_> = FULL
                .iter()
                .map(|&(k, v)| if k == var { (k, value) } else { (k, v) })
                .collect();
            let e = CniEnv::from_vars(Command::Add, &vars(&changed)).unwrap_err();
            assert_eq!(e.code(), code::INVALID_ENV, "{var}={value}");
            assert!(e.to_string().starts_with(var), "{e}");
        }
    }
}
