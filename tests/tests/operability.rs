//! What operators point their tools at: a real Prometheus scrapes the
//! agents' /metrics while containers talk and peers come and go, promtool
//! checks the exposition, /healthz answers until etcd is lost past the
//! grace, and `node-agent status --json` matches the pinned maps, with the
//! agent running and stopped.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, ensure};
use ipnet::Ipv4Net;
use node_agent::flannel::{LeaseAttrs, VxlanLeaseData};
use weft_common::Reason;
use weft_tests::process::Background;
use weft_tests::{
    CONVERGE, Cluster, Host, SWITCH_IP, Signal, node_agent_binary, require_bpffs, require_root,
    require_tools, wait_until,
};

const CONFIG: &str = weft_tests::VXLAN_CONFIG;
const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";
const METRICS_PORT: u16 = 9867;
const HEALTHZ_PORT: u16 = 9868;
/// A peer whose PublicIP no host has a route to: the encap program's FIB
/// lookup fails for its subnet, with BPF_FIB_LKUP_RET_NOT_FWDED.
const UNROUTABLE_PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 200);
const BPF_FIB_LKUP_RET_NOT_FWDED: f64 = 4.0;

/// argv: URL. Prints the body; exits 1 on an HTTP error status, after
/// printing the code and body.
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
    require_tools(&[
        "ip", "nsenter", "etcdctl", "ping", "python3", PROMETHEUS, PROMTOOL,
    ])?;
    node_agent_binary()?;
    Ok(())
}

fn vxlan_lease(ip: Ipv4Addr, vni: u32) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip,
        backend_type: "vxlan".to_owned(),
        backend_data: Some(VxlanLeaseData {
            vni: Some(vni),
            vtep_mac: [0x02, 0, 0, 0, 0, ip.octets()[3]],
        }),
    }
}

/// `node-agent status` of `host`, with `extra` flags.
fn run_status(host: &Host<'_>, extra: &[&str]) -> Result<String> {
    let binary = node_agent_binary()?;
    let binary = binary.to_string_lossy();
    let pin_path = host.pin_path().to_string_lossy().into_owned();
    let state_file = host.state_file().to_string_lossy().into_owned();
    let mut args = vec![
        &*binary,
        "status",
        "--pin-path",
        &pin_path,
        "--state-file",
        &state_file,
    ];
    args.extend_from_slice(extra);
    weft_tests::process::run(host.ns().command_keep_mounts(&args))
}

/// `node-agent status --json` of `host`, parsed.
fn status_json(host: &Host<'_>) -> Result<serde_json::Value> {
    let out = run_status(host, &["--json"])?;
    serde_json::from_str(&out).with_context(|| format!("status --json printed {out}"))
}

