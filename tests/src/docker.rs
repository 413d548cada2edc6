//! Real container runtimes on a simulated host: Debian's dockerd, one per
//! host namespace, and the busybox image their containers run.
//!
//! Nothing can be pulled here, so the image is a busybox rootfs built from
//! the `busybox-static` package. Its one service, [`IpEcho`], answers an HTTP
//! request with the address the connection came from (busybox httpd, CGI):
//! that is how the tests see whether a container's IP survived the trip or
//! was masqueraded.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    Host, Netns,
    process::{self, Background, Bound, wait_until},
};

/// The port [`IpEcho`] serves on, in containers and on the stand-in internet.
pub const ECHO_PORT: u16 = 8080;
const IMAGE: &str = "weft-busybox:test";
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
const CGI: &str =
    "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$REMOTE_ADDR\"\n";

/// A busybox root filesystem serving the address-echo page, as a directory
/// and as a tarball for `docker import`.
pub struct IpEcho {
    dir: tempfile::TempDir,
}

impl IpEcho {
    pub fn build() -> Result<Self> {
        let busybox = Path::new("/bin/busybox");
        ensure!(
            busybox.is_file(),
            "{} missing: install busybox-static (`cargo xtask setup` does)",
            busybox.display()
        );
        let dir = crate::scratch_dir()?;
        let root = dir.path().join("rootfs");
        for sub in ["bin", "www/cgi-bin", "tmp", "etc", "proc", "sys", "dev"] {
            fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        fs::copy(busybox, root.join("bin/busybox")).context("copying busybox")?;
        let applets = process::run(process::command("/bin/busybox", &["--list"]))?;
        for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
            symlink("busybox", root.join("bin").join(applet))
                .with_context(|| format!("linking applet {applet}"))?;
        }
        let cgi = root.join("www/cgi-bin/ip");
        fs::write(&cgi, CGI).context("writing the echo CGI")?;
        fs::set_permissions(&cgi, fs::Permissions::from_mode(0o755))
            .context("making the echo CGI executable")?;
        let echo = Self { dir };
        let tar = echo.tarball();
        process::run(process::command(
            "tar",
            &[
                "-C",
                &root.to_string_lossy(),
                "-cf",
                &tar.to_string_lossy(),
                ".",
            ],
        ))?;
        Ok(echo)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    pub fn tarball(&self) -> PathBuf {
        self.dir.path().join("rootfs.tar")
    }

    /// The service's command line inside the image.
    pub fn server_args() -> Vec<String> {
        ["httpd", "-f", "-p", &ECHO_PORT.to_string(), "-h", "/www"]
            .map(str::to_owned)
            .to_vec()
    }

    /// Serves the page from a namespace with the machine's busybox (the
    /// stand-in for an internet server), once it listens.
    pub fn serve_in(&self, ns: &Netns, addr: Ipv4Addr) -> Result<Background> {
        let www = self.root().join("www");
        let listen = format!("{addr}:{ECHO_PORT}");
        let mut server = Background::spawn(ns.command(&[
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            &listen,
            "-h",
            &www.to_string_lossy(),
        ]))?;
        server.wait_bound(
            Bound::TcpListen,
            SocketAddrV4::new(addr, ECHO_PORT),
            Duration::from_secs(10),
        )?;
        Ok(server)
    }

    /// A shell command that asks the service at `ip` for the caller's
    /// address (busybox `wget` crashes in these containers; `nc` works).
    pub fn fetch_command(ip: Ipv4Addr) -> String {
        format!("printf 'GET /cgi-bin/ip HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {ECHO_PORT}")
    }

    /// The address the service saw, from its reply.
    pub fn parse_reply(reply: &str) -> Result<Ipv4Addr> {
        let last = reply
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .with_context(|| format!("empty reply from the echo service: {reply:?}"))?;
        let addr = last
            .trim()
            .trim_start_matches("[::ffff:")
            .trim_end_matches(']');
        addr.parse()
            .with_context(|| format!("echo service replied {reply:?}"))
    }
}

/// One dockerd in a host's network namespace, with its own data root, exec
/// root, socket and cgroup parent. Dropping it removes its containers, stops
/// it (and the containerd it started) and removes its state.
pub struct Dockerd {
    dir: tempfile::TempDir,
    process: Option<Background>,
    cgroup: String,
}

impl Dockerd {
    /// Starts dockerd with `flags` in `host`'s namespace and waits until it
    /// answers. Only the network namespace is switched: dockerd needs the
    /// machine's mounts (cgroups, its storage).
    pub fn start(host: &Host<'_>, flags: &[String]) -> Result<Self> {
        let dir = crate::scratch_dir()?;
        // Named like the host's pin dir, so the stale sweep finds it too.
        let cgroup = format!(
            "{}{}-{}",
            crate::PIN_PREFIX,
            host.cluster().tag(),
            host.index()
        );
        let path = |sub: &str| dir.path().join(sub).to_string_lossy().into_owned();
        let sock = format!("unix://{}", path("docker.sock"));
        let mut args: Vec<String> = [
            "dockerd",
            "--data-root",
            &path("root"),
            "--exec-root",
            &path("exec"),
            "--pidfile",
            &path("docker.pid"),
            "-H",
            &sock,
            "--storage-driver",
            "vfs",
            "--cgroup-parent",
            &format!("/{cgroup}"),
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend_from_slice(flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = dir.path().join("dockerd.log");
        let process = Background::spawn_logged(host.ns().command_keep_mounts(&args), &log)?;
        let mut dockerd = Self {
            dir,
            process: Some(process),
            cgroup,
        };
        let log_text = || fs::read_to_string(&log).unwrap_or_default();
        wait_until(DOCKER_TIMEOUT, "dockerd to answer", |last| {
            if let Some(p) = dockerd.process.as_mut()
                && let Some(status) = p.try_wait()?
            {
                bail!(
                    "dockerd exited with {status}:\n{}",
                    process::tail(&log_text(), 30)
                );
            }
            match dockerd.docker(&["version", "--format", "{{.Server.Version}}"]) {
                Ok(_) => Ok(Some(())),
                Err(e) => {
                    *last = format!("{e:#}");
                    Ok(None)
                }
            }
        })
        .with_context(|| format!("dockerd log:\n{}", process::tail(&log_text(), 30)))?;
        Ok(dockerd)
    }

    /// Runs the docker CLI against this daemon; returns stdout.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let sock = format!("unix://{}", self.dir.path().join("docker.sock").display());
        let mut cmd = Command::new("docker");
        cmd.args(["-H", &sock]).args(args);
        process::run_timeout(cmd, DOCKER_TIMEOUT)
    }

    pub fn import(&self, echo: &IpEcho) -> Result<()> {
        self.docker(&["import", &echo.tarball().to_string_lossy(), IMAGE])
            .map(drop)
    }

    /// Starts a container named `name` running the echo service and returns
    /// its IP on the default bridge.
    pub fn run_echo(&self, name: &str) -> Result<Ipv4Addr> {
        let mut args = vec!["run", "-d", "--name", name, IMAGE];
        let server = IpEcho::server_args();
        args.extend(server.iter().map(String::as_str));
        self.docker(&args)?;
        let ip = self.docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", name])?;
        ip.trim()
            .parse()
            .with_context(|| format!("container {name} has IP {ip:?}"))
    }

    /// Runs a shell command in container `name`; returns stdout.
    pub fn exec(&self, name: &str, shell: &str) -> Result<String> {
        self.docker(&["exec", name, "sh", "-c", shell])
    }

    /// The address container `name`'s request to the echo service at `ip`
    /// arrived from.
    pub fn seen_from(&self, name: &str, ip: Ipv4Addr) -> Result<Ipv4Addr> {
        IpEcho::parse_reply(&self.exec(name, &IpEcho::fetch_command(ip))?)
    }

    /// Tears everything down, going on past failures (each is reported)
    /// so that one stuck step does not leave the rest behind.
    fn stop(&mut self) {
        let report = |what: &str, r: Result<()>| {
            if let Err(e) = r {
                eprintln!("weft-tests: dockerd teardown, {what}: {e:#}");
            }
        };
        report(
            "removing containers",
            self.docker(&["ps", "-aq"]).and_then(|ids| {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if ids.is_empty() {
                    return Ok(());
                }
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                self.docker(&args).map(drop)
            }),
        );
        if let Some(mut p) = self.process.take() {
            // dockerd stops its containerd on SIGTERM; Background kills
            // and reaps it if it does not.
            report(
                "stopping dockerd",
                p.stop(libc::SIGTERM, Duration::from_secs(30)).map(drop),
            );
        }
        detach_mounts_under(self.dir.path());
        // dockerd's cgroupfs driver leaves the parent, with an empty child
        // per container, per controller (cgroup v1) or once (v2).
        for entry in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            remove_cgroup(&entry.path().join(&self.cgroup));
        }
        remove_cgroup(&Path::new("/sys/fs/cgroup").join(&self.cgroup));
    }
}

/// Removes an empty cgroup and its empty children: rmdir is how a cgroup
/// goes (its control files cannot be unlinked), children first.
pub(crate) fn remove_cgroup(path: &Path) {
    for entry in fs::read_dir(path).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&entry.path());
        }
    }
    let _ = fs::remove_dir(path);
}

/// Detaches whatever is still mounted under `dir` (the shm of a container
/// that died with its runtime), which would make removing `dir` fail.
pub(crate) fn detach_mounts_under(dir: &Path) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy().into_owned();
    for mount in mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
    {
        let Ok(target) = std::ffi::CString::new(mount) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path; MNT_DETACH only
        // detaches a mount under the caller's own fixture directory.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}
