//! weft's firewall rules (`--ip-masq` and `--iptables-forward-rules`),
//! spoken to the kernel as nf_tables netlink messages, so the agent forks
//! no `nft` or `iptables`.
//!
//! - Masquerade lives in weft's own table, `table ip weft`, chain
//!   `postrouting` (type nat, hook postrouting, priority srcnat): traffic
//!   between two cluster addresses returns untouched, container traffic from
//!   this node's subnet to anywhere else but multicast is masqueraded with
//!   fully random ports, as flanneld's `--ip-masq` rules do.
//! - Forward accepts must sit in the chain whose policy drops: an accept in
//!   one nftables table does not override a drop in another at the same hook.
//!   Docker's DROP policy is on iptables' `FORWARD` chain (iptables-nft's
//!   `table ip filter`), so when that chain exists weft appends its two
//!   accepts there, as flanneld's `FLANNEL-FWD` rules are; `iptables-save`
//!   shows them with their comments.
//!
//! Every rule carries a comment starting with `weft:` (nftables rule user
//! data), which is how weft finds its own rules again: resyncs compare them
//! with what should be there and rebuild only on a difference, and cleanup
//! removes exactly them.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// weft's own table (family ip).
pub const TABLE: &str = "weft";
const POSTROUTING: &str = "postrouting";
/// iptables-nft's filter table and chain, where Docker's DROP policy is.
const IPTABLES_FILTER: &str = "filter";
const IPTABLES_FORWARD: &str = "FORWARD";
const COMMENT_PREFIX: &str = "weft:";
/// flanneld leaves multicast destinations alone (`! -d 224.0.0.0/4`).
const MULTICAST: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4) {
    Ok(n) => n,
    Err(_) => panic!("224.0.0.0/4 is a valid network"),
};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("nf_tables {op}: {source}")]
    Kernel {
        op: &'static str,
        errno: i32,
        source: std::io::Error,
    },
    #[error("nf_tables {op}: malformed reply")]
    Malformed { op: &'static str },
}

impl NftError {
    fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn is_not_found(&self) -> bool {
        self.errno() == Some(libc::ENOENT)
    }
}

/// One match of a rule, on the IPv4 header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    SrcIn(Ipv4Net),
    DstIn(Ipv4Net),
    DstNotIn(Ipv4Net),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Return,
    MasqueradeRandomFully,
}

/// A rule: all matches, a packet counter, then the action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
    /// Starts with [`COMMENT_PREFIX`]; says what the rule is for.
    pub comment: String,
}

/// What the firewall should hold for this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirewallPlan {
    /// The cluster network.
    pub network: Ipv4Net,
    /// This node's subnet.
    pub subnet: Ipv4Net,
    pub ip_masq: bool,
    pub forward_rules: bool,
}

impl FirewallPlan {
    /// flanneld's `--ip-masq` semantics, for this node's subnet only.
    pub fn masq_rules(&self) -> Vec<Rule> {
        let (network, subnet) = (self.network, self.subnet);
        vec![
            Rule {
                matches: vec![Match::SrcIn(network), Match::DstIn(network)],
                action: Action::Return,
                comment: format!("{COMMENT_PREFIX} no NAT inside the cluster network {network}"),
            },
            Rule {
                matches: vec![Match::SrcIn(subnet), Match::DstNotIn(MULTICAST)],
                action: Action::MasqueradeRandomFully,
                comment: format!(
                    "{COMMENT_PREFIX} masquerade containers of {subnet} leaving the cluster network"
                ),
            },
        ]
    }

    /// flanneld's `FLANNEL-FWD` rules.
    pub fn forward_rules(&self) -> Vec<Rule> {
        let network = self.network;
        vec![
            Rule {
                matches: vec![Match::SrcIn(network)],
                action: Action::Accept,
                comment: format!("{COMMENT_PREFIX} forward from the cluster network {network}"),
            },
            Rule {
                matches: vec![Match::DstIn(network)],
                action: Action::Accept,
                comment: format!("{COMMENT_PREFIX} forward to the cluster network {network}"),
            },
        ]
    }
}

/// What [`Firewall::sync`] found missing or different and put back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    pub masq: bool,
    pub forward: bool,
}

/// A rule as listed by the kernel: enough to find and remove weft's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedRule {
    pub handle: u64,
    pub comment: Option<String>,
    /// The chain a `jump`/`goto` verdict of the rule names, if any.
    pub jump: Option<String>,
}

