//! Running child processes with deadlines.
//!
//! Every external command the fixture runs goes through here so that a hung
//! tool (an `ip` waiting on a lock, a `ping` to a black hole) turns into an
//! error naming the command instead of a test that never ends.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Read;
use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use crate::system::describe;

/// Deadline for short configuration commands (`ip`, `etcdctl`, `bpftool`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, an error, or `timeout` passes.
///
/// The poll interval starts small and grows, so fast conditions cost little
/// and slow ones do not spin. On timeout the error names `what` and includes
/// the last "not yet" reason `f` reported through `last`.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&mut String) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(5);
    let mut last = String::new();
    loop {
        if let Some(v) = f(&mut last)? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            if last.is_empty() {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            bail!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// Runs `cmd` to completion with stdin closed, capturing its output, and
/// kills it if it outlives `timeout`. A non-zero exit is *not* an error here:
/// see [`check`].
pub fn run_output(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let desc = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
    wait_output(child, &desc, timeout)
}

/// Waits for an already spawned child whose stdout/stderr are piped (or
/// not), collecting what it prints. Kills it on timeout.
pub fn wait_output(mut child: Child, desc: &str, timeout: Duration) -> Result<Output> {
    // Drain both pipes on their own threads: a child that fills a pipe
    // buffer would otherwise block forever while we wait for it to exit.
    let out = child
        .stdout
        .take()
        .map(|p| thread::spawn(move || read_all(p)));
    let err = child
        .stderr
        .take()
        .map(|p| thread::spawn(move || read_all(p)));
    let status =
        wait_status(&mut child, timeout).with_context(|| format!("waiting for `{desc}`"))?;
    let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
        h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    };
    let stdout = join(out);
    let stderr = join(err);
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "`{desc}` did not finish within {timeout:?} and was killed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    // A read error only truncates diagnostics; the exit status still decides.
    let _ = r.read_to_end(&mut buf);
    buf
}

/// Waits up to `timeout` for `child` to exit. Returns `None` (after killing
/// and reaping it) if it did not.
pub fn wait_status(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let status = wait_status_no_kill(child, timeout)?;
    if status.is_none() {
        // Already exited between the check and the kill is fine.
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(status)
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still
/// running, which is left to the caller to end.
pub fn wait_status_no_kill(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait().context("try_wait on child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

/// Turns a finished command's output into its stdout, or an error carrying
/// the exit status and both streams.
pub fn check(desc: &str, output: &Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    bail!(
        "`{desc}` failed ({})\nstdout: {}\nstderr: {}",
        output.status,
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// Runs `cmd` with the default deadline and returns its stdout, failing on
/// a non-zero exit.
pub fn run(cmd: Command) -> Result<String> {
    run_timeout(cmd, COMMAND_TIMEOUT)
}

/// Like [`run`] with an explicit deadline.
pub fn run_timeout(cmd: Command, timeout: Duration) -> Result<String> {
    let desc = describe(&cmd);
    let output = run_output(cmd, timeout)?;
    check(&desc, &output)
}

/// Builds a [`Command`] from a program and arguments.
pub fn command<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Sends `signal` to `pid`. The fixture only signals children it spawned.
pub fn signal_pid(pid: u32, signal: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid does not fit pid_t")?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("kill({pid}, {signal})"));
    }
    Ok(())
}

/// Last `n` lines of `text`, for error messages that quote logs.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child running in the background, killed and reaped on drop unless
/// [`Self::finish`]ed: no server or tool outlives the fixture that started
/// it, whatever the exit path.
pub struct Background {
    child: Option<Child>,
    desc: String,
}

/// What [`Background::wait_bound`] waits for.
#[derive(Clone, Copy, Debug)]
pub enum Bound {
    /// A TCP socket listening on the address.
    TcpListen,
    /// A UDP socket bound to the address.
    Udp,
}

impl Background {
    /// Starts `cmd` with stdin closed and stdout and stderr piped, to be
    /// collected by [`Self::finish`].
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::spawn_as_is(cmd)
    }

    /// Starts `cmd` with stdin closed and stdout and stderr appended to
    /// `log_path`.
    pub fn spawn_logged(mut cmd: Command, log_path: &Path) -> Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating log {}", log_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        Self::spawn_as_is(cmd)
    }

    fn spawn_as_is(mut cmd: Command) -> Result<Self> {
        let desc = describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
        Ok(Self {
            child: Some(child),
            desc,
        })
    }

    /// The command line, for messages.
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The child's piped stdout, to read as it runs (started with
    /// [`Self::spawn`]); `None` the second time.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The child's pid, until it is finished.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits up to `timeout` for the child to exit;
    /// `None` if it did not, after which it is killed and reaped.
    pub fn stop(&mut self, signal: libc::c_int, timeout: Duration) -> Result<Option<ExitStatus>> {
        let child = self.child.as_mut().context("already finished")?;
        signal_pid(child.id(), signal)?;
        wait_status(child, timeout).with_context(|| format!("waiting for `{}`", self.desc))
    }

    /// The exit status if the child has exited, `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("try_wait on `{}`", self.desc)),
            None => bail!("`{}` was already finished", self.desc),
        }
    }

    /// Waits up to `timeout` for the child to exit and returns its stdout;
    /// a non-zero exit or a timeout is an error carrying both streams.
    pub fn finish(mut self, timeout: Duration) -> Result<String> {
        let child = self.child.take().context("already finished")?;
        let output = wait_output(child, &self.desc, timeout)?;
        check(&self.desc, &output)
    }

    /// Waits until the child has a socket on `addr` as `bound` says, read
    /// from `/proc/<pid>/net`, which lists the sockets of the child's own
    /// network namespace: readiness, not a guess at how long start-up takes.
    /// The child must be the server itself (`ip netns exec` execs it in
    /// place, so it keeps the pid).
    pub fn wait_bound(
        &mut self,
        bound: Bound,
        addr: SocketAddrV4,
        timeout: Duration,
    ) -> Result<()> {
        let pid = self.id().context("already finished")?;
        let table = match bound {
            Bound::TcpListen => "tcp",
            Bound::Udp => "udp",
        };
        let path = format!("/proc/{pid}/net/{table}");
        let desc = self.desc.clone();
        wait_until(timeout, &format!("`{desc}` to bind {addr}"), |last| {
            if let Some(status) = self.try_wait()? {
                bail!("`{desc}` exited with {status} before binding {addr}");
            }
            // Gone between the check and the read: the next round says so.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if proc_net_has(&text, bound, addr) {
                return Ok(Some(()));
            }
            *last = format!("no such socket in {path}");
            Ok(None)
        })
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: kill fails, wait reaps.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a `/proc/net/{tcp,udp}` table holds a socket on `addr` in the
/// state `bound` wants. Lines read `sl local rem st ...`, the local address
/// as the hex of the in-memory (network-order) u32 and the port in hex.
fn proc_net_has(text: &str, bound: Bound, addr: SocketAddrV4) -> bool {
    // TCP_LISTEN is 0x0A; a bound, unconnected UDP socket is TCP_CLOSE, 0x07.
    let want_state = match bound {
        Bound::TcpListen => "0A",
        Bound::Udp => "07",
    };
    let want_ip = u32::from_ne_bytes(addr.ip().octets());
    text.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (Some(local), Some(_), Some(state)) = (fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let Some((ip, port)) = local.split_once(':') else {
            return false;
        };
        let ip = u32::from_str_radix(ip, 16).ok();
        let port = u16::from_str_radix(port, 16).ok();
        state == want_state && ip == Some(want_ip) && port == Some(addr.port())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0500F40A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n";
        let at = |a: [u8; 4], p| SocketAddrV4::new(a.into(), p);
        assert!(proc_net_has(
            tcp,
            Bound::TcpListen,
            at([10, 244, 0, 5], 5201)
        ));
        assert!(!proc_net_has(
            tcp,
            Bound::TcpListen,
            at([10, 244, 0, 5], 5202)
        ));
        assert!(!proc_net_has(tcp, Bound::Udp, at([10, 244, 0, 5], 5201)));
        let udp = tcp.replace(" 0A ", " 07 ");
        assert!(proc_net_has(&udp, Bound::Udp, at([10, 244, 0, 5], 5201)));
    }
}
