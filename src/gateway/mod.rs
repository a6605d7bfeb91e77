//! The gateway: the DMZ half of Sallyport.
//!
//! It accepts agents on its control port, opens the public listeners they push, announces each
//! client to an agent of the listener's site, and pipes the client to the data connection the
//! agent dials back. It never dials the internal network.
//!
//! **It never writes to disk.** Listener configuration arrives over the control channel and
//! lives in memory only; payload bytes only pass through [`crate::pipe`]; the log goes to
//! stderr. Nothing in this module may open a file for writing.
//!
//! Operators drive it through a [`GatewayHandle`]: state (running, paused, stopping),
//! statistics, connections, reload, stop and restart.

mod control;
mod listener;
pub mod outbound;
mod pending;
mod pool;
mod site;
pub mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::limits::{ConnLimiter, Gauge};
use crate::net;
use pending::PendingTable;
use site::SiteRegistry;
pub use site::{ListenerState, ListenerView};
use stats::{GatewayStats, History, Traffic, TrafficSnapshot};

/// What the gateway is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Listeners accept clients.
    Running,
    /// Listeners are closed; established connections and agents stay.
    Paused,
    /// Shutting down: listeners and the control port are closed, connections drain.
    Stopping,
}

/// Why [`Gateway::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped for good (SIGTERM, or `POST /api/stop`) after draining.
    Stop,
    /// Dropped everything; the caller reloads its config and starts again.
    Restart,
}

/// State shared by every task of one gateway.
pub(crate) struct Shared {
    config: RwLock<Arc<GatewayConfig>>,
    pub sites: SiteRegistry,
    pub pending: PendingTable,
    pub stats: GatewayStats,
    pub traffic: Arc<Traffic>,
    /// Control-port connections still in their handshake.
    pub handshakes: ConnLimiter,
    /// Client connections, waiting or piping.
    pub clients: ConnLimiter,
    /// Clients waiting for a data connection, across all listeners.
    pub pending_total: Gauge,
    /// Refusals being written to refused control-port connections.
    pub refusals: Gauge,
    /// Every connection task (control sessions, data hellos, clients), for draining on stop.
    pub tasks: TaskTracker,
    /// Stops accepting: the control port and control sessions end.
    pub shutdown: CancellationToken,
    /// Drops established connections (restart, or a drain that ran out of time).
    pub kill: CancellationToken,
    state: Mutex<RunState>,
    exit: Mutex<Option<Exit>>,
    exit_requested: CancellationToken,
    pub started: SystemTime,
    started_at: Instant,
    pub control_addr: SocketAddr,
    next_client_id: AtomicU64,
    next_agent_id: AtomicU64,
}

impl Shared {
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_agent_id(&self) -> u64 {
        self.next_agent_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The configuration in force (a reload replaces it; holders keep the one they took).
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.config.read().unwrap().clone()
    }

    pub fn state(&self) -> RunState {
        *self.state.lock().unwrap()
    }

    fn request_exit(&self, exit: Exit) {
        let mut slot = self.exit.lock().unwrap();
        if slot.is_none() {
            *slot = Some(exit);
        }
        self.exit_requested.cancel();
    }
}

/// A gateway with its control port bound, ready to [`Gateway::run`].
pub struct Gateway {
    shared: Arc<Shared>,
    control: TcpListener,
}

