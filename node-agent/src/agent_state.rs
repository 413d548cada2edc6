//! What a running agent knows about its control plane that the pinned maps
//! do not say: when its lease expires, whether its etcd watch is in sync,
//! how often it reconciled, and which leases it skips and why.
//!
//! The lease manager and the watcher write it through [`AgentStatus`]
//! (small hooks, one call per event); `/metrics` and `/healthz` read it; and
//! the agent keeps a copy in `--state-file` (JSON, [`StateSnapshot`]) so
//! that `node-agent status` can show it with the agent stopped. bpffs holds
//! no regular files, so the file lives under /run, next to flannel's.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Default of `--state-file` (`node-agent run` and `status`).
pub const DEFAULT_STATE_FILE: &str = "/run/weft/state.json";
/// The file is rewritten at most this often, however busy etcd is.
const WRITE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a weft state file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The etcd watch's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Started, first listing not yet watched from.
    Listing,
    /// Listed and watching: the peer table follows etcd.
    Watching,
    /// The watch failed; forwarding goes on with the last table while the
    /// agent reconnects and lists again.
    Lost,
}

impl SyncState {
    pub const ALL: [SyncState; 3] = [Self::Listing, Self::Watching, Self::Lost];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Listing => "listing",
            Self::Watching => "watching",
            Self::Lost => "lost",
        }
    }
}

/// Everything [`AgentStatus`] holds; the `--state-file` format. Times are
/// Unix seconds. Field names are stable; new ones may be added.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot {
    /// The agent's process id, to tell whether it still runs.
    pub pid: u32,
    pub version: String,
    pub started_at: u64,
    pub subnet: String,
    pub backend: String,
    /// When this node's subnet lease expires unless renewed; `None` for a
    /// reservation (no TTL) or before the first renewal check.
    pub lease_expires_at: Option<u64>,
    pub lease_reservation: bool,
    pub sync: SyncState,
    /// Since when the watch is in `sync`: for `lost` and `listing`, when
    /// the agent last stopped being in sync (or started).
    pub sync_since: u64,
    /// The last etcd event (watch response with events, or a listing).
    pub last_event_at: Option<u64>,
    /// Full reconciliations of the peer table with an etcd listing.
    pub reconciles: u64,
    /// Leases skipped now, by cause (see [`crate::peers::PeerError::cause`]).
    pub skipped_leases: BTreeMap<String, u64>,
}

impl StateSnapshot {
    /// Reads a state file; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> Result<Option<Self>, StateFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateFileError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateFileError::Parse {
                path: path.to_owned(),
                source,
            })
    }

    /// Whether the agent that wrote this still runs: its pid is alive and
    /// is a node-agent (pids are reused).
    pub fn agent_running(&self) -> bool {
        std::fs::read_link(format!("/proc/{}/exe", self.pid)).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("node-agent"))
        })
    }

    /// How long the agent has been out of sync with etcd at `now`.
    pub fn out_of_sync_for(&self, now: u64) -> Option<Duration> {
        (self.sync != SyncState::Watching)
            .then(|| Duration::from_secs(now.saturating_sub(self.sync_since)))
    }
}

/// Unix seconds of `t`.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Calls `f` on the status a subsystem reports to, if it has one (unit
/// tests build the watcher and lease manager without).
pub fn report(status: &Option<Arc<AgentStatus>>, f: impl FnOnce(&AgentStatus)) {
    if let Some(status) = status {
        f(status);
    }
}

/// The shared, live copy; cheap to update from any task.
#[derive(Debug)]
pub struct AgentStatus {
    state: Mutex<StateSnapshot>,
    changed: Notify,
}

impl AgentStatus {
    pub fn new(subnet: ipnet::Ipv4Net, backend: &str) -> Arc<Self> {
        let now = unix(SystemTime::now());
        Arc::new(Self {
            state: Mutex::new(StateSnapshot {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: now,
                subnet: subnet.to_string(),
                backend: backend.to_owned(),
                lease_expires_at: None,
                lease_reservation: false,
                sync: SyncState::Listing,
                sync_since: now,
                last_event_at: None,
                reconciles: 0,
                skipped_leases: BTreeMap::new(),
            }),
            changed: Notify::new(),
        })
    }

