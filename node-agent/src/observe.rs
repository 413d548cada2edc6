//! What operators and their tools read from a running agent: `/healthz`
//! (flannel's `--healthz-ip`/`--healthz-port`) and Prometheus `/metrics`.
//!
//! Both are answered per request from the pinned state, read through
//! [`PinnedState`] (the one reader `status`, the tests and the bench use),
//! and from the agent's [`AgentStatus`]. The exposition is built with the
//! `prometheus-client` crate: OpenMetrics for a client that asks for it
//! (Prometheus does), else the classic text format 0.0.4 (curl, promtool).
//! A request never blocks the agent: the server is a task of its own, and a
//! reply is built from map reads and one lock of the status.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::{EncodeMetric, text::encode},
    metrics::{TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use weft_common::{MAP_NODE_IPS, MAP_SUBNETS, MAX_SUBNETS, Mode, NodeConfig, Reason, RemoteNode};

use crate::{
    agent_state::{AgentStatus, StateSnapshot, SyncState, unix},
    pinned::{CounterRow, PinnedError, PinnedState},
};

/// A request head larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The `--healthz-*` and `--metrics-addr` flags of `node-agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ObserveSettings {
    /// Address for the /healthz endpoint (flannel's flag).
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: Ipv4Addr,
    /// Port for /healthz; 0 turns it off (flannel's default).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,
    /// Seconds /healthz stays healthy while the agent is out of sync with
    /// etcd (watch lost, or never established); after that it answers 503
    /// until the watch is back. Forwarding goes on either way.
    #[arg(
        long = "healthz-etcd-grace",
        env = "WEFT_HEALTHZ_ETCD_GRACE",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub etcd_grace_secs: u64,
    /// Address for Prometheus /metrics (e.g. 0.0.0.0:9867); off when unset.
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// What the server needs of the agent.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub pin_path: PathBuf,
    pub subnet: ipnet::Ipv4Net,
    pub backend: &'static str,
    pub status: Arc<AgentStatus>,
    /// `--healthz-etcd-grace`.
    pub etcd_grace: Duration,
}

/// Starts the servers the settings ask for; each runs as its own task.
pub async fn serve(settings: &ObserveSettings, info: AgentInfo) -> Result<(), ObserveError> {
    if settings.healthz_port != 0 {
        let addr = SocketAddr::from((settings.healthz_ip, settings.healthz_port));
        spawn_server(addr, info.clone()).await?;
    }
    if let Some(addr) = settings.metrics_addr {
        spawn_server(addr, info).await?;
    }
    Ok(())
}

async fn spawn_server(addr: SocketAddr, info: AgentInfo) -> Result<(), ObserveError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ObserveError::Bind { addr, source })?;
    tracing::info!(%addr, "serving /healthz and /metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let info = info.clone();
                    tokio::spawn(async move {
                        // A client that goes away is its own business.
                        let _ = answer(stream, &info).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, info: &AgentInfo) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let reply = match read {
        Ok(Ok(())) => respond(&head, info),
        _ => Reply::status(408, "request timeout\n"),
    };
    stream.write_all(&reply.to_bytes()).await?;
    stream.shutdown().await
}

/// An HTTP/1.1 reply.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    code: u16,
    content_type: &'static str,
    body: String,
}

