//! The gateway's answers to the admin API (`GET /api/status`, `/api/stats`, `/api/health`,
//! `/api/connections`): plain data, serialized to JSON by the admin server and read back, typed,
//! by `sallyport status`. Field names are the API: renaming one is a breaking change.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::stats::{self, History, TrafficSnapshot};
use super::{ListenerView, RouteView, RunState};

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
