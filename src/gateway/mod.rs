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

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
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
use pending::PendingTable;
pub use route::RouteView;
use site::SiteRegistry;
pub use site::{ListenerState, ListenerView};
use stats::{GatewayStats, History, Traffic, TrafficSnapshot};

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
        Ok(exit)
    }
}

/// An agent as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub site: String,
    pub name: String,
    pub addr: SocketAddr,
    pub connected_since: u64,
    pub connected_seconds: u64,
    /// Clients offered to it and not yet claimed.
    pub inflight: usize,
    /// The certificate it presented (TLS only).
    pub cert: Option<crate::certinfo::CertView>,
}

/// `GET /api/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Always `"gateway"` (the agent's admin API says `"agent"`): how `sallyport status` knows
    /// which daemon it talks to.
    pub daemon: Cow<'static, str>,
    pub state: RunState,
    /// green: running with an agent; amber: paused; red: no agent (or stopping).
    pub light: Cow<'static, str>,
    pub version: Cow<'static, str>,
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub control: ControlView,
    pub agents: Vec<AgentView>,
    pub listeners: Vec<ListenerView>,
    /// Routes of the ports shared by host name: port, name, site, listener.
    pub routes: Vec<RouteView>,
    /// Agents the last reloads cut because `[peers]` no longer allows them (at most 32).
    pub revoked: Vec<RevokedView>,
}

/// An agent a reload cut: who, when, why and what was closed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedView {
    pub site: String,
    pub agent: String,
    pub addr: SocketAddr,
    pub at: u64,
    pub reason: String,
    /// Warm-pool connections closed with it.
    pub pooled: usize,
    /// Client and outbound connections it was piping, and whether they were closed too.
    pub established: usize,
    pub established_closed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlView {
    pub listen: SocketAddr,
    pub tls: bool,
    pub data_tls: bool,
    /// The gateway's own certificate (TLS only).
    pub cert: Option<crate::certinfo::CertView>,
}

/// Per-listener statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatsView {
    pub site: String,
    pub name: String,
    #[serde(flatten)]
    pub traffic: TrafficSnapshot,
}

/// `GET /api/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsView {
    pub uptime_seconds: u64,
    pub agents: usize,
    /// Idle warm-pool data connections, all sites.
    pub pooled: usize,
    pub totals: TrafficSnapshot,
    pub listeners: Vec<ListenerStatsView>,
    /// Refused connections by reason.
    pub refusals: BTreeMap<Cow<'static, str>, u64>,
    /// `sallyport check` probes received (not refusals: an operator testing the setup).
    pub check_probes: u64,
    pub tls: TlsView,
    pub history: History,
}

/// The control port's TLS handshakes and the sessions kept for resumption.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TlsView {
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    pub sessions: crate::transport::SessionFigures,
}