impl Reply {
    fn status(code: u16, body: &str) -> Self {
        Self {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.to_owned(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.code {
            200 => "OK",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            500 => "Internal Server Error",
            _ => "Service Unavailable",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.code,
            self.content_type,
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn respond(head: &[u8], info: &AgentInfo) -> Reply {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.lines();
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let (method, target) = (request_line.next(), request_line.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    let wants_openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("accept") && value.contains("application/openmetrics-text")
        })
    });
    match (method, path) {
        (Some("GET" | "HEAD"), Some("/healthz")) => {
            let now = unix(SystemTime::now());
            match health(
                &info.pin_path,
                &info.status.snapshot(),
                info.etcd_grace,
                now,
            ) {
                Ok(()) => Reply::status(200, "ok\n"),
                Err(why) => Reply::status(503, &format!("{why}\n")),
            }
        }
        (Some("GET" | "HEAD"), Some("/metrics")) => match snapshot(info) {
            Ok(snap) => match render_metrics(info, &snap) {
                Ok(om) if wants_openmetrics => Reply {
                    code: 200,
                    content_type: OPENMETRICS,
                    body: om,
                },
                Ok(om) => Reply {
                    code: 200,
                    content_type: TEXT_FORMAT,
                    body: to_text_format(&om),
                },
                Err(e) => Reply::status(500, &format!("encoding the metrics: {e}\n")),
            },
            Err(e) => Reply::status(503, &format!("reading the pinned maps: {e}\n")),
        },
        (Some("GET" | "HEAD"), _) => Reply::status(404, "try /healthz or /metrics\n"),
        _ => Reply::status(405, "GET only\n"),
    }
}

/// Healthy: the data path is pinned and configured, so packets are being
/// handled, and the agent follows etcd, or lost it less than `grace` ago.
/// (flanneld's /healthz only says that the process runs.) A lost etcd does
/// not stop forwarding, so the grace lets short outages pass unnoticed; a
/// longer one means this node no longer learns of other nodes' changes.
fn health(pin_path: &Path, state: &StateSnapshot, grace: Duration, now: u64) -> Result<(), String> {
    let pinned = PinnedState::open(pin_path).map_err(|e| format!("data path not pinned: {e}"))?;
    match pinned.node_config() {
        Ok(Some(cfg)) if cfg.configured != 0 => {}
        Ok(_) => return Err("data path not configured yet".to_owned()),
        Err(e) => return Err(format!("reading NODE_CONFIG: {e}")),
    }
    match state.out_of_sync_for(now) {
        Some(out) if out > grace => Err(format!(
            "out of sync with etcd for {}s (watch {}), longer than the {}s grace",
            out.as_secs(),
            state.sync.name(),
            grace.as_secs()
        )),
        _ => Ok(()),
    }
}

/// What one scrape reports.
struct Snapshot {
    table: Vec<CounterRow>,
    peers: Vec<(ipnet::Ipv4Net, RemoteNode)>,
    node_ips: usize,
    config: Option<NodeConfig>,
    state: StateSnapshot,
    now: u64,
}

fn snapshot(info: &AgentInfo) -> Result<Snapshot, PinnedError> {
    let pinned = PinnedState::open(&info.pin_path)?;
    Ok(Snapshot {
        table: pinned.counter_table()?,
        peers: pinned.peers()?,
        node_ips: pinned.node_ips()?.len(),
        config: pinned.node_config()?,
        state: info.status.snapshot(),
        now: unix(SystemTime::now()),
    })
}

type Labels = Vec<(&'static str, String)>;

/// Registers a family of `M` with one series per `(labels, value)`, each
/// set by `set`.
fn family<M, V>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, V)>,
    set: impl Fn(&M, V),
) where
    M: EncodeMetric + TypedMetric + Default + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<Labels, M>::default();
    for (labels, value) in series {
        set(&family.get_or_create(&labels), value);
    }
    registry.register(name, help, family);
}

/// [`family`] of counters.
fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, u64)>,
) {
    family(registry, name, help, series, |c: &Counter, v| {
        c.inc_by(v);
    });
}

/// [`family`] of gauges.
fn gauges(
    registry: &mut Registry,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, i64)>,
) {
    family(registry, name, help, series, |g: &Gauge, v| {
        g.set(v);
    });
}

/// Registers an unlabelled gauge.
fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

/// What a reason did to the packet: `drop`, `pass` (untouched) or
/// `handled` (encapsulated, decapsulated, forwarded, answered).
fn verdict(reason: Reason) -> &'static str {
    if reason.is_drop() {
        "drop"
    } else if reason.name().starts_with("pass_") {
        "pass"
    } else {
        "handled"
    }
}

