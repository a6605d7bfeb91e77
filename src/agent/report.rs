//! What the agent's admin API answers (`/api/status`, `/api/stats`, `POST /api/reload`), as
//! typed structs: the admin server serializes them, `sallyport status` deserializes the same
//! types, and `/metrics` is rendered from them. Built from the live [`super::AgentStatus`],
//! [`super::stats::AgentStats`] and configuration on each request; nothing here is stored.

use serde::{Deserialize, Serialize};

pub use super::stats::{Bytes, Failure, ListenerSnapshot, OutboundSnapshot};

/// `"agent"` in [`StatusReport::daemon`]; the gateway's status says `"gateway"`.
pub const DAEMON: &str = "agent";

/// The status light, of the agent or of one gateway as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Light {
    /// Connected, every listener open (for the agent: every gateway green).
    Green,
    /// Connected, but a listener failed or waits for a paused gateway (for the agent: some
    /// gateways are not green, at least one is connected).
    Amber,
    /// Not connected (for the agent: no gateway connected).
    Red,
}

/// `GET /api/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// Always [`DAEMON`]: how a client tells the agent's API from the gateway's.
    pub daemon: String,
    pub version: String,
    pub site: String,
    pub agent: String,
    /// Unix seconds.
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub light: Light,
    pub config: ConfigReport,
    /// One per configured gateway, in configuration order.
    pub gateways: Vec<GatewayReport>,
    /// The configured listeners, in configuration order.
    pub listeners: Vec<ListenerReport>,
    /// The outbound proxy, when configured.
    pub outbound: Option<OutboundReport>,
    /// The agent's own certificate (with TLS).
    #[serde(default)]
    pub cert: Option<crate::certinfo::CertView>,
}

/// The configuration in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigReport {
    /// agent.toml, as given on the command line.
    pub path: Option<String>,
    /// 1 at start, one more for each reload that was applied.
    pub generation: u64,
    /// The digest pushed to gateways (agents of one site must push the same).
    pub digest: String,
    /// When this generation was loaded (unix seconds).
    pub loaded_at: u64,
    /// The latest reload attempt, applied or refused.
    pub last_reload: Option<ReloadReport>,
    /// Reloads applied since the agent started.
    pub reloads_applied: u64,
    /// Reloads refused (a bad file) since the agent started.
    pub reloads_refused: u64,
}

/// One reload attempt (SIGHUP or `POST /api/reload`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// Unix seconds.
    pub at: u64,
    /// Whether it was applied.
    pub ok: bool,
    /// Why it was refused (file, line, field).
    pub error: Option<String>,
}

/// One gateway, as this agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayReport {
    /// As configured (`host:port`).
    pub gateway: String,
    pub light: Light,
    pub connected: bool,
    /// The address the control channel reached.
    pub addr: Option<String>,
    /// Unix seconds.
    pub connected_since: Option<u64>,
    pub connected_seconds: Option<u64>,
    /// `None` for a plaintext control channel.
    pub tls: Option<TlsReport>,
    /// The gateway's certificate on the current control channel (TLS only).
    #[serde(default)]
    pub cert: Option<crate::certinfo::CertView>,
    /// Whether data connections to it use TLS.
    pub data_tls: bool,
    /// The negotiated protocol version.
    pub protocol: Option<u16>,
    /// The heartbeat interval in force.
    pub heartbeat_ms: Option<u32>,
    /// The kernel's smoothed round-trip time of the control connection (`TCP_INFO`), which the
    /// heartbeats keep current.
    pub rtt_ms: Option<f64>,
    /// Why the last session or attempt failed (cleared when a session is established).
    pub last_error: Option<String>,
    /// Failed attempts since the last established session.
    pub reconnect_attempts: u32,
    /// Sessions established since the agent started.
    pub sessions: u64,
    pub pool: PoolReport,
    /// Every configured listener's state on this gateway, in configuration order.
    pub listeners: Vec<ListenerOnGateway>,
}

/// The TLS session of a control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsReport {
    /// `TLS 1.3`.
    pub version: String,
    /// The name the gateway's certificate was verified for.
    pub server_name: String,
}

/// The warm pool to one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolReport {
    /// Idle connections wanted now: the adaptive pool's target, within `min` and `max`.
    pub size: usize,
    /// Idle connections open now.
    pub idle: usize,
    /// `pool`'s bounds in agent.toml (equal for a fixed pool).
    #[serde(default)]
    pub min: usize,
    #[serde(default)]
    pub max: usize,
    /// Clients handed over pooled connections, and clients announced because none was idle,
    /// since the agent started.
    #[serde(default)]
    pub hits: u64,
    #[serde(default)]
    pub misses: u64,
}

