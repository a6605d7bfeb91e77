//! Gateway statistics: counters bumped by the code that moves the numbers, read by the admin API,
//! `/metrics` and logs without touching the data path.
//!
//! - Byte counts live in each connection's [`PipeCounters`] (atomics, bumped per chunk by the
//!   pipe). The connection table is locked once when a connection starts and once when it
//!   ends, never per chunk; a finished connection's bytes are folded into its listener's totals.
//! - Live totals are computed on read: finished bytes plus the bytes of active connections.
//! - A sampler records totals every second for per-second rates (over a sliding window) and the
//!   dashboard's charts.
//! - Refusals are [`Event`]s, so their log lines are rate limited where they are counted.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::limits::{Event, Gauge};
use crate::pipe::PipeCounters;

mod traffic;

pub use traffic::{run_sampler, sum, History, Tracking, Traffic, TrafficSnapshot};

/// Control-port and client refusals, counted and logged (rate limited) where they happen.
#[derive(Debug)]
pub struct GatewayStats {
    /// Clients refused by a listener's client rules.
    pub clients_rejected: Event,
    /// Clients refused because their address is banned (logged per ban, not here).
    pub clients_banned: Event,
    /// Clients refused by their listener's `new_connections_per_ip`.
    pub clients_rate_limited: Event,
    /// Clients refused by a limit (connections in total or per IP, pending clients).
    pub clients_over_limit: Event,
    /// Clients refused because the gateway is paused (only while the race with closing lasts).
    pub clients_paused: Event,
    /// Clients closed because no data connection claimed them before their deadline.
    pub clients_unclaimed: Event,
    /// Clients closed because the agent reported it could not serve them.
    pub clients_failed: Event,
    /// Offers of a client to another agent of its site after one reported it could not serve
    /// it (the client fails only when every connected agent has failed it).
    pub clients_reoffered: Event,
    /// Data connections refused: unknown, expired or reused id, or a wrong token.
    pub data_refused: Event,
    /// Control-port connections refused by `[peers]`.
    pub peers_denied: Event,
    /// Control-port connections dropped for a bad preamble, hello, version or a timeout.
    pub bad_hellos: Event,
    /// TLS handshakes that failed (unknown CA, expired certificate, not TLS 1.3 ...).
    pub tls_failures: Event,
    /// Control-port connections refused by the handshake limits.
    pub handshakes_over_limit: Event,
    /// Outbound connections refused by `[egress]` (or for a site without a connected agent).
    pub egress_denied: Event,
    /// Outbound connections whose destination could not be resolved or reached.
    pub egress_unreachable: Event,
    /// `sallyport check` runs that reached this gateway (data hellos for [`PROBE_ID`]): not
    /// refusals, so not in [`GatewayStats::refusals`].
    ///
    /// [`PROBE_ID`]: crate::protocol::PROBE_ID
    pub check_probes: Event,
    /// Pool and outbound connections not bound to a live control session (wrong session
    /// secret, or a certificate that is not the session's).
    pub session_unproven: Event,
    /// Pool connections refused because their site's pool was full.
    pub pool_full: Event,
    /// Clients handed to a pooled connection whose agent did not answer in time (offered
    /// again elsewhere).
    pub pool_unanswered: Event,
    /// Clients handed to a pooled connection its agent had closed in an orderly way (it declined
    /// the client, or its pool was shrinking): offered to the next one, not to that agent.
    pub pool_declined: Event,
    /// Connections whose agent certificate is bound to another site than the one they claim,
    /// or to none when `[control] tls.site_binding = "required"`.
    pub wrong_site: Event,
    /// Agents cut by a reload because the new CRL revokes their certificate (or the new CA no
    /// longer accepts it). A revoked certificate's handshake fails and counts as `tls_failed`.
    pub revoked: Event,
    /// Clients of a port shared by host name that sent no complete ClientHello or request head
    /// within the peek deadline.
    pub route_timeout: Event,
    /// Clients of a shared port whose first bytes were neither TLS nor HTTP/1.
    pub route_garbage: Event,
    /// Clients of a shared port naming a host no listener serves there, without a default.
    pub route_unknown: Event,
    /// Connections from a trusted front balancer (`[clients] proxy_protocol_from`) without a
    /// valid PROXY header within its deadline ([`super::front`]).
    pub proxy_header: Event,
    /// Control-port TLS handshakes completed in full (certificates exchanged and checked).
    pub tls_full: std::sync::atomic::AtomicU64,
    /// Control-port TLS handshakes that resumed a session (docs/security.md, "Resumption").
    pub tls_resumed: std::sync::atomic::AtomicU64,
}

