//! weft's node agent: flannel's control plane on etcd, driving an eBPF data path.
//!
//! Subsystems, each with its own error type:
//! - [`etcd`]: the etcd connection: endpoints, TLS, authentication;
//! - [`flannel`]: config, key layout, lease values, allocation, subnet file;
//! - [`lease_manager`]: this node's lease in etcd;
//! - [`watcher`] and [`peers`]: other nodes' leases, mirrored into the BPF map;
//! - [`datapath`]: loading, attaching and pinning the BPF programs;
//! - [`bpffs`]: the BPF filesystem under the pins, mounted when missing;
//! - [`doctor`]: `node-agent doctor`, the host checks flannel users trip on;
//! - [`docker_opts`]: `node-agent docker-opts`, the dockerd flags;
//! - [`layout`]: pinned map layouts checked against the object's;
//! - [`pinned`]: the one reader of pinned state, and the peer-map writer;
//! - [`netconf`]: the underlay interface, the cluster route, peers' neighbour
//!   entries (kept in place against removals), forwarding;
//! - [`netlink`]: the typed rtnetlink layer everything above talks through;
//! - [`nft`]: `--ip-masq` and the forward rules, over nf_tables netlink;
//! - [`observe`]: `/healthz`, Prometheus `/metrics` and systemd readiness;
//! - [`agent_state`]: lease expiry and etcd sync state, shared with
//!   [`observe`] and kept in `--state-file` for `status`.

pub mod agent;
pub mod agent_state;
pub mod bpffs;
pub mod datapath;
pub mod docker_opts;
pub mod doctor;
pub mod ebpf;
pub mod etcd;
pub mod ethtool;
pub mod flannel;
pub mod flannel_takeover;
pub mod ipip_slow_path;
pub mod layout;
pub mod lease_manager;
pub mod netconf;
pub mod netlink;
pub mod nft;
pub mod observe;
pub mod peers;
pub mod pinned;
pub mod watcher;