/// One listener on one gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerOnGateway {
    pub name: String,
    /// `open`, `failed`, `paused` (accepted by a paused gateway), `pending` (pushed, no answer
    /// yet) or `down` (no control channel to that gateway).
    pub state: String,
    /// Where it listens, when open.
    pub addrs: Vec<String>,
    /// The gateway's reason, when failed.
    pub error: Option<String>,
}

/// One configured listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReport {
    pub name: String,
    pub public: String,
    /// `host:port` (a range maps port for port), or `local` for the embedding application.
    pub backend: String,
    pub proxy_protocol: String,
    pub transparent: bool,
    /// With several backends (`backend = [...]`): how clients are spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<String>,
    /// With several backends: each one's health and load ([`super::backends`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<super::backends::BackendReport>,
}

/// The outbound proxy's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundReport {
    pub listen: String,
    /// Whether clients must authenticate (`users` set).
    pub authentication: bool,
}

/// `GET /api/stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReport {
    pub uptime_seconds: u64,
    /// The sum over every listener (`last_failure`: the latest of any).
    pub totals: ListenerSnapshot,
    /// One per listener that has counters (configured now, or earlier: counters outlive a
    /// listener's removal so the rows add up to the totals).
    pub listeners: Vec<ListenerStatsReport>,
    pub outbound: OutboundSnapshot,
    /// Offers refused before any connection was made, by reason (`rate`, `data_connections`,
    /// `backend_connections`, `listener_backend_connections`, `unknown_listener`, `bad_port`).
    #[serde(default)]
    pub refused: std::collections::BTreeMap<String, u64>,
}

/// One listener's counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatsReport {
    pub name: String,
    #[serde(flatten)]
    pub counters: ListenerSnapshot,
}

/// The answer to `POST /api/reload` when the new configuration was applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// `"reload"`.
    pub action: String,
    pub generation: u64,
    pub digest: String,
    /// Warnings about the new file (e.g. plaintext), as the log shows them.
    pub notices: Vec<String>,
}

impl StatsReport {
    /// Sums listener counters into totals.
    pub fn totals_of(listeners: &[ListenerStatsReport]) -> ListenerSnapshot {
        let mut t = ListenerSnapshot::default();
        for l in listeners {
            let c = &l.counters;
            t.offered += c.offered;
            t.served += c.served;
            t.backend_failures += c.backend_failures;
            t.data_failures += c.data_failures;
            t.active += c.active;
            t.bytes += c.bytes;
            if c.last_failure.as_ref().map(|f| f.at) > t.last_failure.as_ref().map(|f| f.at) {
                t.last_failure = c.last_failure.clone();
            }
        }
        t
    }
}

