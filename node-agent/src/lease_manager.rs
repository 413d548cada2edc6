//! This node's subnet lease in etcd, in flannel's layout: a key
//! `<prefix>/subnets/<net>-<len>` attached to an etcd lease with a 24 h TTL,
//! created only if absent and renewed long before it expires.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use ipnet::Ipv4Net;

use crate::agent_state::{self, AgentStatus};
use crate::flannel::{AllocError, KeyLayout, LeaseAttrs, NetworkConfig, Reuse, choose_subnet};

/// flannel's subnet lease TTL.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Renewal period: 23 renewals fit in one TTL, so a node survives a long
/// etcd outage without losing its subnet.
pub const RENEW_EVERY: Duration = Duration::from_secs(3600);
/// A failed renewal is retried after this, doubling up to
/// [`RENEW_RETRY_MAX`], with jitter: within minutes, not an hour later.
const RENEW_RETRY_MIN: Duration = Duration::from_secs(5);
const RENEW_RETRY_MAX: Duration = Duration::from_secs(120);
/// Attempts before giving up on a contended allocation.
const ACQUIRE_ATTEMPTS: usize = 16;

/// The largest lease value the agent reads. flannel's values are ~150
/// bytes (a dual-stack one a few hundred); 64 KiB leaves room for any
/// backend data while one value over it, skipped with one log line, can
/// never hold up the others.
pub const MAX_LEASE_VALUE: usize = 64 * 1024;
/// The largest response the client accepts: flannel's Go client allows
/// `math.MaxInt32` bytes. etcd-client's default of 4 MiB let three values of
/// etcd's maximum size (1.5 MiB) on one page stop every agent from listing.
pub const MAX_RECEIVE: usize = i32::MAX as usize;
/// Longest text of a key or an error that goes into one log line.
pub const MAX_LOGGED: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("lost the race for a subnet {0} times in a row; is another agent using PublicIP {1}?")]
    Contended(usize, Ipv4Addr),
    #[error(
        "lease lost: etcd lease {0:x} of subnet {1} expired or was replaced, and the subnet is \
         now leased by {2}"
    )]
    Lost(i64, Ipv4Net, String),
}

/// A lease listed from etcd: the subnet, its value, and the etcd metadata
/// needed for compare-and-swap.
#[derive(Clone, Debug)]
pub struct ListedLease {
    /// The key as etcd holds it: `10.244.5.0-24`, or on a dual-stack
    /// flannel node `10.244.5.0-24&fd00::-64`. Writes to this lease go to
    /// this key, never one rebuilt from `subnet`.
    pub key: String,
    pub subnet: Ipv4Net,
    pub attrs: LeaseAttrs,
    pub mod_revision: i64,
    /// Revision that created the key: older leases win overlaps.
    pub create_revision: i64,
    /// 0 for a reservation: a key written without an etcd lease, which
    /// flannel treats as permanent.
    pub etcd_lease: i64,
}

/// A key under `<prefix>/subnets/` that is no lease the agent can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// The key, shortened to [`MAX_LOGGED`] for logging.
    pub key: String,
    /// The subnet, if the key names one.
    pub subnet: Option<Ipv4Net>,
    pub mod_revision: i64,
    /// Why, shortened to [`MAX_LOGGED`]; never the whole value.
    pub reason: String,
}

/// A full listing of `<prefix>/subnets/` at one revision, oldest lease first.
pub struct Listing {
    pub revision: i64,
    pub leases: Vec<ListedLease>,
    /// Keys or values that could not be used, with the reason.
    pub rejected: Vec<Rejected>,
}

/// Leases per range request: 20,000 flannel values are about 4 MiB. A page
/// that is too large anyway (values near etcd's 1.5 MiB request limit) is
/// asked for again in halves.
const LIST_PAGE: i64 = 20_000;