/// weft's rules in the kernel, as `node-agent status` shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// Comments of the rules in `table ip weft`.
    pub masq: Vec<String>,
    /// Comments of weft's rules in iptables' `FORWARD` chain; `None` when
    /// there is no such chain.
    pub forward: Option<Vec<String>>,
}

/// Keeps the planned rules in the kernel.
pub struct Firewall {
    plan: FirewallPlan,
}

impl Firewall {
    pub fn new(plan: FirewallPlan) -> Self {
        Self { plan }
    }

    /// Makes the kernel's rules match the plan, touching nothing when they
    /// already do. Returns what was (re)installed or removed.
    pub fn sync(&self, nft: &mut Nft) -> Result<Repairs, NftError> {
        let mut repairs = Repairs::default();
        let want_masq = if self.plan.ip_masq {
            self.plan.masq_rules()
        } else {
            Vec::new()
        };
        let masq_ok = if want_masq.is_empty() {
            // Anything left in weft's table (even without its chain) goes.
            !nft.table_exists(TABLE)?
        } else {
            match nft.list_rules(TABLE, POSTROUTING) {
                Ok(rules) => comments_match(&rules, &want_masq),
                Err(e) if e.is_not_found() => false,
                Err(e) => return Err(e),
            }
        };
        if !masq_ok {
            let mut batch = Batch::new();
            // "add; delete; add" replaces the table atomically whether or
            // not it existed, as `nft -f` scripts do.
            batch.new_table(TABLE);
            batch.del_table(TABLE);
            if !want_masq.is_empty() {
                batch.new_table(TABLE);
                batch.new_nat_chain(TABLE, POSTROUTING, NF_INET_POST_ROUTING, NF_IP_PRI_NAT_SRC);
                for rule in &want_masq {
                    batch.append_rule(TABLE, POSTROUTING, rule);
                }
            }
            nft.send_batch(batch, "replacing table ip weft")?;
            repairs.masq = true;
        }

        // The FORWARD chain belongs to iptables; without it there is no
        // DROP policy of iptables' to get past.
        if nft.chain_exists(IPTABLES_FILTER, IPTABLES_FORWARD)? {
            let want = if self.plan.forward_rules {
                self.plan.forward_rules()
            } else {
                Vec::new()
            };
            let ours: Vec<ListedRule> = nft
                .list_rules(IPTABLES_FILTER, IPTABLES_FORWARD)?
                .into_iter()
                .filter(is_ours)
                .collect();
            if !comments_match(&ours, &want) {
                let mut batch = Batch::new();
                for rule in &ours {
                    batch.del_rule(IPTABLES_FILTER, IPTABLES_FORWARD, rule.handle);
                }
                for rule in &want {
                    batch.append_rule(IPTABLES_FILTER, IPTABLES_FORWARD, rule);
                }
                nft.send_batch(batch, "updating weft's rules in ip filter FORWARD")?;
                repairs.forward = true;
            }
        }
        Ok(repairs)
    }

    /// Removes every rule weft installed, whatever plan installed it.
    pub fn remove(nft: &mut Nft) -> Result<(), NftError> {
        Self::new(FirewallPlan {
            network: Ipv4Net::default(),
            subnet: Ipv4Net::default(),
            ip_masq: false,
            forward_rules: false,
        })
        .sync(nft)
        .map(drop)
    }

    /// What weft has installed now.
    pub fn installed(nft: &mut Nft) -> Result<Installed, NftError> {
        let comments = |rules: Vec<ListedRule>| -> Vec<String> {
            rules
                .into_iter()
                .filter(is_ours)
                .filter_map(|r| r.comment)
                .collect()
        };
        let masq = match nft.list_rules(TABLE, POSTROUTING) {
            Ok(rules) => comments(rules),
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e),
        };
        let forward = if nft.chain_exists(IPTABLES_FILTER, IPTABLES_FORWARD)? {
            Some(comments(nft.list_rules(IPTABLES_FILTER, IPTABLES_FORWARD)?))
        } else {
            None
        };
        Ok(Installed { masq, forward })
    }
}

fn is_ours(rule: &ListedRule) -> bool {
    rule.comment
        .as_deref()
        .is_some_and(|c| c.starts_with(COMMENT_PREFIX))
}