impl Default for GatewayStats {
    fn default() -> Self {
        GatewayStats {
            clients_rejected: Event::some_per_10s(),
            clients_banned: Event::once_per_10s(),
            clients_rate_limited: Event::once_per_10s(),
            clients_over_limit: Event::once_per_10s(),
            clients_paused: Event::once_per_10s(),
            clients_unclaimed: Event::some_per_10s(),
            clients_failed: Event::some_per_10s(),
            clients_reoffered: Event::some_per_10s(),
            data_refused: Event::some_per_10s(),
            peers_denied: Event::some_per_10s(),
            bad_hellos: Event::some_per_10s(),
            tls_failures: Event::some_per_10s(),
            handshakes_over_limit: Event::once_per_10s(),
            egress_denied: Event::some_per_10s(),
            egress_unreachable: Event::some_per_10s(),
            check_probes: Event::some_per_10s(),
            session_unproven: Event::some_per_10s(),
            pool_full: Event::once_per_10s(),
            pool_unanswered: Event::some_per_10s(),
            pool_declined: Event::some_per_10s(),
            wrong_site: Event::some_per_10s(),
            revoked: Event::some_per_10s(),
            route_timeout: Event::some_per_10s(),
            route_garbage: Event::some_per_10s(),
            route_unknown: Event::some_per_10s(),
            proxy_header: Event::some_per_10s(),
            tls_full: Default::default(),
            tls_resumed: Default::default(),
        }
    }
}

impl GatewayStats {
    /// Every refusal counter by name, for the API and `/metrics`.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::from([
            ("client_rules", self.clients_rejected.count()),
            ("banned", self.clients_banned.count()),
            ("rate_limited", self.clients_rate_limited.count()),
            ("client_limits", self.clients_over_limit.count()),
            ("client_paused", self.clients_paused.count()),
            ("client_unclaimed", self.clients_unclaimed.count()),
            ("client_agent_failed", self.clients_failed.count()),
            ("client_reoffered", self.clients_reoffered.count()),
            ("data_token", self.data_refused.count()),
            ("peer_denied", self.peers_denied.count()),
            ("bad_hello", self.bad_hellos.count()),
            ("tls_failed", self.tls_failures.count()),
            ("handshake_limits", self.handshakes_over_limit.count()),
            ("egress_denied", self.egress_denied.count()),
            ("egress_unreachable", self.egress_unreachable.count()),
            ("session_proof", self.session_unproven.count()),
            ("pool_full", self.pool_full.count()),
            ("pool_unanswered", self.pool_unanswered.count()),
            ("pool_declined", self.pool_declined.count()),
            ("wrong_site", self.wrong_site.count()),
            ("revoked", self.revoked.count()),
            ("route_timeout", self.route_timeout.count()),
            ("route_garbage", self.route_garbage.count()),
            ("route_unknown", self.route_unknown.count()),
            ("proxy_header", self.proxy_header.count()),
        ])
    }
}

/// The four byte counters of the original product: what the gateway read from and wrote to
/// clients, and read from and wrote to agents (their data connections).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes4 {
    pub client_read: u64,
    pub client_written: u64,
    pub agent_read: u64,
    pub agent_written: u64,
}

impl Add for Bytes4 {
    type Output = Bytes4;
    fn add(self, o: Bytes4) -> Bytes4 {
        Bytes4 {
            client_read: self.client_read + o.client_read,
            client_written: self.client_written + o.client_written,
            agent_read: self.agent_read + o.agent_read,
            agent_written: self.agent_written + o.agent_written,
        }
    }
}

impl Sub for Bytes4 {
    type Output = Bytes4;
    fn sub(self, o: Bytes4) -> Bytes4 {
        Bytes4 {
            client_read: self.client_read.saturating_sub(o.client_read),
            client_written: self.client_written.saturating_sub(o.client_written),
            agent_read: self.agent_read.saturating_sub(o.agent_read),
            agent_written: self.agent_written.saturating_sub(o.agent_written),
        }
    }
}

/// Bytes per second for each of the four counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates4 {
    pub client_read: f64,
    pub client_written: f64,
    pub agent_read: f64,
    pub agent_written: f64,
}

impl Rates4 {
    fn over(delta: Bytes4, secs: f64) -> Rates4 {
        if secs <= 0.0 {
            return Rates4::default();
        }
        Rates4 {
            client_read: delta.client_read as f64 / secs,
            client_written: delta.client_written as f64 / secs,
            agent_read: delta.agent_read as f64 / secs,
            agent_written: delta.agent_written as f64 / secs,
        }
    }
}

