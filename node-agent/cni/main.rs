//! `weft-cni`: weft's CNI plugin (CNI spec 1.0.0; also 0.3.x and 0.4.0).
//!
//! Like flannel's plugin it configures nothing itself: it reads the subnet.env node-agent
//! writes, turns it into a config for the standard `bridge` plugin (with `host-local` IPAM),
//! and runs that plugin. The delegate config is saved per container at ADD, so DEL and CHECK
//! use the same one even if subnet.env has changed since. See the README for the conflist.
//!
//! This binary lives outside node-agent/src on purpose: executing the delegate plugins is
//! the CNI protocol itself, whereas the agent configures the kernel without forking tools.

mod config;
mod delegate;
mod env;
mod error;
mod state;

use std::ffi::OsString;
use std::io::{self, Read as _, Write as _};
use std::process::ExitCode;

use node_agent::flannel::SubnetEnv;
use serde_json::json;

use crate::config::{BRIDGE_PLUGIN, CURRENT_VERSION, NetConf, SUPPORTED_VERSIONS};
use crate::env::{CniEnv, Command};
use crate::error::CniError;
use crate::state::Store;

fn main() -> ExitCode {
    let get = |var: &str| std::env::var_os(var);
    let mut stdin = Vec::new();
    let read = io::stdin().read_to_end(&mut stdin);
    let (version, outcome) = match read {
        Ok(_) => handle(&get, &stdin),
        Err(e) => (
            CURRENT_VERSION.to_owned(),
            Err(CniError::io("reading the network config from stdin")(e)),
        ),
    };
    let mut stdout = io::stdout().lock();
    match outcome {
        Ok(output) => {
            if stdout
                .write_all(&output)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // The runtime is gone; nothing left to tell it.
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The result on stdout is for the runtime; stderr lands in its log.
            eprintln!("weft-cni: {e}");
            let _ = writeln!(stdout, "{}", e.to_result(&version));
            ExitCode::FAILURE
        }
    }
}

/// Runs one call. Returns the version error results must be written in (the request's, once
/// its config is known to speak a supported one) and what to print on success.
fn handle(
    get: &impl Fn(&str) -> Option<OsString>,
    stdin: &[u8],
) -> (String, Result<Vec<u8>, CniError>) {
    let command = match env::command(get) {
        Ok(command) => command,
        Err(e) => return (CURRENT_VERSION.to_owned(), Err(e)),
    };
    if command == Command::Version {
        return (CURRENT_VERSION.to_owned(), Ok(version_result()));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(e) => return (CURRENT_VERSION.to_owned(), Err(e)),
    };
    let outcome = CniEnv::from_vars(command, get).and_then(|env| match command {
        Command::Add => add(&conf, &env),
        Command::Del => del(&conf, &env).map(|()| Vec::new()),
        Command::Check => check(&conf, &env).map(|()| Vec::new()),
        Command::Version => Ok(version_result()),
    });
    (conf.cni_version, outcome)
}

fn version_result() -> Vec<u8> {
    json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
    .into_bytes()
}

fn read_subnet_env(conf: &NetConf) -> Result<SubnetEnv, CniError> {
    let path = &conf.subnet_file;
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CniError::SubnetEnvMissing { path: path.clone() }
        } else {
            CniError::io(format!("reading {}", path.display()))(e)
        }
    })?;
    SubnetEnv::parse(&text).map_err(|source| CniError::SubnetEnvMalformed {
        path: path.clone(),
        source,
    })
}

/// Everything that can fail without touching the host (subnet.env, the delegate's presence,
/// the data dir) is checked before the delegate runs; if the delegate then fails, its partial
/// work is undone with a DEL, so a failed ADD leaves no half-set-up container behind.
fn add(conf: &NetConf, env: &CniEnv) -> Result<Vec<u8>, CniError> {
    let subnet_env = read_subnet_env(conf)?;
    let bridge = delegate::find(BRIDGE_PLUGIN, env)?;
    let saved = config::bridge_config(conf, &subnet_env);
    let store = Store::new(&conf.data_dir);
    // Saved before the delegate runs: if this process dies half-way, the runtime's DEL
    // still finds what to undo.
    store.save(&env.container_id, &env.ifname, &saved)?;
    let call = config::for_call(&saved, conf);
    match delegate::run(&bridge, "ADD", &call) {
        Ok(result) => Ok(result),
        Err(e) => {
            let mut del = config::for_call(&saved, conf);
            if let Some(map) = del.as_object_mut() {
                map.remove("prevResult");
            }
            if let Err(undo) = delegate::run(&bridge, "DEL", &del) {
                eprintln!("weft-cni: undoing the failed ADD: {undo}");
            } else if let Err(undo) = store.remove(&env.container_id, &env.ifname) {
                eprintln!("weft-cni: undoing the failed ADD: {undo}");
            }
            Err(e)
        }
    }
}

