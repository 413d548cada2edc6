//! What operators point their tools at: a real Prometheus scrapes the
//! agents' /metrics while containers talk, and /healthz answers.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use weft_tests::process::Background;
use weft_tests::{
    CONVERGE, Cluster, SWITCH_IP, node_agent_binary, require_bpffs, require_root, require_tools,
    wait_until,
};

const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
const PROMETHEUS: &str = "/usr/bin/prometheus";
const METRICS_PORT: u16 = 9867;
const HEALTHZ_PORT: u16 = 9868;

/// argv: URL. Prints the body; exits 1 on an HTTP error status.
const FETCH: &str = r#"
import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
    sys.exit(1)
"#;

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&["ip", "nsenter", "etcdctl", "ping", "python3", PROMETHEUS])?;
    node_agent_binary()?;
    Ok(())
}

#[test]
fn prometheus_scrapes_the_agents_and_healthz_answers() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let metrics = format!("0.0.0.0:{METRICS_PORT}");
    let healthz = HEALTHZ_PORT.to_string();
    let (hosts, _) = cluster.start_hosts(
        &[1, 2],
        &["--metrics-addr", &metrics, "--healthz-port", &healthz],
        false,
    )?;
    let a = hosts[0].attach_container()?;
    let b = hosts[1].attach_container()?;
    a.ping_until(b.ip(), CONVERGE)?;
    a.ping(b.ip(), 10, 56, false)?;

    let fetch = |url: &str| cluster.switch().run(&["python3", "-c", FETCH, url]);
    for host in &hosts {
        let body = fetch(&format!("http://{}:{HEALTHZ_PORT}/healthz", host.ip()))?;
        ensure!(
            body.trim() == "ok",
            "host {} /healthz: {body}",
            host.index()
        );
    }

    // Prometheus in the switch namespace, scraping both agents every second.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("prometheus.yml");
    let targets = hosts
        .iter()
        .map(|h| format!("'{}:{METRICS_PORT}'", h.ip()))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: weft\n    static_configs:\n      - targets: [{targets}]\n"
        ),
    )?;
    let web = format!("{SWITCH_IP}:9090");
    let _prometheus = Background::spawn_logged(
        cluster.switch().command(&[
            PROMETHEUS,
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", dir.path().join("data").display()),
            &format!("--web.listen-address={web}"),
            "--log.level=warn",
        ]),
        &dir.path().join("prometheus.log"),
    )?;
    let query = |q: &str| -> Result<Vec<(String, f64)>> {
        let url = format!(
            "http://{web}/api/v1/query?query={}",
            q.replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
        );
        let body = fetch(&url)?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("Prometheus said {body}"))?;
        v.pointer("/data/result")
            .and_then(serde_json::Value::as_array)
            .with_context(|| format!("no result in {body}"))?
            .iter()
            .map(|r| {
                let instance = r
                    .pointer("/metric/instance")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let value = r
                    .pointer("/value/1")
                    .and_then(serde_json::Value::as_str)
                    .with_context(|| format!("no value in {r}"))?
                    .parse::<f64>()?;
                Ok((instance, value))
            })
            .collect()
    };
    let scrape_wait = Duration::from_secs(60);
    wait_until(scrape_wait, "Prometheus to scrape both agents", |last| {
        let up = query("up{job=\"weft\"}").unwrap_or_default();
        *last = format!("up = {up:?}");
        Ok((up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0)).then_some(()))
    })?;
    // Both nodes tunnelled the pings (and their replies), and each sees
    // the other as its one VXLAN peer.
    wait_until(scrape_wait, "encapsulated packets in Prometheus", |last| {
        let sent = query("weft_packets_total{reason=\"encapsulated\"}")?;
        *last = format!("encapsulated = {sent:?}");
        Ok((sent.len() == 2 && sent.iter().all(|(_, v)| *v >= 10.0)).then_some(()))
    })?;
    let peers = query("weft_peers{mode=\"vxlan\"}")?;
    ensure!(
        peers.len() == 2 && peers.iter().all(|(_, v)| *v == 1.0),
        "weft_peers: {peers:?}"
    );
    let info = query("weft_node_info")?;
    ensure!(info.len() == 2, "weft_node_info: {info:?}");

    // The same facts for scripts: `node-agent status --json`.
    let binary = node_agent_binary()?;
    let binary = binary.to_string_lossy();
    let pin_path = hosts[0].pin_path().to_string_lossy().into_owned();
    let out = weft_tests::process::run(hosts[0].ns().command_keep_mounts(&[
        &binary,
        "status",
        "--json",
        "--pin-path",
        &pin_path,
    ]))?;
    let status: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("status --json printed {out}"))?;
    let peer_ip = hosts[1].ip().to_string();
    ensure!(
        status["node"]["configured"] == true
            && status["peers"].as_array().map(Vec::len) == Some(1)
            && status["peers"][0]["public_ip"] == peer_ip.as_str()
            && status["peers"][0]["mode"] == "vxlan"
            && status["counters"]["encapsulated"].as_u64() >= Some(10),
        "unexpected status --json:\n{out}"
    );
    Ok(())
}
