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
    datapath::{self, Datapath, DecapMode, LoadOptions},
    etcd::EtcdSettings,
    flannel::{
        Backend, KeyLayout, LeaseAttrs, NetworkConfig, SubnetEnv, VxlanLeaseData, flannel_mtu,
        subnet_env,
    },
    flannel_takeover::{self, Adoption},
    ipip_slow_path,
    lease_manager::LeaseManager,
    netconf::{self, ClusterRoute, HostNetworking, IfaceChoice},
    netlink::{Netlink as _, NetlinkEvents, RtNetlink},
    nft::{Firewall, FirewallPlan, Nft, Repairs},
    observe::{self, AgentInfo, ObserveSettings},
    peers::PeerTable,
    pinned::PinnedState,
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
    /// bpffs directory for the maps and program links.
    #[arg(long, default_value = "/sys/fs/bpf/weft")]
    pub pin_path: PathBuf,
    /// Where VXLAN is decapsulated.
    #[arg(long, value_enum, default_value_t = DecapMode::Auto)]
    pub decap_mode: DecapMode,
    /// Masquerade traffic from this node's containers to destinations
    /// outside the cluster network (flannel's --ip-masq).
    #[arg(long, env = "FLANNELD_IP_MASQ")]
    pub ip_masq: bool,
    /// Accept cluster-network traffic in iptables' FORWARD chain, so a DROP
    /// policy (Docker sets one) does not stop it.
    #[arg(
        long = "iptables-forward-rules",
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
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
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub flannel_takeover: bool,
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

/// A `FLANNELD_*` variable no flag reads is a flannel setting weft does not
/// implement: refusing it beats ignoring what the unit file asks for.
fn check_flannel_env(vars: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let known = known_flannel_env();
    let unknown: Vec<String> = vars
        .into_iter()
        .filter(|v| v.starts_with("FLANNELD_") && !known.contains(v))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{} set, but weft implements no such flanneld setting; unset it (see the README's flag table)",
            unknown.join(", ")
        );
    }
    Ok(())
}

