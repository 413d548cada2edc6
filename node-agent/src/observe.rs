//! What operators and their tools read from a running agent: `/healthz`
//! (flannel's `--healthz-ip`/`--healthz-port`) and Prometheus `/metrics`.
//!
//! Both are answered from the pinned state, read afresh per request through
//! [`PinnedState`], the one reader `status`, the tests and the bench use. A
//! request never blocks the agent: the server is a task of its own, and a
//! reply is built from map reads only.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use weft_common::{Mode, NodeConfig, Reason, RemoteNode};

use crate::pinned::{PinnedError, PinnedState};

/// A request head larger than this is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Address for Prometheus /metrics (e.g. 0.0.0.0:9867); off when unset.
    #[arg(long, env = "WEFT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// What the agent knows about itself that the maps do not say.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub pin_path: PathBuf,
    pub subnet: ipnet::Ipv4Net,
    pub backend: &'static str,
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
    let mut request_line = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (request_line.next(), request_line.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    match (method, path) {
        (Some("GET" | "HEAD"), Some("/healthz")) => match health(&info.pin_path) {
            Ok(()) => Reply::status(200, "ok\n"),
            Err(why) => Reply::status(503, &format!("{why}\n")),
        },
        (Some("GET" | "HEAD"), Some("/metrics")) => match snapshot(&info.pin_path) {
            Ok(snap) => Reply {
                code: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: render_metrics(info, &snap),
            },
            Err(e) => Reply::status(503, &format!("reading the pinned maps: {e}\n")),
        },
        (Some("GET" | "HEAD"), _) => Reply::status(404, "try /healthz or /metrics\n"),
        _ => Reply::status(405, "GET only\n"),
    }
}

/// Healthy: the data path is pinned and configured, so packets are being
/// handled. (A lost etcd does not make a node unhealthy: it forwards on.)
fn health(pin_path: &Path) -> Result<(), String> {
    let state = PinnedState::open(pin_path).map_err(|e| format!("data path not pinned: {e}"))?;
    match state.node_config() {
        Ok(Some(cfg)) if cfg.configured != 0 => Ok(()),
        Ok(_) => Err("data path not configured yet".to_owned()),
        Err(e) => Err(format!("reading NODE_CONFIG: {e}")),
    }
}

/// The pinned state one scrape reports.
struct Snapshot {
    counters: Vec<(Reason, u64)>,
    peers: Vec<(ipnet::Ipv4Net, RemoteNode)>,
    config: Option<NodeConfig>,
}

fn snapshot(pin_path: &Path) -> Result<Snapshot, PinnedError> {
    let state = PinnedState::open(pin_path)?;
    Ok(Snapshot {
        counters: state.counters()?,
        peers: state.peers()?,
        config: state.node_config()?,
    })
}

fn render_metrics(info: &AgentInfo, snap: &Snapshot) -> String {
    let mut out = String::new();
    // `write!` to a String cannot fail.
    let _ = writeln!(
        out,
        "# HELP weft_packets_total Packets the BPF programs saw, by reason (the COUNTERS map, all CPUs) and verdict (handled, pass, drop)."
    );
    let _ = writeln!(out, "# TYPE weft_packets_total counter");
    for (reason, n) in &snap.counters {
        let verdict = if reason.is_drop() {
            "drop"
        } else if reason.name().starts_with("pass_") {
            "pass"
        } else {
            "handled"
        };
        let _ = writeln!(
            out,
            "weft_packets_total{{reason=\"{}\",verdict=\"{verdict}\"}} {n}",
            reason.name()
        );
    }
    let _ = writeln!(
        out,
        "# HELP weft_peers Remote subnets in the forwarding table, by how they are reached."
    );
    let _ = writeln!(out, "# TYPE weft_peers gauge");
    for (mode, name) in [
        (Mode::Vxlan, "vxlan"),
        (Mode::Ipip, "ipip"),
        (Mode::Direct, "direct"),
    ] {
        let n = snap
            .peers
            .iter()
            .filter(|(_, node)| node.mode == mode as u8)
            .count();
        let _ = writeln!(out, "weft_peers{{mode=\"{name}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP weft_node_info This node's lease and data path; always 1."
    );
    let _ = writeln!(out, "# TYPE weft_node_info gauge");
    let public_ip = snap
        .config
        .map(|c| Ipv4Addr::from(c.public_ip).to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "weft_node_info{{subnet=\"{}\",public_ip=\"{public_ip}\",backend=\"{}\",version=\"{}\"}} 1",
        info.subnet,
        info.backend,
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        out,
        "# HELP weft_datapath_configured Whether the programs have this node's configuration (1) or pass everything untouched (0)."
    );
    let _ = writeln!(out, "# TYPE weft_datapath_configured gauge");
    let configured = snap.config.is_some_and(|c| c.configured != 0);
    let _ = writeln!(out, "weft_datapath_configured {}", u8::from(configured));
    out
}

/// Tells systemd (`Type=notify`) that the agent is up: leased, data path
/// attached, route in place. Without `$NOTIFY_SOCKET` (not under systemd)
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
    use super::*;

    fn info() -> AgentInfo {
        AgentInfo {
            pin_path: PathBuf::from("/nonexistent/weft-test"),
            subnet: "10.244.5.0/24".parse().expect("subnet"),
            backend: "vxlan",
        }
    }

    #[test]
    fn metrics_follow_the_exposition_format() {
        let node = RemoteNode {
            public_ip: [198, 18, 0, 2],
            vtep_mac: [2, 0, 0, 0, 0, 2],
            mode: Mode::Vxlan as u8,
            _pad0: 0,
            vni: 1,
        };
        let snap = Snapshot {
            counters: Reason::ALL.iter().map(|r| (*r, *r as u64)).collect(),
            peers: vec![("10.244.6.0/24".parse().expect("subnet"), node)],
            config: None,
        };
        let text = render_metrics(&info(), &snap);
        assert!(
            text.contains(
                "weft_packets_total{reason=\"drop_unknown_source\",verdict=\"drop\"} 17\n"
            )
        );
        assert!(
            text.contains("weft_packets_total{reason=\"encapsulated\",verdict=\"handled\"} 0\n")
        );
        assert!(text.contains("weft_packets_total{reason=\"pass_gso\",verdict=\"pass\"} 7\n"));
        assert!(text.contains("weft_peers{mode=\"vxlan\"} 1\n"));
        assert!(text.contains("weft_peers{mode=\"ipip\"} 0\n"));
        assert!(text.contains("weft_datapath_configured 0\n"));
        // Every sample line: name{labels} value, after its HELP and TYPE.
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