fn unix(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One configured listener in the status; `backends`: the health of grouped backends, by
/// listener (its entry is taken).
fn listener_report(
    l: &crate::config::ListenerConfig,
    backends: &mut std::collections::HashMap<String, Vec<super::backends::BackendReport>>,
) -> ListenerReport {
    use crate::config::Backend;
    let backend = match (&l.backend, &l.group) {
        (_, Some(g)) => {
            let all: Vec<String> = g.backends.iter().map(|b| b.to_string()).collect();
            all.join(", ")
        }
        (Backend::Tcp(b), None) => b.to_string(),
        (Backend::Local, None) => "local".to_string(),
    };
    ListenerReport {
        name: l.name.clone(),
        public: l.public.to_string(),
        backend,
        proxy_protocol: format!("{:?}", l.proxy_protocol).to_lowercase(),
        transparent: l.impersonation == crate::config::Impersonation::Transparent,
        balance: l.group.as_ref().map(|g| g.balance.word().to_string()),
        backends: backends.remove(&l.name).unwrap_or_default(),
    }
}

/// One listener's state on one gateway, from that gateway's latest answer.
fn listener_on(name: &str, gateway: Option<&super::GatewayStatus>) -> ListenerOnGateway {
    use crate::protocol::ListenerStatus;
    let (state, addrs, error) = match gateway.filter(|g| g.connected_to.is_some()) {
        None => ("down", vec![], None),
        Some(g) => match g.listeners.get(name) {
            None => ("pending", vec![], None),
            Some(ListenerStatus::Bound { addrs, .. }) => {
                ("open", addrs.iter().map(|a| a.to_string()).collect(), None)
            }
            Some(ListenerStatus::Failed { error }) => ("failed", vec![], Some(error.clone())),
            Some(ListenerStatus::Paused) => ("paused", vec![], None),
        },
    };
    ListenerOnGateway {
        name: name.to_string(),
        state: state.to_string(),
        addrs,
        error,
    }
}

/// One gateway of the agent's configuration as `/api/status` shows it: its connection, TLS,
/// pool, and where each listener stands on it (`g`: what the sessions learnt, if anything).
fn gateway_report(
    config: &crate::config::AgentConfig,
    name: &str,
    g: Option<&super::GatewayStatus>,
    now: std::time::SystemTime,
) -> GatewayReport {
    let connected = g.is_some_and(|g| g.connected_to.is_some());
    let listeners: Vec<ListenerOnGateway> = config
        .listeners
        .iter()
        .map(|l| listener_on(&l.name, g))
        .collect();
    let light = if !connected {
        Light::Red
    } else if listeners.iter().all(|l| l.state == "open") {
        Light::Green
    } else {
        Light::Amber
    };
    let since = g.and_then(|g| g.connected_since).filter(|_| connected);
    GatewayReport {
        gateway: name.to_string(),
        light,
        connected,
        addr: g.and_then(|g| g.connected_to).map(|a| a.to_string()),
        connected_since: since.map(unix),
        connected_seconds: since.map(|s| now.duration_since(s).map_or(0, |d| d.as_secs())),
        tls: g.filter(|_| connected).and_then(|g| {
            Some(TlsReport {
                version: g.tls_version?.to_string(),
                server_name: g.server_name.clone()?,
            })
        }),
        cert: g
            .filter(|_| connected)
            .and_then(|g| g.cert.as_ref())
            .map(|c| crate::certinfo::CertView::of(c, now)),
        data_tls: connected && g.is_some_and(|g| g.data_tls),
        protocol: g.and_then(|g| g.protocol).filter(|_| connected),
        heartbeat_ms: g.and_then(|g| g.heartbeat_ms).filter(|_| connected),
        rtt_ms: g
            .and_then(|g| g.rtt)
            .filter(|_| connected)
            .map(|d| d.as_secs_f64() * 1000.0),
        last_error: g.and_then(|g| g.last_error.clone()),
        reconnect_attempts: g.map_or(0, |g| g.failures),
        sessions: g.map_or(0, |g| g.sessions),
        pool: PoolReport {
            size: g
                .filter(|_| connected)
                .map_or(config.pool.min, |g| g.pool_target),
            idle: g.filter(|_| connected).map_or(0, |g| g.pool_idle),
            min: config.pool.min,
            max: config.pool.max,
            hits: g.map_or(0, |g| g.pool_hits),
            misses: g.map_or(0, |g| g.pool_misses),
        },
        listeners,
    }
}

impl super::Agent {
    /// `GET /api/status`, from the live status and the configuration in force.
    pub fn status_report(&self) -> StatusReport {
        let config = self.config.borrow().clone();
        let live = self.status.borrow().clone();
        let now = std::time::SystemTime::now();
        let mut backends = self.stats.backends.reports();
        let gateways: Vec<GatewayReport> = config
            .gateways
            .iter()
            .map(|name| gateway_report(&config, name, live.gateways.get(name), now))
            .collect();
        let light = if gateways.iter().all(|g| g.light == Light::Green) {
            Light::Green
        } else if gateways.iter().any(|g| g.connected) {
            Light::Amber
        } else {
            Light::Red
        };
        StatusReport {
            daemon: DAEMON.to_string(),
            cert: config
                .tls
                .as_ref()
                .map(|t| crate::certinfo::CertView::of(&t.identity, now)),
            version: env!("CARGO_PKG_VERSION").to_string(),
            site: config.site.clone(),
            agent: config.name.clone(),
            started_at: unix(self.started),
            uptime_seconds: now.duration_since(self.started).map_or(0, |d| d.as_secs()),
            light,
            config: self.config_state.report(),
            gateways,
            listeners: config
                .listeners
                .iter()
                .map(|l| listener_report(l, &mut backends))
                .collect(),
            outbound: config.outbound.as_ref().map(|o| OutboundReport {
                listen: o.listen.to_string(),
                authentication: !o.users.is_empty(),
            }),
        }
    }

    /// `GET /api/stats`: every listener's counters (those of listeners removed by a reload
    /// too), their totals, and the outbound proxy's.
    pub fn stats_report(&self) -> StatsReport {
        let listeners: Vec<ListenerStatsReport> = self
            .stats
            .snapshot()
            .into_iter()
            .map(|(name, counters)| ListenerStatsReport { name, counters })
            .collect();
        StatsReport {
            uptime_seconds: std::time::SystemTime::now()
                .duration_since(self.started)
                .map_or(0, |d| d.as_secs()),
            totals: StatsReport::totals_of(&listeners),
            listeners,
            outbound: self.stats.outbound.snapshot(),
            refused: self.stats.refused.snapshot(),
        }
    }
}
