//! What the agent knows about its gateways right now: connected or not, the last error, and
//! what each gateway answered for each listener. Sessions write it; `check`, the embedded
//! listener, logs and the admin API ([`super::report`]) read it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::protocol::{ListenerStatus, Token};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// Keyed by the gateway as configured (`host:port`).
    pub gateways: BTreeMap<String, GatewayStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayStatus {
    /// The address the current control channel reached, while connected.
    pub connected_to: Option<SocketAddr>,
    pub connected_since: Option<SystemTime>,
    /// Whether the control channel runs over TLS.
    pub tls: bool,
    /// Whether data connections to this gateway use TLS.
    pub data_tls: bool,
    /// Why the last session or attempt failed.
    pub last_error: Option<String>,
    /// Failed attempts since the last established session.
    pub failures: u32,
    /// The gateway's answer for each listener, from the latest config result.
    pub listeners: BTreeMap<String, ListenerStatus>,
    /// The current control session's secret (protocol v2), which outbound connections present.
    pub(crate) session: Option<Token>,
    /// The TLS version of the control channel (`TLS 1.3`), while connected over TLS.
    pub tls_version: Option<&'static str>,
    /// The name the gateway's certificate was verified for.
    pub server_name: Option<String>,
    /// The gateway's certificate, as it presented it on the current control channel.
    pub cert: Option<crate::certinfo::CertInfo>,
    /// The negotiated protocol version, while connected.
    pub protocol: Option<u16>,
    /// The heartbeat interval in force, while connected.
    pub heartbeat_ms: Option<u32>,
    /// The kernel's smoothed round-trip time of the control connection, refreshed at every
    /// heartbeat.
    pub rtt: Option<std::time::Duration>,
    /// Sessions established since the agent started.
    pub sessions: u64,
    /// Idle warm-pool connections open now.
    pub pool_idle: usize,
    /// Idle warm-pool connections wanted now (the adaptive pool's target; see `agent::pool`).
    pub pool_target: usize,
    /// Clients this gateway handed over pooled connections, and clients it announced (the
    /// pool had none idle): since the agent started.
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// The gateway's answer to this session's latest ban list (none: not answered yet, or a
    /// gateway that does not apply bans).
    pub bans: Option<crate::protocol::BanResult>,
}

impl AgentStatus {
    /// Whether every gateway has answered for `listener` and all of them bound it.
    pub fn bound_everywhere(&self, listener: &str) -> bool {
        !self.gateways.is_empty()
            && self.gateways.values().all(|g| {
                matches!(
                    g.listeners.get(listener),
                    Some(ListenerStatus::Bound { .. })
                )
            })
    }
}
