//! Fixtures for weft's end-to-end tests and `cargo xtask demo`.
//!
//! Everything runs in network namespaces this library creates, on the
//! 198.18.0.0/24 underlay (RFC 2544 benchmarking range) with container
//! addresses from the cluster network only inside namespaces. Every name
//! carries a per-process tag ([`unique_tag`]), and every resource is
//! released by `Drop`, so a failing or panicking test cleans up too.
//! Resources left by a test process that was killed outright are removed
//! before the next test process creates anything (see [`sweep_stale`]).

pub mod baseline;
mod cluster;
pub mod docker;
mod etcd;
mod netns;
pub mod old_pins;
pub mod pki;
pub mod podman;
pub mod process;
pub mod stream;
mod system;
pub mod test_run;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub use cluster::{
    CONVERGE, Cluster, Container, Host, RECONCILED, Reconciliation, SWITCH_IP, Signal,
    SubnetEnvExt, TransferStats, doctor_check, start_agents_meshed, switch_port, tcp_transfer,
    wait_full_mesh, wait_routes,
};
pub use etcd::{AGENT_PASSWORD, AGENT_USER, Etcd, EtcdSecurity, WatchEvent, parse_watch_json};
pub use netns::{Capture, Netns, capture};
/// The subnet file, as the agent's own `flannel` module reads and writes it.
pub use node_agent::flannel::SubnetEnv;
pub use process::wait_until;
pub use system::{BPFFS, require_bpffs, require_root, require_tools, workspace_root};
pub use tempfile::TempDir;
/// The vxlan network config of the suites that write other nodes' leases
/// while agents run. Agents lease from 10.244.1.0 to 10.244.99.0 only
/// (SubnetMax), so a foreign or malformed lease a test writes at
/// 10.244.100.0 and above never lands on a subnet an agent picked at random.
pub const VXLAN_CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMax":"10.244.99.0","Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
/// Name prefixes; [`sweep_stale`] only touches names of exactly these
/// shapes: `wtst-<tag>-...` namespaces, `weft-t<tag>-<n>` pin directories
/// and `weft-tests-<tag>-...` temp directories.
pub(crate) const NS_PREFIX: &str = "wtst-";
pub(crate) const PIN_PREFIX: &str = "weft-t";
pub(crate) const TMP_PREFIX: &str = "weft-tests-";
/// Bits of [`unique_tag`]'s value that hold the per-process counter; the
/// rest is the pid, which is how [`sweep_stale`] finds the owner.
const COUNTER_BITS: u32 = 9;

/// A private bpffs directory for one test's pins, removed with everything
/// in it on drop. Its name has the shape [`sweep_stale`] recognises.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new() -> Result<Self> {
        let path = pin_path(&unique_tag(), 0);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The node agent to test: `$WEFT_NODE_AGENT`, else `release/node-agent`
/// in `$CARGO_TARGET_DIR` (relative to the workspace root) or the
/// workspace's `target/`.
pub fn node_agent_binary() -> Result<PathBuf> {
    release_binary("node-agent", "WEFT_NODE_AGENT")
}

/// weft's CNI plugin to test: `$WEFT_CNI`, else `release/weft-cni`, found
/// like [`node_agent_binary`] (`cargo xtask build` builds both).
pub fn weft_cni_binary() -> Result<PathBuf> {
    release_binary("weft-cni", "WEFT_CNI")
}

/// `$<env>` if set, else the release build of `name`; an error naming the
/// fix if it does not exist.
fn release_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{env}={} does not exist", path.display());
        }
        return Ok(path);
    }
    let root = workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t));
    let path = target.join("release").join(name);
    if !path.is_file() {
        bail!(
            "{name} binary not found at {}: run `cargo xtask build` first (or set {env})",
            path.display()
        );
    }
    Ok(path)
}

/// The namespace of role `role` in the fixture tagged `tag`:
/// `wtst-<tag>-<role>`, a shape [`sweep_stale`] recognises (see [`ns_tag`]).
pub(crate) fn ns_name(tag: &str, role: &str) -> String {
    format!("{NS_PREFIX}{tag}-{role}")
}

/// Pin directory `index` of the fixture tagged `tag`:
/// `/sys/fs/bpf/weft-t<tag>-<index>`.
pub(crate) fn pin_path(tag: &str, index: u8) -> PathBuf {
    Path::new(BPFFS).join(format!("{PIN_PREFIX}{tag}-{index}"))
}

/// A new private directory under the system temp dir, removed with its
/// contents on drop; named `weft-tests-<tag>-<random>` so that
/// [`sweep_stale`] removes it if this process is killed first.
pub fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("{TMP_PREFIX}{}-", unique_tag()))
        .tempdir()
        .context("creating a scratch directory")
}

/// A short name fragment (at most 6 base-36 characters) unique among live
/// processes: the pid with a per-process counter in the low bits. The first
/// call sweeps what killed runs left behind, so the sweep always comes
/// before this process names (and so creates) anything.
pub fn unique_tag() -> String {
    sweep_stale();
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & ((1 << COUNTER_BITS) - 1);
    // pid_max is at most 2^22, so the value stays below 2^31 < 36^6.
    let value = (std::process::id() << COUNTER_BITS) | n;
    to_base36(value)
}