    fn update(&self, f: impl FnOnce(&mut StateSnapshot, u64)) {
        {
            // A panic while holding the lock leaves plain data behind.
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut s, unix(SystemTime::now()));
        }
        self.changed.notify_one();
    }

    pub fn snapshot(&self) -> StateSnapshot {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The lease has `ttl` left (after a renewal, or checked at start).
    pub fn lease_ttl(&self, ttl: Duration) {
        self.update(|s, now| s.lease_expires_at = Some(now + ttl.as_secs()));
    }

    /// The subnet is a reservation: it never expires.
    pub fn lease_reservation(&self) {
        self.update(|s, _| {
            s.lease_reservation = true;
            s.lease_expires_at = None;
        });
    }

    /// The watch is established: in sync from now on.
    pub fn watching(&self) {
        self.update(|s, now| {
            if s.sync != SyncState::Watching {
                s.sync = SyncState::Watching;
                s.sync_since = now;
            }
        });
    }

    /// The watch (or the listing before it) failed. An outage that was
    /// already going on keeps its start.
    pub fn lost(&self) {
        self.update(|s, now| {
            if s.sync == SyncState::Watching {
                s.sync_since = now;
            }
            s.sync = SyncState::Lost;
        });
    }

    /// A listing was reconciled into the peer table.
    pub fn reconciled(&self) {
        self.update(|s, now| {
            s.reconciles += 1;
            s.last_event_at = Some(now);
        });
    }

    /// A watch response carried events.
    pub fn event(&self) {
        self.update(|s, now| s.last_event_at = Some(now));
    }

    /// The leases skipped now, by cause. Reported after every watch
    /// response, so only a change wakes the file writer.
    pub fn skipped(&self, by_cause: BTreeMap<String, u64>) {
        let same = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .skipped_leases
            == by_cause;
        if !same {
            self.update(|s, _| s.skipped_leases = by_cause);
        }
    }

    /// Writes the state to `path` whenever it changes, at most once per
    /// [`WRITE_AT_MOST_EVERY`]. A failed write is logged once until a
    /// write works again; the agent does not depend on the file.
    pub async fn keep_written(self: Arc<Self>, path: PathBuf) {
        let mut failing = false;
        loop {
            let text = match serde_json::to_string_pretty(&self.snapshot()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode the agent state");
                    return std::future::pending().await;
                }
            };
            match crate::flannel::subnet_env::write_atomic(&path, &text) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the state file; `status` will not show lease and sync state");
                    failing = true;
                }
                Err(_) => {}
            }
            self.changed.notified().await;
            tokio::time::sleep(WRITE_AT_MOST_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_keeps_its_start_until_the_watch_is_back() {
        let status = AgentStatus::new("10.244.1.0/24".parse().expect("net"), "vxlan");
        let start = status.snapshot();
        assert_eq!(start.sync, SyncState::Listing);
        assert!(start.out_of_sync_for(start.sync_since + 7) == Some(Duration::from_secs(7)));
        status.watching();
        let watching = status.snapshot();
        assert_eq!(watching.sync, SyncState::Watching);
        assert_eq!(watching.out_of_sync_for(u64::MAX), None);
        status.lost();
        let lost = status.snapshot().sync_since;
        status.lost();
        assert_eq!(status.snapshot().sync_since, lost, "still the same outage");
        assert_eq!(status.snapshot().sync, SyncState::Lost);
        status.reconciled();
        status.reconciled();
        let s = status.snapshot();
        assert_eq!((s.reconciles, s.sync), (2, SyncState::Lost));
        assert!(s.last_event_at.is_some());
    }

    #[test]
    fn the_state_file_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        assert_eq!(StateSnapshot::read(&path).expect("read"), None);
        let status = AgentStatus::new("10.244.1.0/24".parse().expect("net"), "ipip");
        status.lease_ttl(Duration::from_secs(3600));
        status.skipped(BTreeMap::from([("vni".to_owned(), 2)]));
        let snap = status.snapshot();
        crate::flannel::subnet_env::write_atomic(
            &path,
            &serde_json::to_string(&snap).expect("json"),
        )
        .expect("write");
        let back = StateSnapshot::read(&path).expect("read").expect("some");
        assert_eq!(back, snap);
        let gone = StateSnapshot {
            pid: u32::MAX,
            ..back
        };
        assert!(!gone.agent_running(), "no such process");
        std::fs::write(&path, "{").expect("write");
        assert!(matches!(
            StateSnapshot::read(&path),
            Err(StateFileError::Parse { .. })
        ));
    }
}
