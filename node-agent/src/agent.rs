//! `node-agent run` and `node-agent cleanup`: wiring the subsystems together.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use etcd_client::Client;
use ipnet::Ipv4Net;
use tokio::io::unix::AsyncFd;
use weft_common::{
    DECAP_IPIP, DECAP_VXLAN, Mode, NodeConfig, PROG_SLOWPATH_IPIP_TC, PROG_SLOWPATH_RX_TC,
};

use crate::{
    agent_state::{self, AgentStatus, StateSnapshot},
    datapath::{self, Datapath, DecapMode, HostRouting, LoadOptions},
    etcd::EtcdSettings,
    flannel::{
        Backend, KeyLayout, LeaseAttrs, NetworkConfig, SubnetEnv, VxlanLeaseData, datapath_mtu,
        flannel_mtu, subnet_env, underlay_mtu,
    },
    flannel_takeover::{self, Adoption},
    ipip_slow_path,
    lease_manager::LeaseManager,
    netconf::{self, ClusterRoute, HostNetworking, IfaceChoice},
    netlink::{ExternalVxlan, ListedRoute, Netlink as _, NetlinkEvents, RtNetlink},
    nft::{Firewall, FirewallPlan, Nft, Repairs},
    observe::{self, AgentInfo, ObserveSettings},
    peers::PeerTable,
    pinned::{PinnedError, PinnedState, packets_by_reason},
    watcher::PeerWatcher,
};

/// Settings of `node-agent run`: its flags, validated by clap.
#[derive(Debug, Clone, clap::Args)]
pub struct RunSettings {
    #[command(flatten)]
    pub etcd: EtcdSettings,
    #[command(flatten)]
    pub observe: ObserveSettings,
    /// Underlay interface, by name or IPv4 address; repeat (or separate
    /// with commas) to try several in order [default: the default route's].
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Regular expressions matched against interface names, then their
    /// addresses, when no --iface is given.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,
    /// Use the interface that routes to this address, when neither --iface
    /// nor --iface-regex is given.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// Address other nodes send tunnel traffic to [default: the --iface
    /// address that chose the interface, else its primary IPv4 address].
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    #[arg(long, env = "FLANNELD_ETCD_PREFIX", default_value = crate::flannel::DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = subnet_env::DEFAULT_PATH)]
    pub subnet_file: PathBuf,
    /// bpffs directory for the maps and program links. When its parent
    /// (/sys/fs/bpf) is no BPF filesystem, the agent mounts one there.
    #[arg(long, env = "WEFT_PIN_PATH", default_value = "/sys/fs/bpf/weft")]
    pub pin_path: PathBuf,
    /// Where the agent keeps its lease and etcd sync state (JSON) for
    /// `node-agent status`, which reads it even with the agent stopped.
    #[arg(long, env = "WEFT_STATE_FILE", default_value = agent_state::DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// Where VXLAN is decapsulated.
    #[arg(long, env = "WEFT_DECAP_MODE", value_enum, default_value_t = DecapMode::Auto)]
    pub decap_mode: DecapMode,
    /// How decapsulated packets reach their container: `kernel` (IP
    /// forwarding, through netfilter and conntrack, as with flannel) or
    /// `bpf` (the decap program hands them to the container's bridge,
    /// skipping both; see the README's "Host routing").
    #[arg(long, env = "WEFT_HOST_ROUTING", value_enum, default_value_t = HostRouting::Kernel)]
    pub host_routing: HostRouting,
    /// flannel renews its lease this many minutes before it expires. weft
    /// renews every hour, earlier than any margin up to 1380 asks; the value
    /// is checked as flannel checks it (1 to 1439).
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..1440)
    )]
    pub subnet_lease_renew_margin: u32,
    /// Masquerade traffic from this node's containers to destinations
    /// outside the cluster network (flannel's --ip-masq).
    #[arg(
        long,
        env = "FLANNELD_IP_MASQ",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = go_bool
    )]
    pub ip_masq: bool,
    /// Accept cluster-network traffic in iptables' FORWARD chain, so a DROP
    /// policy (Docker sets one) does not stop it.
    #[arg(
        long = "iptables-forward-rules",
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = go_bool
    )]
    pub forward_rules: bool,
    /// Seconds between checks that the firewall rules are still in place.
    #[arg(
        long = "iptables-resync",
        env = "FLANNELD_IPTABLES_RESYNC",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub firewall_resync_secs: u64,
    /// Firewall mark ORed into every decapsulated packet (`meta mark & MARK
    /// == MARK` in nftables); decimal or 0x-hex, 0 = no mark.
    #[arg(
        long,
        env = "WEFT_DECAP_MARK",
        default_value = "0x1000",
        value_parser = parse_mark
    )]
    pub decap_mark: u32,
    /// On a node flanneld ran on, remove its devices, routes and iptables
    /// chains once weft's data path forwards (false: leave them to remove
    /// by hand; see the README's "Migrating from flannel").
    #[arg(
        long,
        env = "WEFT_FLANNEL_TAKEOVER",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = go_bool
    )]
    pub flannel_takeover: bool,
}

impl RunSettings {
    /// How the underlay interface is chosen, from the `--iface*` flags.
    pub fn iface_choice(&self) -> IfaceChoice {
        IfaceChoice {
            ifaces: self.iface.clone(),
            regexes: self.iface_regex.clone(),
            can_reach: self.iface_can_reach,
            public_ip: self.public_ip,
        }
    }
}

/// A boolean as flanneld reads its flags and `FLANNELD_*` variables (Go's
/// `strconv.ParseBool`: `1`, `t`, `TRUE`, `0`, `f`, `False`, ...), so a
/// flanneld unit file's values mean the same here.
fn go_bool(s: &str) -> Result<bool, String> {
    crate::flannel::subnet_env::parse_go_bool(s)
        .ok_or_else(|| format!("{s:?} is not a boolean (true, false, 1, 0, t, f)"))
}

