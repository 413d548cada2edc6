//! flannel-compatible control-plane data: the network config, the etcd key layout, subnet
//! leases, subnet allocation and `/run/flannel/subnet.env`.
//!
//! Everything here is pure data handling (apart from [`subnet_env::write_atomic`]) so that it
//! can be unit tested without etcd or the kernel. Subnets are always [`ipnet::Ipv4Net`].

pub mod config;
pub mod echo;
pub mod keys;
pub mod lease;
pub mod subnet;
pub mod subnet_env;

mod json;

pub use config::{Backend, ConfigError, NetworkConfig, VxlanConfig};
pub use echo::{Echo, MAX_ERROR_TEXT, error_chain};
pub use json::FieldError;
pub use keys::{DEFAULT_PREFIX, KeyError, KeyLayout, SubnetKey, subnet_key_name};
pub use lease::{LeaseAttrs, LeaseError, VxlanLeaseData};
pub use subnet::{AllocError, Reuse, choose_subnet};
pub use subnet_env::{SubnetEnv, SubnetEnvError, datapath_mtu, flannel_mtu, underlay_mtu};
