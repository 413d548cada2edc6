//! Network namespaces and the traffic tools run inside them.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use node_agent::flannel::lease::parse_mac;

use crate::process::{self, Background, COMMAND_TIMEOUT};

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, brings `lo` up and turns IPv6 off so that the
    /// only traffic on the simulated wires is what the tests send.
    pub fn new(name: &str) -> Result<Self> {
        process::run(process::command("ip", &["netns", "add", name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        // From here on Drop removes the namespace, also if setup fails.
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(ns)
    }

    /// Sets sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) in this
    /// namespace. Written from a thread that entered it, with no `sysctl`
    /// process: /proc/sys/net shows the writing thread's own namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        self.run_in(|| std::fs::write(&path, value))?
            .with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Creates a veth pair, `name` here and `peer_name` in `peer`, both with
    /// `mtu`. Both ends are created directly in their namespaces, so no
    /// device ever appears in the machine's own namespace.
    pub fn add_veth(&self, name: &str, peer: &Netns, peer_name: &str, mtu: u32) -> Result<()> {
        let mtu = mtu.to_string();
        let args = [
            "link", "add", "name", name, "netns", &self.name, "mtu", &mtu, "type", "veth", "peer",
            "name", peer_name, "netns", &peer.name, "mtu", &mtu,
        ];
        process::run(process::command("ip", &args))?;
        Ok(())
    }

    /// The interface index and MAC address of device `dev` here.
    pub fn link(&self, dev: &str) -> Result<(u32, [u8; 6])> {
        let out = self.ip(&["-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("`ip -j link` printed {out:?}"))?;
        let ifindex = v[0]["ifindex"]
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .with_context(|| format!("no ifindex for {dev} in {out}"))?;
        let mac = v[0]["address"]
            .as_str()
            .with_context(|| format!("no MAC for {dev} in {out}"))?;
        Ok((ifindex, parse_mac(mac)?))
    }

    /// A handle to an existing namespace, which it will delete on drop.
    pub(crate) fn adopt(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> args...` as a [`Command`], not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        command_in(&self.name, args)
    }

    /// Like [`Self::command`] but switching only the network namespace
    /// (`nsenter --net`), keeping the caller's mounts. For the node agent:
    /// `ip netns exec` also enters a new mount namespace with a fresh sysfs
    /// on /sys, which hides the machine's bpffs at /sys/fs/bpf, so pins made
    /// there would be invisible outside and gone when the process exits.
    pub fn command_keep_mounts(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .args(args);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace (only the
    /// network namespace; mounts stay the caller's). For in-process work
    /// that must see the namespace's devices and routes, such as
    /// `BPF_PROG_TEST_RUN`, which runs in the calling thread's namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    use std::os::fd::AsRawFd as _;
                    // SAFETY: setns(2) on a valid namespace fd; it only
                    // changes this (fresh, scoped) thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error())
                            .with_context(|| format!("setns into {path}"));
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// Runs `args` in the namespace and returns its output whatever the exit
    /// status; fails only if it cannot be started or hangs.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        process::run_output(self.command(args), COMMAND_TIMEOUT)
    }

    /// Runs `args` in the namespace; a non-zero exit is an error carrying
    /// stderr. Returns stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        process::run(self.command(args))
    }

    /// [`Self::run`] with an explicit deadline.
    pub fn run_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        process::run_timeout(self.command(args), timeout)
    }

    /// `ip -n <ns> args...`: cheaper than `ip netns exec <ns> ip ...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip_in(&self.name, args)
    }

    /// Starts `args` in the namespace in the background with stdout and
    /// stderr appended to `log_path`.
    pub fn spawn_logged(&self, args: &[&str], log_path: &Path) -> Result<Background> {
        Background::spawn_logged(self.command(args), log_path)
    }

    /// Pings `dst` `count` times with `size` payload bytes and fails unless
    /// every echo is answered. With `df` the don't-fragment bit is set
    /// (`-M do`), so a payload that does not fit the path MTU fails instead
    /// of being fragmented. Returns ping's output.
    pub fn ping(&self, dst: Ipv4Addr, count: u32, size: u32, df: bool) -> Result<String> {
        let (count_s, size_s, dst_s) = (count.to_string(), size.to_string(), dst.to_string());
        let args = [
            "ping",
            "-n",
            "-c",
            &count_s,
            "-i",
            "0.2",
            "-W",
            "2",
            "-s",
            &size_s,
            "-M",
            if df { "do" } else { "dont" },
            &dst_s,
        ];
        // Each probe may take up to -W seconds; leave slack on top.
        let timeout = Duration::from_secs(10 + 3 * u64::from(count));
        let cmd = self.command(&args);
        let desc = process::describe(&cmd);
        let output = process::run_output(cmd, timeout)?;
        let text = process::check(&desc, &output)
            .with_context(|| format!("ping from {} to {dst}", self.name))?;
        // ping exits 0 when *some* replies came back; the tests want all.
        let received = parse_ping_received(&text)
            .with_context(|| format!("parsing output of `{desc}`:\n{text}"))?;
        if received != count {
            bail!(
                "ping from {} to {dst}: {received} of {count} replies\n{text}",
                self.name
            );
        }
        Ok(text)
    }

    /// Sends single pings until one is answered or `timeout` passes. For
    /// waiting on convergence (routes programmed by an agent) before the
    /// strict checks of [`Self::ping`].
    pub fn ping_until(&self, dst: Ipv4Addr, timeout: Duration) -> Result<()> {
        let dst_s = dst.to_string();
        process::wait_until(
            timeout,
            &format!("{dst} to answer ping from {}", self.name),
            |last| {
                let out = self.exec(&["ping", "-n", "-c", "1", "-W", "1", &dst_s])?;
                if out.status.success() {
                    return Ok(Some(()));
                }
                *last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(None)
            },
        )
    }

    /// Starts a packet capture in this namespace; see [`Capture`].
    pub fn capture(&self, iface: &str, filter: &str, count: u32) -> Result<Capture> {
        Capture::start(self, iface, filter, count)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside (a stray tool of ours) would keep the
        // namespace and its devices alive after `ip netns del` drops the
        // name, so end them first. Only namespaces this fixture created get
        // here.
        if let Ok(out) = process::run(process::command("ip", &["netns", "pids", &self.name])) {
            for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                let _ = process::signal_pid(pid, libc::SIGKILL);
            }
        }
        if let Err(e) = process::run(process::command("ip", &["netns", "del", &self.name])) {
            eprintln!(
                "weft-tests: could not delete namespace {}: {e:#}",
                self.name
            );
        }
    }
}

fn parse_ping_received(text: &str) -> Result<u32> {
    // "3 packets transmitted, 3 received, 0% packet loss, time 402ms"
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .context("no summary line")?;
    let received = line
        .split(',')
        .nth(1)
        .and_then(|f| f.split_whitespace().next())
        .context("no received count")?;
    received.parse().context("received count is not a number")
}

/// A running `tcpdump`. Start it, generate traffic, then [`Capture::finish`].
pub struct Capture {
    child: Option<Child>,
    desc: String,
    count: u32,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Capture {
    /// Runs `tcpdump -n -l -c <count> -i <iface> <filter>` in `ns` and
    /// returns once tcpdump reports it is listening, so traffic sent after
    /// this call is seen.
    pub fn start(ns: &Netns, iface: &str, filter: &str, count: u32) -> Result<Self> {
        let count_s = count.to_string();
        let cmd = ns.command(&["tcpdump", "-n", "-l", "-c", &count_s, "-i", iface, filter]);
        Self::spawn(cmd, "listening on", count)
    }

    /// Like [`Self::start`] with tshark, which dissects what it captures:
    /// prints one line per packet with `fields` (tab-separated; a field
    /// that occurs in several layers, e.g. `ip.proto` of a tunnel packet, is
    /// comma-separated, outer first). UDP 8472 is decoded as VXLAN, as
    /// flannel uses it, and IPv4 header checksums are verified
    /// (`ip.checksum.status`: 2 = good).
    pub fn start_tshark(
        ns: &Netns,
        iface: &str,
        filter: &str,
        count: u32,
        fields: &[&str],
    ) -> Result<Self> {
        let count_s = count.to_string();
        let mut args = vec![
            "tshark",
            "-n",
            "-l",
            "-i",
            iface,
            "-c",
            &count_s,
            "-f",
            filter,
            "-d",
            "udp.port==8472,vxlan",
            "-o",
            "ip.check_checksum:TRUE",
            "-T",
            "fields",
        ];
        for f in fields {
            args.extend(["-e", f]);
        }
        Self::spawn(ns.command(&args), "Capturing on", count)
    }

    fn spawn(mut cmd: Command, ready: &str, count: u32) -> Result<Self> {
        let desc = process::describe(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
        let stdout_pipe = child.stdout.take().context("tcpdump stdout not piped")?;
        let stderr_pipe = child.stderr.take().context("tcpdump stderr not piped")?;
        let stdout = thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stdout_pipe).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let stderr = Arc::clone(&stderr);
            thread::spawn(move || {
                for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                    let mut s = stderr.lock().unwrap_or_else(PoisonError::into_inner);
                    s.push_str(&line);
                    s.push('\n');
                    // The receiver stops listening once tcpdump is ready.
                    let _ = tx.send(line);
                }
            });
        }
        let mut capture = Self {
            child: Some(child),
            desc,
            count,
            stdout: Some(stdout),
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(ready) => return Ok(capture),
                Ok(_) => {}
                Err(_) => {
                    let err = capture.stderr_text();
                    capture.stop();
                    bail!("`{}` did not start listening:\n{err}", capture.desc);
                }
            }
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT makes tcpdump flush what it has before exiting.
            let _ = process::signal_pid(child.id(), libc::SIGINT);
            if !matches!(
                process::wait_status(&mut child, Duration::from_secs(2)),
                Ok(Some(_))
            ) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Waits up to `timeout` for tcpdump to have seen its `count` packets
    /// and returns the decoded packets, one per line. If fewer arrived the
    /// error includes what was captured.
    pub fn finish(mut self, timeout: Duration) -> Result<String> {
        let mut done = false;
        if let Some(child) = self.child.as_mut() {
            done = matches!(process::wait_status_no_kill(child, timeout)?, Some(s) if s.success());
        }
        self.stop();
        let text = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if !done {
            bail!(
                "`{}` did not see {} packets within {timeout:?}\ncaptured:\n{text}\nstderr:\n{}",
                self.desc,
                self.count,
                self.stderr_text()
            );
        }
        Ok(text)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Captures up to `count` packets matching `filter` on `iface` in `ns`
/// while `during` runs, e.g. a ping. Fails if `during` fails or fewer than
/// `count` packets are seen within `timeout` after it returns.
pub fn capture(
    ns: &Netns,
    iface: &str,
    filter: &str,
    count: u32,
    timeout: Duration,
    during: impl FnOnce() -> Result<()>,
) -> Result<String> {
    let cap = Capture::start(ns, iface, filter, count)?;
    during().context("traffic generated during the capture")?;
    cap.finish(timeout)
}

/// `ip netns exec <ns> args...` for a namespace known by name.
/// `ip -n <ns> args...` for namespace `ns` by name: [`Netns::ip`] for code
/// that holds no [`Netns`] (a fixture's background thread).
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", ns]).args(args);
    process::run(cmd)
}

pub(crate) fn command_in(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}