pub async fn run(s: RunSettings) -> anyhow::Result<()> {
    check_flannel_env(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))?;
    let keys = KeyLayout::new(&s.etcd_prefix).context("--etcd-prefix")?;
    let nl = RtNetlink::open().context("netlink")?;
    let choice = IfaceChoice {
        ifaces: s.iface.clone(),
        regexes: s.iface_regex.clone(),
        can_reach: s.iface_can_reach,
    };
    let (iface, chosen_by) = netconf::choose_interface(&nl, &choice)
        .await
        .context("choosing the underlay interface")?;
    let public_ip = match s.public_ip.or(chosen_by) {
        Some(ip) => ip,
        None => iface.primary_ipv4().context("--public-ip default")?,
    };
    tracing::info!(iface = %iface.name, %public_ip, mtu = iface.mtu, "starting");

    let mut client = connect(&s.etcd).await?;
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

    let mtu = flannel_mtu(iface.mtu, &cfg.backend);
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
    dp.write_node_config(&NodeConfig {
        configured: 1,
        public_ip: public_ip.octets(),
        vtep_mac: iface.mac,
        vxlan_port_be: vxlan.map_or(0, |v| v.port.to_be()),
        vni: vxlan.map_or(0, |v| v.vni),
        iface_ifindex: iface.ifindex,
        iface_mtu: iface.mtu,
        iface_mac: iface.mac,
        cluster_prefix_len: cfg.network.prefix_len(),
        local_prefix_len: held.subnet.prefix_len(),
        cluster_network: cfg.network.network().octets(),
        local_subnet: held.subnet.network().octets(),
        decap,
        slow_path_ifindex: slow_path.map(|(index, _)| index).or(ipip_tap).unwrap_or(0),
    })?;
    // host-gw receives plain packets: no decap hook at all. On a veth an XDP
    // program would even turn TSO off on the peer, for nothing.
    let decap_mode = (decap != 0).then_some(s.decap_mode);
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
    if let Some(index) = ipip_tap {
        // Up only now that its program is attached: nothing is read from
        // the raw socket until the task below runs anyway.
        nl.link_set_up(index)
            .await
            .context("bringing the IP-in-IP tap up")?;
    }
    // Subscribed before the route goes in, so no removal of it is missed.
    let events = NetlinkEvents::subscribe().context("netlink events")?;
    let mut host = HostNetworking::new(cluster_route, iface.addrs.clone());
    host.ensure_route(&nl)
        .await
        .context("installing the cluster route")?;
    tracing::info!(?hook, pin_path = %s.pin_path.display(), "data path attached");
    observe::serve(
        &s.observe,
        AgentInfo {
            pin_path: s.pin_path.clone(),
            subnet: held.subnet,
            backend: cfg.backend.type_name(),
        },
    )
    .await
    .context("--healthz-port / --metrics-addr")?;
    observe::notify_ready(&format!("forwarding for {}", held.subnet));

    let table = PeerTable::new(&cfg, held.subnet, public_ip, iface.addrs.clone());
    let peer_maps = dp.take_peer_maps()?;
    let (peer_ips, peer_ips_rx) = tokio::sync::watch::channel(BTreeSet::new());
    let adoption = Adoption {
        nl: nl.clone(),
        state: flannel,
        remove: s.flannel_takeover,
        pin_path: s.pin_path.clone(),
        attrs: attrs.clone(),
        acquired_with: lease_attrs,
        datapath: dp,
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
    );
    tokio::select! {
        () = host.run(&nl, Some(events), peer_ips_rx) => bail!("host networking task stopped"),
        () = keep_firewall(&firewall, nft, Duration::from_secs(s.firewall_resync_secs)) => bail!("firewall task stopped"),
        err = watcher.run() => {
            Err(anyhow::Error::new(err)).context("stopping: this node no longer holds its subnet lease; restart the agent to lease again")
        }
        r = flannel_takeover::adopt_then_renew(leases, held, adoption) => r.context("subnet lease"),
        () = drain_bpf_logs(logger) => bail!("BPF log reader stopped"),
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
fn endpoint_ips(endpoints: &[String]) -> Vec<Ipv4Addr> {
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

/// Connects to etcd, retrying until it answers. etcd-client connects lazily
/// per request afterwards, so later outages are handled by the callers.
/// Connects to etcd, retrying while it is unreachable. A configuration no
/// retry can fix (a bad file, a wrong CA or password) ends the agent with
/// the error, which names the flag, file or user.
async fn connect(settings: &EtcdSettings) -> anyhow::Result<Client> {
    let opts = settings.connect_options().context("etcd settings")?;
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
            Err(e) => format!("cannot read it: {e}"),
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

/// `status --json`: the same facts as the text, for scripts. Field names
/// are stable; new ones may be added.
fn status_json(state: &PinnedState) -> anyhow::Result<serde_json::Value> {
    use serde_json::json;
    let peers: Vec<_> = state
        .peers()?
        .iter()
        .map(|(subnet, node)| {
            json!({
                "subnet": subnet.to_string(),
                "public_ip": Ipv4Addr::from(node.public_ip).to_string(),
                "mode": peer_mode(node),
                "vtep_mac": crate::flannel::lease::format_mac(&node.vtep_mac),
                "vni": node.vni,
            })
        })
        .collect();
    let counters: serde_json::Map<String, serde_json::Value> = state
        .counters()?
        .iter()
        .map(|(reason, n)| (reason.name().to_owned(), json!(n)))
        .collect();
    let node = state.node_config()?.map(|c| {
        json!({
            "configured": c.configured != 0,
            "public_ip": Ipv4Addr::from(c.public_ip).to_string(),
            "subnet": format!("{}/{}", Ipv4Addr::from(c.local_subnet), c.local_prefix_len),
            "network": format!("{}/{}", Ipv4Addr::from(c.cluster_network), c.cluster_prefix_len),
            "iface_ifindex": c.iface_ifindex,
            "iface_mtu": c.iface_mtu,
        })
    });
    let firewall = match Nft::open().and_then(|mut nft| Firewall::installed(&mut nft)) {
        Ok(installed) => json!({
            "masquerade": installed.masq,
            "forward": installed.forward,
        }),
        Err(e) => json!({ "error": e.to_string() }),
    };
    Ok(json!({
        "node": node,
        "peers": peers,
        "counters": counters,
        "firewall": firewall,
    }))
}

/// Prints the peer table and the counters (what bpftool shows as raw bytes),
/// as text or, with `json`, as one JSON object.
pub fn status(pin_path: &Path, json: bool) -> anyhow::Result<()> {
    let reading = || format!("reading the maps pinned under {}", pin_path.display());
    let state = PinnedState::open(pin_path).with_context(reading)?;
    if json {
        let value = status_json(&state).with_context(reading)?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let peers = state.peers().with_context(reading)?;
    println!("peers ({}):", peers.len());
    for (subnet, node) in &peers {
        let mut how = peer_mode(node);
        if node.mode == Mode::Vxlan as u8 {
            how = format!(
                "{how} vtep {} vni {}",
                crate::flannel::lease::format_mac(&node.vtep_mac),
                node.vni
            );
        }
        println!(
            "  {subnet:<18} -> {:<15} {how}",
            Ipv4Addr::from(node.public_ip)
        );
    }
    println!("counters (packets, all CPUs):");
    for (reason, n) in &state.counters().with_context(reading)? {
        println!("  {:<22} {n}", reason.name());
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
/// (which detaches the programs), the slow-path device, and the subnet
/// file (unless `None`).
pub async fn cleanup(pin_path: &Path, subnet_file: Option<&Path>) -> anyhow::Result<()> {
    let pinned_cfg = if PinnedState::exists(pin_path) {
        PinnedState::open(pin_path)?.node_config()?
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
    let Some(subnet_file) = subnet_file else {
        return Ok(());
    };
    match std::fs::remove_file(subnet_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", subnet_file.display()))
        }
        _ => Ok(()),
    }
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