/// Lists every lease, page by page, all pages at the revision of the first,
/// so the listing is one consistent snapshot a watch can continue from.
pub async fn list_leases(
    client: &mut Client,
    keys: &KeyLayout,
) -> Result<Listing, etcd_client::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_RECEIVE);
    let prefix = keys.subnets_prefix();
    let end = prefix_end(prefix.as_bytes());
    let mut start = prefix.into_bytes();
    let mut revision = 0;
    let mut page = LIST_PAGE;
    let mut leases = Vec::new();
    let mut rejected = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
        if revision != 0 {
            opts = opts.with_revision(revision);
        }
        let resp = match kv.get(start.clone(), Some(opts)).await {
            Ok(r) => r,
            Err(etcd_client::Error::GRpcStatus(s))
                if page > 1
                    && matches!(
                        s.code(),
                        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                    ) =>
            {
                page = (page / 2).max(1);
                tracing::debug!(page, "lease page too large; asking for fewer");
                continue;
            }
            Err(e) => return Err(e),
        };
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        }
        for kv in resp.kvs() {
            match parse_kv(keys, kv.key(), kv.value()) {
                Ok((subnet, attrs)) => leases.push(ListedLease {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    subnet,
                    attrs,
                    mod_revision: kv.mod_revision(),
                    create_revision: kv.create_revision(),
                    etcd_lease: kv.lease(),
                }),
                Err((subnet, reason)) => rejected.push(Rejected {
                    key: bounded(&String::from_utf8_lossy(kv.key())),
                    subnet,
                    mod_revision: kv.mod_revision(),
                    reason,
                }),
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
        rejected,
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

/// `text` cut to [`MAX_LOGGED`] bytes (on a character boundary), saying how
/// long it was: keys and values come from anyone who can write to etcd.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_LOGGED {
        return text.to_owned();
    }
    let mut cut = MAX_LOGGED;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}... ({} bytes)", &text[..cut], text.len())
}

/// Parses one subnet key and its value. The error carries the subnet when
/// the key names one, and says why in at most [`MAX_LOGGED`] bytes. A
/// dual-stack key whose IPv6 half is malformed still names its IPv4
/// subnet (flannel's own key parser reads that half alone), so that subnet
/// stays taken like the subnet of any other unusable lease.
pub fn parse_kv(
    keys: &KeyLayout,
    key: &[u8],
    value: &[u8],
) -> Result<(Ipv4Net, LeaseAttrs), (Option<Ipv4Net>, String)> {
    let key = String::from_utf8_lossy(key);
    let subnet = keys.parse_subnet_key(&key).map_err(|e| {
        let ipv4_half = key
            .split_once('&')
            .and_then(|(ipv4, _)| keys.parse_subnet_key(ipv4).ok());
        (ipv4_half, bounded(&e.to_string()))
    })?;
    let fail = |why: String| (Some(subnet), bounded(&why));
    if value.len() > MAX_LEASE_VALUE {
        return Err(fail(format!(
            "value of {} bytes is over the {MAX_LEASE_VALUE}-byte limit for a lease; skipped",
            value.len()
        )));
    }
    let value = std::str::from_utf8(value).map_err(|e| fail(format!("value is not UTF-8: {e}")))?;
    let attrs = LeaseAttrs::parse(value).map_err(|e| fail(e.to_string()))?;
    Ok((subnet, attrs))
}

/// When to renew a lease with `ttl_left`: at once if more than one renewal
/// period has passed since it was granted or renewed (a kept lease after a
/// restart, one somebody re-granted shorter), else when that period is up.
pub fn renew_delay(ttl_left: Duration) -> Duration {
    ttl_left
        .saturating_sub(LEASE_TTL.saturating_sub(RENEW_EVERY))
        .min(RENEW_EVERY)
}

/// The lease this node holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acquired {
    /// The etcd key holding the lease (see [`ListedLease::key`]).
    pub key: String,
    pub subnet: Ipv4Net,
    /// 0 for a reservation, which is never renewed.
    pub etcd_lease: i64,
    pub how: &'static str,
}

pub struct LeaseManager {
    client: Client,
    keys: KeyLayout,
    attrs: LeaseAttrs,
    status: Option<Arc<AgentStatus>>,
}

impl LeaseManager {
    pub fn new(client: Client, keys: KeyLayout, attrs: LeaseAttrs) -> Self {
        Self {
            client,
            keys,
            attrs,
            status: None,
        }
    }

