//! `node-agent doctor`: checks this host for what flannel users trip on,
//! with `run`'s own flags and environment, and explains each problem in one
//! line with its fix. Nothing is changed. A failed check makes the exit
//! status non-zero; a warning (something slow or surprising, not broken)
//! does not.

use std::{fs, io, net::Ipv4Addr, path::Path, time::Duration};

use ipnet::Ipv4Net;
use serde::Serialize;
use weft_common::{PROG_DECAP_TC, PROG_DECAP_XDP, PROG_SLOWPATH_RX_TC};

use crate::{
    agent::{RunSettings, endpoint_ips},
    datapath::{DecapMode, resolve_decap_mode},
    ethtool,
    flannel::{Backend, KeyLayout, NetworkConfig, SubnetEnv, flannel_mtu, underlay_mtu},
    flannel_takeover,
    netconf::{self, ClusterRoute, IfaceChoice, Interface},
    netlink::{Netlink, RtNetlink},
};

/// How long doctor waits for etcd before checking without the config.
const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// The first kernel with tcx links, which the TC programs attach through.
const TCX_KERNEL: (u32, u32) = (6, 6);
/// The container bridges whose MTU must not exceed `FLANNEL_MTU`: the CNI
/// bridge plugin's and dockerd's defaults.
const BRIDGES: [&str; 2] = ["cni0", "docker0"];

/// `node-agent doctor`'s flags: `run`'s, so the same unit file or
/// environment is checked, plus `--json`.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorSettings {
    #[command(flatten)]
    pub run: RunSettings,
    /// One JSON object (`ok`, `checks`) for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not checked: what it needs (the network config) is unknown.
    Skip,
}

/// One check's verdict: what was found, and for a problem, the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skip(name: &'static str, why: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skip,
            detail: why.into(),
            fix: None,
        }
    }

    /// The one-line text form: `FAIL mtu: ... fix: ...`.
    pub fn line(&self) -> String {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        match &self.fix {
            Some(fix) => format!("{tag} {}: {}. Fix: {fix}", self.name, self.detail),
            None => format!("{tag} {}: {}", self.name, self.detail),
        }
    }
}

