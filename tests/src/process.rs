//! Running child processes with deadlines.
//!
//! Every external command the fixture runs goes through here so that a hung
//! tool (an `ip` waiting on a lock, a `ping` to a black hole) turns into an
//! error naming the command instead of a test that never ends.

use std::ffi::OsStr;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Deadline for short configuration commands (`ip`, `etcdctl`, `bpftool`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A printable form of a command, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(shell_quote));
    parts.join(" ")
}

fn shell_quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

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