impl Gateway {
    /// Binds the control port. Fails (with the address in the message) if it is taken.
    pub async fn bind(config: GatewayConfig) -> anyhow::Result<Gateway> {
        let addr = config.control_listen;
        let control = net::bind_listener(addr)
            .with_context(|| format!("cannot listen on control port {addr}"))?;
        let limits = &config.limits;
        let shared = Arc::new(Shared {
            sites: SiteRegistry::default(),
            pending: PendingTable::default(),
            stats: GatewayStats::default(),
            traffic: Arc::default(),
            handshakes: ConnLimiter::new(limits.max_handshakes, limits.max_handshakes_per_ip),
            clients: ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip),
            pending_total: Gauge::default(),
            refusals: Gauge::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            kill: CancellationToken::new(),
            state: Mutex::new(RunState::Running),
            exit: Mutex::new(None),
            exit_requested: CancellationToken::new(),
            started: SystemTime::now(),
            started_at: Instant::now(),
            control_addr: control.local_addr()?,
            next_client_id: AtomicU64::new(1),
            next_agent_id: AtomicU64::new(1),
            config: RwLock::new(Arc::new(config)),
        });
        Ok(Gateway { shared, control })
    }

    /// The bound control address (useful when the config asked for port 0).
    pub fn control_addr(&self) -> SocketAddr {
        self.shared.control_addr
    }

    /// A handle for operators: status, statistics, pause, resume, stop, restart, reload.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `signals` is cancelled (a graceful stop) or an operator asks to stop or
    /// restart. A stop closes the control port and every listener and lets established
    /// connections finish for up to `limits.drain_timeout`; a restart drops everything at once.
    pub async fn run(self, signals: CancellationToken) -> anyhow::Result<Exit> {
        tracing::info!("control port listening on {}", self.control_addr());
        let shared = self.shared.clone();
        let accept = tokio::spawn(control::accept_loop(shared.clone(), self.control));
        let sampler = tokio::spawn(stats::run_sampler(
            shared.traffic.clone(),
            shared.shutdown.clone(),
        ));
        // Give memory back after load peaks (aborted with this function's end).
        let counter = shared.clone();
        let trimmer = tokio::spawn(crate::mem::trim_after_peaks(
            move || counter.clients.current(),
            256,
        ));
        tokio::select! {
            _ = signals.cancelled() => shared.request_exit(Exit::Stop),
            _ = shared.exit_requested.cancelled() => {}
        }
        trimmer.abort();
        let exit = shared.exit.lock().unwrap().unwrap_or(Exit::Stop);
        *shared.state.lock().unwrap() = RunState::Stopping;
        let active = shared.traffic.connections().len();
        match exit {
            Exit::Stop => tracing::info!(
                "stopping: closing the control port and every listener; {active} connection(s) may drain"
            ),
            Exit::Restart => tracing::warn!(
                "restarting: dropping every connection ({active} established) and agent"
            ),
        }
        shared.shutdown.cancel();
        let _ = accept.await;
        let _ = sampler.await;
        for site in shared.sites.all() {
            site.reconcile_now(&shared).await;
        }
        shared.tasks.close();
        let grace = match exit {
            Exit::Stop => shared.config().limits.drain_timeout,
            Exit::Restart => Duration::ZERO,
        };
        if tokio::time::timeout(grace, shared.tasks.wait())
            .await
            .is_err()
        {
            if exit == Exit::Stop {
                tracing::warn!(
                    "{} connection(s) still open after {}; closing them",
                    shared.traffic.connections().len(),
                    humantime::format_duration(grace)
                );
            }
            shared.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), shared.tasks.wait()).await;
        }
        Ok(exit)
    }
}

/// An agent as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub site: String,
    pub name: String,
    pub addr: SocketAddr,
    pub connected_since: u64,
    pub connected_seconds: u64,
    /// Clients offered to it and not yet claimed.
    pub inflight: usize,
}

/// `GET /api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub state: RunState,
    /// green: running with an agent; amber: paused; red: no agent (or stopping).
    pub light: &'static str,
    pub version: &'static str,
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub control: ControlView,
    pub agents: Vec<AgentView>,
    pub listeners: Vec<ListenerView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlView {
    pub listen: SocketAddr,
    pub tls: bool,
    pub data_tls: bool,
}

/// Per-listener statistics.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerStatsView {
    pub site: String,
    pub name: String,
    #[serde(flatten)]
    pub traffic: TrafficSnapshot,
}

/// `GET /api/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct StatsView {
    pub uptime_seconds: u64,
    pub agents: usize,
    /// Idle warm-pool data connections, all sites.
    pub pooled: usize,
    pub totals: TrafficSnapshot,
    pub listeners: Vec<ListenerStatsView>,
    /// Refused connections by reason.
    pub refusals: BTreeMap<&'static str, u64>,
    pub history: History,
}

