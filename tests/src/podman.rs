//! A real CNI runtime on a simulated host: Debian's podman with its CNI backend, running in
//! the host's network namespace, attaching containers through weft's CNI plugin.
//!
//! Each [`Podman`] has its own storage, run dir, network config dir and temp dir under a
//! scratch directory, its own network (unique name, so host-local's state dir under
//! `/var/lib/cni/networks/<name>` is its own), and removes all of it on drop: its containers,
//! host-local's leases and libcni's cached results.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cluster::Host;
use crate::process;

/// Where Debian's containernetworking-plugins installs bridge, host-local and the rest.
pub const SYSTEM_CNI_DIR: &str = "/usr/lib/cni";
/// host-local's default state dir, one subdirectory per network name.
pub const HOST_LOCAL_DIR: &str = "/var/lib/cni/networks";
/// libcni's cache of ADD results (what it sends as prevResult for CHECK and DEL).
const LIBCNI_RESULTS_DIR: &str = "/var/lib/cni/results";
/// The image every test container runs, imported from a busybox rootfs.
pub const IMAGE: &str = "localhost/weft-busybox:latest";
/// `podman run` takes seconds on vfs storage; a stuck one is a failure.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// One podman instance on one host, with one CNI network served by weft-cni.
pub struct Podman<'h> {
    host: &'h Host<'h>,
    network: String,
    /// weft-cni's `dataDir` for this network.
    data_dir: PathBuf,
    /// The directory podman looks up plugins in first (weft-cni is linked there).
    plugin_dir: PathBuf,
    network_config: Value,
    // Last: removed after Drop::drop has stopped the containers living in it.
    dir: tempfile::TempDir,
}