/// Runs every check, prints them (text or JSON) and fails when one failed.
pub async fn run(settings: &DoctorSettings) -> anyhow::Result<()> {
    let checks = checks(&settings.run).await;
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if settings.json {
        let value = serde_json::json!({ "ok": failed == 0, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for check in &checks {
            println!("{}", check.line());
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// Keeps `result`'s value, or records the check that says why there is none.
fn settle<T>(out: &mut Vec<Check>, result: Result<T, Check>) -> Option<T> {
    result.map_err(|check| out.push(check)).ok()
}

/// Every check, in the order a reader fixes them.
pub async fn checks(s: &RunSettings) -> Vec<Check> {
    let mut out = vec![kernel_btf(), kernel_tcx(), bpffs(&s.pin_path)];
    let opened = RtNetlink::open().map_err(|e| {
        Check::problem(
            "netlink",
            Status::Fail,
            format!("cannot open a netlink socket: {e}"),
            "run doctor as root",
        )
    });
    let Some(nl) = settle(&mut out, opened) else {
        return out;
    };
    let found = interface(&nl, s, &mut out).await;
    let iface = settle(&mut out, found);
    let read = network_config(s, &mut out).await;
    let cfg = settle(&mut out, read);
    let subnet_env = read_subnet_env(&s.subnet_file);
    match (&iface, &cfg) {
        (Some(iface), Some(cfg)) => {
            out.push(mtu(&nl, iface, cfg, subnet_env.as_ref()).await);
            out.push(routes(&nl, s, iface, cfg, subnet_env.as_ref()).await);
            out.push(decap_hook(s, iface, cfg));
            out.push(gro(s, iface, cfg));
        }
        _ => {
            for name in ["mtu", "routes", "decap", "gro"] {
                out.push(Check::skip(
                    name,
                    "needs the interface and the network config",
                ));
            }
        }
    }
    out.push(forwarding());
    out
}

fn kernel_btf() -> Check {
    const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
    if Path::new(VMLINUX).exists() {
        Check::ok("btf", format!("kernel BTF at {VMLINUX}"))
    } else {
        Check::problem(
            "btf",
            Status::Warn,
            format!(
                "no kernel BTF ({VMLINUX} is missing): the verifier's messages are poorer and BTF-dependent features are off"
            ),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)",
        )
    }
}

/// `major.minor` of a kernel release string such as `6.18.0-1-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_tcx() -> Check {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v >= TCX_KERNEL => Check::ok("tcx", format!("kernel {release} has tcx links")),
        Some(_) => Check::problem(
            "tcx",
            Status::Fail,
            format!(
                "kernel {release} is older than {}.{}: weft attaches its TC programs as tcx links, which it lacks",
                TCX_KERNEL.0, TCX_KERNEL.1
            ),
            "run a kernel of 6.6 or later",
        ),
        None => Check::problem(
            "tcx",
            Status::Warn,
            format!("cannot read the kernel version ({release:?})"),
            "check that /proc is mounted",
        ),
    }
}

fn bpffs(pin_path: &Path) -> Check {
    let parent = pin_path.parent().unwrap_or(pin_path);
    if crate::bpffs::is_bpffs(pin_path) || crate::bpffs::is_bpffs(parent) {
        return Check::ok(
            "bpffs",
            format!("{} is on a BPF filesystem", pin_path.display()),
        );
    }
    let empty = match fs::read_dir(parent) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    };
    if empty {
        Check::problem(
            "bpffs",
            Status::Warn,
            format!(
                "{} is no BPF filesystem; the agent mounts one at start",
                parent.display()
            ),
            format!(
                "mount it on the host (`mount -t bpf bpf {}`, or an fstab line) so the pins outlive an agent in a private mount namespace",
                parent.display()
            ),
        )
    } else {
        Check::problem(
            "bpffs",
            Status::Fail,
            format!(
                "--pin-path {} is not on a BPF filesystem, and {} holds other files",
                pin_path.display(),
                parent.display()
            ),
            "use a --pin-path under /sys/fs/bpf",
        )
    }
}

/// The interface and PublicIP `run` would choose.
async fn interface(
    nl: &RtNetlink,
    s: &RunSettings,
    out: &mut Vec<Check>,
) -> Result<Interface, Check> {
    let choice = s.iface_choice();
    let how = describe_choice(&choice);
    let (iface, chosen_by) = netconf::choose_interface(nl, &choice).await.map_err(|e| {
        Check::problem(
            "interface",
            Status::Fail,
            format!("no interface chosen by {how}: {e}"),
            "name the underlay interface with --iface (a name or an address)",
        )
    })?;
    out.push(Check::ok(
        "interface",
        format!(
            "{} (ifindex {}, MTU {}) chosen by {how}",
            iface.name, iface.ifindex, iface.mtu
        ),
    ));
    let own = |ip: Ipv4Addr| iface.addrs.iter().any(|a| a.addr() == ip);
    out.push(match (s.public_ip.or(chosen_by), iface.primary_ipv4()) {
        (Some(ip), _) if own(ip) => Check::ok("public-ip", format!("{ip}, an address of {}", iface.name)),
        (Some(ip), _) => Check::problem(
            "public-ip",
            Status::Warn,
            format!(
                "--public-ip {ip} is not an address of {}: peers send tunnel traffic there, which works only if it is forwarded (1:1 NAT) to this host",
                iface.name
            ),
            format!("drop --public-ip unless {ip} is this host's NAT address"),
        ),
        (None, Ok(ip)) => Check::ok("public-ip", format!("{ip}, {}'s primary address", iface.name)),
        (None, Err(e)) => Check::problem(
            "public-ip",
            Status::Fail,
            e.to_string(),
            format!("give {} an IPv4 address, or pass --public-ip", iface.name),
        ),
    });
    Ok(iface)
}

fn describe_choice(choice: &IfaceChoice) -> String {
    let mut how: Vec<String> = Vec::new();
    if !choice.ifaces.is_empty() {
        how.push(format!("--iface {}", choice.ifaces.join(",")));
    }
    if !choice.regexes.is_empty() {
        how.push(format!("--iface-regex {}", choice.regexes.join(",")));
    }
    if let Some(ip) = choice.can_reach {
        how.push(format!("--iface-can-reach {ip}"));
    }
    match (how.is_empty(), choice.public_ip) {
        (false, _) => how.join(", then "),
        (true, Some(ip)) => format!("the address --public-ip {ip}"),
        (true, None) => "the default route".to_owned(),
    }
}

/// The network config from etcd, when etcd answers within [`ETCD_TIMEOUT`].
async fn network_config(s: &RunSettings, out: &mut Vec<Check>) -> Result<NetworkConfig, Check> {
    const START_ETCD: &str = "start etcd or correct --etcd-endpoints; the checks that need the network config were skipped";
    let keys = KeyLayout::new(&s.etcd_prefix).map_err(|e| {
        Check::problem(
            "config",
            Status::Fail,
            format!("--etcd-prefix: {e}"),
            "use flannel's form, e.g. /coreos.com/network",
        )
    })?;
    let key = keys.config_key();
    let opts = s.etcd.connect_options().map_err(|e| {
        Check::problem(
            "etcd",
            Status::Fail,
            e.to_string(),
            "correct the --etcd-* flags",
        )
    })?;
    let endpoints = s.etcd.etcd_endpoints.join(", ");
    let read = async {
        let mut client = s.etcd.connect(opts).await?;
        client
            .get(key.as_str(), None)
            .await
            .map_err(|e| crate::etcd::EtcdError::Client(Box::new(e)))
    };
    let resp = tokio::time::timeout(ETCD_TIMEOUT, read)
        .await
        .map_err(|_| format!("no answer from {endpoints} within {ETCD_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|problem| Check::problem("etcd", Status::Warn, problem, START_ETCD))?;
    out.push(Check::ok("etcd", format!("reached {endpoints}")));
    let cfg = match resp.kvs().first() {
        None => Err("missing".to_owned()),
        Some(kv) => std::str::from_utf8(kv.value())
            .map_err(|e| e.to_string())
            .and_then(|v| NetworkConfig::parse(v).map_err(|e| e.to_string())),
    }
    .map_err(|problem| {
        Check::problem(
            "config",
            Status::Fail,
            format!("{key}: {problem}"),
            format!(
                "etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}' (with your Network)"
            ),
        )
    })?;
    out.push(Check::ok(
        "config",
        format!(
            "{key}: Network {}, backend {}",
            cfg.network,
            cfg.backend.type_name()
        ),
    ));
    Ok(cfg)
}

fn read_subnet_env(path: &Path) -> Option<SubnetEnv> {
    SubnetEnv::parse(&fs::read_to_string(path).ok()?).ok()
}

/// The MTUs along the way: the interface has room for the encapsulation,
/// `FLANNEL_MTU` is what this config and interface give (as flannel
/// computes it), and no container bridge is wider than it.
async fn mtu(
    nl: &RtNetlink,
    iface: &Interface,
    cfg: &NetworkConfig,
    env: Option<&SubnetEnv>,
) -> Check {
    const NAME: &str = "mtu";
    let want = flannel_mtu(iface.mtu, &cfg.backend);
    let underlay = underlay_mtu(iface.mtu, &cfg.backend);
    if want < 68 {
        return Check::problem(
            NAME,
            Status::Fail,
            format!(
                "{} has MTU {}, too small for the {} backend's header",
                iface.name,
                iface.mtu,
                cfg.backend.type_name()
            ),
            format!("raise {}'s MTU", iface.name),
        );
    }
    if let Some(env) = env
        && env.mtu != want
    {
        return Check::problem(
            NAME,
            Status::Fail,
            format!(
                "the subnet file says FLANNEL_MTU={}, but {}'s MTU {} and this config give {want}",
                env.mtu, iface.name, iface.mtu
            ),
            "restart the agent so it writes the file again, then recreate the containers",
        );
    }
    for bridge in BRIDGES {
        if let Ok(link) = nl.link_by_name(bridge).await
            && link.mtu > want
        {
            return Check::problem(
                NAME,
                Status::Fail,
                format!(
                    "{bridge} has MTU {} but FLANNEL_MTU is {want}: containers send packets the tunnel cannot carry, and TCP stalls where path-MTU discovery is blocked",
                    link.mtu
                ),
                format!(
                    "ip link set {bridge} mtu {want}, and give the containers' interfaces MTU {want} (dockerd --mtu={want}; the CNI plugin reads it from the subnet file)"
                ),
            );
        }
    }
    if underlay > iface.mtu {
        return Check::problem(
            NAME,
            Status::Warn,
            format!(
                "Backend.MTU {underlay} is above {}'s MTU {}: full-size packets are fragmented on the underlay",
                iface.name, iface.mtu
            ),
            format!("set Backend.MTU to {} or less, or drop it", iface.mtu),
        );
    }
    Check::ok(
        NAME,
        format!(
            "FLANNEL_MTU {want} ({} MTU {underlay} minus the {} header)",
            iface.name,
            cfg.backend.type_name()
        ),
    )
}

/// The Network's one route must not capture routes or addresses the host
/// needs: the check `run` makes before it installs the route.
async fn routes(
    nl: &RtNetlink,
    s: &RunSettings,
    iface: &Interface,
    cfg: &NetworkConfig,
    env: Option<&SubnetEnv>,
) -> Check {
    let route = ClusterRoute {
        network: cfg.network,
        ifindex: iface.ifindex,
        iface_mac: iface.mac,
        mtu: Some(flannel_mtu(iface.mtu, &cfg.backend)),
    };
    // Without a subnet file no route counts as this node's own bridge's.
    let local = env
        .map(|e| e.subnet)
        .unwrap_or_else(|| Ipv4Net::from(cfg.network.network()));
    // On a flannel node not yet migrated, the routes through flannel's own
    // device are what `run` takes over, not a conflict. (Its host-gw routes
    // are taken over only once the leases confirm them, which doctor does
    // not list, so they are still reported.)
    let flannel_device_routes: Vec<_> =
        match flannel_takeover::detect(nl, cfg.network, iface.ifindex).await {
            Ok(state) => {
                let devices: Vec<u32> = state.devices.iter().map(|d| d.index).collect();
                state
                    .routes
                    .into_iter()
                    .filter(|r| r.ifindex.is_some_and(|i| devices.contains(&i)))
                    .collect()
            }
            Err(_) => Vec::new(),
        };
    match netconf::check_network_capture(
        nl,
        &route,
        local,
        &iface.addrs,
        &endpoint_ips(&s.etcd.etcd_endpoints),
        &flannel_device_routes,
    )
    .await
    {
        Ok(()) => Check::ok(
            "routes",
            format!("no host route or address overlaps Network {}", cfg.network),
        ),
        Err(e) => Check::problem(
            "routes",
            Status::Fail,
            e.to_string(),
            "remove the overlapping route, or choose a Network (in etcd's config) that overlaps none",
        ),
    }
}

/// Which hook decapsulates now, from the pinned links, and the driver of
/// the interface, which decides whether XDP can attach in native mode.
fn decap_hook(s: &RunSettings, iface: &Interface, cfg: &NetworkConfig) -> Check {
    const NAME: &str = "decap";
    if cfg.backend == Backend::HostGw {
        return Check::ok(NAME, "host-gw needs no decapsulation");
    }
    let driver = ethtool::driver(&iface.name).ok();
    let on = format!(
        "{} ({})",
        iface.name,
        driver.as_deref().unwrap_or("driver unknown")
    );
    match decap_in_use(s, cfg, driver.as_deref()) {
        (DecapMode::Device, true) => Check::ok(
            NAME,
            format!(
                "the kernel's VXLAN socket of {} decapsulates and {PROG_SLOWPATH_RX_TC} checks each packet; no program on {on}",
                netconf::SLOW_PATH_DEVICE
            ),
        ),
        (DecapMode::Xdp, true) => {
            Check::ok(NAME, format!("XDP in native mode decapsulates on {on}"))
        }
        (DecapMode::Tc, true) => match s.decap_mode {
            DecapMode::Tc => Check::ok(
                NAME,
                format!("TC ingress decapsulates on {on} (--decap-mode tc)"),
            ),
            _ => Check::problem(
                NAME,
                Status::Warn,
                format!(
                    "XDP could not attach in native mode on {on}, so TC ingress decapsulates: slower per packet"
                ),
                "use a NIC driver with native XDP, or pass --decap-mode tc to make the choice explicit",
            ),
        },
        (mode, _) => Check::skip(
            NAME,
            format!(
                "no agent data path is pinned under {} yet; on {on} the agent {}",
                s.pin_path.display(),
                match mode {
                    DecapMode::Auto | DecapMode::Xdp => "tries XDP in native mode, then TC ingress",
                    DecapMode::Tc => "uses TC ingress",
                    DecapMode::Device =>
                        "leaves it to the kernel VXLAN socket of its slow-path device",
                }
            ),
        ),
    }
}

/// How this node decapsulates: from the pinned links when an agent has
/// attached them (true), else what `run` would choose here (false).
fn decap_in_use(s: &RunSettings, cfg: &NetworkConfig, driver: Option<&str>) -> (DecapMode, bool) {
    let pinned = |name: &str| s.pin_path.join(name).exists();
    if pinned(PROG_DECAP_XDP) {
        (DecapMode::Xdp, true)
    } else if pinned(PROG_DECAP_TC) {
        (DecapMode::Tc, true)
    } else if pinned(PROG_SLOWPATH_RX_TC) {
        (DecapMode::Device, true)
    } else {
        let vxlan = matches!(cfg.backend, Backend::Vxlan(_));
        match resolve_decap_mode(s.decap_mode, vxlan, driver).0 {
            // XDP first, TC only where it cannot attach.
            DecapMode::Auto => (DecapMode::Xdp, false),
            mode => (mode, false),
        }
    }
}

/// GRO on a veth underlay: veth has it off by default, and after an XDP
/// program passes a decapsulated frame nothing merges it unless it is on.
/// It matters only to XDP: TC sees skbs the stack already built, and under
/// `device` the kernel VXLAN socket's GRO cells merge the inner packets.
fn gro(s: &RunSettings, iface: &Interface, cfg: &NetworkConfig) -> Check {
    const NAME: &str = "gro";
    const NOT_XDP: &str = "no XDP decapsulation, GRO state does not matter here";
    if cfg.backend == Backend::HostGw {
        return Check::ok(NAME, NOT_XDP);
    }
    let driver = match ethtool::driver(&iface.name) {
        Ok(d) => d,
        Err(e) => return Check::skip(NAME, format!("cannot ask {}'s driver: {e}", iface.name)),
    };
    if decap_in_use(s, cfg, Some(&driver)).0 != DecapMode::Xdp {
        return Check::ok(NAME, NOT_XDP);
    }
    match ethtool::gro(&iface.name) {
        Ok(true) => Check::ok(NAME, format!("GRO is on on {} ({driver})", iface.name)),
        Ok(false) if driver == "veth" => Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{} is a veth with GRO off (veth's default): after XDP decapsulation nothing merges the packets, so TCP costs one stack traversal per segment",
                iface.name
            ),
            format!("ethtool -K {} gro on", iface.name),
        ),
        Ok(false) => Check::problem(
            NAME,
            Status::Warn,
            format!(
                "GRO is off on {} ({driver}): received TCP is not merged",
                iface.name
            ),
            format!("ethtool -K {} gro on", iface.name),
        ),
        Err(e) => Check::skip(NAME, format!("cannot read {}'s GRO state: {e}", iface.name)),
    }
}

fn forwarding() -> Check {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match fs::read_to_string(PATH).map(|v| v.trim() == "1") {
        Ok(true) => Check::ok("forwarding", "IPv4 forwarding is on"),
        Ok(false) => Check::problem(
            "forwarding",
            Status::Warn,
            "IPv4 forwarding is off: no container traffic crosses this host until the agent starts (it turns it on)",
            "start the agent, or sysctl -w net.ipv4.ip_forward=1 if something turned it off after",
        ),
        Err(e) => Check::skip("forwarding", format!("cannot read {PATH}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_release_strings() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("6.6"), Some((6, 6)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("6.5.0").is_some_and(|v| v < TCX_KERNEL));
    }

    #[test]
    fn a_problem_is_one_line_with_its_fix() {
        let c = Check::problem(
            "mtu",
            Status::Fail,
            "cni0 is too wide",
            "ip link set cni0 mtu 1450",
        );
        assert_eq!(
            c.line(),
            "FAIL mtu: cni0 is too wide. Fix: ip link set cni0 mtu 1450"
        );
        assert!(!c.line().contains('\n'));
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["status"], "fail");
        assert_eq!(json["fix"], "ip link set cni0 mtu 1450");
        assert_eq!(Check::ok("btf", "x").line(), "ok   btf: x");
    }
}