/// `GET /api/connections`: one piping client.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub site: String,
    pub listener: String,
    pub client: SocketAddr,
    pub gateway: SocketAddr,
    pub agent: SocketAddr,
    pub started_at: u64,
    pub age_seconds: f64,
    pub bytes: stats::Bytes4,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Operators' view and controls of a running gateway.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    pub fn state(&self) -> RunState {
        self.shared.state()
    }

    pub fn agents(&self) -> Vec<AgentView> {
        self.shared
            .sites
            .all()
            .iter()
            .flat_map(|site| {
                site.agents().into_iter().map(|a| AgentView {
                    site: site.name.clone(),
                    name: a.name.clone(),
                    addr: a.addr,
                    connected_since: unix(a.connected_since),
                    connected_seconds: a.connected_since.elapsed().unwrap_or_default().as_secs(),
                    inflight: a.inflight.load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    pub fn status(&self) -> StatusView {
        let s = &self.shared;
        let agents = self.agents();
        let state = s.state();
        let light = match state {
            RunState::Paused => "amber",
            RunState::Running if !agents.is_empty() => "green",
            _ => "red",
        };
        let config = s.config();
        StatusView {
            state,
            light,
            version: env!("CARGO_PKG_VERSION"),
            started_at: unix(s.started),
            uptime_seconds: s.started_at.elapsed().as_secs(),
            control: ControlView {
                listen: s.control_addr,
                tls: config.tls.is_some(),
                data_tls: config.tls.is_some() && config.data_tls,
            },
            agents,
            listeners: s
                .sites
                .all()
                .iter()
                .flat_map(|site| site.listener_views())
                .collect(),
        }
    }

    pub fn stats(&self) -> StatsView {
        let s = &self.shared;
        let (per, totals) = s.traffic.snapshot();
        StatsView {
            uptime_seconds: s.started_at.elapsed().as_secs(),
            agents: s.sites.all().iter().map(|site| site.agent_count()).sum(),
            pooled: s.sites.all().iter().map(|site| site.pool.len()).sum(),
            totals,
            listeners: per
                .into_iter()
                .map(|(l, traffic)| ListenerStatsView {
                    site: l.site.clone(),
                    name: l.name.clone(),
                    traffic,
                })
                .collect(),
            refusals: s.stats.refusals(),
            history: s.traffic.history(),
        }
    }

    pub fn connections(&self) -> Vec<ConnectionView> {
        self.shared
            .traffic
            .connections()
            .into_iter()
            .map(|c| ConnectionView {
                id: c.id,
                site: c.listener.site.clone(),
                listener: c.listener.name.clone(),
                client: c.client_addr,
                gateway: c.gateway_addr,
                agent: c.agent_addr,
                started_at: unix(c.started),
                age_seconds: c.started_at.elapsed().as_secs_f64(),
                bytes: c.bytes(),
            })
            .collect()
    }

    async fn set_state(&self, state: RunState) -> RunState {
        {
            let mut current = self.shared.state.lock().unwrap();
            if *current == RunState::Stopping || *current == state {
                return *current;
            }
            *current = state;
        }
        tracing::warn!(
            "gateway {}",
            if state == RunState::Paused {
                "PAUSED: listeners closed, established connections and agents kept"
            } else {
                "RESUMED: listeners reopen"
            }
        );
        for site in self.shared.sites.all() {
            site.reconcile_now(&self.shared).await;
        }
        self.shared.state()
    }

    /// Closes every listener (new clients are refused); connections and agents stay.
    pub async fn pause(&self) -> RunState {
        self.set_state(RunState::Paused).await
    }

    /// Reopens the listeners of every site that has an agent.
    pub async fn resume(&self) -> RunState {
        self.set_state(RunState::Running).await
    }

    /// Graceful stop: `Gateway::run` closes everything and drains, then returns [`Exit::Stop`].
    pub fn stop(&self) {
        tracing::warn!("stop requested");
        self.shared.request_exit(Exit::Stop);
    }

    /// `Gateway::run` drops everything and returns [`Exit::Restart`].
    pub fn restart(&self) {
        tracing::warn!("restart requested");
        self.shared.request_exit(Exit::Restart);
    }

    /// Applies a re-read gateway.toml: peer rules, limits, TLS files, `data_tls`, the client bind
    /// address (only listeners that used it restart). The control port address needs a restart.
    pub async fn reload(&self, new: GatewayConfig) {
        let old = self.shared.config();
        if new.control_listen != old.control_listen {
            tracing::warn!(
                "reload: [control] listen changed ({} -> {}): takes effect at the next restart",
                old.control_listen,
                new.control_listen
            );
        }
        let limits = &new.limits;
        self.shared
            .handshakes
            .set_limits(limits.max_handshakes, limits.max_handshakes_per_ip);
        self.shared
            .clients
            .set_limits(limits.max_connections, limits.max_connections_per_ip);
        *self.shared.config.write().unwrap() = Arc::new(new);
        for site in self.shared.sites.all() {
            site.reconcile_now(&self.shared).await;
        }
        tracing::info!("reload: gateway configuration applied (peers, limits, TLS, client bind)");
    }
}
