//! This node's subnet lease in etcd, in flannel's layout: a key
//! `<prefix>/subnets/<net>-<len>` attached to an etcd lease with a 24 h TTL,
//! created only if absent and renewed long before it expires.

use std::{net::Ipv4Addr, time::Duration};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;

use crate::flannel::{AllocError, KeyLayout, LeaseAttrs, NetworkConfig, Reuse, choose_subnet};

/// flannel's subnet lease TTL.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Renewal period: 23 renewals fit in one TTL, so a node survives a long
/// etcd outage without losing its subnet.
pub const RENEW_EVERY: Duration = Duration::from_secs(3600);
/// Attempts before giving up on a contended allocation.
const ACQUIRE_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("lost the race for a subnet {0} times in a row; is another agent using PublicIP {1}?")]
    Contended(usize, Ipv4Addr),
    #[error("etcd lease {0:x} expired and subnet {1} is now leased by another node")]
    Lost(i64, Ipv4Net),
}

/// A lease listed from etcd: the subnet, its value, and the etcd metadata
/// needed for compare-and-swap.
#[derive(Clone, Debug)]
pub struct ListedLease {
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    pub mod_revision: i64,
    /// Revision that created the key: older leases win overlaps.
    pub create_revision: i64,
    pub etcd_lease: i64,
}

/// A full listing of `<prefix>/subnets/` at one revision, oldest lease first.
pub struct Listing {
    pub revision: i64,
    pub leases: Vec<ListedLease>,
    /// Keys or values that could not be parsed, with the reason.
    pub malformed: Vec<String>,
}

/// Leases per range request. etcd-client (tonic) refuses responses over
/// 4 MiB; a flannel lease value is ~150 bytes, so 5,000 per page stays far
/// below that even for 100,000-node networks.
const LIST_PAGE: i64 = 5_000;

/// Lists every lease, page by page, all pages at the revision of the first,
/// so the listing is one consistent snapshot a watch can continue from.
pub async fn list_leases(
    client: &mut Client,
    keys: &KeyLayout,
) -> Result<Listing, etcd_client::Error> {
    let prefix = keys.subnets_prefix();
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.into_bytes();
    let mut revision = 0;
    let mut leases = Vec::new();
    let mut malformed = Vec::new();
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if revision != 0 {
            opts = opts.with_revision(revision);
        }
        let resp = client.get(start.clone(), Some(opts)).await?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        }
        for kv in resp.kvs() {
            match parse_kv(keys, kv.key(), kv.value()) {
                Ok((subnet, attrs)) => leases.push(ListedLease {
                    subnet,
                    attrs,
                    mod_revision: kv.mod_revision(),
                    create_revision: kv.create_revision(),
                    etcd_lease: kv.lease(),
                }),
                Err(e) => malformed.push(e),
            }
        }
        // Ranges come back in key order; the next page starts just after
        // the last key.
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    leases.sort_by_key(|l| l.create_revision);
    Ok(Listing {
        revision,
        leases,
        malformed,
    })
}

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's "prefix end": the prefix with its last byte incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

/// Parses one subnet key and its value; the error names both.
pub fn parse_kv(
    keys: &KeyLayout,
    key: &[u8],
    value: &[u8],
) -> Result<(Ipv4Net, LeaseAttrs), String> {
    let key = String::from_utf8_lossy(key);
    let subnet = keys.parse_subnet_key(&key).map_err(|e| e.to_string())?;
    let value =
        std::str::from_utf8(value).map_err(|e| format!("{key}: value is not UTF-8: {e}"))?;
    let attrs = LeaseAttrs::parse(value).map_err(|e| format!("{key}: {e}"))?;
    Ok((subnet, attrs))
}

/// The lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub subnet: Ipv4Net,
    pub etcd_lease: i64,
    pub how: &'static str,
}

pub struct LeaseManager {
    client: Client,
    keys: KeyLayout,
    attrs: LeaseAttrs,
}

impl LeaseManager {
    pub fn new(client: Client, keys: KeyLayout, attrs: LeaseAttrs) -> Self {
        Self {
            client,
            keys,
            attrs,
        }
    }

