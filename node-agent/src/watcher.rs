//! Follows every node's lease in etcd and keeps [`PeerTable`] (and so the
//! BPF map) equal to it.
//!
//! List, then watch from the listing's revision + 1, so no event falls in
//! between. On any watch failure (lost connection, compaction, cancel) the
//! loop backs off, lists again and reconciles, which removes entries whose
//! deletion it missed and adds what it missed.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use etcd_client::{Client, EventType, WatchOptions};
use tokio::sync::watch;

use crate::{
    flannel::{KeyLayout, LeaseAttrs},
    lease_manager::{Acquired, list_leases, parse_kv},
    peers::{Change, PeerTable, SubnetMap},
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
    Revoked(ipnet::Ipv4Net),
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct PeerWatcher<M> {
    client: Client,
    keys: KeyLayout,
    table: PeerTable,
    map: M,
    own: Acquired,
    own_attrs: LeaseAttrs,
    /// Every known node's PublicIP, for the host networking's neighbour entries.
    peer_ips: watch::Sender<BTreeSet<Ipv4Addr>>,
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
        }
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

    /// Runs until this node's own lease is revoked, which it returns, like
    /// flanneld, which shuts down then. Other errors are logged once per
    /// outage and retried.
    pub async fn run(mut self) -> WatchError {
        let mut backoff = BACKOFF_MIN;
        let mut outage = false;
        loop {
            let err = self.sync_and_watch(&mut outage, &mut backoff).await;
            if matches!(err, WatchError::Revoked(_)) {
                return err;
            }
            if outage {
                tracing::debug!(error = %err, "etcd watch still failing");
            } else {
                tracing::warn!(error = %err, "etcd watch lost; forwarding continues with the current table, reconnecting with backoff");
                outage = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Lists and reconciles, then applies watch events until the watch fails.
    async fn sync_and_watch(&mut self, outage: &mut bool, backoff: &mut Duration) -> WatchError {
        let listing = match list_leases(&mut self.client, &self.keys).await {
            Ok(l) => l,
            Err(e) => return e.into(),
        };
        for bad in &listing.malformed {
            tracing::error!(error = %bad, "skipping malformed lease");
        }
        let pairs: Vec<_> = listing
            .leases
            .iter()
            .map(|l| (l.subnet, l.attrs.clone()))
            .collect();
        if !pairs.iter().any(|(s, _)| *s == self.own.subnet) {
            return WatchError::Revoked(self.own.subnet);
        }
        let report = self.table.reconcile(&mut self.map, &pairs);
        self.publish_peer_ips();
        for e in &report.skipped {
            tracing::error!(error = %e, "skipping lease");
        }
        tracing::info!(
            revision = listing.revision,
            peers = self.table.len(),
            added = report.added,
            updated = report.updated,
            removed = report.removed,
            skipped = report.skipped.len(),
            "peer table reconciled with etcd"
        );
        if *outage {
            tracing::info!("etcd watch re-established");
            *outage = false;
        }
        *backoff = BACKOFF_MIN;

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(listing.revision + 1);
        let (_watcher, mut stream) = match self
            .client
            .watch(self.keys.subnets_prefix(), Some(opts))
            .await
        {
            Ok(w) => w,
            Err(e) => return e.into(),
        };
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
                return WatchError::Canceled(resp.cancel_reason().to_owned());
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        self.on_put(kv.key(), kv.value());
                        self.publish_peer_ips();
                    }
                    EventType::Delete => {
                        if let Some(revoked) = self.on_delete(kv.key()) {
                            return revoked;
                        }
                        self.publish_peer_ips();
                    }
                }
            }
        }
    }

    fn on_put(&mut self, key: &[u8], value: &[u8]) {
        let (subnet, attrs) = match parse_kv(&self.keys, key, value) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(error = %e, "skipping malformed lease");
                return;
            }
        };
        if self.table.is_local(subnet) {
            if attrs.public_ip != self.own_attrs.public_ip {
                tracing::error!(%subnet, public_ip = %attrs.public_ip, "this node's subnet was overwritten by another node");
            }
            return;
        }
        match self.table.upsert(&mut self.map, subnet, &attrs) {
            Ok(Change::Added) => {
                tracing::info!(%subnet, public_ip = %attrs.public_ip, "peer added")
            }
            Ok(Change::Updated) => {
                tracing::info!(%subnet, public_ip = %attrs.public_ip, "peer updated")
            }
            Ok(Change::Unchanged) => {}
            Err(e) => tracing::error!(error = %e, "skipping lease"),
        }
    }

    fn on_delete(&mut self, key: &[u8]) -> Option<WatchError> {
        let key = String::from_utf8_lossy(key);
        let subnet = match self.keys.parse_subnet_key(&key) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring deletion of a non-lease key");
                return None;
            }
        };
        if self.table.is_local(subnet) {
            return Some(WatchError::Revoked(subnet));
        }
        match self.table.remove(&mut self.map, subnet) {
            Ok(true) => tracing::info!(%subnet, "peer removed"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot remove peer"),
        }
        None
    }
}
