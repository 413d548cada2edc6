//! Follows every node's lease in etcd and keeps [`PeerTable`] (and so the
//! BPF map) equal to it.
//!
//! List, then watch from the listing's revision + 1, so no event falls in
//! between. On any watch failure (lost connection, compaction, cancel) the
//! loop backs off, lists again and reconciles, which removes entries whose
//! deletion it missed and adds what it missed. Events and relists apply one
//! rule (see [`PeerTable::reconcile`]), so both end at the same map.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{BuildHasher as _, Hasher as _},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, WatchOptions};
use ipnet::Ipv4Net;
use tokio::sync::watch;

use crate::{
    agent_state::{self, AgentStatus},
    flannel::{KeyLayout, LeaseAttrs},
    lease_manager::{Acquired, MAX_RECEIVE, Rejected, bounded, list_leases, parse_kv},
    peers::{Candidate, Change, PeerTable, Refusal, SubnetMap},
};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("watch canceled by etcd: {0}")]
    Canceled(String),
    #[error("watch start revision was compacted (oldest kept revision {0})")]
    Compacted(i64),
    #[error("watch stream ended")]
    Ended,
    #[error(
        "this node's lease for {0} was deleted from etcd (revoked); peers have dropped this node"
    )]
    Revoked(Ipv4Net),
    #[error(
        "lease lost: this node's subnet {subnet} is now leased by {holder}, not by this node \
         ({own}); peers now send its traffic there"
    )]
    TakenOver {
        subnet: Ipv4Net,
        holder: String,
        own: Ipv4Addr,
    },
}

impl WatchError {
    /// Whether the agent must stop: its subnet is no longer its own.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Revoked(_) | Self::TakenOver { .. })
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A watch must stay up this long before the backoff starts again from
/// its minimum: one that dies at once must not make every agent relist the
/// whole table every 200 ms.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff with jitter: each delay is drawn from the upper half
/// of the current step, so agents that lost etcd together do not come back
/// together.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            step: min,
        }
    }

    /// The next delay, using a fresh random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(random())
    }

    /// The next delay for the random draw `r`: in [step / 2, step].
    pub fn next_with(&mut self, r: u64) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        let jitter_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(r.checked_rem(jitter_ns.saturating_add(1)).unwrap_or(0))
    }

    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// Resets if the operation stayed healthy for `up` at least
    /// [`HEALTHY_AFTER`].
    pub fn healthy_for(&mut self, up: Duration) {
        if up >= HEALTHY_AFTER {
            self.reset();
        }
    }
}