/// The peers and drops in `status` are the pinned maps' own.
fn check_status_matches_pins(host: &Host<'_>, status: &serde_json::Value) -> Result<()> {
    let pinned = host.pinned()?;
    let peers: Vec<(String, String)> = pinned
        .peers()?
        .iter()
        .map(|(net, node)| (net.to_string(), Ipv4Addr::from(node.public_ip).to_string()))
        .collect();
    let shown: Vec<(String, String)> = status["peers"]
        .as_array()
        .context("no peers array")?
        .iter()
        .map(|p| {
            (
                p["subnet"].as_str().unwrap_or_default().to_owned(),
                p["public_ip"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    ensure!(peers == shown, "status peers {shown:?}, pinned {peers:?}");
    for p in status["peers"].as_array().into_iter().flatten() {
        // The hosts share one underlay segment: a peer there is its own
        // next hop; the unroutable one has none.
        let want = if p["public_ip"] == UNROUTABLE_PEER.to_string().as_str() {
            serde_json::Value::Null
        } else {
            p["public_ip"].clone()
        };
        ensure!(p["mode"] == "vxlan" && p["next_hop"] == want, "peer {p}");
    }
    for reason in Reason::ALL.iter().filter(|r| r.is_drop()) {
        let pinned_n = pinned.counter(*reason)?;
        ensure!(
            status["drops"][reason.name()].as_u64() == Some(pinned_n),
            "drops.{}: status {}, pinned {pinned_n}",
            reason.name(),
            status["drops"][reason.name()]
        );
    }
    Ok(())
}

#[test]
fn prometheus_scrapes_the_agents_and_status_matches_the_pins() -> Result<()> {
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
    let dir = tempfile::tempdir()?;
    for host in &hosts {
        let body = fetch(&format!("http://{}:{HEALTHZ_PORT}/healthz", host.ip()))?;
        ensure!(
            body.trim() == "ok",
            "host {} /healthz: {body}",
            host.index()
        );
        // The exposition a plain GET gets passes promtool's checks.
        let exposition = fetch(&format!("http://{}:{METRICS_PORT}/metrics", host.ip()))?;
        let path = dir.path().join(format!("metrics-{}.txt", host.index()));
        std::fs::write(&path, &exposition)?;
        let mut check = std::process::Command::new(PROMTOOL);
        check
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&path)?);
        weft_tests::process::run(check).with_context(|| {
            format!(
                "promtool on host {}'s /metrics:\n{exposition}",
                host.index()
            )
        })?;
    }

    // Prometheus in the switch namespace, scraping both agents every second.
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
            q.replace('%', "%25")
                .replace(' ', "%20")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('=', "%3D")
                .replace(',', "%2C")
                .replace('(', "%28")
                .replace(')', "%29")
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
    // Waits until `q` has one series per agent and `ok` holds for each.
    let wait_all = |what: &str, q: &str, ok: &dyn Fn(f64) -> bool| -> Result<()> {
        wait_until(Duration::from_secs(60), what, |last| {
            let got = query(q)?;
            *last = format!("{q} = {got:?}");
            Ok((got.len() == hosts.len() && got.iter().all(|(_, v)| ok(*v))).then_some(()))
        })
    };
    wait_all(
        "Prometheus to scrape both agents",
        "up{job=\"weft\"}",
        &|v| v == 1.0,
    )?;
    // Both nodes tunnelled the pings (and their replies), and each sees
    // the other as its one VXLAN peer.
    wait_all(
        "encapsulated packets in Prometheus",
        "sum by (instance) (weft_packets_total{program=\"weft_encap_tc\",reason=\"encapsulated\"})",
        &|v| v >= 10.0,
    )?;
    wait_all(
        "encapsulated bytes in Prometheus",
        "sum by (instance) (weft_bytes_total{program=\"weft_encap_tc\",reason=\"encapsulated\"})",
        &|v| v >= 10.0 * (84.0 + 50.0),
    )?;
    wait_all("one vxlan peer", "weft_peers{mode=\"vxlan\"}", &|v| {
        v == 1.0
    })?;
    wait_all(
        "etcd watch up",
        "weft_etcd_sync_state{state=\"watching\"}",
        &|v| v == 1.0,
    )?;
    wait_all(
        "a lease about to last a day",
        "weft_lease_remaining_seconds",
        &|v| v > 23.0 * 3600.0 && v <= 24.0 * 3600.0,
    )?;
    wait_all("one reconcile", "weft_reconciles_total", &|v| v >= 1.0)?;
    ensure!(query("weft_node_info")?.len() == 2, "weft_node_info");
    ensure!(query("weft_build_info")?.len() == 2, "weft_build_info");
    let drop_series = "weft_packets_total{program=\"weft_encap_tc\",reason=\"drop_fib_lookup\"}";
    wait_all("the drop series, at zero", drop_series, &|v| v == 0.0)?;

    // A peer appears whose PublicIP no host can route to, and one with the
    // wrong VNI: the peer count moves, the bad lease is counted as skipped,
    // and traffic to the unroutable peer is dropped by the FIB lookup, with
    // its return code.
    let unroutable: Ipv4Net = "10.244.200.0/24".parse()?;
    let wrong_vni: Ipv4Net = "10.244.201.0/24".parse()?;
    cluster.put_lease(unroutable, &vxlan_lease(UNROUTABLE_PEER, 1))?;
    cluster.put_lease(wrong_vni, &vxlan_lease(Ipv4Addr::new(198, 18, 0, 99), 9))?;
    wait_all("two vxlan peers", "weft_peers{mode=\"vxlan\"}", &|v| {
        v == 2.0
    })?;
    wait_all(
        "a lease skipped for its VNI",
        "weft_leases_skipped{cause=\"vni_mismatch\"}",
        &|v| v == 1.0,
    )?;
    // Lost pings are the point here.
    let _ = a.ping(Ipv4Addr::new(10, 244, 200, 5), 5, 56, false);
    let a_instance = format!("{}:{METRICS_PORT}", hosts[0].ip());
    wait_until(
        Duration::from_secs(60),
        "FIB-lookup drops in Prometheus",
        |last| {
            let drops = query(drop_series)?;
            let code = query(
                "weft_helper_last_error{program=\"weft_encap_tc\",reason=\"drop_fib_lookup\"}",
            )?;
            *last = format!("drops {drops:?}, code {code:?}");
            Ok((drops.contains(&(a_instance.clone(), 5.0))
                && code == [(a_instance.clone(), BPF_FIB_LKUP_RET_NOT_FWDED)])
            .then_some(()))
        },
    )?;

    // The same facts for scripts: `node-agent status --json`.
    let status = status_json(&hosts[0])?;
    let lease_left = status["agent"]["lease"]["expires_in_seconds"].as_u64();
    ensure!(
        status["agent"]["running"] == true
            && status["agent"]["sync"]["state"] == "watching"
            && status["agent"]["sync"]["skipped_leases"]["vni_mismatch"] == 1
            && lease_left.is_some_and(|s| s > 23 * 3600 && s <= 24 * 3600)
            && status["node"]["configured"] == true
            && status["peers"].as_array().map(Vec::len) == Some(2)
            && status["drops"]["drop_fib_lookup"] == 5
            && status["counters"]["encapsulated"].as_u64() >= Some(10)
            && status["host"]["cluster_route"]["dst"] == "10.244.0.0/16",
        "unexpected status --json:\n{status:#}"
    );
    check_status_matches_pins(&hosts[0], &status)?;
    let text = run_status(&hosts[0], &[])?;
    ensure!(
        text.contains("agent: running")
            && text.contains("etcd watching")
            && text.contains("cluster route: 10.244.0.0/16 via 10.244.0.0"),
        "unexpected status:\n{text}"
    );

    cluster.etcd().del(&cluster.lease_key(unroutable))?;
    cluster.etcd().del(&cluster.lease_key(wrong_vni))?;
    wait_all("one vxlan peer again", "weft_peers{mode=\"vxlan\"}", &|v| {
        v == 1.0
    })?;
    wait_all(
        "no lease skipped",
        "sum by (instance) (weft_leases_skipped) or on (instance) (0 * up{job=\"weft\"})",
        &|v| v == 0.0,
    )?;

    // Stopped, the agent's pins and state file still tell the story.
    hosts[0].kill_agent(Signal::Term)?;
    let stopped = status_json(&hosts[0])?;
    ensure!(
        stopped["agent"]["running"] == false
            && stopped["agent"]["sync"]["state"] == "agent_not_running"
            && stopped["agent"]["lease"]["expires_at"] == status["agent"]["lease"]["expires_at"]
            && stopped["peers"].as_array().map(Vec::len) == Some(1),
        "unexpected status --json of a stopped agent:\n{stopped:#}"
    );
    check_status_matches_pins(&hosts[0], &stopped)?;
    let text = run_status(&hosts[0], &[])?;
    ensure!(
        text.contains("agent: not running") && text.contains("etcd agent_not_running"),
        "unexpected status of a stopped agent:\n{text}"
    );
    Ok(())
}

#[test]
fn healthz_fails_once_etcd_is_lost_past_the_grace() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let healthz = HEALTHZ_PORT.to_string();
    const GRACE_SECS: u64 = 5;
    let grace = GRACE_SECS.to_string();
    let (hosts, _) = cluster.start_hosts(
        &[1],
        &["--healthz-port", &healthz, "--healthz-etcd-grace", &grace],
        false,
    )?;
    let url = format!("http://{}:{HEALTHZ_PORT}/healthz", hosts[0].ip());
    // (HTTP status ok, body)
    let get = || -> (bool, String) {
        match cluster.switch().run(&["python3", "-c", FETCH, &url]) {
            Ok(body) => (true, body),
            Err(e) => (false, format!("{e:#}")),
        }
    };
    wait_until(CONVERGE, "/healthz to answer ok", |last| {
        let (ok, body) = get();
        *last = body;
        Ok(ok.then_some(()))
    })?;

    cluster.etcd().stop();
    let lost_at = std::time::Instant::now();
    wait_until(
        Duration::from_secs(60),
        "/healthz to fail past the grace",
        |last| {
            let (ok, body) = get();
            *last = body.clone();
            Ok((!ok).then_some(body))
        },
    )
    .and_then(|body| {
        ensure!(
            body.contains("503") && body.contains("out of sync with etcd"),
            "/healthz said {body}"
        );
        Ok(())
    })?;
    ensure!(
        lost_at.elapsed() >= Duration::from_secs(GRACE_SECS),
        "/healthz failed {:?} after etcd stopped, inside the {GRACE_SECS}s grace",
        lost_at.elapsed()
    );

    cluster.etcd().restart()?;
    wait_until(
        Duration::from_secs(90),
        "/healthz to recover with etcd",
        |last| {
            let (ok, body) = get();
            *last = body;
            Ok(ok.then_some(()))
        },
    )?;
    Ok(())
}