/// `GET /api/health`.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView {
    pub healthy: bool,
    pub state: RunState,
    pub agents: usize,
    /// Empty when healthy.
    pub reasons: Vec<String>,
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
                    cert: a
                        .chain
                        .as_ref()
                        .and_then(|c| c.first())
                        .and_then(|leaf| crate::certinfo::CertView::of_der(leaf.as_ref())),
                })
            })
            .collect()
    }

    pub fn status(&self) -> StatusView {
        self.status_of(None)
    }

    /// The status, of one site only when `site` is given (its agents and listeners; the light
    /// is that site's).
    pub fn status_of(&self, site: Option<&str>) -> StatusView {
        let s = &self.shared;
        let mut agents = self.agents();
        agents.retain(|a| site.map_or(true, |name| a.site == name));
        let state = s.state();
        let light = match state {
            RunState::Paused => "amber",
            RunState::Running if !agents.is_empty() => "green",
            _ => "red",
        };
        let config = s.config();
        StatusView {
            daemon: "gateway".into(),
            state,
            light: light.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: unix(s.started),
            uptime_seconds: s.started_at.elapsed().as_secs(),
            control: ControlView {
                listen: s.control_addr,
                tls: config.tls.is_some(),
                data_tls: config.tls.is_some() && config.data_tls,
                cert: config
                    .tls
                    .as_ref()
                    .map(|t| crate::certinfo::CertView::of(&t.identity, SystemTime::now())),
            },
            agents,
            listeners: s
                .sites
                .all()
                .iter()
                .filter(|one| site.map_or(true, |name| one.name == name))
                .flat_map(|site| site.listener_views())
                .collect(),
            routes: s
                .routes
                .views()
                .into_iter()
                .filter(|r| site.map_or(true, |name| r.site == name))
                .collect(),
            revoked: s.revoked.lock().iter().cloned().collect(),
        }
    }

    pub fn stats(&self) -> StatsView {
        self.stats_of(None)
    }

    /// The statistics, of one site only when `site` is given (its listeners, their sum as the
    /// totals, its agents and pool; refusals and history stay gateway-wide).
    pub fn stats_of(&self, site: Option<&str>) -> StatsView {
        let s = &self.shared;
        let (mut per, mut totals) = s.traffic.snapshot();
        let sites: Vec<_> = s
            .sites
            .all()
            .into_iter()
            .filter(|one| site.map_or(true, |name| one.name == name))
            .collect();
        if let Some(name) = site {
            per.retain(|(l, _)| l.site == name);
            totals = stats::sum(per.iter().map(|(_, t)| t));
        }
        StatsView {
            uptime_seconds: s.started_at.elapsed().as_secs(),
            agents: sites.iter().map(|site| site.agent_count()).sum(),
            pooled: sites.iter().map(|site| site.pool.len()).sum(),
            totals,
            listeners: per
                .into_iter()
                .map(|(l, traffic)| ListenerStatsView {
                    site: l.site.clone(),
                    name: l.name.clone(),
                    traffic,
                })
                .collect(),
            refusals: s
                .stats
                .refusals()
                .into_iter()
                .map(|(k, n)| (k.into(), n))
                .collect(),
            check_probes: s.stats.check_probes.count(),
            tls: TlsView {
                handshakes_full: s.stats.tls_full.load(Ordering::Relaxed),
                handshakes_resumed: s.stats.tls_resumed.load(Ordering::Relaxed),
                sessions: (s.config().tls.as_ref())
                    .map(|t| t.server.sessions())
                    .unwrap_or_default(),
            },
            history: s.traffic.history(),
        }
    }

    /// Whether a load balancer should send clients here, and if not, why.
    pub fn health(&self) -> HealthView {
        let s = &self.shared;
        let state = s.state();
        let mut reasons = Vec::new();
        match state {
            RunState::Running => {}
            RunState::Paused => reasons.push("the gateway is paused".to_string()),
            RunState::Stopping => reasons.push("the gateway is stopping".to_string()),
        }
        let sites = s.sites.all();
        let agents: usize = sites.iter().map(|site| site.agent_count()).sum();
        if agents == 0 {
            reasons.push("no agent connected".to_string());
        }
        for site in &sites {
            if site.agent_count() == 0 && site.last_pushed() > 0 {
                reasons.push(format!(
                    "site \"{}\": no agent connected (its {} listener(s) are closed)",
                    site.name,
                    site.last_pushed()
                ));
            }
            for l in site.listener_views() {
                if let Some(error) = l.error.filter(|_| l.state == ListenerState::Failed) {
                    reasons.push(format!(
                        "site \"{}\": listener \"{}\" failed: {error}",
                        site.name, l.name
                    ));
                }
            }
        }
        HealthView {
            healthy: reasons.is_empty(),
            state,
            agents,
            reasons,
        }
    }

    /// The bans in force, per site that has any.
    pub fn bans(&self) -> Vec<bans::SiteBansView> {
        self.shared
            .sites
            .all()
            .iter()
            .map(|site| site.bans.view(&site.name))
            .filter(|v| v.total > 0)
            .collect()
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
            let mut current = self.shared.state.lock();
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

    /// The configuration in force.
    pub fn config(&self) -> Arc<GatewayConfig> {
        self.shared.config()
    }

    /// Applies a re-read gateway.toml and says, key by key, what changed and whether it took
    /// effect (logged too). Keys that need a restart (`control.listen`, `control.data_tls`)
    /// keep their running value. Agents the new `[peers]` rules deny are cut at once.
    /// `[admin]` is the admin server's: its caller applies it.
    pub async fn reload(&self, new: GatewayConfig) -> Vec<Change> {
        let old = self.shared.config();
        let changes = old.changes(&new);
        let mut applied = new;
        applied.control_listen = old.control_listen;
        applied.data_tls = old.data_tls;
        let limits = &applied.limits;
        self.shared
            .handshakes
            .set_limits(limits.max_handshakes, limits.max_handshakes_per_ip);
        self.shared
            .handshakes
            .set_reserved(limits.max_handshakes / 4);
        self.shared
            .clients
            .set_limits(limits.max_connections, limits.max_connections_per_ip);
        *self.shared.config.write() = Arc::new(applied);
        // Who is cut is noted before they are told (they leave their sites at once).
        self.revoke_denied_agents();
        self.revoke_rejected_certificates();
        // After the swap: every connection waiting in `denied` now sees the new rules.
        self.shared.peer_rules.send_modify(|g| *g += 1);
        for site in self.shared.sites.all() {
            site.reconcile_now(&self.shared).await;
        }
        for change in &changes {
            if change.needs_restart() {
                tracing::warn!("reload: {change}");
            } else {
                tracing::info!("reload: {change}");
            }
        }
        let later = changes.iter().filter(|c| c.needs_restart()).count();
        tracing::info!(
            "reload: gateway configuration applied ({} key(s) changed, {later} need(s) a restart)",
            changes.len()
        );
        changes
    }

    /// Closes the pooled connections of agents `[peers]` now denies, and says who is cut (their
    /// sessions and connections end by themselves in [`Shared::denied`] once the rules'
    /// generation moves).
    fn revoke_denied_agents(&self) {
        let config = self.shared.config();
        let denied = |ip: IpAddr| !config.peers.allows(ip);
        let connections = self.shared.traffic.connections();
        for site in self.shared.sites.all() {
            let pooled = site.pool.remove_peers(denied);
            for agent in site.agents().into_iter().filter(|a| denied(a.addr.ip())) {
                let established = connections
                    .iter()
                    .filter(|c| c.agent_addr.ip() == agent.addr.ip())
                    .count();
                let pooled = pooled.get(&agent.addr.ip()).copied().unwrap_or(0);
                let reason = format!(
                    "{} is no longer allowed by the gateway's [peers] rules",
                    agent.addr.ip()
                );
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "reload: agent REVOKED: {reason}: control channel closed, {pooled} pooled \
                     connection(s) closed, {established} established connection(s) {}",
                    if config.drop_established {
                        "closed"
                    } else {
                        "left to finish ([peers] drop_established = false)"
                    }
                );
                self.note_revoked(RevokedView {
                    site: site.name.clone(),
                    agent: agent.name.clone(),
                    addr: agent.addr,
                    at: unix(SystemTime::now()),
                    reason,
                    pooled,
                    established,
                    established_closed: config.drop_established,
                });
            }
        }
    }

    /// Cuts the agents whose certificate the new TLS settings refuse (a CRL that lists it, a
    /// client_ca that did not issue it): their control sessions end with REVOKED, and with
    /// them their pooled connections; the client and outbound connections they pipe end in
    /// [`Shared::cut`] (under `[peers] drop_established`, as for a `[peers]` revocation).
    fn revoke_rejected_certificates(&self) {
        let config = self.shared.config();
        let Some(tls) = &config.tls else {
            return;
        };
        let connections = self.shared.traffic.connections();
        for site in self.shared.sites.all() {
            for agent in site.agents() {
                let Some(chain) = &agent.chain else {
                    continue;
                };
                let Err(e) = tls.server.verify_client(chain) else {
                    continue;
                };
                let reason = format!("its certificate is now refused: {e}");
                // Connections from its address: what the cut in [`Shared::cut`] reaches.
                let established = connections
                    .iter()
                    .filter(|c| c.agent_addr.ip() == agent.addr.ip())
                    .count();
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "reload: agent REVOKED: {reason}: control channel and pooled connections \
                     closed, established connection(s) {}",
                    if config.drop_established {
                        "closed"
                    } else {
                        "left to finish ([peers] drop_established = false)"
                    }
                );
                self.shared.stats.revoked.hit();
                self.note_revoked(RevokedView {
                    site: site.name.clone(),
                    agent: agent.name.clone(),
                    addr: agent.addr,
                    at: unix(SystemTime::now()),
                    reason,
                    pooled: site.pool.agent_count(agent.id),
                    established,
                    established_closed: config.drop_established,
                });
                agent.cert_revoked.cancel();
            }
        }
    }

    fn note_revoked(&self, view: RevokedView) {
        let mut revoked = self.shared.revoked.lock();
        if revoked.len() == 32 {
            revoked.pop_front();
        }
        revoked.push_back(view);
    }

    /// Restarts with `new` (validated by the caller; `None`: the caller re-reads the file) and
    /// returns what it changes. Every key applies at a restart.
    pub fn restart_with(&self, new: Option<GatewayConfig>) -> Vec<Change> {
        let changes = match &new {
            Some(new) => self.shared.config().changes(new),
            None => Vec::new(),
        };
        *self.shared.staged.lock() = new;
        self.restart();
        changes
    }

    /// The configuration `restart_with` staged, for the next gateway.
    pub fn take_staged(&self) -> Option<GatewayConfig> {
        self.shared.staged.lock().take()
    }
}