fn secs(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The OpenMetrics exposition of `snap`. The README's metrics table lists
/// every family.
fn render_metrics(info: &AgentInfo, snap: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut r = Registry::with_prefix("weft");
    let slot = |row: &CounterRow| -> Labels {
        vec![
            ("program", row.program.name().to_owned()),
            ("reason", row.reason.name().to_owned()),
            ("verdict", verdict(row.reason).to_owned()),
        ]
    };
    counters(
        &mut r,
        "packets",
        "Packets the BPF programs counted, by program, reason and verdict (drop, pass, handled)",
        snap.table.iter().map(|row| (slot(row), row.packets)),
    );
    counters(
        &mut r,
        "bytes",
        "Bytes of the counted packets (skb->len at TC, the frame at XDP), by program, reason and verdict",
        snap.table.iter().map(|row| (slot(row), row.bytes)),
    );
    gauges(
        &mut r,
        "helper_last_error",
        "Return code of the last kernel helper that failed, by program and reason: a negative errno, or a BPF_FIB_LKUP_RET_* code for drop_fib_lookup",
        snap.table.iter().filter(|row| row.ext_err != 0).map(|row| {
            let labels = vec![
                ("program", row.program.name().to_owned()),
                ("reason", row.reason.name().to_owned()),
            ];
            (labels, row.ext_err)
        }),
    );
    gauges(
        &mut r,
        "peers",
        "Remote subnets in the forwarding table (the SUBNETS map), by how they are reached",
        [
            (Mode::Vxlan, "vxlan"),
            (Mode::Ipip, "ipip"),
            (Mode::Direct, "direct"),
        ]
        .map(|(mode, name)| {
            let n = snap
                .peers
                .iter()
                .filter(|(_, node)| node.mode == mode as u8)
                .count();
            (vec![("mode", name.to_owned())], n as i64)
        }),
    );
    gauges(
        &mut r,
        "map_entries",
        "Entries in the pinned BPF maps the agent fills, by map",
        [("SUBNETS", snap.peers.len()), ("NODE_IPS", snap.node_ips)]
            .map(|(map, n)| (vec![("map", map.to_owned())], n as i64)),
    );
    gauges(
        &mut r,
        "map_capacity",
        "Entries the pinned BPF maps the agent fills can hold, by map",
        [MAP_SUBNETS, MAP_NODE_IPS]
            .map(|map| (vec![("map", map.to_owned())], i64::from(MAX_SUBNETS))),
    );
    let configured = snap.config.is_some_and(|c| c.configured != 0);
    gauge(
        &mut r,
        "datapath_configured",
        "Whether the programs have this node's configuration (1) or pass everything untouched (0)",
        i64::from(configured),
    );
    let public_ip = snap
        .config
        .map(|c| Ipv4Addr::from(c.public_ip).to_string())
        .unwrap_or_default();
    gauges(
        &mut r,
        "node_info",
        "This node's lease and data path; always 1",
        [(
            vec![
                ("subnet", info.subnet.to_string()),
                ("public_ip", public_ip),
                ("backend", info.backend.to_owned()),
            ],
            1,
        )],
    );
    gauges(
        &mut r,
        "build_info",
        "The agent's build; always 1",
        [(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
    );
    let state = &snap.state;
    if let Some(at) = state.lease_expires_at {
        gauge(
            &mut r,
            "lease_remaining_seconds",
            "Seconds until this node's subnet lease expires unless renewed; absent for a reservation or before the first renewal check",
            secs(at.saturating_sub(snap.now)),
        );
    }
    gauges(
        &mut r,
        "etcd_sync_state",
        "The etcd watch's state: 1 for the current one of listing, watching, lost",
        SyncState::ALL.map(|s| {
            (
                vec![("state", s.name().to_owned())],
                i64::from(s == state.sync),
            )
        }),
    );
    gauge(
        &mut r,
        "etcd_out_of_sync_seconds",
        "Seconds since the agent stopped following etcd (0 while watching); /healthz fails past --healthz-etcd-grace",
        state
            .out_of_sync_for(snap.now)
            .map_or(0, |d| secs(d.as_secs())),
    );
    if let Some(at) = state.last_event_at {
        gauge(
            &mut r,
            "etcd_last_event_age_seconds",
            "Seconds since the last etcd event or listing; absent before the first",
            secs(snap.now.saturating_sub(at)),
        );
    }
    let reconciles = Counter::<u64>::default();
    reconciles.inc_by(state.reconciles);
    r.register(
        "reconciles",
        "Full reconciliations of the peer table with an etcd listing (at start and after each lost watch)",
        reconciles,
    );
    gauges(
        &mut r,
        "leases_skipped",
        "Other nodes' leases the agent skips now, by cause (each is logged once)",
        state
            .skipped_leases
            .iter()
            .map(|(cause, n)| (vec![("cause", cause.clone())], secs(*n))),
    );
    let mut out = String::new();
    encode(&mut out, &r)?;
    Ok(out)
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics
/// exposition from [`render_metrics`]: a counter's family is named with its
/// `_total` suffix there, and there are no `# UNIT` or `# EOF` lines. Label
/// values and HELP texts here need no other change.
fn to_text_format(openmetrics: &str) -> String {
    let counters: BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let total = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{total} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Tells systemd (`Type=notify`) that the agent is up: leased, data path
/// attached, route in place, and the first relist of the peers done (the
/// watcher calls it then). Without `$NOTIFY_SOCKET` (not under systemd)
/// it does nothing; a failure is logged, never fatal.
pub fn notify_ready(status: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nSTATUS={status}\n");
    if let Err(e) = send_notify(&socket, message.as_bytes()) {
        tracing::warn!(error = %e, socket = ?socket, "cannot notify systemd");
    }
}

fn send_notify(socket: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::{ffi::OsStrExt as _, net};
    let bytes = socket.as_bytes();
    // sd_notify(3): a leading '@' names an abstract socket.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => net::SocketAddr::from_abstract_name(name)?,
        None => net::SocketAddr::from_pathname(Path::new(socket))?,
    };
    let sock = net::UnixDatagram::unbound()?;
    sock.send_to_addr(message, &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use weft_common::Program;

    use super::*;

    fn info() -> AgentInfo {
        AgentInfo {
            pin_path: PathBuf::from("/nonexistent/weft-test"),
            subnet: "10.244.5.0/24".parse().expect("subnet"),
            backend: "vxlan",
            status: AgentStatus::new("10.244.5.0/24".parse().expect("subnet"), "vxlan"),
            etcd_grace: Duration::from_secs(300),
        }
    }

    fn snap() -> Snapshot {
        let node = RemoteNode {
            public_ip: [198, 18, 0, 2],
            vtep_mac: [2, 0, 0, 0, 0, 2],
            mode: Mode::Vxlan as u8,
            _pad0: 0,
            vni: 1,
        };
        let table = Program::ALL
            .iter()
            .flat_map(|&program| {
                Reason::ALL.iter().map(move |&reason| CounterRow {
                    program,
                    reason,
                    packets: reason as u64,
                    bytes: 100 * reason as u64,
                    ext_err: if reason == Reason::DropFibLookup {
                        4
                    } else {
                        0
                    },
                })
            })
            .collect();
        let status = AgentStatus::new("10.244.5.0/24".parse().expect("subnet"), "vxlan");
        status.skipped(std::collections::BTreeMap::from([(
            "vni_mismatch".to_owned(),
            2,
        )]));
        status.reconciled();
        let mut state = status.snapshot();
        state.lease_expires_at = Some(state.started_at + 3600);
        Snapshot {
            table,
            peers: vec![("10.244.6.0/24".parse().expect("subnet"), node)],
            node_ips: 1,
            config: None,
            now: state.started_at + 10,
            state,
        }
    }

    #[test]
    fn metrics_follow_the_exposition_formats() {
        let om = render_metrics(&info(), &snap()).expect("encode");
        let text = to_text_format(&om);
        for line in [
            "weft_packets_total{program=\"weft_decap_xdp\",reason=\"drop_unknown_source\",verdict=\"drop\"} 17",
            "weft_bytes_total{program=\"weft_encap_tc\",reason=\"pass_gso\",verdict=\"pass\"} 700",
            "weft_helper_last_error{program=\"weft_encap_tc\",reason=\"drop_fib_lookup\"} 4",
            "weft_peers{mode=\"vxlan\"} 1",
            "weft_peers{mode=\"ipip\"} 0",
            "weft_map_entries{map=\"NODE_IPS\"} 1",
            "weft_map_capacity{map=\"SUBNETS\"} 131072",
            "weft_datapath_configured 0",
            "weft_lease_remaining_seconds 3590",
            "weft_etcd_sync_state{state=\"listing\"} 1",
            "weft_etcd_sync_state{state=\"watching\"} 0",
            "weft_etcd_out_of_sync_seconds 10",
            "weft_reconciles_total 1",
            "weft_leases_skipped{cause=\"vni_mismatch\"} 2",
        ] {
            assert!(
                om.contains(&format!("{line}\n")),
                "{line} missing from\n{om}"
            );
            assert!(
                text.contains(&format!("{line}\n")),
                "{line} missing from\n{text}"
            );
        }
        assert!(om.contains("# TYPE weft_packets counter\n") && om.ends_with("# EOF\n"));
        assert!(text.contains("# TYPE weft_packets_total counter\n"));
        assert!(text.contains("# HELP weft_reconciles_total Full"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        // Only the slot whose helper failed has a return code.
        assert_eq!(
            om.matches("weft_helper_last_error{").count(),
            Program::ALL.len()
        );
        // Text format: every sample's family has its TYPE line.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().expect("a name");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE line"
            );
        }
    }

    #[test]
    fn readiness_reaches_a_notify_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        send_notify(path.as_os_str(), b"READY=1\nSTATUS=x\n").expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        let get = |path: &str| respond(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes(), &info());
        // Nothing is pinned at the test's path: unhealthy, and says why.
        let health = get("/healthz");
        assert_eq!(health.code, 503);
        assert!(health.body.contains("not pinned"), "{}", health.body);
        assert_eq!(get("/metrics").code, 503);
        assert_eq!(get("/").code, 404);
        assert_eq!(
            respond(b"POST /healthz HTTP/1.1\r\n\r\n", &info()).code,
            405
        );
        assert_eq!(respond(b"", &info()).code, 405);
        let bytes = Reply::status(200, "ok\n").to_bytes();
        let text = String::from_utf8(bytes).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("\r\n\r\nok\n"));
        assert!(text.contains("Content-Length: 3\r\n"));
    }
}
