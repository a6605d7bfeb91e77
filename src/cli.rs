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
use crate::gateway::{Exit, Gateway};

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
    /// Troubleshoot an agent's setup: config, gateway reachability, TLS, peer rules, listeners,
    /// backends, a test connection per listener. Exit status 1 on any failure.
    Check {
        /// Path to agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show a running gateway's state, agents, listeners, counters and rates.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the raw JSON of /api/status and /api/stats instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Control a running gateway: pause, resume, restart or stop.
    Ctl {
        action: CtlAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Certificates for mutual TLS between agents and gateways.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

/// Where the admin API is and how to authenticate.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// Base URL of the gateway's admin API.
    #[arg(long, default_value = "http://127.0.0.1:9090", env = "SALLYPORT_ADMIN")]
    pub admin: String,
    /// Bearer token (`[admin] token` in gateway.toml), needed by ctl when one is set.
    #[arg(long, env = "SALLYPORT_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CtlAction {
    /// Close the listeners; established connections and agents stay.
    Pause,
    /// Reopen the listeners.
    Resume,
    /// Drop everything, re-read gateway.toml, start again (agents reconnect by themselves).
    Restart,
    /// Graceful stop: close the listeners, let connections drain, exit.
    Stop,
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
    // `check` prints its own report; only errors of the agent it runs are worth a log line.
    init_logging(if matches!(cli.command, Command::Check { .. }) {
        "error"
    } else {
        "info"
    });
    match cli.command {
        Command::Gateway { config } => {
            let cfg = match GatewayConfig::load(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            run_async(run_gateway(cfg, config))
        }
        Command::Check { config } => match runtime() {
            Ok(rt) if rt.block_on(crate::check::run(&config)) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(code) => code,
        },
        Command::Status { admin, json } => {
            run_async(crate::status::print(admin.admin, admin.token, json))
        }
        Command::Ctl { action, admin } => run_async(ctl(action, admin)),
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

fn init_logging(default: &str) {
    let filter =
        EnvFilter::try_from_env("SALLYPORT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The multi-threaded tokio runtime every command runs on.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
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

/// Runs the gateway (again after each restart) and its admin server (once, across restarts).
async fn run_gateway(cfg: GatewayConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let signals = stop_on_signals()?;
    let (slot, slot_rx) = tokio::sync::watch::channel(None);
    let admin_stop = CancellationToken::new();
    let admin = match cfg.admin_listen {
        Some(addr) => {
            let listener = crate::admin::bind(addr).await?;
            let (token, stop) = (cfg.admin_token.clone(), admin_stop.clone());
            Some(tokio::spawn(crate::admin::serve(
                listener, slot_rx, token, stop,
            )))
        }
        None => None,
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut cfg = cfg;
    // An ephemeral control port ("…:0") stays the same across restarts, or agents would lose it.
    let mut bound_control: Option<(std::net::SocketAddr, std::net::SocketAddr)> = None;
    loop {
        let mut bind_cfg = cfg.clone();
        if let Some((asked, got)) = bound_control {
            if asked == cfg.control_listen && asked.port() == 0 {
                bind_cfg.control_listen = got;
            }
        }
        let gateway = Gateway::bind(bind_cfg).await?;
        bound_control = Some((cfg.control_listen, gateway.control_addr()));
        let handle = gateway.handle();
        slot.send_replace(Some(handle.clone()));
        let reload_path = path.clone();
        let running = gateway.run(signals.clone());
        tokio::pin!(running);
        let exit = loop {
            tokio::select! {
                exit = &mut running => break exit?,
                _ = hup.recv() => match GatewayConfig::load(&reload_path) {
                    Ok(new) => {
                        tracing::info!("SIGHUP: {} reloaded", reload_path.display());
                        log_notices(&new.notices);
                        cfg = new.clone();
                        handle.reload(new).await;
                    }
                    Err(e) => tracing::error!("SIGHUP: reload refused, keeping the running config: {e}"),
                },
            }
        };
        slot.send_replace(None);
        match exit {
            Exit::Stop => break,
            Exit::Restart => match GatewayConfig::load(&path) {
                Ok(new) => {
                    log_notices(&new.notices);
                    cfg = new;
                }
                Err(e) => {
                    tracing::error!("restart: {e}; starting again with the previous configuration")
                }
            },
        }
        tracing::info!("restarting the gateway");
    }
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

async fn ctl(action: CtlAction, admin: AdminArgs) -> anyhow::Result<()> {
    let path = match action {
        CtlAction::Pause => "/api/pause",
        CtlAction::Resume => "/api/resume",
        CtlAction::Restart => "/api/restart",
        CtlAction::Stop => "/api/stop",
    };
    let (code, body) =
        crate::admin::client::request(&admin.admin, "POST", path, admin.token.as_deref()).await?;
    match code {
        200 => {
            println!(
                "ok: {} (gateway state: {})",
                body["action"].as_str().unwrap_or("done"),
                body["state"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        401 => anyhow::bail!(
            "401 unauthorized: pass the admin token with --token or SALLYPORT_ADMIN_TOKEN"
        ),
        _ => anyhow::bail!("HTTP {code}: {body}"),
    }
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