fn comments_match(have: &[ListedRule], want: &[Rule]) -> bool {
    have.len() == want.len()
        && have
            .iter()
            .zip(want)
            .all(|(h, w)| h.comment.as_deref() == Some(w.comment.as_str()))
}

// nfnetlink and nf_tables numbers (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFPROTO_IPV4: u8 = 2;
const NF_INET_POST_ROUTING: u32 = 4;
/// `srcnat` priority.
const NF_IP_PRI_NAT_SRC: i32 = 100;
const NF_ACCEPT: i32 = 1;
const NFT_RETURN: i32 = -5;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 1 << 4;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_MASQ_FLAGS: u16 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
/// libnftnl's comment type in rule user data, which `nft` and iptables-nft print.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
/// Offsets of the addresses in the IPv4 header.
const IPV4_SADDR: u32 = 12;
const IPV4_DADDR: u32 = 16;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// Writes netlink attributes into a message buffer.
struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

impl Attrs<'_> {
    fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A NUL-terminated string, as the kernel's NLA_STRING policies accept.
    fn string(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(ty, &v);
    }

    fn be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    fn nested(&mut self, ty: u16, f: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        f(&mut Attrs { buf: self.buf });
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn expr(&mut self, name: &str, data: impl FnOnce(&mut Attrs<'_>)) {
        self.nested(NFTA_LIST_ELEM, |e| {
            e.string(NFTA_EXPR_NAME, name);
            e.nested(NFTA_EXPR_DATA, data);
        });
    }

    fn data_value(&mut self, ty: u16, bytes: &[u8]) {
        self.nested(ty, |d| d.put(NFTA_DATA_VALUE, bytes));
    }
}

/// One netlink message with an nfgenmsg header.
fn message(
    ty: u16,
    flags: u16,
    family: u8,
    res_id: u16,
    attrs: impl FnOnce(&mut Attrs<'_>),
) -> Vec<u8> {
    let mut buf = vec![0; NLMSG_HDRLEN];
    buf[4..6].copy_from_slice(&ty.to_ne_bytes());
    buf[6..8].copy_from_slice(&flags.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    attrs(&mut Attrs { buf: &mut buf });
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Encodes `rule`'s expressions: per match a payload load, a prefix mask and
/// a compare (the same expressions `nft` and iptables-nft generate for
/// `ip saddr 10.244.0.0/16`), then a counter and the action.
fn encode_expressions(a: &mut Attrs<'_>, rule: &Rule) {
    for m in &rule.matches {
        let (offset, net, op) = match *m {
            Match::SrcIn(n) => (IPV4_SADDR, n, NFT_CMP_EQ),
            Match::DstIn(n) => (IPV4_DADDR, n, NFT_CMP_EQ),
            Match::DstNotIn(n) => (IPV4_DADDR, n, NFT_CMP_NEQ),
        };
        a.expr("payload", |d| {
            d.be32(NFTA_PAYLOAD_DREG, NFT_REG_1);
            d.be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER);
            d.be32(NFTA_PAYLOAD_OFFSET, offset);
            d.be32(NFTA_PAYLOAD_LEN, 4);
        });
        a.expr("bitwise", |d| {
            d.be32(NFTA_BITWISE_SREG, NFT_REG_1);
            d.be32(NFTA_BITWISE_DREG, NFT_REG_1);
            d.be32(NFTA_BITWISE_LEN, 4);
            d.data_value(NFTA_BITWISE_MASK, &net.netmask().octets());
            d.data_value(NFTA_BITWISE_XOR, &[0; 4]);
        });
        a.expr("cmp", |d| {
            d.be32(NFTA_CMP_SREG, NFT_REG_1);
            d.be32(NFTA_CMP_OP, op);
            d.data_value(NFTA_CMP_DATA, &net.network().octets());
        });
    }
    a.expr("counter", |_| {});
    match rule.action {
        Action::Accept | Action::Return => {
            let code = if rule.action == Action::Accept {
                NF_ACCEPT
            } else {
                NFT_RETURN
            };
            a.expr("immediate", |d| {
                d.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
                d.nested(NFTA_IMMEDIATE_DATA, |data| {
                    data.nested(NFTA_DATA_VERDICT, |v| {
                        v.be32(NFTA_VERDICT_CODE, code as u32)
                    });
                });
            });
        }
        Action::MasqueradeRandomFully => {
            a.expr("masq", |d| {
                d.be32(NFTA_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY)
            });
        }
    }
}

/// The comment as libnftnl stores it: type, length, NUL-terminated text.
fn encode_comment(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(254)];
    let mut v = vec![NFTNL_UDATA_RULE_COMMENT, (text.len() + 1) as u8];
    v.extend_from_slice(text);
    v.push(0);
    v
}

fn decode_comment(udata: &[u8]) -> Option<String> {
    let mut rest = udata;
    while let [ty, len, tail @ ..] = rest {
        let len = usize::from(*len);
        let value = tail.get(..len)?;
        if *ty == NFTNL_UDATA_RULE_COMMENT {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = &tail[len..];
    }
    None
}

/// The chain a rule's `immediate` verdict (jump or goto) names, found in
/// its NFTA_RULE_EXPRESSIONS payload.
fn decode_jump(expressions: &[u8]) -> Option<String> {
    attributes(expressions)
        .filter(|(ty, _)| *ty == NFTA_LIST_ELEM)
        .find_map(|(_, elem)| {
            let mut name = None;
            let mut data = None;
            for (ty, payload) in attributes(elem) {
                match ty {
                    NFTA_EXPR_NAME => name = Some(payload),
                    NFTA_EXPR_DATA => data = Some(payload),
                    _ => {}
                }
            }
            if name? != b"immediate\0" {
                return None;
            }
            let value = attributes(data?)
                .find(|(ty, _)| *ty == NFTA_IMMEDIATE_DATA)?
                .1;
            let verdict = attributes(value)
                .find(|(ty, _)| *ty == NFTA_DATA_VERDICT)?
                .1;
            let chain = attributes(verdict)
                .find(|(ty, _)| *ty == NFTA_VERDICT_CHAIN)?
                .1;
            Some(String::from_utf8_lossy(chain.strip_suffix(&[0]).unwrap_or(chain)).into_owned())
        })
}

/// A transaction: the kernel applies all of it or none of it.
struct Batch {
    messages: Vec<Vec<u8>>,
}

impl Batch {
    fn new() -> Self {
        Self {
            messages: Vec::new(),
        }
    }

    fn push(&mut self, ty: u16, flags: u16, attrs: impl FnOnce(&mut Attrs<'_>)) {
        self.messages.push(message(
            nft_type(ty),
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_IPV4,
            0,
            attrs,
        ));
    }

    fn new_table(&mut self, table: &str) {
        self.push(NFT_MSG_NEWTABLE, NLM_F_CREATE, |a| {
            a.string(NFTA_TABLE_NAME, table)
        });
    }

    fn del_table(&mut self, table: &str) {
        self.push(NFT_MSG_DELTABLE, 0, |a| a.string(NFTA_TABLE_NAME, table));
    }

    fn new_nat_chain(&mut self, table: &str, chain: &str, hook: u32, priority: i32) {
        self.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, |a| {
            a.string(NFTA_CHAIN_TABLE, table);
            a.string(NFTA_CHAIN_NAME, chain);
            a.nested(NFTA_CHAIN_HOOK, |h| {
                h.be32(NFTA_HOOK_HOOKNUM, hook);
                h.be32(NFTA_HOOK_PRIORITY, priority as u32);
            });
            a.be32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
            a.string(NFTA_CHAIN_TYPE, "nat");
        });
    }

    fn del_chain(&mut self, table: &str, chain: &str) {
        self.push(NFT_MSG_DELCHAIN, 0, |a| {
            a.string(NFTA_CHAIN_TABLE, table);
            a.string(NFTA_CHAIN_NAME, chain);
        });
    }

    fn append_rule(&mut self, table: &str, chain: &str, rule: &Rule) {
        self.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, |a| {
            a.string(NFTA_RULE_TABLE, table);
            a.string(NFTA_RULE_CHAIN, chain);
            a.nested(NFTA_RULE_EXPRESSIONS, |e| encode_expressions(e, rule));
            a.put(NFTA_RULE_USERDATA, &encode_comment(&rule.comment));
        });
    }

    fn del_rule(&mut self, table: &str, chain: &str, handle: u64) {
        self.push(NFT_MSG_DELRULE, 0, |a| {
            a.string(NFTA_RULE_TABLE, table);
            a.string(NFTA_RULE_CHAIN, chain);
            a.put(NFTA_RULE_HANDLE, &handle.to_be_bytes());
        });
    }

    /// The messages framed by BATCH_BEGIN/END, with sequence numbers.
    fn encode(self, first_seq: u32) -> (Vec<u8>, u32) {
        let frame = |ty| message(ty, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES, |_| {});
        let mut out = Vec::new();
        let mut seq = first_seq;
        for mut msg in std::iter::once(frame(NFNL_MSG_BATCH_BEGIN))
            .chain(self.messages)
            .chain(std::iter::once(frame(NFNL_MSG_BATCH_END)))
        {
            msg[8..12].copy_from_slice(&seq.to_ne_bytes());
            seq = seq.wrapping_add(1);
            out.extend_from_slice(&msg);
        }
        (out, seq)
    }
}

/// A netlink message in a receive buffer.
struct Received<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Iterates the netlink messages in a receive buffer; stops at a malformed
/// length (the caller then sees its request unanswered and times out).
fn messages(buf: &[u8]) -> impl Iterator<Item = Received<'_>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(rest.get(0..4)?.try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(rest.get(4..6)?.try_into().ok()?);
        let seq = u32::from_ne_bytes(rest.get(8..12)?.try_into().ok()?);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some(Received { ty, seq, payload })
    })
}

