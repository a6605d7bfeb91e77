//! The agent: the internal half of Sallyport.
//!
//! It is the only side that dials. For every gateway in its config it keeps one control channel
//! open ([`session`]), reconnecting after any error with [`backoff::Backoff`]. For every client
//! the gateway announces it dials a data connection back to that gateway and a connection to the
//! backend, and pipes the two ([`data`]).
//!
//! Data connections are tasks of the agent, not of the control session that announced them: a
//! control channel can drop and come back while every established transfer carries on.

pub mod backoff;
mod data;
pub(crate) mod dial;
pub mod embedded;
mod outbound;
mod pool;
pub mod proxy_header;
mod session;
pub mod status;

pub use embedded::{Accepted, ClientAddr, GatewayListener, GatewayListenerBuilder, GatewayStream};
pub use status::{AgentStatus, GatewayStatus};

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;

/// How long a stopping agent waits for established connections to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What every task of one agent shares.
#[derive(Clone)]
pub(crate) struct AgentCtx {
    /// The current configuration; a reload replaces it and each session pushes it.
    pub config: watch::Receiver<Arc<AgentConfig>>,
    /// Every data connection task.
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// What sessions learn about their gateways.
    pub status: Arc<watch::Sender<AgentStatus>>,
    /// Where clients of `Backend::Local` listeners go (the embedding application).
    pub local: Option<mpsc::Sender<Accepted>>,
}

impl AgentCtx {
    pub fn config(&self) -> Arc<AgentConfig> {
        self.config.borrow().clone()
    }
}

/// A configured agent, ready to [`Agent::run`].
pub struct Agent {
    config: watch::Sender<Arc<AgentConfig>>,
    status: Arc<watch::Sender<AgentStatus>>,
    local: Option<mpsc::Sender<Accepted>>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Self {
        let (config, _) = watch::channel(Arc::new(config));
        let (status, _) = watch::channel(AgentStatus::default());
        Agent {
            config,
            status: Arc::new(status),
            local: None,
        }
    }

    /// An agent whose `Backend::Local` listeners hand their clients to `local`.
    pub fn with_local_acceptor(config: AgentConfig, local: mpsc::Sender<Accepted>) -> Self {
        Agent {
            local: Some(local),
            ..Agent::new(config)
        }
    }

    /// Live view of the gateways: connected or not, last error, listener results.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Replaces the configuration; every connected session pushes the new listener set.
    pub fn reload(&self, config: AgentConfig) {
        self.config.send_replace(Arc::new(config));
    }

    /// Connects to every gateway and serves until `shutdown` is cancelled, then closes the
    /// control channels and gives established connections a short grace period.
    pub async fn run(&self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let ctx = AgentCtx {
            config: self.config.subscribe(),
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            status: self.status.clone(),
            local: self.local.clone(),
        };
        let config = ctx.config();
        tracing::info!(
            site = %config.site, agent = %config.name,
            "agent starting: {} listener(s), gateway(s) {}",
            config.listeners.len(), config.gateways.join(", ")
        );
        let sessions = TaskTracker::new();
        if let Some(outbound) = &config.outbound {
            let listener = outbound::bind(outbound).await?;
            sessions.spawn(outbound::serve(ctx.clone(), listener));
        }
        for gateway in config.gateways.clone() {
            sessions.spawn(session::keep_connected(ctx.clone(), gateway));
        }
        sessions.close();
        // Give memory back after load peaks; stops with the sessions.
        let tasks = ctx.tasks.clone();
        let trimmer = tokio::spawn(crate::mem::trim_after_peaks(move || tasks.len(), 256));
        sessions.wait().await;
        trimmer.abort();
        ctx.tasks.close();
        if tokio::time::timeout(DRAIN_GRACE, ctx.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} connection(s) still open after {}; exiting anyway",
                ctx.tasks.len(),
                humantime::format_duration(DRAIN_GRACE)
            );
        }
        Ok(())
    }
}