/// Idempotent: the saved config if there is one, else one built from the current
/// subnet.env (the data dir may have been wiped), else there is nothing weft could have set
/// up for this container and DEL succeeds.
fn del(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    let store = Store::new(&conf.data_dir);
    let saved = match store.load(&env.container_id, &env.ifname) {
        Ok(Some(saved)) => Some(saved),
        Ok(None) => None,
        // A corrupt file must not wedge DEL forever: fall back as if it were missing.
        Err(e @ CniError::SavedConfigCorrupt { .. }) => {
            eprintln!("weft-cni: DEL: {e}; using subnet.env instead");
            None
        }
        Err(e) => return Err(e),
    };
    let saved = match saved {
        Some(saved) => saved,
        None => match read_subnet_env(conf) {
            Ok(subnet_env) => config::bridge_config(conf, &subnet_env),
            Err(e) => {
                eprintln!("weft-cni: DEL: no saved config and {e}: nothing to delete");
                return store.remove(&env.container_id, &env.ifname);
            }
        },
    };
    let bridge = delegate::find(BRIDGE_PLUGIN, env)?;
    delegate::run(&bridge, "DEL", &config::for_call(&saved, conf))?;
    store.remove(&env.container_id, &env.ifname)
}

/// CHECK asks the delegate to verify the container against the prevResult the runtime sends,
/// with the config ADD used.
fn check(conf: &NetConf, env: &CniEnv) -> Result<(), CniError> {
    if !conf.has_check() {
        return Err(CniError::IncompatibleVersion {
            version: conf.cni_version.clone(),
        });
    }
    if conf.prev_result.is_none() {
        return Err(CniError::InvalidConfig(
            "CHECK needs prevResult (the result of ADD)".to_owned(),
        ));
    }
    let store = Store::new(&conf.data_dir);
    let saved =
        store
            .load(&env.container_id, &env.ifname)?
            .ok_or_else(|| CniError::ContainerUnknown {
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
                dir: store.dir().to_path_buf(),
            })?;
    let bridge = delegate::find(BRIDGE_PLUGIN, env)?;
    delegate::run(&bridge, "CHECK", &config::for_call(&saved, conf))?;
    Ok(())
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use std::collections::HashMap;

    use serde_json::Value;

    use super::*;
    use crate::error::code;

    fn call(vars: &[(&str, &str)], stdin: &str) -> (String, Result<Vec<u8>, CniError>) {
        let map: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        handle(&|k: &str| map.get(k).cloned(), stdin.as_bytes())
    }

    #[test]
    fn version_needs_nothing_else() {
        let (_, out) = call(&[("CNI_COMMAND", "VERSION")], "");
        let v: Value = serde_json::from_slice(&out.unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
        );
    }

    #[test]
    fn errors_before_touching_anything() {
        let root = std::env::temp_dir().join(format!("weft-cni-main-{}", std::process::id()));
        let data = root.join("data");
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/none"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/nonexistent"),
        ];
        let conf = |file: &str| {
            format!(
                r#"{{"cniVersion":"0.4.0","name":"n","type":"weft-cni","subnetFile":"{}","dataDir":"{}"}}"#,
                root.join(file).display(),
                data.display()
            )
        };
        std::fs::create_dir_all(&root).unwrap();
        let (version, out) = call(&env, &conf("missing.env"));
        assert_eq!(version, "0.4.0");
        assert_eq!(out.unwrap_err().code(), code::SUBNET_ENV_MISSING);
        std::fs::write(root.join("bad.env"), "FLANNEL_NETWORK=10.244.0.0/16\n").unwrap();
        let (_, out) = call(&env, &conf("bad.env"));
        assert_eq!(out.unwrap_err().code(), code::SUBNET_ENV_MALFORMED);
        std::fs::write(
            root.join("good.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let (_, out) = call(&env, &conf("good.env"));
        assert_eq!(out.unwrap_err().code(), code::PLUGIN_NOT_FOUND);
        // None of these saved anything.
        assert!(!data.exists());
        // DEL of a container weft never saw: nothing to do, even with no bridge plugin.
        let mut del = env;
        del[0] = ("CNI_COMMAND", "DEL");
        let (_, out) = call(&del, &conf("missing.env"));
        assert_eq!(out.unwrap(), Vec::<u8>::new());
        // CHECK without prevResult, and of an unknown container.
        let mut check = env;
        check[0] = ("CNI_COMMAND", "CHECK");
        let (_, out) = call(&check, &conf("good.env"));
        assert_eq!(out.unwrap_err().code(), code::INVALID_CONFIG);
        let with_prev = conf("good.env").replace('}', r#","prevResult":{}}"#);
        let (_, out) = call(&check, &with_prev);
        assert_eq!(out.unwrap_err().code(), code::CONTAINER_UNKNOWN);
        // CHECK does not exist before 0.4.0.
        let old = with_prev.replace("0.4.0", "0.3.1");
        let (_, out) = call(&check, &old);
        assert_eq!(out.unwrap_err().code(), code::INCOMPATIBLE_VERSION);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unreadable_config_errors_speak_the_current_version() {
        let (version, out) = call(&[("CNI_COMMAND", "ADD")], "{not json");
        assert_eq!(version, CURRENT_VERSION);
        assert_eq!(out.unwrap_err().code(), code::DECODING);
        let (_, out) = call(&[], "{}");
        assert_eq!(out.unwrap_err().code(), code::INVALID_ENV);
    }
}
