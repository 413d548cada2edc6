//! Checks of the machine and the workspace, and how commands are printed.
//!
//! This one file is compiled into two crates: here into weft-tests, and into
//! xtask's default build through `#[path]`, because that build must compile
//! with nothing installed and so cannot depend on weft-tests (which needs the
//! BPF toolchain). It may therefore use only std, anyhow and libc.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where bpffs must be mounted; the agent pins under it.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Fails unless running as root, which namespaces and BPF need.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "must run as root: e2e tests create network namespaces and load BPF (euid is {euid})"
        );
    }
    Ok(())
}

/// Fails unless bpffs is mounted at [`BPFFS`] (the agent pins there).
pub fn require_bpffs() -> Result<()> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next(), f.next(), f.next());
        dir == Some(BPFFS) && fstype == Some("bpf")
    });
    if !mounted {
        bail!(
            "bpffs is not mounted at {BPFFS}: run `cargo xtask setup` (or `mount -t bpf bpf {BPFFS}`)"
        );
    }
    Ok(())
}

/// Fails naming the first of `tools` not found on PATH.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        let found = std::env::split_paths(&path).any(|d| d.join(tool).is_file());
        if !found {
            bail!("`{tool}` not found on PATH: run `cargo xtask setup`");
        }
    }
    Ok(())
}

/// The cargo workspace root: the parent of the crate this file is built in
/// (tests/ or xtask/, both directly under the root).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// A printable form of a command, for logs and error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(shell_quote));
    parts.join(" ")
}

fn shell_quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