    /// Reports the lease's expiry to `status` as renewals learn it.
    pub fn with_status(mut self, status: Arc<AgentStatus>) -> Self {
        self.status = Some(status);
        self
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
            // The watcher names each one once; here they only count.
            for bad in &listing.rejected {
                tracing::debug!(key = %bad.key, error = %bad.reason, "skipping unusable lease");
            }
            let pairs: Vec<(Ipv4Net, LeaseAttrs)> = listing
                .leases
                .iter()
                .map(|l| (l.subnet, l.attrs.clone()))
                .collect();
            // A key whose value cannot be read still holds its subnet: a
            // node wrote it, and handing the subnet out again would lease
            // it twice.
            let unusable: Vec<Ipv4Net> = listing.rejected.iter().filter_map(|r| r.subnet).collect();
            let seed = u64::from(u32::from(me))
                ^ u64::from(std::process::id())
                ^ (attempt as u64 * 0x9e37_79b9);
            let choice = choose_subnet(cfg, &pairs, &unusable, me, subnet_file, seed)?;
            let subnet = choice.subnet();
            // Our own lease keeps the key it has (a dual-stack flannel key
            // names the IPv6 subnet too); a new one gets flannel's IPv4 key.
            let own = listing
                .leases
                .iter()
                .find(|l| l.subnet == subnet && l.attrs.public_ip == me)
                .filter(|_| matches!(choice, Reuse::OwnLease(_)));
            let key = own.map_or_else(|| self.keys.subnet_key(subnet), |l| l.key.clone());

            // Stale leases of ours for other subnets (e.g. after a config
            // change) would blackhole traffic sent to them: drop them, as
            // flannel does, but only the version we saw, so a key another
            // node has taken over since is left alone. Reservations are
            // permanent by definition and stay.
            for old in listing
                .leases
                .iter()
                .filter(|l| l.attrs.public_ip == me && l.subnet != subnet && l.etcd_lease != 0)
            {
                let old_key = old.key.as_str();
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        old_key,
                        CompareOp::Equal,
                        old.mod_revision,
                    )])
                    .and_then([TxnOp::delete(old_key, None)]);
                if self.client.txn(txn).await?.succeeded() {
                    tracing::info!(subnet = %old.subnet, "deleted this node's stale lease");
                } else {
                    tracing::info!(subnet = %old.subnet, "this node's stale lease changed meanwhile; left alone");
                }
            }

            let (condition, etcd_lease, how) = match choice {
                Reuse::OwnLease(_) => {
                    let existing = own;
                    let mod_rev = existing.map(|l| l.mod_revision).unwrap_or_default();
                    match existing {
                        // A reservation: used as it is, never given a TTL.
                        // Only a changed value is written (flannel updates
                        // it, still without a lease).
                        Some(l) if l.etcd_lease == 0 => {
                            if l.attrs == self.attrs {
                                return Ok(Acquired {
                                    key,
                                    subnet,
                                    etcd_lease: 0,
                                    how: "uses its reservation",
                                });
                            }
                            (
                                Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_rev),
                                0,
                                "uses its reservation",
                            )
                        }
                        _ => {
                            // Keep the etcd lease the key already has if it
                            // is still alive: the restart then changes
                            // nothing in etcd. One with little time left is
                            // renewed at once by keep_renewed.
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
                    }
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
            let put_opts = (etcd_lease != 0).then(|| PutOptions::new().with_lease(etcd_lease));
            let txn = Txn::new().when([condition]).and_then([TxnOp::put(
                key.as_str(),
                value.as_str(),
                put_opts,
            )]);
            if self.client.txn(txn).await?.succeeded() {
                return Ok(Acquired {
                    key,
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

    /// Replaces the attributes this node publishes in its held lease (a
    /// node taken over from flanneld gets weft's VtepMAC), under the etcd
    /// lease it already has; renewals write them from now on. Conditional
    /// on the key being unchanged since read, and still this node's.
    pub async fn publish(&mut self, held: &Acquired, attrs: LeaseAttrs) -> Result<(), LeaseError> {
        self.attrs = attrs;
        let key = self.keys.subnet_key(held.subnet);
        let resp = self.client.get(key.as_str(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(LeaseError::Lost(
                held.etcd_lease,
                held.subnet,
                "nobody (deleted)".to_owned(),
            ));
        };
        match parse_kv(&self.keys, kv.key(), kv.value()) {
            Ok((_, a)) if a.public_ip == self.attrs.public_ip => {}
            Ok((_, a)) => {
                return Err(LeaseError::Lost(
                    held.etcd_lease,
                    held.subnet,
                    format!("node {}", a.public_ip),
                ));
            }
            Err((_, why)) => {
                return Err(LeaseError::Lost(
                    held.etcd_lease,
                    held.subnet,
                    format!("an unreadable value ({why})"),
                ));
            }
        }
        let opts = (kv.lease() != 0).then(|| PutOptions::new().with_lease(kv.lease()));
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(key.as_str(), self.attrs.to_json(), opts)]);
        if self.client.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(LeaseError::Etcd(etcd_client::Error::InvalidArgs(
                "subnet key changed while publishing".to_owned(),
            )))
        }
    }

    async fn grant(&mut self) -> Result<i64, LeaseError> {
        Ok(self
            .client
            .lease_grant(LEASE_TTL.as_secs() as i64, None)
            .await?
            .id())
    }

    /// Time left on an etcd lease, or `None` if it is gone.
    async fn ttl_left(&mut self, id: i64) -> Result<Option<Duration>, LeaseError> {
        let ttl = self.client.lease_time_to_live(id, None).await?.ttl();
        Ok(u64::try_from(ttl)
            .ok()
            .filter(|&t| t > 0)
            .map(Duration::from_secs))
    }

    /// Renews the lease forever, one period after the last renewal, and at
    /// once when it has less time left than that (a kept lease after a
    /// restart). A failed renewal is retried within minutes, with jitter.
    /// If the lease expired anyway (etcd unreachable for a whole TTL), the
    /// key is put back under a new lease, provided no other node took the
    /// subnet meanwhile; if one did, the lease is lost and this returns.
    /// A reservation has nothing to renew.
    pub async fn keep_renewed(mut self, mut held: Acquired) -> Result<(), LeaseError> {
        if held.etcd_lease == 0 {
            agent_state::report(&self.status, AgentStatus::lease_reservation);
            tracing::info!(subnet = %held.subnet, "subnet is a reservation (no TTL); nothing to renew");
            return std::future::pending().await;
        }
        let mut retry = crate::watcher::Backoff::new(RENEW_RETRY_MIN, RENEW_RETRY_MAX);
        let mut failing = false;
        let mut delay = match self.ttl_left(held.etcd_lease).await {
            Ok(Some(ttl)) => {
                agent_state::report(&self.status, |s| s.lease_ttl(ttl));
                let delay = renew_delay(ttl);
                if delay.is_zero() {
                    tracing::info!(subnet = %held.subnet, ttl_secs = ttl.as_secs(), "kept subnet lease is due for renewal; renewing now");
                }
                delay
            }
            Ok(None) | Err(_) => Duration::ZERO,
        };
        loop {
            tokio::time::sleep(delay).await;
            match self.renew_once(&mut held).await {
                Ok(ttl) => {
                    agent_state::report(&self.status, |s| s.lease_ttl(ttl));
                    if failing {
                        tracing::info!(subnet = %held.subnet, "lease renewal works again");
                    }
                    failing = false;
                    retry.reset();
                    delay = renew_delay(ttl).max(Duration::from_secs(1));
                }
                Err(LeaseError::Etcd(e)) => {
                    delay = retry.next_delay();
                    if !failing {
                        tracing::warn!(error = %bounded(&e.to_string()), retry_in_secs = delay.as_secs(), "cannot renew the subnet lease; retrying with backoff");
                    }
                    failing = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One renewal; returns the time the lease has left after it.
    async fn renew_once(&mut self, held: &mut Acquired) -> Result<Duration, LeaseError> {
        let (mut keeper, mut responses) = self.client.lease_keep_alive(held.etcd_lease).await?;
        keeper.keep_alive().await?;
        let ttl = responses.message().await?.map(|r| r.ttl()).unwrap_or(0);
        let ttl = Duration::from_secs(u64::try_from(ttl).unwrap_or(0));
        // A keep-alive restores the TTL the lease was granted with; one
        // granted for less than a renewal period (not by this agent) is
        // replaced by a full one.
        if ttl > LEASE_TTL.saturating_sub(RENEW_EVERY) {
            tracing::debug!(ttl_secs = ttl.as_secs(), "subnet lease renewed");
            return Ok(ttl);
        }
        self.reattach(held).await?;
        Ok(LEASE_TTL)
    }

    /// Puts this node's key under a new 24 h lease: its lease expired, or
    /// was granted too short. Every write is conditional on what was read.
    async fn reattach(&mut self, held: &mut Acquired) -> Result<(), LeaseError> {
        let key = held.key.clone();
        let resp = self.client.get(key.as_str(), None).await?;
        let current = resp.kvs().first();
        let condition = match current {
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            Some(kv) => {
                let owner =
                    parse_kv(&self.keys, kv.key(), kv.value()).map(|(_, attrs)| attrs.public_ip);
                match owner {
                    Ok(ip) if ip == self.attrs.public_ip => {}
                    Ok(ip) => {
                        return Err(LeaseError::Lost(
                            held.etcd_lease,
                            held.subnet,
                            format!("node {ip}"),
                        ));
                    }
                    Err((_, why)) => {
                        return Err(LeaseError::Lost(
                            held.etcd_lease,
                            held.subnet,
                            format!("an unreadable value ({why})"),
                        ));
                    }
                }
                if kv.lease() == 0 {
                    agent_state::report(&self.status, AgentStatus::lease_reservation);
                    tracing::info!(subnet = %held.subnet, "subnet became a reservation; no more renewals");
                    held.etcd_lease = 0;
                    return std::future::pending().await;
                }
                Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
            }
        };
        let id = self.grant().await?;
        let txn = Txn::new().when([condition]).and_then([TxnOp::put(
            key.as_str(),
            self.attrs.to_json(),
            Some(PutOptions::new().with_lease(id)),
        )]);
        if self.client.txn(txn).await?.succeeded() {
            if current.is_none() {
                tracing::warn!(subnet = %held.subnet, "subnet lease had expired; re-leased it");
            } else {
                tracing::info!(subnet = %held.subnet, old = format!("{:x}", held.etcd_lease), new = format!("{id:x}"), "subnet key moved to a new 24 h lease");
            }
            held.etcd_lease = id;
            Ok(())
        } else {
            let _ = self.client.lease_revoke(id).await;
            // Changed between the read and the write: look again next time.
            Err(LeaseError::Etcd(etcd_client::Error::InvalidArgs(
                "subnet key changed while renewing".to_owned(),
            )))
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_immediate_for_a_short_kept_lease_and_hourly_otherwise() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_delay(LEASE_TTL), RENEW_EVERY, "fresh: in an hour");
        assert_eq!(renew_delay(LEASE_TTL - h / 2), h / 2);
        assert_eq!(renew_delay(LEASE_TTL - h), Duration::ZERO);
        assert_eq!(renew_delay(Duration::from_secs(60)), Duration::ZERO);
        assert_eq!(renew_delay(Duration::ZERO), Duration::ZERO);
        // A lease granted longer than flannel's is still renewed hourly.
        assert_eq!(renew_delay(LEASE_TTL * 2), RENEW_EVERY);
    }

    #[test]
    fn log_text_is_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(1000);
        let b = bounded(&long);
        assert!(b.len() < MAX_LOGGED + 40, "{}", b.len());
        assert!(b.ends_with("(2000 bytes)"), "{b}");
    }

    #[test]
    fn oversized_values_are_refused_without_parsing() {
        let keys = KeyLayout::new("/coreos.com/network").unwrap();
        let big = format!(
            r#"{{"PublicIP":"198.18.0.9","BackendType":"host-gw","x":"{}"}}"#,
            "a".repeat(MAX_LEASE_VALUE)
        );
        let (subnet, why) = parse_kv(
            &keys,
            b"/coreos.com/network/subnets/10.244.9.0-24",
            big.as_bytes(),
        )
        .expect_err("too large");
        assert_eq!(subnet, Some("10.244.9.0/24".parse().unwrap()));
        assert!(
            why.contains("over the 65536-byte limit") && why.len() <= MAX_LOGGED,
            "{why}"
        );
        let small = r#"{"PublicIP":"198.18.0.9","BackendType":"host-gw"}"#;
        assert!(
            parse_kv(
                &keys,
                b"/coreos.com/network/subnets/10.244.9.0-24",
                small.as_bytes()
            )
            .is_ok()
        );
    }

    #[test]
    fn a_bad_dual_stack_key_or_value_still_names_its_ipv4_subnet() {
        let keys = KeyLayout::default();
        let subnet: Ipv4Net = "10.244.5.0/24".parse().expect("subnet");
        let dual = format!("{}10.244.5.0-24&fd00::-64", keys.subnets_prefix());
        let good = r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:02"}}"#;
        assert_eq!(
            parse_kv(&keys, dual.as_bytes(), good.as_bytes()).map(|(s, _)| s),
            Ok(subnet)
        );
        let (named, _) = parse_kv(&keys, dual.as_bytes(), b"{not json").expect_err("bad value");
        assert_eq!(named, Some(subnet));
        let bad_v6 = format!("{}10.244.5.0-24&fd00::zz-64", keys.subnets_prefix());
        let (named, why) =
            parse_kv(&keys, bad_v6.as_bytes(), good.as_bytes()).expect_err("bad key");
        assert_eq!(named, Some(subnet), "{why}");
        let garbage = format!("{}not-a-subnet&fd00::-64", keys.subnets_prefix());
        let (named, _) = parse_kv(&keys, garbage.as_bytes(), good.as_bytes()).expect_err("garbage");
        assert_eq!(named, None);
    }

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