fn to_base36(mut v: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// The pid encoded in a tag made by [`unique_tag`].
fn tag_owner(tag: &str) -> Option<u32> {
    u32::from_str_radix(tag, 36).ok().map(|v| v >> COUNTER_BITS)
}

/// Removes namespaces, pin directories and temp dirs that this fixture
/// created in processes that no longer exist (a test run killed by SIGKILL
/// or Ctrl-C never runs its Drops). Runs once per process, from the first
/// [`unique_tag`], before this process creates anything, so names carrying
/// this process's own pid are stale too (pid reuse).
fn sweep_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let me = std::process::id();
        let stale = |tag: &str| {
            tag_owner(tag)
                .is_some_and(|pid| pid == me || !Path::new(&format!("/proc/{pid}")).exists())
        };
        if let Ok(list) = process::run(process::command("ip", &["netns", "list"])) {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if let Some(tag) = ns_tag(name)
                    && stale(tag)
                {
                    eprintln!("weft-tests: removing stale namespace {name}");
                    // Dropping the handle runs the usual teardown.
                    drop(Netns::adopt(name));
                }
            }
        }
        let dirs: [(PathBuf, TagOf); 3] = [
            (PathBuf::from(BPFFS), pin_tag),
            (std::env::temp_dir(), tmp_tag),
            // host-local's state of the podman fixture's networks (named like pin dirs).
            (PathBuf::from(podman::HOST_LOCAL_DIR), pin_tag),
        ];
        // dockerd's cgroup parents (see docker::Dockerd), per cgroup v1
        // controller or once on v2; a cgroup goes with rmdir alone.
        let cgroup_roots = std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in cgroup_roots {
            for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if pin_tag(&name).is_some_and(stale) {
                    docker::remove_cgroup(&entry.path());
                }
            }
        }
        for (dir, tag_of) in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(tag) = tag_of(&name)
                    && stale(tag)
                {
                    eprintln!("weft-tests: removing stale {}", entry.path().display());
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    });
}

/// Extracts the tag from a name of one of our shapes.
type TagOf = fn(&str) -> Option<&str>;

fn is_tag(s: &str) -> bool {
    (1..=6).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `wtst-<tag>-sw` (switch), `wtst-<tag>-tr` (the BPF_PROG_TEST_RUN
/// bench), `wtst-<tag>-h<n>`, `wtst-<tag>-h<n>c<m>`.
fn ns_tag(name: &str) -> Option<&str> {
    let (tag, role) = name.strip_prefix(NS_PREFIX)?.split_once('-')?;
    let host_or_container = role.strip_prefix('h').is_some_and(|r| {
        let (h, c) = r.split_once('c').unwrap_or((r, "0"));
        is_index(h) && is_index(c)
    });
    let fixed = matches!(role, "sw" | "tr");
    (is_tag(tag) && (fixed || host_or_container)).then_some(tag)
}

/// `weft-t<tag>-<n>`.
fn pin_tag(name: &str) -> Option<&str> {
    let (tag, index) = name.strip_prefix(PIN_PREFIX)?.split_once('-')?;
    (is_tag(tag) && is_index(index)).then_some(tag)
}

/// `weft-tests-<tag>-<random>`.
fn tmp_tag(name: &str) -> Option<&str> {
    let (tag, _) = name.strip_prefix(TMP_PREFIX)?.split_once('-')?;
    is_tag(tag).then_some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_unique_and_encode_the_pid() {
        let a = unique_tag();
        let b = unique_tag();
        assert_ne!(a, b);
        assert!(a.len() <= 6, "{a}");
        assert_eq!(tag_owner(&a), Some(std::process::id()));
        assert_eq!(to_base36(0), "0");
        assert_eq!(to_base36(35), "z");
        assert_eq!(to_base36(36), "10");
        assert!(to_base36((1 << 31) - 1).len() <= 6);
    }

    #[test]
    fn sweep_matches_only_our_names() {
        assert_eq!(ns_tag("wtst-1a2b-sw"), Some("1a2b"));
        assert_eq!(ns_tag("wtst-1a2b-h3"), Some("1a2b"));
        assert_eq!(ns_tag("wtst-1a2b-h3c12"), Some("1a2b"));
        assert_eq!(ns_tag("wtst-1a2b-tr"), Some("1a2b"));
        assert_eq!(ns_tag("wtst-1a2b-bench"), None);
        assert_eq!(ns_tag(&ns_name("1a2b", "tr")), Some("1a2b"));
        assert_eq!(pin_path("1a2b", 3), Path::new(BPFFS).join("weft-t1a2b-3"));
        assert_eq!(ns_tag("wft-1a2b-sw"), None);
        assert_eq!(pin_tag("weft-t1a2b-3"), Some("1a2b"));
        assert_eq!(pin_tag("weft-test-x"), None);
        assert_eq!(pin_tag("weft"), None);
        assert_eq!(tmp_tag("weft-tests-1a2b-Xy9"), Some("1a2b"));
        assert_eq!(tmp_tag("weft-bench-1a2b"), None);
    }
}