/// A firewall mark, in decimal or `0x` hex as iptables and nft print them.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a 32-bit mark (decimal or 0x-hex): {e}"))
}

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// flanneld's environment variables this agent reads: every flag's.
fn known_flannel_env() -> BTreeSet<String> {
    use clap::Args as _;
    RunSettings::augment_args(clap::Command::default())
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// flanneld's flags that weft does not implement, and why. Given on the
/// command line or as `FLANNELD_*`, each stops the agent with its reason.
pub const UNSUPPORTED_FLANNEL_FLAGS: &[(&str, &str)] = &[
    ("public-ipv6", "weft's data path is IPv4 only"),
    (
        "ip-masq-fully-random-disable",
        "weft's masquerade rules always use fully random ports",
    ),
    (
        "ip-blackhole-route",
        "weft installs no blackhole route for the local subnet",
    ),
    (
        "kube-subnet-mgr",
        "weft leases subnets in etcd only, not through the Kubernetes API",
    ),
    ("kube-api-url", "weft has no Kubernetes subnet manager"),
    (
        "kube-annotation-prefix",
        "weft has no Kubernetes subnet manager",
    ),
    ("kubeconfig-file", "weft has no Kubernetes subnet manager"),
    (
        "net-config-path",
        "weft reads the network config from etcd (<etcd-prefix>/config) only",
    ),
    (
        "set-node-network-unavailable",
        "weft has no Kubernetes subnet manager",
    ),
    ("v", "set the log level with RUST_LOG (e.g. RUST_LOG=debug)"),
    ("vmodule", "set per-module log levels with RUST_LOG"),
    ("log_backtrace_at", "weft logs through tracing, not klog"),
];

/// The environment form flanneld reads a flag from: `FLANNELD_` and the
/// name upper-cased, dashes as underscores.
fn flannel_env_name(flag: &str) -> String {
    format!("FLANNELD_{}", flag.to_ascii_uppercase().replace('-', "_"))
}

/// Refuses a flanneld flag weft does not implement among `args` (the words
/// after `run`), naming it with the reason. Checked before clap parses, so
/// the answer is the reason rather than "unexpected argument".
pub fn check_unsupported_flags<'a>(args: impl IntoIterator<Item = &'a str>) -> anyhow::Result<()> {
    for arg in args {
        if arg == "--" {
            break;
        }
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue;
        };
        let name = name.split_once('=').map_or(name, |(n, _)| n);
        if let Some((flag, why)) = UNSUPPORTED_FLANNEL_FLAGS.iter().find(|(f, _)| *f == name) {
            bail!("flanneld's --{flag} is not supported: {why} (see the README's flag table)");
        }
    }
    Ok(())
}

