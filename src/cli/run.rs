//! Running a command: the tokio runtime, a daemon's exit status (78 when its config names an
//! address it cannot listen on, so a service manager does not restart it in a loop), SIGINT and
//! SIGTERM, and the gateway's and agent's run loops (restart, reload, admin server).

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::EXIT_CONFIG;
use crate::agent::Agent;
use crate::config::{AgentConfig, GatewayConfig};
use crate::gateway::{Exit, Gateway};

/// The multi-threaded tokio runtime every command runs on.
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// A start that failed on the configuration's account (its admin port is taken): the exit
/// status is [`EXIT_CONFIG`], so a service manager does not restart it in a loop.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

pub(super) fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if e.downcast_ref::<StartError>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs a daemon; an address its config file names that cannot be listened on (taken by another
/// program, not an address of this host) is a configuration error: exit 78 like the others, so a
/// service manager does not restart into the same clash in a loop.
pub(super) fn run_daemon(
    config: &std::path::Path,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_address_clash(&e) || e.downcast_ref::<StartError>().is_some() => {
            tracing::error!("{}: {e:#}", config.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` comes from listening on an address that is in use or not local.
fn is_address_clash(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind;
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::AddrInUse | ErrorKind::AddrNotAvailable
            )
        })
    })
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

/// Runs the gateway (again after each restart) and its admin server (across restarts; a
/// reload or restart applies `[admin]` to it).
pub(super) async fn run_gateway(cfg: GatewayConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let signals = stop_on_signals()?;
    let (slot, slot_rx) = tokio::sync::watch::channel(None);
    let state = crate::admin::AdminState::new(slot_rx, cfg.admin_token.clone(), Some(path.clone()));
    let mut admin = crate::admin::server::AdminServer::start(&cfg, state).await?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut cfg = cfg;
    // The configuration the last gateway ran with, to fall back on if a new one cannot bind.
    let mut last_good: Option<GatewayConfig> = None;
    // An ephemeral control port ("…:0") stays the same across restarts, or agents would lose it.
    let mut bound_control: Option<(std::net::SocketAddr, std::net::SocketAddr)> = None;
    loop {
        let mut bind_cfg = cfg.clone();
        if let Some((asked, got)) = bound_control {
            if asked == cfg.control_listen && asked.port() == 0 {
                bind_cfg.control_listen = got;
            }
        }
        let gateway = match (Gateway::bind(bind_cfg).await, last_good.take()) {
            (Ok(g), _) => g,
            (Err(e), Some(previous)) => {
                tracing::error!("restart: {e:#}; starting again with the previous configuration");
                cfg = previous;
                continue;
            }
            (Err(e), None) => return Err(e),
        };
        bound_control = Some((cfg.control_listen, gateway.control_addr()));
        let handle = gateway.handle();
        slot.send_replace(Some(handle.clone()));
        let running = gateway.run(signals.clone());
        tokio::pin!(running);
        let exit = loop {
            tokio::select! {
                exit = &mut running => break exit?,
                _ = hup.recv() => match GatewayConfig::load(&path) {
                    Ok(new) => {
                        tracing::info!("SIGHUP: {} reloaded", path.display());
                        log_notices(&new.notices);
                        if let Err(e) = admin.apply(&new).await {
                            tracing::error!("reload: {e}");
                        }
                        handle.reload(new.clone()).await;
                        cfg = new;
                    }
                    Err(e) => tracing::error!("SIGHUP: reload refused, keeping the running config: {e}"),
                },
            }
        };
        slot.send_replace(None);
        if exit == Exit::Stop {
            break;
        }
        last_good = Some(handle.config().as_ref().clone());
        // `ctl restart` validated and staged the file; otherwise read it now.
        match handle
            .take_staged()
            .map(Ok)
            .unwrap_or_else(|| GatewayConfig::load(&path))
        {
            Ok(new) => {
                log_notices(&new.notices);
                cfg = new;
            }
            Err(e) => {
                tracing::error!("restart: {e}; starting again with the previous configuration")
            }
        }
        if let Err(e) = admin.apply(&cfg).await {
            tracing::error!("restart: {e}");
        }
        tracing::info!("restarting the gateway");
    }
    admin.stop().await;
    tracing::info!("gateway stopped");
    Ok(())
}

pub(super) async fn run_agent(cfg: AgentConfig, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    log_notices(&cfg.notices);
    raise_open_files_limit();
    let shutdown = stop_on_signals()?;
    let admin_config = cfg.admin.clone();
    let bans = match &cfg.state_dir {
        Some(dir) => crate::agent::bans::BanStore::open(dir).map_err(StartError)?,
        None => crate::agent::bans::BanStore::in_memory(),
    };
    let agent = std::sync::Arc::new(Agent::from_file(cfg, Some(path)).with_bans(bans));
    // The admin port is part of the configuration: when it is taken the agent stops before it
    // dials anything, with the config error's exit status, rather than run unobservable.
    let admin_stop = CancellationToken::new();
    let admin = match admin_config.listen {
        Some(addr) => {
            let listener = crate::admin::bind(addr, crate::admin::agent::LISTENING)
                .await
                .map_err(|e| {
                    StartError(format!(
                        "{e:#}: another agent on this host? set [admin] listen to a free port, or enabled = false"
                    ))
                })?;
            Some(tokio::spawn(crate::admin::agent::serve(
                listener,
                agent.clone(),
                admin_config.token,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    let mut hup = signal(SignalKind::hangup())?;
    let reloader = agent.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A refusal is logged (and shown by the admin API) inside; the running config stays.
            let _ = reloader.reload_file("SIGHUP");
        }
    });
    let result = agent.run(shutdown).await;
    admin_stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    result
}
