//! The agent: the internal half of Sallyport.
//!
//! It is the only side that dials. For every gateway in its config it keeps one control channel
//! open ([`session`]), reconnecting after any error with [`backoff::Backoff`]. For every client
//! the gateway announces it dials a data connection back to that gateway and a connection to the
//! backend, and pipes the two ([`data`]).
//!
//! Data connections are tasks of the agent, not of the control session that announced them: a
//! control channel can drop and come back while every established transfer carries on.

pub mod backends;
pub mod backoff;
pub mod bans;
mod channel;
mod data;
pub(crate) mod dial;
pub mod embedded;
pub(crate) mod limits;
mod outbound;
mod pool;
pub mod proxy_header;
mod push;
mod reload;
pub mod report;
mod session;
pub mod stats;
pub mod status;
mod supervisor;
mod udp;

pub use embedded::{Accepted, ClientAddr, GatewayListener, GatewayListenerBuilder, GatewayStream};
pub use status::{AgentStatus, GatewayStatus};

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AgentConfig;

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
    /// Counters for the admin API and `/metrics`.
    pub stats: Arc<stats::AgentStats>,
    /// Each gateway's share of the agent (`[limits]`).
    pub limits: Arc<limits::Limits>,
    /// The bans every session pushes to its gateway.
    pub bans: Arc<bans::BanStore>,
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
    stats: Arc<stats::AgentStats>,
    /// The configuration's generation and reload history.
    config_state: reload::ConfigState,
    /// The bans it pushes to every gateway (`sallyport ban`).
    pub bans: Arc<bans::BanStore>,
    started: std::time::SystemTime,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Self {
        Agent::from_file(config, None)
    }

    /// An agent whose configuration came from `path` (`None`: built in code), which
    /// [`Agent::reload_file`] re-reads.
    pub fn from_file(config: AgentConfig, path: Option<std::path::PathBuf>) -> Self {
        let stats = Arc::new(stats::AgentStats::default());
        for l in &config.listeners {
            stats.listener(&l.name);
        }
        let config_state = reload::ConfigState::new(&config, path);
        let (config, _) = watch::channel(Arc::new(config));
        let (status, _) = watch::channel(AgentStatus::default());
        Agent {
            config,
            status: Arc::new(status),
            local: None,
            stats,
            config_state,
            started: std::time::SystemTime::now(),
            bans: Arc::new(bans::BanStore::in_memory()),
        }
    }

    /// An agent whose bans are `bans` (loaded from its `state_dir`).
    pub fn with_bans(self, bans: bans::BanStore) -> Self {
        Agent {
            bans: Arc::new(bans),
            ..self
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

    /// Replaces the configuration and says, key by key, what changes (logged): sessions push
    /// the new listener set, and the supervisor follows `gateways`, `[outbound]` and the
    /// control channels' own settings. Returns the new configuration generation.
    pub fn reload(&self, config: AgentConfig) -> u64 {
        warn_if_transparent_impossible(&config);
        let old = self.config.borrow().clone();
        let changes = old.changes(&config);
        let listeners = old.listener_changes(&config);
        for change in &changes {
            tracing::info!("reload: {change}");
        }
        if !listeners.is_empty() {
            tracing::info!("reload: {listeners}: pushed to every gateway");
        }
        tracing::info!(
            "reload: agent configuration applied ({} key(s) changed{})",
            changes.len(),
            if listeners.is_empty() {
                ", listeners unchanged"
            } else {
                ""
            }
        );
        for l in &config.listeners {
            self.stats.listener(&l.name);
        }
        let generation = self.config_state.applied(&config);
        self.config.send_replace(Arc::new(config));
        generation
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
            stats: self.stats.clone(),
            limits: Arc::default(),
            bans: self.bans.clone(),
        };
        let config = ctx.config();
        tracing::info!(
            site = %config.site, agent = %config.name,
            "agent starting: {} listener(s), gateway(s) {}",
            config.listeners.len(), config.gateways.join(", ")
        );
        warn_if_transparent_impossible(&config);
        // Give memory back after load peaks; stops with the sessions.
        let tasks = ctx.tasks.clone();
        let trimmer = tokio::spawn(crate::mem::trim_after_peaks(move || tasks.len(), 256));
        // Several backends per listener: their sets and health checks follow reloads.
        let registry = ctx.stats.backends.clone();
        let checks = backends::supervise(registry, ctx.config.clone(), shutdown.clone());
        let checks = tokio::spawn(checks);
        // Control channels and the outbound proxy, following reloads until shutdown.
        let sessions = TaskTracker::new();
        let supervised = supervisor::supervise(&ctx, &sessions).await;
        sessions.close();
        sessions.wait().await;
        trimmer.abort();
        checks.abort();
        supervised?;
        ctx.tasks.close();
        // The setting in force when the stop came (a reload may have changed it).
        let drain = ctx.config().drain_timeout;
        if !ctx.tasks.is_empty() {
            tracing::info!(
                "stopping: {} connection(s) may finish within {} (drain_timeout)",
                ctx.tasks.len(),
                humantime::format_duration(drain)
            );
        }
        if tokio::time::timeout(drain, ctx.tasks.wait()).await.is_err() {
            tracing::warn!(
                "{} connection(s) still open after {}; exiting anyway",
                ctx.tasks.len(),
                humantime::format_duration(drain)
            );
        }
        Ok(())
    }
}

/// Transparent listeners need `IP_TRANSPARENT`; without root or CAP_NET_ADMIN every one of their
/// clients would fail. Said once, at start and at each reload, rather than once per client.
fn warn_if_transparent_impossible(config: &AgentConfig) {
    let transparent: Vec<&str> = config
        .listeners
        .iter()
        .filter(|l| l.impersonation == crate::config::Impersonation::Transparent)
        .map(|l| l.name.as_str())
        .collect();
    if transparent.is_empty() {
        return;
    }
    if let Err(e) = crate::net::may_connect_transparent() {
        tracing::warn!(
            "listener(s) {} use impersonation = \"transparent\", but this process cannot set \
             IP_TRANSPARENT ({e}): every client of them will fail. Run the agent as root or with \
             CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN and CapabilityBoundingSet, \
             see docs/impersonation.md)",
            transparent.join(", ")
        );
    }
}