/// Counters of one listener (by site and name); they outlive restarts of the listener.
#[derive(Debug)]
pub struct ListenerStats {
    pub site: String,
    pub name: String,
    /// Clients accepted and offered to an agent.
    pub accepted: AtomicU64,
    /// Clients refused by the listener's rules or a limit.
    pub rejected: AtomicU64,
    /// Connections that ended (after piping, or unclaimed, or failed).
    pub closed: AtomicU64,
    /// Clients waiting for their data connection.
    pub pending: Gauge,
    finished: Mutex<Bytes4>,
    /// Datagram counts, for a UDP listener.
    pub udp: UdpStats,
}

/// Why a datagram from a client was not forwarded (or one to a client not sent).
#[derive(Debug, Clone, Copy)]
pub enum UdpDrop {
    /// Over `[limits] max_datagram`.
    Oversize = 0,
    /// Its flow's queue was full (the data connection is slower than the client).
    QueueFull = 1,
    /// It would have opened a flow the rules, a limit or a pause refused.
    Refused = 2,
    /// A reply the socket did not take.
    SendFailed = 3,
    /// Over the listener's `client_rate` or `listener_rate` (either direction).
    Rate = 4,
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 5] = [
        UdpDrop::Oversize,
        UdpDrop::QueueFull,
        UdpDrop::Refused,
        UdpDrop::SendFailed,
        UdpDrop::Rate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UdpDrop::Oversize => "oversize",
            UdpDrop::QueueFull => "queue_full",
            UdpDrop::Refused => "refused",
            UdpDrop::SendFailed => "send_failed",
            UdpDrop::Rate => "rate",
        }
    }
}

/// Counters of a UDP listener. Bytes are counted per flow like a TCP client's.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Set when the listener opens as UDP: its snapshot then has a `udp` part.
    pub is_udp: std::sync::atomic::AtomicBool,
    /// Flows open now (waiting for their data connection or relaying).
    pub flows: Gauge,
    /// Datagrams from clients queued for their flow.
    pub from_clients: AtomicU64,
    /// Datagrams sent to clients.
    pub to_clients: AtomicU64,
    /// Flows the gateway ended itself: silent past the idle timeout plus its margin (the
    /// agent, which should have ended them, is hung or misbehaving).
    pub idle_ended: AtomicU64,
    dropped: [AtomicU64; UdpDrop::ALL.len()],
}

impl UdpStats {
    pub fn dropped(&self, why: UdpDrop) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `None` for a TCP listener.
    pub fn snapshot(&self) -> Option<UdpSnapshot> {
        if !self.is_udp.load(Ordering::Relaxed) {
            return None;
        }
        Some(UdpSnapshot {
            flows: self.flows.get() as u64,
            datagrams_from_clients: self.from_clients.load(Ordering::Relaxed),
            datagrams_to_clients: self.to_clients.load(Ordering::Relaxed),
            flows_idle_ended: self.idle_ended.load(Ordering::Relaxed),
            dropped: UdpDrop::ALL
                .iter()
                .map(|d| {
                    (
                        d.name().into(),
                        self.dropped[*d as usize].load(Ordering::Relaxed),
                    )
                })
                .collect(),
        })
    }
}

/// A UDP listener's datagram counts in `/api/stats` and `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UdpSnapshot {
    pub flows: u64,
    pub datagrams_from_clients: u64,
    pub datagrams_to_clients: u64,
    /// Flows the gateway ended after the idle timeout plus its margin (the agent did not).
    #[serde(default)]
    pub flows_idle_ended: u64,
    /// Dropped datagrams by reason: oversize, queue_full, refused, send_failed, rate.
    pub dropped: BTreeMap<Cow<'static, str>, u64>,
}

impl ListenerStats {
    fn new(site: &str, name: &str) -> Self {
        ListenerStats {
            site: site.to_string(),
            name: name.to_string(),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            pending: Gauge::default(),
            finished: Mutex::new(Bytes4::default()),
            udp: UdpStats::default(),
        }
    }
}

/// One piping client connection.
#[derive(Debug)]
pub struct ConnEntry {
    pub id: u64,
    pub listener: Arc<ListenerStats>,
    pub client_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub started: SystemTime,
    pub started_at: Instant,
    /// a = the client, b = the agent's data connection.
    pub counters: PipeCounters,
    /// Why the agent could not serve the client, when it said so while the client was already
    /// piping (a warm-pool connection is piped before the agent dials the backend).
    pub failure: std::sync::OnceLock<String>,
}

impl ConnEntry {
    pub fn bytes(&self) -> Bytes4 {
        let s = self.counters.snapshot();
        Bytes4 {
            client_read: s.a_read,
            client_written: s.a_written,
            agent_read: s.b_read,
            agent_written: s.b_written,
        }
    }
}

#[cfg(test)]
mod tests;
