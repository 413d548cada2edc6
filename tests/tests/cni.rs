//! weft's CNI plugin, weft-cni, under a real runtime and driven as libcni drives it.
//!
//! - `podman_containers_across_hosts`: two hosts running node-agent (the e2e fixture), podman
//!   with its CNI backend in each host's namespace creating containers through weft-cni;
//!   container-to-container ping and TCP both ways, CHECK on healthy containers, DEL freeing
//!   host-local's lease and weft-cni's saved config, DEL repeated, and a failing ADD undone.
//! - `plugin_errors_and_version`: the plugin executed with the CNI_* environment and stdin
//!   config for VERSION and each error case, checking the error result's code and message.
//!
//! They need root and what `cargo xtask setup` installs (podman, runc, the CNI plugins,
//! busybox-static) and `cargo xtask build`; without them they fail saying what is missing.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use weft_tests::docker::IpEcho;
use weft_tests::podman::{self, Podman, PodmanContainer};
use weft_tests::{
    Cluster, Host, node_agent_binary, require_bpffs, require_root, require_tools, scratch_dir,
    wait_until, weft_cni_binary,
};

const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}"#;
const CONVERGE: Duration = Duration::from_secs(30);
const TCP_PORT: &str = "7777";

/// What the plugin answered: exit status, stdout parsed as JSON when it is JSON.
#[derive(Debug)]
struct Answer {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {:?}", self.stdout))
    }

    /// Asserts an error result with `code` whose message contains `needle`, in `version`.
    fn expect_error(&self, code: u64, needle: &str, version: &str) -> Result<()> {
        ensure!(!self.success, "expected failure, got success: {self:?}");
        let v = self.json()?;
        ensure!(v["code"] == code, "expected code {code}: {v}");
        ensure!(
            v["cniVersion"] == version,
            "expected version {version}: {v}"
        );
        let msg = v["msg"].as_str().context("error result without msg")?;
        ensure!(msg.contains(needle), "msg {msg:?} lacks {needle:?}");
        // The message also goes to stderr, the runtime's log.
        ensure!(
            self.stderr.contains(msg),
            "stderr {:?} lacks {msg:?}",
            self.stderr
        );
        Ok(())
    }
}