/// Iterates attributes: (type without flags, payload).
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(rest.get(0..2)?.try_into().ok()?));
        if len < 4 || len > rest.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(rest.get(2..4)?.try_into().ok()?) & 0x3fff;
        let payload = &rest[4..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((ty, payload))
    })
}

/// The errno of an NLMSG_ERROR payload; 0 is an acknowledgement.
fn error_code(payload: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?))
}

/// A netfilter netlink socket of the caller's network namespace.
pub struct Nft {
    socket: Socket,
    seq: u32,
}

impl Nft {
    pub fn open() -> Result<Self, NftError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
        // The kernel answers within sendmsg; a reply that never comes must
        // not hang the agent's one thread (etcd keepalives run there too).
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on a socket this function owns, with a pointer
        // to a live timeval and its exact size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(NftError::Socket(std::io::Error::last_os_error()));
        }
        socket.bind_auto().map_err(NftError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NftError::Socket)?;
        Ok(Self { socket, seq: 1 })
    }

    fn kernel_error(op: &'static str, code: i32) -> NftError {
        let errno = code.abs();
        NftError::Kernel {
            op,
            errno,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Sends one request and collects the replies until `DONE` or an error
    /// (or, for a request that is not a dump, its acknowledgement).
    fn request(
        &mut self,
        mut msg: Vec<u8>,
        dump: bool,
        op: &'static str,
    ) -> Result<Vec<Vec<u8>>, NftError> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        msg[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.socket.send(&msg, 0).map_err(NftError::Socket)?;
        let mut replies = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(64 * 1024);
            self.socket.recv(&mut buf, 0).map_err(NftError::Socket)?;
            // Replies to anything sent before (a batch abandoned on its
            // first error) are not this request's.
            for msg in messages(&buf).filter(|m| m.seq == seq) {
                match msg.ty {
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_ERROR => {
                        let code = error_code(msg.payload).ok_or(NftError::Malformed { op })?;
                        if code != 0 {
                            return Err(Self::kernel_error(op, code));
                        }
                        if !dump {
                            return Ok(replies);
                        }
                    }
                    _ => replies.push(msg.payload.to_vec()),
                }
            }
        }
    }

    /// Whether `table ip <table>` exists.
    pub fn table_exists(&mut self, table: &str) -> Result<bool, NftError> {
        let msg = message(
            nft_type(NFT_MSG_GETTABLE),
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_IPV4,
            0,
            |a| a.string(NFTA_TABLE_NAME, table),
        );
        match self.request(msg, false, "get table") {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `table ip <table>` has a chain `chain`.
    pub fn chain_exists(&mut self, table: &str, chain: &str) -> Result<bool, NftError> {
        let msg = message(
            nft_type(NFT_MSG_GETCHAIN),
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_IPV4,
            0,
            |a| {
                a.string(NFTA_CHAIN_TABLE, table);
                a.string(NFTA_CHAIN_NAME, chain);
            },
        );
        match self.request(msg, false, "get chain") {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The rules of `table ip <table>` chain `chain`, in order; ENOENT when
    /// the chain does not exist.
    pub fn list_rules(&mut self, table: &str, chain: &str) -> Result<Vec<ListedRule>, NftError> {
        if !self.chain_exists(table, chain)? {
            return Err(Self::kernel_error("list rules", libc::ENOENT));
        }
        let msg = message(
            nft_type(NFT_MSG_GETRULE),
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_IPV4,
            0,
            |a| {
                a.string(NFTA_RULE_TABLE, table);
                a.string(NFTA_RULE_CHAIN, chain);
            },
        );
        let mut rules = Vec::new();
        for reply in self.request(msg, true, "list rules")? {
            let attrs = reply
                .get(NFGENMSG_LEN..)
                .ok_or(NftError::Malformed { op: "list rules" })?;
            let mut handle = None;
            let mut comment = None;
            let mut jump = None;
            let mut in_chain = true;
            for (ty, payload) in attributes(attrs) {
                match ty {
                    NFTA_RULE_HANDLE => {
                        handle = payload.try_into().ok().map(u64::from_be_bytes);
                    }
                    NFTA_RULE_USERDATA => comment = decode_comment(payload),
                    NFTA_RULE_EXPRESSIONS => jump = decode_jump(payload),
                    // Older kernels ignore the dump filter: check it here.
                    NFTA_RULE_TABLE => {
                        in_chain &= payload.strip_suffix(&[0]) == Some(table.as_bytes())
                    }
                    NFTA_RULE_CHAIN => {
                        in_chain &= payload.strip_suffix(&[0]) == Some(chain.as_bytes())
                    }
                    _ => {}
                }
            }
            if in_chain {
                rules.push(ListedRule {
                    handle: handle.ok_or(NftError::Malformed { op: "list rules" })?,
                    comment,
                    jump,
                });
            }
        }
        Ok(rules)
    }

    /// The names of the chains in `table ip <table>`; empty when the table
    /// does not exist.
    pub fn chains(&mut self, table: &str) -> Result<Vec<String>, NftError> {
        if !self.table_exists(table)? {
            return Ok(Vec::new());
        }
        let msg = message(
            nft_type(NFT_MSG_GETCHAIN),
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_IPV4,
            0,
            |a| a.string(NFTA_CHAIN_TABLE, table),
        );
        let mut chains = Vec::new();
        for reply in self.request(msg, true, "list chains")? {
            let attrs = reply
                .get(NFGENMSG_LEN..)
                .ok_or(NftError::Malformed { op: "list chains" })?;
            let text =
                |p: &[u8]| String::from_utf8_lossy(p.strip_suffix(&[0]).unwrap_or(p)).into_owned();
            let mut name = None;
            let mut in_table = true;
            for (ty, payload) in attributes(attrs) {
                match ty {
                    NFTA_CHAIN_NAME => name = Some(text(payload)),
                    // Older kernels ignore the dump filter: check it here.
                    NFTA_CHAIN_TABLE => in_table &= text(payload) == table,
                    _ => {}
                }
            }
            if in_table && let Some(name) = name {
                chains.push(name);
            }
        }
        Ok(chains)
    }

    /// Removes, in one transaction, every chain of `table ip <table>` whose
    /// name starts with `prefix` (its rules go with it) and every rule of
    /// the table's other chains that jumps to one of them. Returns the
    /// chains removed and how many jumps to them.
    pub fn remove_chains_with_prefix(
        &mut self,
        table: &str,
        prefix: &str,
    ) -> Result<(Vec<String>, usize), NftError> {
        let (doomed, others): (Vec<String>, Vec<String>) = self
            .chains(table)?
            .into_iter()
            .partition(|c| c.starts_with(prefix));
        if doomed.is_empty() {
            return Ok((doomed, 0));
        }
        let mut batch = Batch::new();
        let mut jumps = 0;
        for chain in &others {
            for rule in self.list_rules(table, chain)? {
                if rule
                    .jump
                    .as_deref()
                    .is_some_and(|j| doomed.iter().any(|d| d == j))
                {
                    batch.del_rule(table, chain, rule.handle);
                    jumps += 1;
                }
            }
        }
        // A chain is deleted with its rules once nothing jumps to it; jumps
        // between the doomed chains go with their own chain.
        for chain in &doomed {
            for rule in self.list_rules(table, chain)? {
                batch.del_rule(table, chain, rule.handle);
            }
        }
        for chain in &doomed {
            batch.del_chain(table, chain);
        }
        self.send_batch(batch, "removing chains")?;
        Ok((doomed, jumps))
    }

    /// Sends a transaction and waits for every message's acknowledgement.
    fn send_batch(&mut self, batch: Batch, op: &'static str) -> Result<(), NftError> {
        let expected = batch.messages.len();
        let first = self.seq;
        let (bytes, next) = batch.encode(first);
        self.seq = next;
        // The batch's own messages, between BATCH_BEGIN and BATCH_END.
        let ours = first.wrapping_add(1)..first.wrapping_add(1 + expected as u32);
        self.socket.send(&bytes, 0).map_err(NftError::Socket)?;
        // nfnetlink processes a batch inside sendmsg, so every reply is
        // queued by now: an acknowledgement or an error per message (after
        // an error the kernel aborts the transaction but still answers the
        // rest). All of them are read, so none is left for the next request.
        let (mut answered, mut first_error) = (0, None);
        while answered < expected {
            let mut buf = Vec::with_capacity(64 * 1024);
            match self.socket.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                // Nothing more queued: fewer answers than messages, which
                // happens only after an error.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && first_error.is_some() => {
                    break;
                }
                Err(e) => return Err(NftError::Socket(e)),
            }
            for msg in messages(&buf).filter(|m| ours.contains(&m.seq) && m.ty == NLMSG_ERROR) {
                answered += 1;
                match error_code(msg.payload).ok_or(NftError::Malformed { op })? {
                    0 => {}
                    code => {
                        first_error.get_or_insert(code);
                    }
                }
            }
        }
        match first_error {
            Some(code) => Err(Self::kernel_error(op, code)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FirewallPlan {
        FirewallPlan {
            network: "10.244.0.0/16".parse().expect("network"),
            subnet: "10.244.5.0/24".parse().expect("subnet"),
            ip_masq: true,
            forward_rules: true,
        }
    }

    #[test]
    fn masq_rules_are_flannels() {
        let rules = plan().masq_rules();
        let network = plan().network;
        // Inside the cluster network: never NATed, and checked first.
        assert_eq!(
            rules[0].matches,
            vec![Match::SrcIn(network), Match::DstIn(network)]
        );
        assert_eq!(rules[0].action, Action::Return);
        // This node's containers to anywhere else but multicast.
        assert_eq!(
            rules[1].matches,
            vec![Match::SrcIn(plan().subnet), Match::DstNotIn(MULTICAST)]
        );
        assert_eq!(rules[1].action, Action::MasqueradeRandomFully);
        assert!(rules.iter().all(|r| r.comment.starts_with(COMMENT_PREFIX)));
    }

    #[test]
    fn forward_rules_accept_both_directions_of_the_cluster_network() {
        let rules = plan().forward_rules();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].matches, vec![Match::SrcIn(plan().network)]);
        assert_eq!(rules[1].matches, vec![Match::DstIn(plan().network)]);
        assert!(rules.iter().all(|r| r.action == Action::Accept));
    }

    #[test]
    fn comments_round_trip_and_truncate() {
        let c = "weft: a comment";
        assert_eq!(decode_comment(&encode_comment(c)).as_deref(), Some(c));
        let long = "x".repeat(400);
        assert_eq!(
            decode_comment(&encode_comment(&long)).map(|s| s.len()),
            Some(254)
        );
        // Other user data types before the comment are skipped; garbage is not a comment.
        let mut udata = vec![7, 2, 0xaa, 0xbb];
        udata.extend(encode_comment(c));
        assert_eq!(decode_comment(&udata).as_deref(), Some(c));
        assert_eq!(decode_comment(&[0, 9, b'x']), None);
    }

    #[test]
    fn a_jump_is_read_from_the_rule_expressions_and_an_accept_is_none() {
        // `-j FLANNEL-FWD` as iptables-nft encodes it: an immediate verdict
        // NFT_JUMP (-3) naming the chain.
        let mut jump = Vec::new();
        Attrs { buf: &mut jump }.expr("immediate", |d| {
            d.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT);
            d.nested(NFTA_IMMEDIATE_DATA, |data| {
                data.nested(NFTA_DATA_VERDICT, |v| {
                    v.be32(NFTA_VERDICT_CODE, -3_i32 as u32);
                    v.string(NFTA_VERDICT_CHAIN, "FLANNEL-FWD");
                });
            });
        });
        assert_eq!(decode_jump(&jump).as_deref(), Some("FLANNEL-FWD"));
        let mut accept = Vec::new();
        encode_expressions(&mut Attrs { buf: &mut accept }, &plan().forward_rules()[0]);
        assert_eq!(decode_jump(&accept), None);
        assert_eq!(decode_jump(&[1, 2, 3]), None);
    }

    #[test]
    fn attributes_are_aligned_and_nested_lengths_cover_their_children() {
        let msg = message(
            nft_type(NFT_MSG_NEWRULE),
            NLM_F_REQUEST,
            NFPROTO_IPV4,
            0,
            |a| {
                a.string(NFTA_RULE_TABLE, "weft");
                a.nested(NFTA_RULE_EXPRESSIONS, |e| {
                    encode_expressions(e, &plan().masq_rules()[1])
                });
            },
        );
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().expect("len")) as usize,
            msg.len()
        );
        let attrs: Vec<_> = attributes(&msg[NLMSG_HDRLEN + NFGENMSG_LEN..]).collect();
        assert_eq!(attrs[0], (NFTA_RULE_TABLE, &b"weft\0"[..]));
        assert_eq!(attrs[1].0, NFTA_RULE_EXPRESSIONS);
        let names: Vec<String> = attributes(attrs[1].1)
            .map(|(_, elem)| {
                let (_, name) = attributes(elem).next().expect("name");
                String::from_utf8_lossy(name.strip_suffix(&[0]).expect("NUL")).into_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "payload", "bitwise", "cmp", "payload", "bitwise", "cmp", "counter", "masq"
            ]
        );
    }

    #[test]
    fn a_prefix_match_masks_then_compares_the_network() {
        let mut buf = Vec::new();
        let rule = Rule {
            matches: vec![Match::DstNotIn(MULTICAST)],
            action: Action::Accept,
            comment: String::new(),
        };
        encode_expressions(&mut Attrs { buf: &mut buf }, &rule);
        let exprs: Vec<_> = attributes(&buf).collect();
        let data = |i: usize| -> Vec<(u16, Vec<u8>)> {
            let (_, elem) = exprs[i];
            let (_, d) = attributes(elem).nth(1).expect("data");
            attributes(d).map(|(t, p)| (t, p.to_vec())).collect()
        };
        let payload = data(0);
        assert!(payload.contains(&(NFTA_PAYLOAD_OFFSET, IPV4_DADDR.to_be_bytes().to_vec())));
        let bitwise = data(1);
        let mask = bitwise
            .iter()
            .find(|(t, _)| *t == NFTA_BITWISE_MASK)
            .expect("mask");
        assert_eq!(
            attributes(&mask.1).next().map(|(_, v)| v.to_vec()),
            Some(vec![240, 0, 0, 0])
        );
        let cmp = data(2);
        assert!(cmp.contains(&(NFTA_CMP_OP, NFT_CMP_NEQ.to_be_bytes().to_vec())));
    }

    #[test]
    fn a_batch_is_framed_and_numbered() {
        let mut batch = Batch::new();
        batch.new_table(TABLE);
        batch.del_table(TABLE);
        let (bytes, next) = batch.encode(40);
        let types: Vec<u16> = messages(&bytes).map(|m| m.ty).collect();
        let seqs: Vec<u32> = messages(&bytes).map(|m| m.seq).collect();
        assert_eq!(seqs, [40, 41, 42, 43]);
        assert_eq!(
            types,
            [
                NFNL_MSG_BATCH_BEGIN,
                nft_type(NFT_MSG_NEWTABLE),
                nft_type(NFT_MSG_DELTABLE),
                NFNL_MSG_BATCH_END
            ]
        );
        assert_eq!(next, 44);
    }

    #[test]
    fn rule_lists_compare_by_comment_and_order() {
        let want = plan().forward_rules();
        let listed = |comments: &[&str]| -> Vec<ListedRule> {
            comments
                .iter()
                .enumerate()
                .map(|(i, c)| ListedRule {
                    handle: i as u64,
                    comment: Some((*c).to_owned()),
                    jump: None,
                })
                .collect()
        };
        let exact: Vec<&str> = want.iter().map(|r| r.comment.as_str()).collect();
        assert!(comments_match(&listed(&exact), &want));
        assert!(!comments_match(&listed(&exact[..1]), &want));
        assert!(!comments_match(&listed(&[exact[1], exact[0]]), &want));
        assert!(!is_ours(&ListedRule {
            handle: 1,
            comment: Some("docker".to_owned()),
            jump: None,
        }));
        assert!(!is_ours(&ListedRule {
            handle: 1,
            comment: None,
            jump: None,
        }));
    }
}
