//! `node-agent`: leases this node's subnet from etcd and runs weft's eBPF
//! data path. See the README for the contract.

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use node_agent::{
    agent::{self, RunSettings},
    agent_state,
    flannel::subnet_env,
};

#[derive(Parser)]
#[command(
    version,
    propagate_version = true,
    about = "weft node agent: flannel-compatible, eBPF data path"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lease a subnet, attach the data path and follow the other nodes.
    Run(Box<RunSettings>),
    /// Show the pinned peer table, the data path's counters, the host state
    /// weft owns, and the agent's lease and etcd sync state (from its state
    /// file; the agent need not run).
    Status {
        #[arg(long, env = "WEFT_PIN_PATH", default_value = "/sys/fs/bpf/weft")]
        pin_path: PathBuf,
        /// The agent's `--state-file`.
        #[arg(long, env = "WEFT_STATE_FILE", default_value = agent_state::DEFAULT_STATE_FILE)]
        state_file: PathBuf,
        /// One JSON object (agent, node, peers, counters, drops, host,
        /// firewall) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Print the dockerd flags for this node (--bip, --ip-masq, --mtu) from
    /// the subnet file, as flannel's mk-docker-opts.sh does.
    DockerOpts {
        #[arg(long, default_value = subnet_env::DEFAULT_PATH)]
        subnet_file: PathBuf,
        /// Write `KEY="flags"` to this file (for systemd's EnvironmentFile=
        /// or /etc/default/docker) instead of printing the flags.
        #[arg(long)]
        dest: Option<PathBuf>,
        /// The variable name in --dest.
        #[arg(long, default_value = "DOCKER_OPTS")]
        key: String,
    },
    /// Check this host for what breaks or slows a flannel network (kernel
    /// features, MTU, interface and PublicIP, overlapping routes, offloads),
    /// with `run`'s flags; one line per check with the fix. Exits non-zero
    /// when a check fails.
    Doctor(Box<node_agent::doctor::DoctorSettings>),
    /// Remove everything `run` created: programs, maps, route, firewall
    /// rules, subnet file, state file.
    Cleanup {
        #[arg(long, env = "WEFT_PIN_PATH", default_value = "/sys/fs/bpf/weft")]
        pin_path: PathBuf,
        #[arg(long, env = "FLANNELD_SUBNET_FILE", default_value = subnet_env::DEFAULT_PATH)]
        subnet_file: PathBuf,
        #[arg(long, env = "WEFT_STATE_FILE", default_value = agent_state::DEFAULT_STATE_FILE)]
        state_file: PathBuf,
        /// Leave the subnet file: flanneld, started before the cleanup
        /// when rolling a node back to it, has written its own there.
        #[arg(long)]
        keep_subnet_file: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // flanneld ignores a FLANNELD_* variable set to the empty string (an
    // `EnvironmentFile=` line `FLANNELD_IFACE=`); clap would read it as a
    // value, so such variables are dropped before it looks.
    for (key, value) in std::env::vars_os() {
        if value.is_empty() && key.to_string_lossy().starts_with("FLANNELD_") {
            // SAFETY: still single-threaded: no runtime or other thread has
            // started, so nothing reads the environment concurrently.
            unsafe { std::env::remove_var(&key) };
        }
    }
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("run")
        && let Err(e) = agent::check_unsupported_flags(args[2..].iter().map(String::as_str))
    {
        tracing::error!("{e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run_command(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// Every command, on one current-thread runtime (those that talk to etcd or
/// netlink need it; the others cost it nothing).
async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(settings) => agent::run(*settings).await,
        Command::Status {
            pin_path,
            state_file,
            json,
        } => agent::status(&pin_path, &state_file, json).await,
        Command::Doctor(settings) => node_agent::doctor::run(&settings).await,
        Command::DockerOpts {
            subnet_file,
            dest,
            key,
        } => node_agent::docker_opts::run(&subnet_file, dest.as_deref(), &key),
        Command::Cleanup {
            pin_path,
            subnet_file,
            state_file,
            keep_subnet_file,
        } => {
            agent::cleanup(
                &pin_path,
                (!keep_subnet_file).then_some(&*subnet_file),
                &state_file,
            )
            .await
        }
    }
}

/// The error chain on one line. Our error types already print their cause,
/// so a cause whose text is already there is not repeated.
fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
