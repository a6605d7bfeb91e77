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

mod admit;
mod autoban;
pub mod bans;
mod binding;
mod client;
mod control;
mod data;
mod edge;
mod front;
mod handle;
mod listener;
mod offer;
pub mod outbound;
mod pending;
mod pool;
mod public;
mod push;
mod route;
mod session;
mod site;
pub mod stats;
mod udp;
mod view;
pub mod watch;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::reference::Change;
use crate::config::GatewayConfig;
use crate::limits::{ConnLimiter, Gauge};
use crate::net;
pub use handle::GatewayHandle;
use pending::PendingTable;
pub use route::RouteView;
use site::SiteRegistry;
pub use site::{ListenerState, ListenerView};
use stats::{GatewayStats, Traffic};
pub use view::{
    AgentView, ConnectionView, ControlView, HealthView, ListenerStatsView, RevokedView, StatsView,
    StatusView, TlsView,
};

/// What the gateway is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Public ports shared by host name, and their routes.
    pub routes: route::SharedPorts,
    pub pending: PendingTable,
    pub stats: GatewayStats,
    pub traffic: Arc<Traffic>,
    /// Control-port connections still in their handshake. A quarter of the places is kept for
    /// addresses that hold an authenticated control session, so strangers cannot starve an
    /// agent's data connections.
    pub handshakes: ConnLimiter,
    /// Addresses holding a control session that joined its site (how many sessions each).
    agent_addrs: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    /// Client connections, waiting or piping.
    pub clients: ConnLimiter,
    /// Clients waiting for a data connection, across all listeners.
    pub pending_total: Gauge,
    /// Refusals being written to refused control-port connections.
    pub refusals: Gauge,
    /// The process's descriptors: new clients and strangers stop short of the reserve.
    pub fds: crate::fds::FdBudget,
    /// Public ports open, all sites (each site counts its own too).
    pub listen_ports: Gauge,
    /// Outbound connections open.
    pub outbound: Gauge,
    /// Every connection task (control sessions, data hellos, clients), for draining on stop.
    pub tasks: TaskTracker,
    /// Stops accepting: the control port and control sessions end.
    pub shutdown: CancellationToken,
    /// Drops established connections (restart, or a drain that ran out of time).
    pub kill: CancellationToken,
    state: Mutex<RunState>,
    /// Bumped by every reload: connections of agents the new `[peers]` rules deny end
    /// ([`Shared::denied`]).
    peer_rules: tokio::sync::watch::Sender<u64>,
    /// The last agents a reload cut, newest last (for the status).
    revoked: Mutex<VecDeque<RevokedView>>,
    /// A configuration validated by `ctl restart`, for the restart to use.
    staged: Mutex<Option<GatewayConfig>>,
    exit: Mutex<Option<Exit>>,
    exit_requested: CancellationToken,
    /// What [`GatewayHandle::watch`] hands out, kept current by [`watch::publish`].
    status: tokio::sync::watch::Sender<watch::GatewayStatus>,
    pub started: SystemTime,
    started_at: Instant,
    pub control_addr: SocketAddr,
    next_client_id: AtomicU64,
    next_agent_id: AtomicU64,
}