impl<'h> Podman<'h> {
    /// Sets up podman on `host` with a network named `weft-t<tag>-<host index>` whose only
    /// plugin is `plugin` (weft-cni), reading the host's subnet file, and imports `image_tar`.
    pub fn new(host: &'h Host<'h>, plugin: &Path, image_tar: &Path) -> Result<Self> {
        let dir = crate::scratch_dir().context("creating podman's directory")?;
        // The pin-directory shape, so sweep_stale also removes host-local's state of a run
        // that was killed before its Drop ran.
        let network = format!(
            "{}{}-{}",
            crate::PIN_PREFIX,
            crate::unique_tag(),
            host.index()
        );
        let plugin_dir = dir.path().join("cni-bin");
        let net_dir = dir.path().join("net");
        for sub in [&plugin_dir, &net_dir] {
            fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        std::os::unix::fs::symlink(plugin, plugin_dir.join("weft-cni"))
            .context("linking weft-cni into the plugin dir")?;
        let data_dir = dir.path().join("weft-data");
        let network_config = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "type": "weft-cni",
            "subnetFile": host.subnet_file(),
            "dataDir": data_dir,
        });
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [network_config],
        });
        fs::write(
            net_dir.join(format!("{network}.conflist")),
            conflist.to_string(),
        )
        .context("writing the conflist")?;
        // podman has no flag for the plugin path; containers.conf names it.
        fs::write(
            dir.path().join("containers.conf"),
            format!(
                "[network]\ncni_plugin_dirs = [{:?}, {SYSTEM_CNI_DIR:?}]\n",
                plugin_dir.to_string_lossy()
            ),
        )
        .context("writing containers.conf")?;
        let podman = Self {
            host,
            network,
            data_dir,
            plugin_dir,
            network_config,
            dir,
        };
        podman
            .run(&["import", &image_tar.to_string_lossy(), IMAGE])
            .context("importing the busybox image")?;
        Ok(podman)
    }

    pub fn network(&self) -> &str {
        &self.network
    }

    /// weft-cni's data dir for this network.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The plugin's entry of the conflist, as libcni hands it to the plugin (before adding
    /// per-call fields such as prevResult).
    pub fn network_config(&self) -> &Value {
        &self.network_config
    }

    /// CNI_PATH as podman's libcni builds it from `cni_plugin_dirs`.
    pub fn cni_path(&self) -> String {
        format!("{}:{SYSTEM_CNI_DIR}", self.plugin_dir.display())
    }

    /// host-local's lease files for this network.
    pub fn host_local_dir(&self) -> PathBuf {
        Path::new(HOST_LOCAL_DIR).join(&self.network)
    }

    /// `podman <global options> args` in the host's network namespace, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let sub = |name: &str| d.join(name).to_string_lossy().into_owned();
        let (root, runroot, net, tmp) = (sub("root"), sub("run"), sub("net"), sub("tmp"));
        let mut argv = vec![
            "podman",
            "--root",
            &root,
            "--runroot",
            &runroot,
            "--tmpdir",
            &tmp,
            "--network-backend",
            "cni",
            "--network-config-dir",
            &net,
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--storage-driver",
            "vfs",
            // crun rejects a hybrid cgroup v1/v2 layout; runc runs on it.
            "--runtime",
            "runc",
        ];
        argv.extend_from_slice(args);
        // Network namespace only: podman's storage and mounts stay the machine's.
        let mut cmd = self.host.ns().command_keep_mounts(&argv);
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"));
        cmd
    }

    /// Runs podman with `args`; a failure carries podman's stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        process::run_timeout(self.command(args), PODMAN_TIMEOUT)
    }

    /// Starts a detached container `name` sleeping on this network and returns its details.
    pub fn start(&self, name: &str) -> Result<PodmanContainer> {
        self.run(&[
            "run",
            "-d",
            "--name",
            name,
            // Without these podman fails here with "error setting rlimit".
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            // busybox ping uses a raw socket.
            "--cap-add",
            "NET_RAW",
            "--network",
            &self.network,
            IMAGE,
            "/bin/sleep",
            "3600",
        ])
        .with_context(|| format!("starting container {name} on host {}", self.host.index()))?;
        self.inspect(name)
    }

    /// Id, network namespace and address of container `name`, from `podman inspect`.
    pub fn inspect(&self, name: &str) -> Result<PodmanContainer> {
        let out = self.run(&["inspect", "--type", "container", name])?;
        let v: Value = serde_json::from_str(&out).context("parsing podman inspect")?;
        let c = &v[0];
        let id = c["Id"].as_str().context("no Id")?.to_owned();
        let netns = c["NetworkSettings"]["SandboxKey"]
            .as_str()
            .context("no SandboxKey")?;
        let ip = c["NetworkSettings"]["Networks"][&self.network]["IPAddress"]
            .as_str()
            .context("no IPAddress on the weft network")?;
        Ok(PodmanContainer {
            name: name.to_owned(),
            id,
            netns: PathBuf::from(netns),
            ip: ip
                .parse()
                .with_context(|| format!("podman reports address {ip:?}"))?,
        })
    }

    /// Runs `args` in container `name`.
    pub fn exec(&self, name: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["exec", name];
        argv.extend_from_slice(args);
        self.run(&argv)
    }

    /// `podman rm -f`: stops the container, and podman's libcni runs DEL.
    pub fn remove(&self, name: &str) -> Result<()> {
        self.run(&["rm", "-f", "-t", "0", name])
            .with_context(|| format!("removing container {name}"))?;
        Ok(())
    }

    /// The ADD result libcni cached for `container`: what it sends as prevResult.
    pub fn cached_result(&self, container: &PodmanContainer) -> Result<Value> {
        let path = self.cache_path(&container.id);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let cache: Value = serde_json::from_str(&text).context("parsing libcni's cache")?;
        cache
            .get("result")
            .cloned()
            .with_context(|| format!("{} has no result", path.display()))
    }

    fn cache_path(&self, container_id: &str) -> PathBuf {
        Path::new(LIBCNI_RESULTS_DIR).join(format!("{}-{container_id}-eth0", self.network))
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Containers first: their conmon and sleep processes, mounts and CNI attachments.
        if let Err(e) = self.run(&["rm", "-a", "-f", "-t", "0"]) {
            eprintln!("weft-tests: removing podman containers: {e:#}");
        }
        let _ = fs::remove_dir_all(self.host_local_dir());
        if let Ok(entries) = fs::read_dir(LIBCNI_RESULTS_DIR) {
            let prefix = format!("{}-", self.network);
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        // Storage and run dirs go with `dir` (vfs layers are plain
        // directories), once nothing is mounted there any more.
        crate::docker::detach_mounts_under(self.dir.path());
    }
}

/// A running container as podman reports it.
#[derive(Clone, Debug)]
pub struct PodmanContainer {
    pub name: String,
    pub id: String,
    /// The container's network namespace, CNI_NETNS.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

/// Fails unless `dir` holds an executable `plugin`.
pub fn require_cni_plugin(dir: &str, plugin: &str) -> Result<()> {
    let path = Path::new(dir).join(plugin);
    if !path.is_file() {
        bail!(
            "CNI plugin {} not found: run `cargo xtask setup` (package containernetworking-plugins)",
            path.display()
        );
    }
    Ok(())
}