/// A random number from the standard library's per-process random keys and
/// the clock: jitter needs no better.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// What has been logged about unusable keys, so each is logged once per
/// version of the key (its mod_revision) and reason, not once per relist.
/// It holds exactly the keys skipped now, so it also counts them by cause.
#[derive(Default)]
struct Reported(BTreeMap<String, (i64, String, &'static str)>);

/// The cause of a lease value that cannot be read at all.
const UNREADABLE: &str = "unreadable";

impl Reported {
    /// Whether `key` at `mod_revision` failing for `reason` is news.
    fn is_new(&mut self, key: &str, mod_revision: i64, reason: &str, cause: &'static str) -> bool {
        let entry = (mod_revision, reason.to_owned(), cause);
        if self.0.get(key) == Some(&entry) {
            return false;
        }
        self.0.insert(key.to_owned(), entry);
        true
    }

    /// The keys skipped now, by cause.
    fn by_cause(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (_, _, cause) in self.0.values() {
            *counts.entry((*cause).to_owned()).or_insert(0) += 1;
        }
        counts
    }

    fn forget(&mut self, key: &str) {
        self.0.remove(key);
    }

    /// After a relist: only keys still unusable are remembered.
    fn keep_only(&mut self, keys: &BTreeSet<String>) {
        self.0.retain(|k, _| keys.contains(k));
    }
}

pub struct PeerWatcher<M> {
    client: Client,
    keys: KeyLayout,
    table: PeerTable,
    map: M,
    own: Acquired,
    own_attrs: LeaseAttrs,
    /// Every known node's PublicIP, for the host networking's neighbour entries.
    peer_ips: watch::Sender<BTreeSet<Ipv4Addr>>,
    reported: Reported,
    status: Option<Arc<AgentStatus>>,
    /// systemd's READY status line, sent once the first relist has filled
    /// the peer map (`None` once sent, or when not asked for).
    ready: Option<String>,
}

impl<M: SubnetMap> PeerWatcher<M> {
    pub fn new(
        client: Client,
        keys: KeyLayout,
        table: PeerTable,
        map: M,
        own: Acquired,
        own_attrs: LeaseAttrs,
        peer_ips: watch::Sender<BTreeSet<Ipv4Addr>>,
    ) -> Self {
        Self {
            client,
            keys,
            table,
            map,
            own,
            own_attrs,
            peer_ips,
            reported: Reported::default(),
            status: None,
            ready: None,
        }
    }

    /// Sends systemd READY=1 with `status` after the first reconcile: only
    /// then is the node attached, routed and forwarding to every peer etcd
    /// knows, which is what a `Type=notify` unit's dependents wait for.
    pub fn with_ready_notice(mut self, status: String) -> Self {
        self.ready = Some(status);
        self
    }

    /// Reports sync state, reconciles and skipped leases to `status`.
    pub fn with_status(mut self, status: Arc<AgentStatus>) -> Self {
        self.status = Some(status);
        self
    }

    fn report_skipped(&self) {
        agent_state::report(&self.status, |s| s.skipped(self.reported.by_cause()));
    }

    /// Publishes the table's node addresses when they changed.
    fn publish_peer_ips(&self) {
        let now: BTreeSet<Ipv4Addr> = self.table.node_ips().collect();
        self.peer_ips.send_if_modified(|ips| {
            let changed = *ips != now;
            *ips = now;
            changed
        });
    }

    /// Runs until this node's own lease is revoked or taken over, which it
    /// returns, like flanneld, which shuts down then. Other errors are
    /// logged once per outage and retried with backoff.
    pub async fn run(mut self) -> WatchError {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut outage = false;
        loop {
            let mut watching_since = None;
            let err = self.sync_and_watch(&mut outage, &mut watching_since).await;
            if err.is_fatal() {
                return err;
            }
            agent_state::report(&self.status, AgentStatus::lost);
            if let Some(since) = watching_since {
                backoff.healthy_for(since.elapsed());
            }
            let delay = backoff.next_delay();
            if outage {
                tracing::debug!(error = %bounded(&err.to_string()), "etcd watch still failing");
            } else {
                tracing::warn!(error = %bounded(&err.to_string()), retry_in_ms = delay.as_millis() as u64, "etcd watch lost; forwarding continues with the current table, reconnecting with backoff");
                outage = true;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Lists and reconciles, then applies watch events until the watch
    /// fails. `watching_since` is set once the watch is established.
    async fn sync_and_watch(
        &mut self,
        outage: &mut bool,
        watching_since: &mut Option<Instant>,
    ) -> WatchError {
        let started = Instant::now();
        let listing = match list_leases(&mut self.client, &self.keys).await {
            Ok(l) => l,
            Err(e) => return e.into(),
        };
        let listed = started.elapsed();
        let own = self.own.subnet;
        if let Some(bad) = listing.rejected.iter().find(|r| r.subnet == Some(own)) {
            return self.taken_over(format!("an unreadable value ({})", bad.reason));
        }
        match listing.leases.iter().find(|l| l.subnet == own) {
            None => return WatchError::Revoked(own),
            Some(l) if l.attrs.public_ip != self.own_attrs.public_ip => {
                return self.taken_over(format!("node {}", l.attrs.public_ip));
            }
            Some(_) => {}
        }
        let leases: BTreeMap<Ipv4Net, Candidate> = listing
            .leases
            .iter()
            .map(|l| {
                (
                    l.subnet,
                    Candidate {
                        attrs: l.attrs.clone(),
                        create_revision: l.create_revision,
                        mod_revision: l.mod_revision,
                    },
                )
            })
            .collect();
        let report = self.table.reconcile(&mut self.map, leases);
        self.publish_peer_ips();
        let mut unusable = BTreeSet::new();
        for bad in &listing.rejected {
            unusable.insert(bad.key.clone());
            self.log_rejected(bad);
        }
        for refusal in &report.refused {
            unusable.insert(self.keys.subnet_key(refusal.subnet));
            self.log_refused(refusal);
        }
        self.reported.keep_only(&unusable);
        self.report_skipped();
        agent_state::report(&self.status, AgentStatus::reconciled);
        if let Some(ready) = self.ready.take() {
            crate::observe::notify_ready(&ready);
        }
        for e in &report.map_errors {
            tracing::error!(error = %e, "cannot update the peer map");
        }
        tracing::info!(
            revision = listing.revision,
            peers = self.table.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            refused = report.refused.len() + listing.rejected.len(),
            list_ms = listed.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "peer table reconciled with etcd"
        );
        if *outage {
            tracing::info!("etcd watch re-established");
            *outage = false;
        }

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(listing.revision + 1);
        let (_watcher, mut stream) = match self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RECEIVE)
            .watch(self.keys.subnets_prefix(), Some(opts))
            .await
        {
            Ok(w) => w,
            Err(e) => return e.into(),
        };
        *watching_since = Some(Instant::now());
        agent_state::report(&self.status, AgentStatus::watching);
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return WatchError::Ended,
                Err(e) => return e.into(),
            };
            if resp.compact_revision() > 0 {
                return WatchError::Compacted(resp.compact_revision());
            }
            if resp.canceled() {
                return WatchError::Canceled(bounded(resp.cancel_reason()));
            }
            if !resp.events().is_empty() {
                agent_state::report(&self.status, AgentStatus::event);
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let stop = match event.event_type() {
                    EventType::Put => self.on_put(
                        kv.key(),
                        kv.value(),
                        kv.create_revision(),
                        kv.mod_revision(),
                    ),
                    EventType::Delete => self.on_delete(kv.key()),
                };
                if let Some(stop) = stop {
                    return stop;
                }
                self.publish_peer_ips();
            }
            self.report_skipped();
        }
    }

    fn taken_over(&self, holder: String) -> WatchError {
        WatchError::TakenOver {
            subnet: self.own.subnet,
            holder,
            own: self.own_attrs.public_ip,
        }
    }

    fn log_rejected(&mut self, bad: &Rejected) {
        if self
            .reported
            .is_new(&bad.key, bad.mod_revision, &bad.reason, UNREADABLE)
        {
            tracing::error!(key = %bad.key, mod_revision = bad.mod_revision, error = %bad.reason, "skipping unusable lease");
        }
    }

    fn log_refused(&mut self, refusal: &Refusal) {
        let key = self.keys.subnet_key(refusal.subnet);
        let reason = bounded(&refusal.error.to_string());
        if self
            .reported
            .is_new(&key, refusal.mod_revision, &reason, refusal.error.cause())
        {
            tracing::error!(%key, mod_revision = refusal.mod_revision, error = %reason, "skipping lease");
        }
    }

    fn on_put(
        &mut self,
        key: &[u8],
        value: &[u8],
        create_revision: i64,
        mod_revision: i64,
    ) -> Option<WatchError> {
        let report = match parse_kv(&self.keys, key, value) {
            Ok((subnet, attrs)) if subnet == self.own.subnet => {
                return (attrs.public_ip != self.own_attrs.public_ip)
                    .then(|| self.taken_over(format!("node {}", attrs.public_ip)));
            }
            Ok((subnet, attrs)) => {
                self.reported.forget(&self.keys.subnet_key(subnet));
                self.table.put(
                    &mut self.map,
                    subnet,
                    Candidate {
                        attrs,
                        create_revision,
                        mod_revision,
                    },
                )
            }
            Err((subnet, reason)) => {
                if subnet == Some(self.own.subnet) {
                    return Some(self.taken_over(format!("an unreadable value ({reason})")));
                }
                self.log_rejected(&Rejected {
                    key: bounded(&String::from_utf8_lossy(key)),
                    subnet,
                    mod_revision,
                    reason,
                });
                // No relist would see a lease there: whatever entry the old
                // value had goes, and what it blocked is checked again.
                match subnet {
                    Some(s) => self.table.delete(&mut self.map, s),
                    None => return None,
                }
            }
        };
        self.log_event(report);
        None
    }

    fn on_delete(&mut self, key: &[u8]) -> Option<WatchError> {
        let key = String::from_utf8_lossy(key);
        let subnet = match self.keys.parse_subnet_key(&key) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %bounded(&e.to_string()), "ignoring deletion of a non-lease key");
                self.reported.forget(&bounded(&key));
                return None;
            }
        };
        if subnet == self.own.subnet {
            return Some(WatchError::Revoked(subnet));
        }
        self.reported.forget(&bounded(&key));
        let report = self.table.delete(&mut self.map, subnet);
        self.log_event(report);
        None
    }

    fn log_event(&mut self, report: crate::peers::EventReport) {
        for (subnet, change) in &report.changes {
            let ip = self.table.get(*subnet).map(|n| Ipv4Addr::from(n.public_ip));
            match (change, ip) {
                (Change::Added, Some(ip)) => tracing::info!(%subnet, public_ip = %ip, "peer added"),
                (Change::Updated, Some(ip)) => {
                    tracing::info!(%subnet, public_ip = %ip, "peer updated")
                }
                (Change::Removed, _) => tracing::info!(%subnet, "peer removed"),
                _ => {}
            }
        }
        for refusal in &report.refused {
            self.log_refused(refusal);
        }
        for e in &report.map_errors {
            tracing::error!(error = %e, "cannot update the peer map");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets_only_after_a_healthy_watch() {
        let mut b = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let lows: Vec<Duration> = (0..10).map(|_| b.next_with(0)).collect();
        assert_eq!(lows[0], BACKOFF_MIN / 2);
        assert_eq!(lows[1], BACKOFF_MIN);
        assert_eq!(*lows.last().unwrap_or(&Duration::ZERO), BACKOFF_MAX / 2);
        let mut b = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        assert_eq!(
            b.next_with(u64::MAX - 1),
            BACKOFF_MIN / 2 + Duration::from_nanos((u64::MAX - 1) % 100_000_001)
        );
        // Draws spread over [step/2, step].
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let d = Backoff::new(BACKOFF_MIN, BACKOFF_MAX).next_delay();
            assert!(d >= BACKOFF_MIN / 2 && d <= BACKOFF_MIN, "{d:?}");
            seen.insert(d);
        }
        assert!(seen.len() > 10, "no jitter: {seen:?}");
        // A watch that dies at once does not reset the backoff.
        let mut b = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        for _ in 0..5 {
            b.next_with(0);
        }
        b.healthy_for(Duration::from_millis(50));
        assert_eq!(b.next_with(0), BACKOFF_MIN * 32 / 2);
        b.healthy_for(HEALTHY_AFTER);
        assert_eq!(b.next_with(0), BACKOFF_MIN / 2);
    }

    #[test]
    fn an_unusable_key_is_reported_once_per_version() {
        let mut r = Reported::default();
        assert!(r.is_new("k", 5, "bad", UNREADABLE));
        assert!(
            !r.is_new("k", 5, "bad", UNREADABLE),
            "same version, same reason"
        );
        assert!(r.is_new("k", 6, "bad", UNREADABLE), "a new version");
        assert!(
            r.is_new("k", 6, "overlaps x", "overlaps_peer"),
            "a new reason"
        );
        assert!(r.is_new("j", 1, "vni 2", "vni_mismatch"));
        assert_eq!(
            r.by_cause(),
            BTreeMap::from([
                ("overlaps_peer".to_owned(), 1),
                ("vni_mismatch".to_owned(), 1)
            ])
        );
        r.keep_only(&BTreeSet::new());
        assert!(r.by_cause().is_empty());
        assert!(
            r.is_new("k", 6, "overlaps x", "overlaps_peer"),
            "fixed, then broken again"
        );
    }
}