/// Executes the plugin as libcni does: `command` and the other CNI_* variables in the
/// environment (an empty value leaves the variable out), `stdin` as the config, optionally
/// inside a host's network namespace (where its bridge lives).
fn call_plugin(host: Option<&Host<'_>>, vars: &[(&str, &str)], stdin: &str) -> Result<Answer> {
    let plugin = weft_cni_binary()?;
    let plugin = plugin.to_string_lossy();
    let mut cmd = match host {
        Some(host) => host.ns().command_keep_mounts(&[&plugin]),
        None => Command::new(&*plugin),
    };
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
        "CNI_ARGS",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in vars {
        if !v.is_empty() {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting weft-cni")?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .context("writing the config")?;
    }
    let output = weft_tests::process::wait_output(child, "weft-cni", Duration::from_secs(60))?;
    Ok(Answer {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

fn vars<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    cni_path: &'a str,
) -> [(&'a str, &'a str); 5] {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", cni_path),
    ]
}

#[test]
fn plugin_errors_and_version() -> Result<()> {
    weft_cni_binary()?;
    podman::require_cni_plugin(podman::SYSTEM_CNI_DIR, "bridge")?;
    let dir = scratch_dir()?;
    let data = dir.path().join("data");
    let conf = |version: &str, subnet_file: &Path| {
        json!({
            "cniVersion": version,
            "name": "weft-errors",
            "type": "weft-cni",
            "subnetFile": subnet_file,
            "dataDir": data,
        })
        .to_string()
    };
    let missing = dir.path().join("missing.env");
    let malformed = dir.path().join("malformed.env");
    std::fs::write(
        &malformed,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=big\nFLANNEL_IPMASQ=false\n",
    )?;
    // Never reached by a delegate: every case below fails before one would run.
    let netns = "/run/netns/weft-cni-test-never-used";
    let add = vars("ADD", "ctr1", netns, podman::SYSTEM_CNI_DIR);

    for stdin in ["", r#"{"cniVersion":"1.0.0"}"#] {
        let version = call_plugin(None, &[("CNI_COMMAND", "VERSION")], stdin)?;
        ensure!(version.success, "VERSION failed: {version:?}");
        let v = version.json()?;
        ensure!(v["cniVersion"] == "1.0.0", "{v}");
        let supported: Vec<&str> = v["supportedVersions"]
            .as_array()
            .context("no supportedVersions")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        ensure!(
            supported == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
            "{supported:?}"
        );
    }

    call_plugin(None, &add, &conf("1.0.0", &missing))?.expect_error(
        100,
        &format!(
            "subnet.env missing: is node-agent running? ({}",
            missing.display()
        ),
        "1.0.0",
    )?;
    call_plugin(None, &add, &conf("0.4.0", &malformed))?.expect_error(
        101,
        "FLANNEL_MTU=\"big\"",
        "0.4.0",
    )?;
    call_plugin(None, &add, "{\"cniVersion\": \"1.0.0\", ")?.expect_error(
        6,
        "not valid JSON",
        "1.0.0",
    )?;
    call_plugin(None, &add, r#"{"cniVersion":"1.0.0","type":"weft-cni"}"#)?.expect_error(
        7,
        "name is missing",
        "1.0.0",
    )?;
    for version in ["2.0.0", "0.2.0"] {
        call_plugin(None, &add, &conf(version, &missing))?.expect_error(
            1,
            &format!("incompatible CNI version \"{version}\""),
            "1.0.0",
        )?;
    }
    let mut no_id = add;
    no_id[1] = ("CNI_CONTAINERID", "");
    call_plugin(None, &no_id, &conf("1.0.0", &missing))?.expect_error(
        4,
        "CNI_CONTAINERID",
        "1.0.0",
    )?;
    call_plugin(None, &[], &conf("1.0.0", &missing))?.expect_error(4, "CNI_COMMAND", "1.0.0")?;

    // DEL of a container weft never set up, with no subnet.env either: success, no output.
    let del = vars("DEL", "ctr1", "", podman::SYSTEM_CNI_DIR);
    for _ in 0..2 {
        let answer = call_plugin(None, &del, &conf("1.0.0", &missing))?;
        ensure!(answer.success && answer.stdout.is_empty(), "{answer:?}");
    }
    // Nothing was saved by any failing call.
    ensure!(!data.exists(), "{} was created", data.display());
    Ok(())
}

fn preflight() -> Result<()> {
    require_root()?;
    require_bpffs()?;
    require_tools(&[
        "ip", "nsenter", "etcdctl", "podman", "runc", "conmon", "iptables", "tar",
    ])
    .context("podman test")?;
    for plugin in ["bridge", "host-local"] {
        podman::require_cni_plugin(podman::SYSTEM_CNI_DIR, plugin)?;
    }
    node_agent_binary()?;
    weft_cni_binary()?;
    Ok(())
}

/// Pings `dst` from container `from` until one answer, then insists on 3 of 3.
fn ping(podman: &Podman<'_>, from: &PodmanContainer, dst: &PodmanContainer) -> Result<()> {
    let dst_ip = dst.ip.to_string();
    wait_until(
        CONVERGE,
        &format!("{} to answer ping from {}", dst.name, from.name),
        |last| match podman.exec(&from.name, &["ping", "-c", "1", "-W", "1", &dst_ip]) {
            Ok(_) => Ok(Some(())),
            Err(e) => {
                *last = format!("{e:#}");
                Ok(None)
            }
        },
    )?;
    let out = podman.exec(&from.name, &["ping", "-c", "3", "-W", "2", &dst_ip])?;
    ensure!(
        out.contains("3 packets received"),
        "ping {} -> {}: {out}",
        from.name,
        dst.name
    );
    Ok(())
}

/// A TCP exchange with busybox nc: `server` answers one line with `ack-<line>`, `client`
/// sends a line and must read that answer back.
fn tcp_exchange(
    client_podman: &Podman<'_>,
    client: &PodmanContainer,
    server_podman: &Podman<'_>,
    server: &PodmanContainer,
) -> Result<()> {
    server_podman.exec(
        &server.name,
        &[
            "sh",
            "-c",
            "printf '#!/bin/sh\\nread line\\necho ack-$line\\n' > /tmp/ack && chmod +x /tmp/ack",
        ],
    )?;
    server_podman.run(&[
        "exec",
        "-d",
        &server.name,
        "nc",
        "-l",
        "-p",
        TCP_PORT,
        "-e",
        "/tmp/ack",
    ])?;
    let line = format!("hello-from-{}", client.name);
    let script = format!("echo {line} | nc -w 5 {} {TCP_PORT}", server.ip);
    let reply = wait_until(
        CONVERGE,
        &format!("a TCP reply from {} to {}", server.name, client.name),
        |last| match client_podman.exec(&client.name, &["sh", "-c", &script]) {
            Ok(out) if !out.trim().is_empty() => Ok(Some(out)),
            Ok(out) => {
                *last = format!("empty reply {out:?}");
                Ok(None)
            }
            Err(e) => {
                *last = format!("{e:#}");
                Ok(None)
            }
        },
    )?;
    ensure!(
        reply.trim() == format!("ack-{line}"),
        "TCP {} -> {}: got {reply:?}",
        client.name,
        server.name
    );
    Ok(())
}

/// CHECK as libcni sends it: the conflist's plugin config plus the cached ADD result as
/// prevResult, in the host's namespace.
fn check(host: &Host<'_>, podman: &Podman<'_>, c: &PodmanContainer) -> Result<Answer> {
    let mut config = podman.network_config().clone();
    config["prevResult"] = podman.cached_result(c)?;
    let netns = c.netns.to_string_lossy();
    let cni_path = podman.cni_path();
    call_plugin(
        Some(host),
        &vars("CHECK", &c.id, &netns, &cni_path),
        &config.to_string(),
    )
}

/// host-local's lease files (one per address) in `podman`'s network.
fn leases(podman: &Podman<'_>) -> Result<Vec<String>> {
    let dir = podman.host_local_dir();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn podman_containers_across_hosts() -> Result<()> {
    preflight()?;
    let cluster = Cluster::new(CONFIG)?;
    let (hosts, envs) = cluster.start_hosts(&[1, 2], &[], false)?;

    // The one busybox image the runtime tests use (its echo service is
    // unused here).
    let image = IpEcho::build()?;
    let plugin = weft_cni_binary()?;
    let pods = [
        Podman::new(&hosts[0], &plugin, &image.tarball())?,
        Podman::new(&hosts[1], &plugin, &image.tarball())?,
    ];
    let a = pods[0].start("a")?;
    let b = pods[1].start("b")?;

    // Addresses from each host's FLANNEL_SUBNET, MTU FLANNEL_MTU, the cluster route via cni0.
    for (pod, c, env) in [(&pods[0], &a, &envs[0]), (&pods[1], &b, &envs[1])] {
        ensure!(
            env.subnet.contains(&c.ip),
            "{} got {} outside {}",
            c.name,
            c.ip,
            env.subnet
        );
        let link = pod.exec(&c.name, &["ip", "-o", "link", "show", "eth0"])?;
        ensure!(
            link.contains(&format!("mtu {} ", env.mtu)),
            "{} eth0: {link}",
            c.name
        );
        let routes = pod.exec(&c.name, &["ip", "route"])?;
        let gateway = std::net::Ipv4Addr::from(u32::from(env.subnet.network()) + 1);
        ensure!(
            routes.contains(&format!("10.244.0.0/16 via {gateway}")),
            "{} routes: {routes}",
            c.name
        );
        ensure!(
            pod.data_dir().join(&c.id).join("eth0.json").is_file(),
            "no saved delegate config for {}",
            c.name
        );
        ensure!(
            leases(pod)? == [c.ip.to_string()],
            "host-local leases: {:?}",
            leases(pod)?
        );
    }

    ping(&pods[0], &a, &b)?;
    ping(&pods[1], &b, &a)?;
    tcp_exchange(&pods[0], &a, &pods[1], &b)?;
    tcp_exchange(&pods[1], &b, &pods[0], &a)?;

    // CHECK passes on healthy containers.
    for (host, pod, c) in [(&hosts[0], &pods[0], &a), (&hosts[1], &pods[1], &b)] {
        let answer = check(host, pod, c)?;
        ensure!(
            answer.success && answer.stdout.is_empty(),
            "CHECK {}: {answer:?}",
            c.name
        );
    }

    // DEL (podman's, on removal) frees the address and forgets the saved config.
    pods[0].remove("a")?;
    ensure!(leases(&pods[0])?.is_empty(), "{:?}", leases(&pods[0])?);
    ensure!(
        !pods[0].data_dir().join(&a.id).exists(),
        "saved config of a survived DEL"
    );
    // DEL again, as a runtime retrying it would: still success.
    let cni_path = pods[0].cni_path();
    let netns = a.netns.to_string_lossy();
    let again = call_plugin(
        Some(&hosts[0]),
        &vars("DEL", &a.id, &netns, &cni_path),
        &pods[0].network_config().to_string(),
    )?;
    ensure!(again.success, "second DEL: {again:?}");

    // An ADD whose delegate fails (no such netns) is undone: no lease, no saved config.
    let failed = call_plugin(
        Some(&hosts[0]),
        &vars(
            "ADD",
            "weftfailedadd",
            "/run/netns/weft-cni-no-such-ns",
            &cni_path,
        ),
        &pods[0].network_config().to_string(),
    )?;
    ensure!(
        !failed.success,
        "ADD into a missing netns succeeded: {failed:?}"
    );
    let result = failed.json()?;
    ensure!(
        result["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("delegate plugin bridge failed")),
        "{result}"
    );
    ensure!(leases(&pods[0])?.is_empty(), "{:?}", leases(&pods[0])?);
    ensure!(
        !pods[0].data_dir().join("weftfailedadd").exists(),
        "the failed ADD left its saved config"
    );

    // b still works after a's removal; a new container on host 1 reaches it.
    let c = pods[0].start("c")?;
    ping(&pods[0], &c, &b)?;
    ping(&pods[1], &b, &c)?;
    Ok(())
}
