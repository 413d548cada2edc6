//! Running a delegate plugin the way a runtime runs a plugin: found in CNI_PATH, with this
//! call's CNI_* environment (inherited as is) and its config on stdin.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::env::CniEnv;
use crate::error::CniError;

/// The first executable file named `plugin` in CNI_PATH's directories, in order.
pub fn find(plugin: &str, env: &CniEnv) -> Result<PathBuf, CniError> {
    env.path
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|path| is_executable(path))
        .ok_or_else(|| CniError::PluginNotFound {
            plugin: plugin.to_owned(),
            search_path: env.raw_path.clone(),
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `plugin` for `command` (`ADD`, `DEL`, `CHECK`) with `config` on stdin and returns its
/// stdout. The delegate's stderr goes to ours, so its diagnostics reach the runtime's log.
pub fn run(plugin: &Path, command: &str, config: &Value) -> Result<Vec<u8>, CniError> {
    let name = plugin.file_name().map_or_else(
        || plugin.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(CniError::io(format!("starting {}", plugin.display())))?;
    // The config is far below a pipe's capacity and plugins read all of stdin before
    // answering, so writing it whole before reading stdout cannot deadlock.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(config.to_string().as_bytes()));
    let output = child
        .wait_with_output()
        .map_err(CniError::io(format!("waiting for {}", plugin.display())))?;
    if output.status.success() {
        if let Some(Err(e)) = written {
            return Err(CniError::io(format!("writing the config to {name}"))(e));
        }
        return Ok(output.stdout);
    }
    Err(delegate_error(&name, output.status, &output.stdout))
}

/// A failed delegate's error result, kept with its code; anything else it printed becomes
/// [`CniError::DelegateCrashed`].
fn delegate_error(plugin: &str, status: std::process::ExitStatus, stdout: &[u8]) -> CniError {
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    let code = parsed.as_ref().and_then(|v| v["code"].as_u64());
    match (parsed.as_ref(), code) {
        (Some(result), Some(code)) => CniError::Delegate {
            plugin: plugin.to_owned(),
            code,
            msg: result["msg"].as_str().unwrap_or_default().to_owned(),
            details: result["details"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
        },
        _ => CniError::DelegateCrashed {
            plugin: plugin.to_owned(),
            status,
            output: String::from_utf8_lossy(stdout).into_owned(),
        },
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    reason = "a test should fail loudly on any unexpected error"
)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn delegate_errors_keep_their_code() {
        let status = ExitStatus::from_raw(1 << 8);
        let e = delegate_error(
            "host-local",
            status,
            br#"{"cniVersion":"1.0.0","code":999,"msg":"no IP addresses available","details":""}"#,
        );
        assert_eq!(e.code(), 999);
        assert_eq!(
            e.to_string(),
            "delegate plugin host-local failed: no IP addresses available"
        );
        let e = delegate_error("bridge", status, b"panic: oops");
        assert_eq!(e.code(), crate::error::code::DELEGATE_CRASHED);
        assert!(e.to_string().contains("panic: oops"), "{e}");
    }

    #[test]
    fn finds_the_first_executable_in_cni_path() {
        let root = std::env::temp_dir().join(format!("weft-cni-find-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        // Not executable: skipped, as exec would fail on it.
        std::fs::write(a.join("bridge"), "").unwrap();
        std::fs::write(b.join("bridge"), "#!/bin/sh\n").unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(b.join("bridge"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        let env = CniEnv {
            container_id: "c".into(),
            netns: None,
            ifname: "eth0".into(),
            path: vec![root.join("none"), a.clone(), b.clone()],
            raw_path: "x".into(),
        };
        assert_eq!(find("bridge", &env).unwrap(), b.join("bridge"));
        assert_eq!(
            find("host-local", &env).unwrap_err().code(),
            crate::error::code::PLUGIN_NOT_FOUND
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