    /// Leases a subnet, preferring (1) a lease already carrying this node's
    /// PublicIP, (2) the subnet named in the existing subnet file, (3) a free
    /// one, like flanneld. Every write is a transaction that only succeeds if
    /// the key is unchanged since we looked, so racing nodes never share one.
    pub async fn acquire(
        &mut self,
        cfg: &NetworkConfig,
        subnet_file: Option<Ipv4Net>,
    ) -> Result<Acquired, LeaseError> {
        let me = self.attrs.public_ip;
        let value = self.attrs.to_json();
        for attempt in 0..ACQUIRE_ATTEMPTS {
            let listing = list_leases(&mut self.client, &self.keys).await?;
            for bad in &listing.malformed {
                tracing::warn!(error = %bad, "skipping malformed lease");
            }
            let pairs: Vec<(Ipv4Net, LeaseAttrs)> = listing
                .leases
                .iter()
                .map(|l| (l.subnet, l.attrs.clone()))
                .collect();
            let seed = u64::from(u32::from(me))
                ^ u64::from(std::process::id())
                ^ (attempt as u64 * 0x9e37_79b9);
            let choice = choose_subnet(cfg, &pairs, me, subnet_file, seed)?;
            let subnet = choice.subnet();
            let key = self.keys.subnet_key(subnet);

            // Stale leases of ours for other subnets (e.g. after a config
            // change) would blackhole traffic sent to them: drop them, as
            // flannel does.
            for old in listing
                .leases
                .iter()
                .filter(|l| l.attrs.public_ip == me && l.subnet != subnet)
            {
                tracing::info!(subnet = %old.subnet, "deleting this node's stale lease");
                let _ = self
                    .client
                    .delete(self.keys.subnet_key(old.subnet), None)
                    .await?;
            }

            let (condition, etcd_lease, how) = match choice {
                Reuse::OwnLease(_) => {
                    let existing = listing.leases.iter().find(|l| l.subnet == subnet);
                    let mod_rev = existing.map(|l| l.mod_revision).unwrap_or_default();
                    // Keep the etcd lease the key already has if it is still
                    // alive: the restart then changes nothing in etcd.
                    let alive = match existing.map(|l| l.etcd_lease).filter(|&id| id != 0) {
                        Some(id) => self.ttl_left(id).await?.map(|_| id),
                        None => None,
                    };
                    let id = match alive {
                        Some(id) => id,
                        None => self.grant().await?,
                    };
                    (
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_rev),
                        id,
                        "kept its lease",
                    )
                }
                Reuse::FromSubnetFile(_) => (
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    self.grant().await?,
                    "reused the subnet file's subnet",
                ),
                Reuse::Fresh(_) => (
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    self.grant().await?,
                    "leased a free subnet",
                ),
            };
            let txn = Txn::new().when([condition]).and_then([TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(etcd_lease)),
            )]);
            if self.client.txn(txn).await?.succeeded() {
                return Ok(Acquired {
                    subnet,
                    etcd_lease,
                    how,
                });
            }
            tracing::info!(%subnet, attempt, "subnet taken concurrently, retrying");
            if !matches!(choice, Reuse::OwnLease(_)) {
                let _ = self.client.lease_revoke(etcd_lease).await;
            }
        }
        Err(LeaseError::Contended(ACQUIRE_ATTEMPTS, me))
    }

    async fn grant(&mut self) -> Result<i64, LeaseError> {
        Ok(self
            .client
            .lease_grant(LEASE_TTL.as_secs() as i64, None)
            .await?
            .id())
    }

    /// Seconds left on an etcd lease, or `None` if it is gone.
    async fn ttl_left(&mut self, id: i64) -> Result<Option<i64>, LeaseError> {
        let ttl = self.client.lease_time_to_live(id, None).await?.ttl();
        Ok((ttl > 0).then_some(ttl))
    }

    /// Renews the lease forever. If it expired anyway (etcd unreachable for a
    /// whole TTL), the key is put back under a new lease, provided no other
    /// node took the subnet meanwhile. Transient etcd errors are retried.
    pub async fn keep_renewed(mut self, mut held: Acquired) -> Result<(), LeaseError> {
        let mut failing = false;
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.renew_once(&mut held).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(subnet = %held.subnet, "lease renewal works again");
                    }
                    failing = false;
                }
                Err(LeaseError::Etcd(e)) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot renew the subnet lease; retrying every hour");
                    }
                    failing = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn renew_once(&mut self, held: &mut Acquired) -> Result<(), LeaseError> {
        let (mut keeper, mut responses) = self.client.lease_keep_alive(held.etcd_lease).await?;
        keeper.keep_alive().await?;
        let ttl = responses.message().await?.map(|r| r.ttl()).unwrap_or(0);
        if ttl > 0 {
            tracing::debug!(ttl, "subnet lease renewed");
            return Ok(());
        }
        let key = self.keys.subnet_key(held.subnet);
        let id = self.grant().await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                self.attrs.to_json(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        if self.client.txn(txn).await?.succeeded() {
            tracing::warn!(subnet = %held.subnet, "subnet lease had expired; re-leased it");
            held.etcd_lease = id;
            Ok(())
        } else {
            Err(LeaseError::Lost(held.etcd_lease, held.subnet))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(
            prefix_end(b"/coreos.com/network/subnets/"),
            b"/coreos.com/network/subnets0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
