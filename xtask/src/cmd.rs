//! Running the commands a task is made of, visibly.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::system::{describe, workspace_root};

/// Prints a task's progress line.
pub fn step(msg: &str) {
    println!("==> {msg}");
}

/// The cargo that runs us, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error.
pub fn run(mut cmd: Command) -> Result<()> {
    let desc = describe(&cmd);
    println!("+ {desc}");
    let status = cmd.status().with_context(|| format!("starting `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns whether it succeeded and its stdout;
/// a command that cannot start counts as failed (tool not installed).
pub fn probe(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ),
        Err(_) => (false, String::new()),
    }
}
