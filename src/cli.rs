//! The command line: subcommands, logging, signals and exit codes.
//!
//! Exit codes: 0 after a clean stop, 1 on a runtime failure, 78 (`EX_CONFIG`) when a config file
//! is invalid: nothing has been opened then, and a service manager should not restart in a loop
//! (the systemd units set `RestartPreventExitStatus=78`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::agent::Agent;
use crate::config::{AgentConfig, GatewayConfig};
use crate::gateway::Gateway;

/// Exit status for an invalid configuration (sysexits.h `EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "sallyport",
    version,
    about = "A DMZ gateway: expose internal TCP services with no inbound hole into the internal network",
    after_help = "Logging: set SALLYPORT_LOG (e.g. debug, or sallyport=debug,info). Docs: README.md and docs/."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (in the DMZ).
    Gateway {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the agent (inside, next to the backends).
    Agent {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run gateway, agent and a tiny HTTP backend in one process on loopback.
    Demo {
        /// Public port of the demo listener on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Certificates for mutual TLS between agents and gateways.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Make a private CA (or reuse the one in DIR), a gateway certificate and agent certificates.
    Init {
        /// Directory for ca.crt, ca.key, gateway.crt, gateway.key, agent.crt, agent.key.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name of the gateway, as agents dial it (repeatable).
        #[arg(long = "gateway-name")]
        gateway_names: Vec<String>,
        /// IP address of the gateway, as agents dial it (repeatable).
        #[arg(long = "gateway-ip")]
        gateway_ips: Vec<std::net::IpAddr>,
        /// Issue a certificate NAME.crt / NAME.key for another agent (repeatable).
        #[arg(long = "agent-name")]
        agent_names: Vec<String>,
        /// Validity of the gateway and agent certificates, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files (a new CA invalidates every certificate it issued).
        #[arg(long)]
        force: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Gateway { config } => {
            let cfg = match GatewayConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            run_async(run_gateway(cfg))
        }
        Command::Agent { config } => {
            let cfg = match AgentConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            run_async(run_agent(cfg, config))
        }
        Command::Demo { port } => run_async(crate::demo::run(port)),
        Command::Cert {
            command:
                CertCommand::Init {
                    dir,
                    gateway_names,
                    gateway_ips,
                    agent_names,
                    days,
                    force,
                },
        } => {
            let opts = crate::certs::InitOptions {
                dir,
                gateway_names,
                gateway_ips,
                agent_names,
                days,
                force,
            };
            match crate::certs::init(&opts) {
                Ok(summary) => {
                    print!("{summary}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn init_logging() {
    let filter =
        EnvFilter::try_from_env("SALLYPORT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels the returned token on SIGINT or SIGTERM.
pub fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: stopping");
        t.cancel();
    });
    Ok(token)
}

fn log_notices(notices: &[String]) {
    for n in notices {
        tracing::warn!("{n}");
    }
}

/// Raises the soft open-files limit to the hard one: every piped client holds two sockets, and
/// the common default soft limit of 1024 would cap a gateway at a few hundred clients.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => {
            tracing::warn!("open files limited to {n}: at most about {} clients", n / 2)
        }
        Ok(n) => tracing::debug!("open files limit: {n}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

async fn run_gateway(cfg: GatewayConfig) -> anyhow::Result<()> {
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let shutdown = stop_on_signals()?;
    let gateway = Gateway::bind(cfg).await?;
    gateway.run(shutdown).await
}

async fn run_agent(cfg: AgentConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let shutdown = stop_on_signals()?;
    let agent = std::sync::Arc::new(Agent::new(cfg));
    let mut hup = signal(SignalKind::hangup())?;
    let reloader = agent.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload_agent(&reloader, &path);
        }
    });
    agent.run(shutdown).await
}

/// SIGHUP: re-read agent.toml; a bad file is reported and the running config kept.
fn reload_agent(agent: &Agent, path: &Path) {
    match AgentConfig::load(path) {
        Ok(cfg) => {
            tracing::info!("SIGHUP: {} reloaded", path.display());
            log_notices(&cfg.notices);
            agent.reload(cfg);
        }
        Err(e) => tracing::error!("SIGHUP: reload refused, keeping the running config: {e}"),
    }
}