/// A `FLANNELD_*` variable no flag reads is a flannel setting weft does not
/// implement: refusing it beats ignoring what the unit file asks for.
fn check_flannel_env(vars: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let known = known_flannel_env();
    let mut problems = Vec::new();
    for var in vars {
        if !var.starts_with("FLANNELD_") || known.contains(&var) {
            continue;
        }
        match UNSUPPORTED_FLANNEL_FLAGS
            .iter()
            .find(|(flag, _)| flannel_env_name(flag) == var)
        {
            Some((_, why)) => problems.push(format!("{var} is not supported: {why}")),
            None => problems.push(format!("{var} is no flanneld setting weft implements")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}; unset it (see the README's flag table)",
            problems.join("; ")
        );
    }
    Ok(())
}

pub async fn run(s: RunSettings) -> anyhow::Result<()> {
    check_flannel_env(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
    // Flags no retry can fix (an endpoint that is no URL, an unreadable
    // TLS file) stop the agent before it touches anything.
    let etcd_opts = s.etcd.connect_options().context("etcd settings")?;
    if u64::from(s.subnet_lease_renew_margin) * 60
        > (crate::lease_manager::LEASE_TTL - crate::lease_manager::RENEW_EVERY).as_secs()
    {
        tracing::warn!(
            margin_minutes = s.subnet_lease_renew_margin,
            "--subnet-lease-renew-margin asks for renewals more often than hourly; weft renews every hour"
        );
    }
    let keys = KeyLayout::new(&s.etcd_prefix).context("--etcd-prefix")?;
    let nl = RtNetlink::open().context("netlink")?;
    let (iface, chosen_by) = netconf::choose_interface(&nl, &s.iface_choice())
        .await
        .context("choosing the underlay interface")?;
    let public_ip = match s.public_ip.or(chosen_by) {
        Some(ip) => ip,
        None => iface.primary_ipv4().context("--public-ip default")?,
    };
    tracing::info!(iface = %iface.name, %public_ip, mtu = iface.mtu, "starting");

    let mut client = connect(&s.etcd, etcd_opts).await?;
    let cfg = wait_for_config(&mut client, &keys).await;

    // The VtepMAC is the underlay interface's own MAC: decapsulated frames
    // then already carry this host's address, and a flannel vxlan peer
    // addresses its inner frames to it. host-gw and ipip leases carry no
    // BackendData, exactly as flannel writes them.
    let (vxlan, decap) = match &cfg.backend {
        Backend::Vxlan(v) => (Some(*v), DECAP_VXLAN),
        Backend::Ipip => (None, DECAP_IPIP),
        Backend::HostGw => (None, 0),
    };
    let attrs = LeaseAttrs {
        public_ip,
        backend_type: cfg.backend.type_name().to_owned(),
        backend_data: vxlan.map(|v| VxlanLeaseData {
            vni: Some(v.vni),
            vtep_mac: iface.mac,
        }),
    };
    let flannel =
        flannel_takeover::detect_logged(&nl, &mut client, &keys, cfg.network, iface.ifindex).await;
    let lease_attrs = flannel_takeover::adopted_attrs(&attrs, &flannel);
    let file_subnet = read_subnet_file(&s.subnet_file);
    let mut leases = LeaseManager::new(client.clone(), keys.clone(), lease_attrs.clone());
    let held = {
        let mut delay = RETRY_MIN;
        loop {
            match leases.acquire(&cfg, file_subnet).await {
                Ok(held) => break held,
                Err(e) => tracing::error!(error = %e, "cannot lease a subnet; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    };
    tracing::info!(subnet = %held.subnet, how = held.how, "subnet leased");
    let status = AgentStatus::new(held.subnet, cfg.backend.type_name());
    let leases = leases.with_status(status.clone());

    let mtu = flannel_mtu(iface.mtu, &cfg.backend);
    let underlay = underlay_mtu(iface.mtu, &cfg.backend);
    if underlay > iface.mtu {
        tracing::warn!(
            backend_mtu = underlay,
            iface_mtu = iface.mtu,
            "the backend's MTU is above the interface's: full-size packets will be fragmented \
             on the underlay, as with flannel; lower Backend.MTU to {} at most",
            iface.mtu
        );
    }
    let cluster_route = ClusterRoute {
        network: cfg.network,
        ifindex: iface.ifindex,
        iface_mac: iface.mac,
        mtu: Some(mtu),
    };
    // Before anything on the host changes: one route for the whole Network
    // must not take over what the node needs to reach.
    netconf::check_network_capture(
        &nl,
        &cluster_route,
        held.subnet,
        &iface.addrs,
        &endpoint_ips(&s.etcd.etcd_endpoints),
        &flannel.routes,
    )
    .await
    .context("refusing to install the cluster route")?;

    let load = LoadOptions {
        decap_mark: s.decap_mark,
        host_routing: s.host_routing,
        public_ip_is_local: iface.addrs.iter().any(|a| a.addr() == public_ip),
    };
    let mut dp = Datapath::load(&s.pin_path, load)
        .with_context(|| format!("loading BPF objects under {}", s.pin_path.display()))?;
    let logger = match aya_log::EbpfLogger::init(dp.ebpf_mut()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "BPF error logs unavailable");
            None
        }
    };

    let env = SubnetEnv {
        network: cfg.network,
        subnet: held.subnet,
        mtu,
        ipmasq: s.ip_masq,
    };
    subnet_env::write_atomic(&s.subnet_file, &env.render())
        .with_context(|| format!("writing {}", s.subnet_file.display()))?;

    netconf::enable_ipv4_forwarding()?;
    let firewall = Firewall::new(FirewallPlan {
        network: cfg.network,
        subnet: held.subnet,
        ip_masq: s.ip_masq,
        forward_rules: s.forward_rules,
    });
    let mut nft = Nft::open().context("netfilter")?;
    firewall
        .sync(&mut nft)
        .context("installing the firewall rules (--ip-masq, --iptables-forward-rules)")?;
    tracing::info!(
        ip_masq = s.ip_masq,
        forward_rules = s.forward_rules,
        "firewall rules in place"
    );
    let slow_path = slow_path_device(&nl, vxlan.map(|v| v.port), iface.mtu).await;
    let ipip_slow_path = (decap == DECAP_IPIP)
        .then(|| ipip_slow_path::IpipSlowPath::open(public_ip, iface.mac))
        .transpose()
        .unwrap_or_else(|e| {
            tracing::warn!(
                error = %e,
                "no IP-in-IP slow path: reassembled outer fragments and too-big packets without DF will be lost"
            );
            None
        });
    let ipip_tap = match &ipip_slow_path {
        Some(_) => Some(
            nl.link_by_name(ipip_slow_path::IPIP_TAP)
                .await
                .context("the IP-in-IP tap")?
                .index,
        ),
        None => None,
    };
    let node_config = NodeConfig {
        configured: 1,
        public_ip: public_ip.octets(),
        vtep_mac: iface.mac,
        vxlan_port_be: vxlan.map_or(0, |v| v.port.to_be()),
        vni: vxlan.map_or(0, |v| v.vni),
        iface_ifindex: iface.ifindex,
        iface_mtu: datapath_mtu(iface.mtu, &cfg.backend),
        iface_mac: iface.mac,
        cluster_prefix_len: cfg.network.prefix_len(),
        local_prefix_len: held.subnet.prefix_len(),
        cluster_network: cfg.network.network().octets(),
        local_subnet: held.subnet.network().octets(),
        decap,
        slow_path_ifindex: slow_path.map(|(index, _)| index).or(ipip_tap).unwrap_or(0),
    };
    dp.write_node_config(&node_config)?;
    // host-gw receives plain packets: no decap hook at all. On a veth an XDP
    // program would even turn TSO off on the peer, for nothing.
    let decap_mode = (decap != 0).then(|| {
        let driver = crate::ethtool::driver(&iface.name).ok();
        let (mode, why) = datapath::resolve_decap_mode(
            s.decap_mode,
            slow_path.is_some(),
            driver.as_deref(),
        );
        if let Some(why) = why {
            tracing::info!(requested = ?s.decap_mode, chosen = ?mode, iface = %iface.name, driver = driver.as_deref().unwrap_or("unknown"), "{why}");
        }
        mode
    });
    let hook = dp.attach(
        &iface.name,
        flannel_takeover::early_decap(&flannel, decap_mode),
    )?;
    dp.attach_slow_path(
        PROG_SLOWPATH_RX_TC,
        slow_path.map(|(_, fresh)| (netconf::SLOW_PATH_DEVICE, fresh)),
    )?;
    // The tap is new with every start (it lives as long as this process).
    dp.attach_slow_path(
        PROG_SLOWPATH_IPIP_TC,
        ipip_slow_path
            .as_ref()
            .map(|_| (ipip_slow_path::IPIP_TAP, true)),
    )?;
    dp.remove_stale_pins()?;
    if let Some(index) = ipip_tap {
        // Up only now that its program is attached: nothing is read from
        // the raw socket until the task below runs anyway.
        nl.link_set_up(index)
            .await
            .context("bringing the IP-in-IP tap up")?;
    }
    // Subscribed before the route goes in, so no removal of it is missed.
    let events = NetlinkEvents::subscribe().context("netlink events")?;
    let (recreated_tx, recreated) = tokio::sync::mpsc::unbounded_channel();
    let mut host = HostNetworking::new(cluster_route, iface.addrs.clone())
        .follow_recreation(iface.name.clone(), recreated_tx);
    host.ensure_route(&nl)
        .await
        .context("installing the cluster route")?;
    tracing::info!(?hook, host_routing = ?s.host_routing, pin_path = %s.pin_path.display(), "data path attached");
    if s.host_routing == HostRouting::Bpf && hook == Some(datapath::DecapHook::Xdp) {
        tracing::warn!(
            "--host-routing bpf applies to TC and device decapsulation; XDP-decapsulated packets go up the stack and are forwarded by the kernel (with vxlan, reassembled ones still take the slow path's BPF host routing)"
        );
    }
    observe::serve(
        &s.observe,
        AgentInfo {
            pin_path: s.pin_path.clone(),
            subnet: held.subnet,
            backend: cfg.backend.type_name(),
            status: status.clone(),
            etcd_grace: Duration::from_secs(s.observe.etcd_grace_secs),
        },
    )
    .await
    .context("--healthz-port / --metrics-addr")?;
    let table = PeerTable::new(&cfg, held.subnet, public_ip, iface.addrs.clone());
    let peer_maps = dp.take_peer_maps()?;
    let (peer_ips, peer_ips_rx) = tokio::sync::watch::channel(BTreeSet::new());
    // Shared by the interface follower and the flannel take-over (which
    // attaches a decap hook it held back); neither holds it across a wait.
    let dp = std::sync::Arc::new(tokio::sync::Mutex::new(dp));
    let adoption = Adoption {
        nl: nl.clone(),
        state: flannel,
        remove: s.flannel_takeover,
        pin_path: s.pin_path.clone(),
        attrs: attrs.clone(),
        acquired_with: lease_attrs,
        datapath: dp.clone(),
        iface: iface.name.clone(),
        decap: decap_mode,
    };
    let watcher = PeerWatcher::new(
        client,
        keys,
        table,
        peer_maps,
        held.clone(),
        attrs,
        peer_ips,
    )
    .with_status(status.clone())
    .with_ready_notice(format!("forwarding for {}", held.subnet));
    tokio::select! {
        () = host.run(&nl, Some(events), peer_ips_rx) => bail!("host networking task stopped"),
        () = keep_firewall(&firewall, nft, Duration::from_secs(s.firewall_resync_secs)) => bail!("firewall task stopped"),
        err = watcher.run() => {
            Err(anyhow::Error::new(err)).context("stopping: this node no longer holds its subnet lease; restart the agent to lease again")
        }
        r = flannel_takeover::adopt_then_renew(leases, held, adoption) => r.context("subnet lease"),
        () = drain_bpf_logs(logger) => bail!("BPF log reader stopped"),
        () = follow_iface(
            &dp,
            &nl,
            node_config,
            &cfg.backend,
            &iface.name,
            decap_mode,
            slow_path.and(vxlan).map(|v| netconf::slow_path_device(v.port, iface.mtu)),
            recreated,
        ) => bail!("interface follower stopped"),
        () = status.keep_written(s.state_file.clone()) => bail!("state file writer stopped"),
        e = run_ipip_slow_path(ipip_slow_path) => {
            Err(anyhow::Error::new(e)).context("the IP-in-IP slow path's raw socket failed")
        }
        r = shutdown_signal() => {
            r?;
            tracing::info!("stopping; the data path stays in place (`node-agent cleanup` removes it)");
            Ok(())
        }
    }
}

/// Sets up the slow-path device for a VXLAN backend on `port` (`None`: not
/// VXLAN, and a device left by an earlier VXLAN run is removed). Returns its
/// ifindex and whether it is new. Without it the fast path still works and
/// only too-big packets without DF and outer fragments are lost, as before
/// the slow path existed, so a failure (e.g. the port is taken by a flannel
/// device in the same namespace) is logged, not fatal.
async fn slow_path_device(nl: &RtNetlink, port: Option<u16>, mtu: u32) -> Option<(u32, bool)> {
    let Some(port) = port else {
        match netconf::remove_slow_path_device(nl).await {
            Ok(true) => tracing::info!(
                device = netconf::SLOW_PATH_DEVICE,
                "removed the slow-path device: the backend is not vxlan"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the slow-path device"),
        }
        return None;
    };
    let dev = netconf::slow_path_device(port, mtu);
    match netconf::ensure_slow_path_device(nl, &dev).await {
        Ok((index, fresh)) => {
            tracing::info!(device = %dev.name, index, port, fresh, "slow-path device ready");
            Some((index, fresh))
        }
        Err(e) => {
            tracing::warn!(
                device = %dev.name,
                error = %e,
                "no slow-path device: too-big packets without DF and outer fragments will be dropped"
            );
            None
        }
    }
}

/// How often the slow-path device is checked for (it has no other user
/// whose events would tell).
const SLOW_PATH_CHECK: Duration = Duration::from_secs(5);

/// Keeps the data path on its devices while the agent runs. Whenever
/// `--iface` is deleted and created again (`recreated` gets the new link),
/// NODE_CONFIG is written first, with the new ifindex, MTU and MAC, then the
/// programs are attached (their pinned links died with the old interface,
/// see `adopt_or_attach`). A deleted slow-path device (`slow_path`: the
/// device this run set up) is created again and its program attached. A
/// failure (the interface gone again, not ready) is logged once and
/// retried.
#[expect(
    clippy::too_many_arguments,
    reason = "the run's fixed facts, each used once; a struct would only rename them"
)]
async fn follow_iface(
    dp: &tokio::sync::Mutex<Datapath>,
    nl: &RtNetlink,
    mut cfg: NodeConfig,
    backend: &Backend,
    iface: &str,
    decap: Option<DecapMode>,
    slow_path: Option<ExternalVxlan>,
    mut recreated: tokio::sync::mpsc::UnboundedReceiver<crate::netlink::Link>,
) {
    const RETRY: Duration = Duration::from_secs(2);
    let mut pending: Option<crate::netlink::Link> = None;
    let mut last_failure: Option<String> = None;
    let mut check = tokio::time::interval(SLOW_PATH_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retry = async {
            match pending {
                Some(_) => tokio::time::sleep(RETRY).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            link = recreated.recv() => {
                // Closed only when the agent is stopping.
                let Some(link) = link else {
                    return std::future::pending().await;
                };
                cfg.iface_ifindex = link.index;
                cfg.iface_mtu = datapath_mtu(link.mtu, backend);
                cfg.iface_mac = link.mac;
                pending = Some(link);
                reattach(&mut *dp.lock().await, &cfg, iface, decap)
            }
            () = retry => reattach(&mut *dp.lock().await, &cfg, iface, decap),
            _ = check.tick(), if slow_path.is_some() => {
                match recreate_slow_path(&mut *dp.lock().await, nl, &mut cfg, slow_path.as_ref()).await {
                    // Not an --iface failure: that one stays pending.
                    Ok(()) if pending.is_some() => continue,
                    other => other,
                }
            }
        };
        match result {
            Ok(()) => {
                if pending.take().is_some() {
                    tracing::info!(%iface, ifindex = cfg.iface_ifindex, "data path attached to the re-created interface");
                } else if last_failure.is_some() {
                    tracing::info!("the slow-path device is in place again");
                }
                last_failure = None;
            }
            Err(e) => {
                let text = format!("{e:#}");
                if last_failure.as_deref() != Some(text.as_str()) {
                    tracing::warn!(%iface, error = %text, "cannot attach the data path to a re-created device yet; retrying");
                }
                last_failure = Some(text);
            }
        }
    }
}

/// NODE_CONFIG, then the programs, onto the current `--iface`.
fn reattach(
    dp: &mut Datapath,
    cfg: &NodeConfig,
    iface: &str,
    decap: Option<DecapMode>,
) -> anyhow::Result<()> {
    dp.write_node_config(cfg)?;
    dp.attach(iface, decap)?;
    Ok(())
}

/// Creates the slow-path device again if it was deleted (or changed), and
/// attaches its program and points NODE_CONFIG at it.
async fn recreate_slow_path(
    dp: &mut Datapath,
    nl: &RtNetlink,
    cfg: &mut NodeConfig,
    dev: Option<&ExternalVxlan>,
) -> anyhow::Result<()> {
    let Some(dev) = dev else { return Ok(()) };
    let (index, fresh) = netconf::ensure_slow_path_device(nl, dev)
        .await
        .context("the slow-path device")?;
    if fresh {
        tracing::warn!(device = %dev.name, index, "the slow-path device was deleted; created it again");
        dp.attach_slow_path(PROG_SLOWPATH_RX_TC, Some((&dev.name, true)))?;
        cfg.slow_path_ifindex = index;
        dp.write_node_config(cfg)?;
    }
    Ok(())
}

/// Runs the IP-in-IP slow path, if there is one; otherwise never returns.
async fn run_ipip_slow_path(path: Option<ipip_slow_path::IpipSlowPath>) -> std::io::Error {
    match path {
        Some(path) => path.run().await,
        None => std::future::pending().await,
    }
}

/// Checks the firewall rules every `every` and puts back what is missing or
/// changed, as flanneld's `--iptables-resync` does. A repair or a new
/// failure is logged once.
async fn keep_firewall(firewall: &Firewall, nft: Nft, every: Duration) {
    let mut nft = Some(nft);
    let mut last_failure: Option<String> = None;
    loop {
        tokio::time::sleep(every).await;
        let result = match nft.take() {
            Some(n) => Ok(n),
            None => Nft::open(),
        }
        .and_then(|mut n| {
            let repairs = firewall.sync(&mut n);
            nft = Some(n);
            repairs
        });
        match result {
            Ok(repairs) => {
                if repairs != Repairs::default() {
                    tracing::warn!(
                        masquerade = repairs.masq,
                        forward = repairs.forward,
                        "firewall rules were missing or changed (a new FORWARD chain, or deleted by hand); installed again"
                    );
                } else if last_failure.is_some() {
                    tracing::info!("firewall rules in place again");
                }
                last_failure = None;
            }
            Err(e) => {
                let text = e.to_string();
                if last_failure.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "cannot check the firewall rules; retrying");
                }
                last_failure = Some(text);
                nft = None;
            }
        }
    }
}

/// The IPv4 addresses among the etcd endpoint URLs (names are left to the
/// resolver and not checked).
pub(crate) fn endpoint_ips(endpoints: &[String]) -> Vec<Ipv4Addr> {
    endpoints
        .iter()
        .filter_map(|url| {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let host_port = rest.split('/').next()?;
            let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
            host.parse().ok()
        })
        .collect()
}

/// Connects to etcd, retrying while it is unreachable. A configuration no
/// retry can fix (a bad file, a wrong CA or password, a client certificate
/// etcd refuses or does not get) ends the agent with
/// the error, which names the flag, file or user.
async fn connect(
    settings: &EtcdSettings,
    opts: etcd_client::ConnectOptions,
) -> anyhow::Result<Client> {
    let mut delay = RETRY_MIN;
    let mut last = String::new();
    loop {
        match settings.connect(opts.clone()).await {
            Ok(client) => return Ok(client),
            Err(e) if e.is_fatal() => return Err(e).context("connecting to etcd"),
            Err(e) => {
                let msg = e.to_string();
                if msg != last {
                    tracing::warn!(error = %msg, "etcd connection failed; retrying");
                    last = msg;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// Reads the network config, waiting until it exists and is valid. Each new
/// problem is logged once, naming the key.
async fn wait_for_config(client: &mut Client, keys: &KeyLayout) -> NetworkConfig {
    let key = keys.config_key();
    let mut last_problem = String::new();
    loop {
        let problem = match client.get(key.as_str(), None).await {
            Err(e) => format!("cannot read it: {}", crate::etcd::describe(&e)),
            Ok(resp) => match resp.kvs().first() {
                None => "missing".to_owned(),
                Some(kv) => match std::str::from_utf8(kv.value())
                    .map_err(|e| e.to_string())
                    .and_then(|v| NetworkConfig::parse(v).map_err(|e| e.to_string()))
                {
                    Ok(cfg) => return cfg,
                    Err(e) => e,
                },
            },
        };
        if problem != last_problem {
            tracing::error!(%key, %problem, "network config unusable; waiting for a valid one");
            last_problem = problem;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn read_subnet_file(path: &Path) -> Option<Ipv4Net> {
    let text = std::fs::read_to_string(path).ok()?;
    match subnet_env::parse_subnet(&text) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable subnet file");
            None
        }
    }
}

async fn drain_bpf_logs(logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    // SAFETY: the logger owns the ring buffer's fd and moves into the
    // AsyncFd, so the fd stays open for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll BPF logs");
            return std::future::pending().await;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!(error = %e, "BPF log reader failed");
                return std::future::pending().await;
            }
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// How a peer is reached, in words.
fn peer_mode(node: &weft_common::RemoteNode) -> String {
    match node.mode {
        m if m == Mode::Vxlan as u8 => "vxlan".to_owned(),
        m if m == Mode::Ipip as u8 => "ipip".to_owned(),
        m if m == Mode::Direct as u8 => "direct".to_owned(),
        m => format!("mode {m}?"),
    }
}

/// Where `peer` is sent on the underlay: the gateway of the longest main
/// table route covering it, or the address itself when that route is a
/// connected one (or none covers it: the FIB lookup then drops).
fn next_hop(routes: &[ListedRoute], peer: Ipv4Addr) -> Option<(Ipv4Addr, Option<u32>)> {
    routes
        .iter()
        .filter(|r| r.table == MAIN_TABLE && r.dst.contains(&peer))
        .max_by_key(|r| r.dst.prefix_len())
        .map(|r| (r.gateway.unwrap_or(peer), r.ifindex))
}

/// The main routing table's id (RT_TABLE_MAIN).
const MAIN_TABLE: u32 = 254;

/// The host state weft owns besides the maps: the cluster route, the
/// managed neighbour entries of the peers, the slow-path device, with the
/// main table for the peers' next hops.
struct HostState {
    routes: Vec<ListedRoute>,
    cluster_route: Option<ListedRoute>,
    managed_neighbours: Vec<Ipv4Addr>,
    slow_path_device: bool,
}

async fn host_state(cfg: Option<&NodeConfig>) -> anyhow::Result<HostState> {
    let nl = RtNetlink::open().context("netlink")?;
    let routes = nl.routes().await?;
    let network = cfg
        .and_then(|c| Ipv4Net::new(Ipv4Addr::from(c.cluster_network), c.cluster_prefix_len).ok());
    let cluster_route = routes
        .iter()
        .find(|r| Some(r.dst) == network && r.gateway == network.map(|n| n.network()))
        .copied();
    let managed_neighbours = match cfg {
        Some(c) if nl.link_by_index(c.iface_ifindex).await?.is_some() => nl
            .neighbours(c.iface_ifindex)
            .await?
            .into_iter()
            .filter(|n| n.managed)
            .map(|n| n.dst)
            .collect(),
        _ => Vec::new(),
    };
    let slow_path_device = nl.vxlan_by_name(netconf::SLOW_PATH_DEVICE).await?.is_some();
    Ok(HostState {
        routes,
        cluster_route,
        managed_neighbours,
        slow_path_device,
    })
}

/// Lease and sync state from the agent's state file, for `status`.
fn agent_json(state_file: &Path) -> serde_json::Value {
    use serde_json::json;
    let snap = match StateSnapshot::read(state_file) {
        Ok(Some(s)) => s,
        Ok(None) => {
            return json!({
                "running": false,
                "state_file": state_file.display().to_string(),
                "error": "no state file: the agent has not run with this --state-file",
            });
        }
        Err(e) => {
            return json!({
                "running": false,
                "state_file": state_file.display().to_string(),
                "error": e.to_string(),
            });
        }
    };
    let now = agent_state::unix(std::time::SystemTime::now());
    let running = snap.agent_running();
    json!({
        "running": running,
        "pid": snap.pid,
        "version": snap.version,
        "started_at": snap.started_at,
        "state_file": state_file.display().to_string(),
        "lease": {
            "subnet": snap.subnet,
            "backend": snap.backend,
            "reservation": snap.lease_reservation,
            "expires_at": snap.lease_expires_at,
            "expires_in_seconds": snap.lease_expires_at.map(|at| at.saturating_sub(now)),
        },
        "sync": {
            // What a stopped agent last knew is history, not a state.
            "state": if running { snap.sync.name() } else { "agent_not_running" },
            "last_state": snap.sync.name(),
            "since": snap.sync_since,
            "out_of_sync_seconds": snap.out_of_sync_for(now).map(|d| d.as_secs()),
            "last_event_at": snap.last_event_at,
            "reconciles": snap.reconciles,
            "skipped_leases": snap.skipped_leases,
        },
    })
}

/// `status --json`: the same facts as the text, for scripts. Field names
/// are stable; new ones may be added.
fn status_json(
    state: &PinnedState,
    host: &anyhow::Result<HostState>,
    state_file: &Path,
) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let routes = host.as_ref().map(|h| h.routes.as_slice()).unwrap_or(&[]);
    let peers: Option<Vec<_>> = if_readable(state.peers())?.map(|peers| {
        peers
            .iter()
            .map(|(subnet, node)| {
                let ip = Ipv4Addr::from(node.public_ip);
                let hop = next_hop(routes, ip);
                json!({
                    "subnet": subnet.to_string(),
                    "public_ip": ip.to_string(),
                    "mode": peer_mode(node),
                    "vtep_mac": crate::flannel::lease::format_mac(&node.vtep_mac),
                    "vni": node.vni,
                    "next_hop": hop.map(|(gw, _)| gw.to_string()),
                    "next_hop_ifindex": hop.and_then(|(_, index)| index),
                })
            })
            .collect()
    });
    let table = if_readable(state.counter_table())?;
    let by_reason = table.as_deref().map(packets_by_reason);
    let counters: Option<serde_json::Map<String, serde_json::Value>> =
        by_reason.as_ref().map(|c| {
            c.iter()
                .map(|(reason, n)| (reason.name().to_owned(), json!(n)))
                .collect()
        });
    let drops: Option<serde_json::Map<String, serde_json::Value>> = by_reason.as_ref().map(|c| {
        c.iter()
            .filter(|(reason, _)| reason.is_drop())
            .map(|(reason, n)| (reason.name().to_owned(), json!(n)))
            .collect()
    });
    let slots: Option<Vec<_>> = table.as_ref().map(|table| {
        table
            .iter()
            .filter(|row| row.packets != 0 || row.ext_err != 0)
            .map(|row| {
                json!({
                    "program": row.program.name(),
                    "reason": row.reason.name(),
                    "packets": row.packets,
                    "bytes": row.bytes,
                    "helper_return_code": row.ext_err,
                })
            })
            .collect()
    });
    let unreadable: Vec<_> = state
        .unreadable()
        .iter()
        .map(|u| json!({ "map": u.name, "why": u.why }))
        .collect();
    let node = if_readable(state.node_config())?.flatten().map(|c| {
        json!({
            "configured": c.configured != 0,
            "public_ip": Ipv4Addr::from(c.public_ip).to_string(),
            "subnet": format!("{}/{}", Ipv4Addr::from(c.local_subnet), c.local_prefix_len),
            "network": format!("{}/{}", Ipv4Addr::from(c.cluster_network), c.cluster_prefix_len),
            "iface_ifindex": c.iface_ifindex,
            "iface_mtu": c.iface_mtu,
            "slow_path_ifindex": c.slow_path_ifindex,
        })
    });
    let host = match host {
        Ok(h) => json!({
            "cluster_route": h.cluster_route.map(|r| json!({
                "dst": r.dst.to_string(),
                "gateway": r.gateway.map(|g| g.to_string()),
                "ifindex": r.ifindex,
                "mtu": r.mtu,
            })),
            "managed_neighbours": h.managed_neighbours.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "slow_path_device": h.slow_path_device,
        }),
        Err(e) => json!({ "error": format!("{e:#}") }),
    };
    let firewall = match Nft::open().and_then(|mut nft| Firewall::installed(&mut nft)) {
        Ok(installed) => json!({
            "masquerade": installed.masq,
            "forward": installed.forward,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    Ok(json!({
        "agent": agent_json(state_file),
        "node": node,
        "peers": peers,
        "counters": counters,
        "drops": drops,
        "counter_slots": slots,
        "host": host,
        "firewall": firewall,
        "unreadable": unreadable,
    }))
}

/// `Ok(None)` for a map this build cannot read: `status` shows the rest and
/// lists it among the unreadable ones.
fn if_readable<T>(r: Result<T, PinnedError>) -> Result<Option<T>, PinnedError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(PinnedError::Unreadable { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Prints the peer table, the counters (what bpftool shows as raw bytes),
/// the host state and, from `state_file`, the lease and etcd sync state,
/// as text or, with `json`, as one JSON object. Works with the agent
/// stopped: everything but the state file is pinned or in the kernel, and
/// over pins of another version it shows what this build can read.
pub async fn status(pin_path: &Path, state_file: &Path, json: bool) -> anyhow::Result<()> {
    let reading = || format!("reading the maps pinned under {}", pin_path.display());
    let state = PinnedState::open(pin_path).with_context(reading)?;
    let cfg = if_readable(state.node_config())
        .with_context(reading)?
        .flatten();
    let host = host_state(cfg.as_ref()).await;
    let value = status_json(&state, &host, state_file).with_context(reading)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let agent = &value["agent"];
    match agent.get("error") {
        Some(e) => println!("agent: {}", e.as_str().unwrap_or_default()),
        None => println!(
            "agent: {} (pid {}), lease {} expires in {}s, etcd {} ({} reconciles)",
            if agent["running"] == true {
                "running"
            } else {
                "not running"
            },
            agent["pid"],
            agent["lease"]["subnet"].as_str().unwrap_or_default(),
            agent["lease"]["expires_in_seconds"],
            agent["sync"]["state"].as_str().unwrap_or_default(),
            agent["sync"]["reconciles"],
        ),
    }
    const UNREADABLE: &str = "not readable by this build, see below";
    let peers = value["peers"].as_array().cloned();
    match &peers {
        Some(peers) => println!("peers ({}):", peers.len()),
        None => println!("peers: {UNREADABLE}"),
    }
    for p in peers.iter().flatten() {
        let text = |k: &str| p[k].as_str().unwrap_or("-").to_owned();
        let mut how = text("mode");
        if how == "vxlan" {
            how = format!("{how} vtep {} vni {}", text("vtep_mac"), p["vni"]);
        }
        println!(
            "  {:<18} -> {:<15} {how}, next hop {}",
            text("subnet"),
            text("public_ip"),
            text("next_hop")
        );
    }
    let counters = if_readable(state.counters()).with_context(reading)?;
    match &counters {
        Some(_) => println!("counters (packets, all programs and CPUs):"),
        None => println!("counters: {UNREADABLE}"),
    }
    for (reason, n) in counters.iter().flatten() {
        println!("  {:<30} {n}", reason.name());
    }
    match &host {
        Ok(h) => {
            match &h.cluster_route {
                Some(r) => println!(
                    "cluster route: {} via {} mtu {}",
                    r.dst,
                    r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    r.mtu
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "-".to_owned())
                ),
                None => println!("cluster route: missing"),
            }
            println!("managed neighbour entries: {}", h.managed_neighbours.len());
            println!(
                "slow-path device {}: {}",
                netconf::SLOW_PATH_DEVICE,
                if h.slow_path_device {
                    "present"
                } else {
                    "absent"
                }
            );
        }
        Err(e) => println!("host state: cannot read ({e:#})"),
    }
    if !state.unreadable().is_empty() {
        println!(
            "maps this build cannot read (another weft version pinned them; \
             `node-agent cleanup` removes them):"
        );
        for u in state.unreadable() {
            println!("  {:<22} {}", u.name, u.why);
        }
    }
    // The firewall rules are this network namespace's, not pinned state.
    match Nft::open().and_then(|mut nft| Firewall::installed(&mut nft)) {
        Ok(installed) => {
            println!("firewall (table ip {}):", crate::nft::TABLE);
            if installed.masq.is_empty() {
                println!("  no masquerade rules (--ip-masq off)");
            }
            for comment in &installed.masq {
                println!("  {comment}");
            }
            match &installed.forward {
                None => println!("iptables FORWARD chain: none here, no forward rules needed"),
                Some(rules) => {
                    println!("iptables FORWARD chain (table ip filter):");
                    if rules.is_empty() {
                        println!("  no weft rules (--iptables-forward-rules off)");
                    }
                    for comment in rules {
                        println!("  {comment}");
                    }
                }
            }
        }
        Err(e) => println!("firewall: cannot read ({e})"),
    }
    Ok(())
}

/// Removes what `run` created: the cluster route and its neighbour entry,
/// the peers' managed neighbour entries, weft's firewall rules, every pin
/// (which detaches the programs), the slow-path device, the subnet file
/// (unless `None`) and the state file.
pub async fn cleanup(
    pin_path: &Path,
    subnet_file: Option<&Path>,
    state_file: &Path,
) -> anyhow::Result<()> {
    // Pins of another version are removed all the same; only the route
    // needs NODE_CONFIG, and is left if it cannot be read.
    let pinned_cfg = if PinnedState::exists(pin_path) {
        match PinnedState::open(pin_path)?.node_config() {
            Ok(cfg) => cfg,
            Err(e @ PinnedError::Unreadable { .. }) => {
                tracing::warn!(error = %e, "the cluster route is left in place: its interface is unknown");
                None
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if let Some(cfg) = pinned_cfg {
        let network = Ipv4Net::new(Ipv4Addr::from(cfg.cluster_network), cfg.cluster_prefix_len)
            .context("pinned NODE_CONFIG holds an invalid network")?;
        let nl = RtNetlink::open().context("netlink")?;
        if nl.link_by_index(cfg.iface_ifindex).await?.is_some() {
            let removed = netconf::remove_managed_neighbours(&nl, cfg.iface_ifindex).await?;
            tracing::debug!(removed, "peer neighbour entries removed");
            ClusterRoute {
                network,
                ifindex: cfg.iface_ifindex,
                iface_mac: cfg.iface_mac,
                mtu: None,
            }
            .remove(&nl)
            .await?;
        } else {
            tracing::info!(
                ifindex = cfg.iface_ifindex,
                "interface is gone, and its route with it"
            );
        }
    }
    let mut nft = Nft::open().context("netfilter")?;
    Firewall::remove(&mut nft).context("removing weft's firewall rules")?;
    datapath::remove_pins(pin_path)?;
    let nl = RtNetlink::open().context("netlink")?;
    if netconf::remove_slow_path_device(&nl)
        .await
        .context("removing the slow-path device")?
    {
        tracing::debug!(
            device = netconf::SLOW_PATH_DEVICE,
            "slow-path device removed"
        );
    }
    for file in [subnet_file, Some(state_file)].into_iter().flatten() {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", file.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_flannel_settings_are_refused_by_name() {
        assert!(check_flannel_env(["FLANNELD_IFACE".to_owned(), "PATH".to_owned()]).is_ok());
        assert!(check_flannel_env(["FLANNELD_ETCD_PASSWORD".to_owned()]).is_ok());
        let err = check_flannel_env(["FLANNELD_KUBE_SUBNET_MGR".to_owned()])
            .expect_err("not implemented");
        assert!(
            err.to_string().contains("FLANNELD_KUBE_SUBNET_MGR"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_flannel_flags_are_refused_with_the_reason() {
        assert!(check_unsupported_flags(["--iface", "eth0", "--ip-masq"]).is_ok());
        let e = check_unsupported_flags(["--iface=eth0", "--kube-subnet-mgr"]).expect_err("kube");
        assert!(
            e.to_string().contains("--kube-subnet-mgr") && e.to_string().contains("etcd"),
            "{e}"
        );
        let e = check_unsupported_flags(["-public-ipv6=fd00::1"]).expect_err("go style");
        assert!(e.to_string().contains("IPv4 only"), "{e}");
        // After `--` nothing is a flag.
        assert!(check_unsupported_flags(["--", "--kube-subnet-mgr"]).is_ok());
        let e = check_flannel_env(["FLANNELD_PUBLIC_IPV6".to_owned()]).expect_err("env");
        assert!(e.to_string().contains("IPv4 only"), "{e}");
        // Every unsupported flag is really not one of ours.
        let known = known_flannel_env();
        for (flag, _) in UNSUPPORTED_FLANNEL_FLAGS {
            assert!(!known.contains(&flannel_env_name(flag)), "{flag}");
        }
    }

    #[test]
    fn every_flanneld_flag_is_implemented_or_refused() {
        // flanneld's flags (main.go), each either read by `run` under its
        // FLANNELD_* name or listed as unsupported.
        let flanneld = [
            "etcd-endpoints",
            "etcd-prefix",
            "etcd-keyfile",
            "etcd-certfile",
            "etcd-cafile",
            "etcd-username",
            "etcd-password",
            "iface",
            "iface-regex",
            "iface-can-reach",
            "subnet-file",
            "public-ip",
            "public-ipv6",
            "subnet-lease-renew-margin",
            "ip-masq",
            "ip-masq-fully-random-disable",
            "kube-subnet-mgr",
            "kube-api-url",
            "kube-annotation-prefix",
            "kubeconfig-file",
            "healthz-ip",
            "healthz-port",
            "iptables-resync",
            "iptables-forward-rules",
            "ip-blackhole-route",
            "net-config-path",
            "set-node-network-unavailable",
        ];
        let known = known_flannel_env();
        for flag in flanneld {
            let implemented = known.contains(&flannel_env_name(flag));
            let refused = UNSUPPORTED_FLANNEL_FLAGS.iter().any(|(f, _)| *f == flag);
            assert!(
                implemented != refused,
                "{flag}: implemented {implemented}, refused {refused}"
            );
        }
    }

    #[test]
    fn boolean_flags_read_go_booleans_as_flanneld_does() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunSettings,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
                .map(|c| (c.run.ip_masq, c.run.forward_rules))
        };
        assert_eq!(parse(&[]).ok(), Some((false, true)));
        assert_eq!(parse(&["--ip-masq"]).ok(), Some((true, true)));
        for (yes, no) in [("1", "0"), ("t", "f"), ("TRUE", "FALSE"), ("True", "false")] {
            let args = [
                format!("--ip-masq={yes}"),
                format!("--iptables-forward-rules={no}"),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_eq!(parse(&args).ok(), Some((true, false)), "{yes} {no}");
        }
        assert!(parse(&["--ip-masq=yes"]).is_err());
    }

    #[test]
    fn marks_parse_in_decimal_and_hex_and_bad_ones_say_why() {
        assert_eq!(parse_mark("4096"), Ok(0x1000));
        assert_eq!(parse_mark("0x1000"), Ok(0x1000));
        assert_eq!(parse_mark("0XFFFF0000"), Ok(0xffff_0000));
        assert_eq!(parse_mark("0"), Ok(0));
        for bad in ["0x", "0x1_0000_0000", "-1", "mark"] {
            let err = parse_mark(bad).expect_err(bad);
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn etcd_endpoint_addresses_are_read_from_urls() {
        let endpoints = [
            "http://198.18.0.254:2379".to_owned(),
            "https://10.0.0.7:2379/".to_owned(),
            "10.0.0.8:2379".to_owned(),
            "http://etcd.example:2379".to_owned(),
        ];
        assert_eq!(
            endpoint_ips(&endpoints),
            [
                Ipv4Addr::new(198, 18, 0, 254),
                Ipv4Addr::new(10, 0, 0, 7),
                Ipv4Addr::new(10, 0, 0, 8)
            ]
        );
    }
}