impl Shared {
    /// A new client id (the audit records' `conn`): never 0 ([`crate::protocol::PROBE_ID`]),
    /// never reused by this gateway, and not by another one or a restart either, since each
    /// gateway instance starts at its own random block (see [`first_client_id`]).
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn next_agent_id(&self) -> u64 {
        self.next_agent_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `ip` holds a control session that joined its site (its connections may use the
    /// handshake places kept for agents).
    pub fn is_agent_addr(&self, ip: std::net::IpAddr) -> bool {
        self.agent_addrs.lock().contains_key(&ip)
    }

    /// Records a joined control session's address until the returned guard drops.
    pub fn agent_addr(self: &Arc<Self>, ip: std::net::IpAddr) -> AgentAddr {
        *self.agent_addrs.lock().entry(ip).or_insert(0) += 1;
        AgentAddr {
            shared: self.clone(),
            ip,
        }
    }

    /// The configuration in force (a reload replaces it; holders keep the one they took).
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.config.read().clone()
    }

    pub fn state(&self) -> RunState {
        *self.state.lock()
    }

    /// Resolves once the `[peers]` rules in force deny `ip` (at once if they already do), for
    /// a connection of that agent to end. A connection already `piping` client bytes ends only
    /// when `[peers] drop_established` is set.
    pub async fn denied(&self, ip: IpAddr, piping: bool) {
        self.cut(ip, None, piping).await;
    }

    /// As [`Shared::denied`], and also once a reload's TLS settings refuse `chain`, the
    /// agent certificate this connection was accepted with (a CRL now lists it, or the
    /// client_ca no longer issued it). The certificate is checked again only after a reload,
    /// never on the connection path. Says why, for the connection's record.
    pub async fn cut(
        &self,
        ip: IpAddr,
        chain: Option<&[CertificateDer<'static>]>,
        piping: bool,
    ) -> &'static str {
        // Subscribe before looking: a reload between the look and the wait still wakes us.
        let mut changes = self.peer_rules.subscribe();
        let mut reloaded = false;
        loop {
            let config = self.config();
            if !piping || config.drop_established {
                if !config.peers.allows(ip) {
                    return "cut: the agent's address was revoked by [peers]";
                }
                let refused = |chain| {
                    let tls = config.tls.as_ref()?;
                    tls.server.verify_client(chain).err()
                };
                if reloaded && chain.and_then(refused).is_some() {
                    return "cut: the agent's certificate was revoked (a reload's tls.crl or client_ca refuses it)";
                }
            }
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            reloaded = true;
        }
    }

    /// Runs `pipe`, a connection the agent at `agent` (accepted with `chain`) serves, until it
    /// ends, the gateway kills what is left ([`Shared::kill`]), or a reload revokes the agent
    /// ([`Shared::cut`]); a kill or a cut is the pipe's error, in words for its record.
    pub(crate) async fn pipe_unless_cut(
        &self,
        agent: IpAddr,
        chain: Option<&[CertificateDer<'static>]>,
        pipe: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> std::io::Result<()> {
        tokio::select! {
            r = pipe => r,
            _ = self.kill.cancelled() => Err(std::io::Error::other("the gateway is restarting or ran out of drain time")),
            why = self.cut(agent, chain, true) => Err(std::io::Error::other(why)),
        }
    }

    fn request_exit(&self, exit: Exit) {
        let mut slot = self.exit.lock();
        if slot.is_none() {
            *slot = Some(exit);
        }
        self.exit_requested.cancel();
    }
}

/// An address counted as an agent's while this lives.
pub(crate) struct AgentAddr {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for AgentAddr {
    fn drop(&mut self) {
        let mut addrs = self.shared.agent_addrs.lock();
        if let Some(n) = addrs.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                addrs.remove(&self.ip);
            }
        }
    }
}

/// The handshake limiter for `limits`: a quarter of `max_handshakes` kept for agents' addresses.
fn handshake_limiter(limits: &crate::config::Limits) -> ConnLimiter {
    let limiter = ConnLimiter::new(limits.max_handshakes, limits.max_handshakes_per_ip);
    limiter.set_reserved(limits.max_handshakes / 4);
    limiter
}

/// Where a gateway instance's client ids start: a random block of 2^32 ids (21 random bits
/// above 32 counting ones), so the ids of two gateways, or of one gateway before and after a
/// restart, do not collide in the agents' and SIEMs' records, while every id stays below 2^53
/// and survives a JSON number (a double) unchanged.
fn first_client_id() -> u64 {
    let block: u64 = rand::random_range(1..1 << 21);
    (block << 32) | 1
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
            routes: Default::default(),
            pending: PendingTable::default(),
            stats: GatewayStats::default(),
            traffic: Arc::default(),
            handshakes: handshake_limiter(limits),
            agent_addrs: Mutex::default(),
            clients: ConnLimiter::new(limits.max_connections, limits.max_connections_per_ip),
            pending_total: Gauge::default(),
            refusals: Gauge::default(),
            fds: crate::fds::FdBudget::of_process(),
            listen_ports: Gauge::default(),
            outbound: Gauge::default(),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            kill: CancellationToken::new(),
            state: Mutex::new(RunState::Running),
            peer_rules: tokio::sync::watch::channel(0).0,
            revoked: Mutex::new(VecDeque::new()),
            staged: Mutex::new(None),
            exit: Mutex::new(None),
            exit_requested: CancellationToken::new(),
            status: tokio::sync::watch::channel(watch::GatewayStatus::empty()).0,
            started: SystemTime::now(),
            started_at: Instant::now(),
            control_addr: control.local_addr()?,
            next_client_id: AtomicU64::new(first_client_id()),
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
        let (ports, per_site) = shared.config().limits.listen_ports(shared.fds.limit());
        tracing::info!(
            "open files: {} allowed, {} kept in reserve; public ports: at most {ports}, {per_site} per site",
            shared.fds.limit(),
            shared.fds.reserve()
        );
        let counter = shared.clone();
        let fd_sampler =
            tokio::spawn(async move { counter.fds.sample_until(counter.shutdown.clone()).await });
        let accept = tokio::spawn(control::accept_loop(shared.clone(), self.control));
        let sampler = tokio::spawn(stats::run_sampler(
            shared.traffic.clone(),
            shared.shutdown.clone(),
        ));
        let recycler = tokio::spawn(pool::recycle_loop(shared.clone()));
        let publisher = tokio::spawn(watch::publish(shared.clone()));
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
        let exit = shared.exit.lock().unwrap_or(Exit::Stop);
        *shared.state.lock() = RunState::Stopping;
        shared.traffic.changes.mark();
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
        let _ = fd_sampler.await;
        let _ = recycler.await;
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
        publisher.abort();
        // The last word: stopped, no listener open.
        watch::refresh(&shared);
        Ok(exit)
    }
}
