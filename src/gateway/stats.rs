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
}

impl UdpDrop {
    pub const ALL: [UdpDrop; 4] = [
        UdpDrop::Oversize,
        UdpDrop::QueueFull,
        UdpDrop::Refused,
        UdpDrop::SendFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UdpDrop::Oversize => "oversize",
            UdpDrop::QueueFull => "queue_full",
            UdpDrop::Refused => "refused",
            UdpDrop::SendFailed => "send_failed",
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
    dropped: [AtomicU64; 4],
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
    /// Dropped datagrams by reason: oversize, queue_full, refused, send_failed.
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

/// Seconds kept for charts.
const HISTORY: usize = 300;
/// Seconds over which rates are averaged.
const RATE_WINDOW: usize = 5;

/// (site, listener name).
type ListenerKey = (String, String);

/// A listener's recent byte totals, for its rates.
type RateWindow = VecDeque<(Instant, Bytes4)>;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bytes: Bytes4,
    active: u64,
}

/// Failure reports remembered for clients that are not piping yet.
const EARLY_FAILURES: usize = 64;

/// Listener stats, active connections and the rate history.
#[derive(Debug, Default)]
pub struct Traffic {
    listeners: Mutex<BTreeMap<(String, String), Arc<ListenerStats>>>,
    connections: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    /// Agents' failure reports for clients not piping yet (a warm-pool agent may report one
    /// before the gateway has read its `PoolAccepted`), oldest first, at most [`EARLY_FAILURES`].
    early_failures: Mutex<VecDeque<(u64, String)>>,
    samples: Mutex<VecDeque<Sample>>,
    listener_samples: Mutex<HashMap<ListenerKey, RateWindow>>,
}

/// A connection registered in [`Traffic`] until this is dropped.
pub struct Tracking<'a> {
    traffic: &'a Traffic,
    id: u64,
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        self.traffic.finish(self.id);
    }
}

/// Totals and rates of one listener or of the whole gateway.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrafficSnapshot {
    pub accepted: u64,
    pub rejected: u64,
    pub closed: u64,
    pub active: u64,
    pub pending: u64,
    pub bytes: Bytes4,
    /// Bytes per second over the last few seconds.
    pub rates: Rates4,
    /// A UDP listener's datagram counts (absent for TCP and in totals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpSnapshot>,
}

/// The sum of several listeners' snapshots (rates add up too).
pub fn sum<'a>(snaps: impl Iterator<Item = &'a TrafficSnapshot>) -> TrafficSnapshot {
    let mut total = TrafficSnapshot {
        accepted: 0,
        rejected: 0,
        closed: 0,
        active: 0,
        pending: 0,
        bytes: Bytes4::default(),
        rates: Rates4::default(),
        udp: None,
    };
    for t in snaps {
        total.accepted += t.accepted;
        total.rejected += t.rejected;
        total.closed += t.closed;
        total.active += t.active;
        total.pending += t.pending;
        total.bytes = total.bytes + t.bytes;
        total.rates.client_read += t.rates.client_read;
        total.rates.client_written += t.rates.client_written;
        total.rates.agent_read += t.rates.agent_read;
        total.rates.agent_written += t.rates.agent_written;
    }
    total
}

/// The charts' data: one point per second, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct History {
    pub interval_seconds: u64,
    pub client_read: Vec<f64>,
    pub client_written: Vec<f64>,
    pub agent_read: Vec<f64>,
    pub agent_written: Vec<f64>,
    pub active: Vec<u64>,
}

impl Traffic {
    /// The stats of a listener, made on first use.
    pub fn listener(&self, site: &str, name: &str) -> Arc<ListenerStats> {
        self.listeners
            .lock()
            .entry((site.to_string(), name.to_string()))
            .or_insert_with(|| Arc::new(ListenerStats::new(site, name)))
            .clone()
    }

    pub fn listeners(&self) -> Vec<Arc<ListenerStats>> {
        self.listeners.lock().values().cloned().collect()
    }

    /// Registers a connection that starts piping.
    pub fn start(&self, entry: Arc<ConnEntry>) {
        let mut connections = self.connections.lock();
        let mut early = self.early_failures.lock();
        if let Some(at) = early.iter().position(|(id, _)| *id == entry.id) {
            let (_, reason) = early.remove(at).expect("found");
            let _ = entry.failure.set(reason);
        }
        connections.insert(entry.id, entry);
    }

    /// [`Traffic::start`], and [`Traffic::finish`] when the returned guard is dropped (for
    /// [`crate::pipe::tracked`]).
    pub fn track(&self, entry: Arc<ConnEntry>) -> Tracking<'_> {
        let id = entry.id;
        self.start(entry);
        Tracking { traffic: self, id }
    }

    /// Unregisters a connection and folds its bytes into its listener's totals.
    pub fn finish(&self, id: u64) {
        let Some(entry) = self.connections.lock().remove(&id) else {
            return;
        };
        let bytes = entry.bytes();
        let mut finished = entry.listener.finished.lock();
        *finished = *finished + bytes;
        entry.listener.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the agent's report that it cannot serve a client that is piping already, or
    /// about to (kept for [`Traffic::start`]; the oldest of [`EARLY_FAILURES`] are forgotten).
    pub fn fail(&self, id: u64, reason: &str) {
        let connections = self.connections.lock();
        match connections.get(&id) {
            Some(entry) => {
                let _ = entry.failure.set(reason.to_string());
            }
            None => {
                let mut early = self.early_failures.lock();
                if early.len() >= EARLY_FAILURES {
                    early.pop_front();
                }
                early.push_back((id, reason.to_string()));
            }
        }
    }

    pub fn connections(&self) -> Vec<Arc<ConnEntry>> {
        let mut v: Vec<_> = self.connections.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Live bytes and active count per listener.
    fn live(&self) -> HashMap<(String, String), (Bytes4, u64)> {
        let mut live: HashMap<(String, String), (Bytes4, u64)> = HashMap::new();
        for c in self.connections.lock().values() {
            let e = live
                .entry((c.listener.site.clone(), c.listener.name.clone()))
                .or_default();
            e.0 = e.0 + c.bytes();
            e.1 += 1;
        }
        live
    }

    /// Per listener: totals, plus the gateway-wide sum.
    pub fn snapshot(&self) -> (Vec<(Arc<ListenerStats>, TrafficSnapshot)>, TrafficSnapshot) {
        let live = self.live();
        let rates = self.listener_rates();
        let mut per = Vec::new();
        let mut total = TrafficSnapshot {
            accepted: 0,
            rejected: 0,
            closed: 0,
            active: 0,
            pending: 0,
            bytes: Bytes4::default(),
            rates: self.rates(),
            udp: None,
        };
        for l in self.listeners() {
            let key = (l.site.clone(), l.name.clone());
            let (live_bytes, active) = live.get(&key).copied().unwrap_or_default();
            let snap = TrafficSnapshot {
                accepted: l.accepted.load(Ordering::Relaxed),
                rejected: l.rejected.load(Ordering::Relaxed),
                closed: l.closed.load(Ordering::Relaxed),
                active,
                pending: l.pending.get() as u64,
                bytes: *l.finished.lock() + live_bytes,
                rates: rates.get(&key).copied().unwrap_or_default(),
                udp: l.udp.snapshot(),
            };
            total.accepted += snap.accepted;
            total.rejected += snap.rejected;
            total.closed += snap.closed;
            total.active += snap.active;
            total.pending += snap.pending;
            total.bytes = total.bytes + snap.bytes;
            per.push((l, snap));
        }
        (per, total)
    }

    /// Records one sample: called every second by the sampler task.
    pub fn sample(&self) {
        let at = Instant::now();
        let (per, total) = self.snapshot();
        {
            let mut samples = self.samples.lock();
            samples.push_back(Sample {
                at,
                bytes: total.bytes,
                active: total.active,
            });
            while samples.len() > HISTORY + 1 {
                samples.pop_front();
            }
        }
        let mut ls = self.listener_samples.lock();
        for (l, snap) in per {
            let q = ls.entry((l.site.clone(), l.name.clone())).or_default();
            q.push_back((at, snap.bytes));
            while q.len() > RATE_WINDOW + 1 {
                q.pop_front();
            }
        }
    }

    /// Gateway-wide rates over the sliding window.
    pub fn rates(&self) -> Rates4 {
        let samples = self.samples.lock();
        if samples.len() < 2 {
            return Rates4::default();
        }
        let (Some(last), Some(first)) = (
            samples.back(),
            samples.iter().rev().nth(RATE_WINDOW.min(samples.len() - 1)),
        ) else {
            return Rates4::default();
        };
        Rates4::over(
            last.bytes - first.bytes,
            last.at.duration_since(first.at).as_secs_f64(),
        )
    }

    fn listener_rates(&self) -> HashMap<(String, String), Rates4> {
        self.listener_samples
            .lock()
            .iter()
            .filter_map(|(k, q)| {
                let (first, last) = (q.front()?, q.back()?);
                Some((
                    k.clone(),
                    Rates4::over(
                        last.1 - first.1,
                        last.0.duration_since(first.0).as_secs_f64(),
                    ),
                ))
            })
            .collect()
    }

    /// Per-second points for the charts.
    pub fn history(&self) -> History {
        let samples = self.samples.lock();
        let mut h = History {
            interval_seconds: 1,
            ..Default::default()
        };
        for pair in samples.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let r = Rates4::over(b.bytes - a.bytes, b.at.duration_since(a.at).as_secs_f64());
            h.client_read.push(r.client_read);
            h.client_written.push(r.client_written);
            h.agent_read.push(r.agent_read);
            h.agent_written.push(r.agent_written);
            h.active.push(b.active);
        }
        h
    }
}

/// Samples `traffic` every second until `stop`.
pub async fn run_sampler(traffic: Arc<Traffic>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => traffic.sample(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(traffic: &Traffic, id: u64) -> Arc<ConnEntry> {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        Arc::new(ConnEntry {
            id,
            listener: traffic.listener("s", "l"),
            client_addr: a,
            gateway_addr: a,
            agent_addr: a,
            started: SystemTime::now(),
            started_at: Instant::now(),
            counters: PipeCounters::default(),
            failure: Default::default(),
        })
    }

    #[test]
    fn finished_and_live_bytes_add_up() {
        let t = Traffic::default();
        let c1 = entry(&t, 1);
        let c2 = entry(&t, 2);
        t.start(c1.clone());
        t.start(c2.clone());
        c1.counters.a_read.fetch_add(100, Ordering::Relaxed);
        c2.counters.b_written.fetch_add(7, Ordering::Relaxed);
        let (_, total) = t.snapshot();
        assert_eq!(
            (
                total.active,
                total.bytes.client_read,
                total.bytes.agent_written
            ),
            (2, 100, 7)
        );
        t.finish(1);
        c1.counters.a_read.fetch_add(1000, Ordering::Relaxed); // after finish: not counted
        let (per, total) = t.snapshot();
        assert_eq!(
            (total.active, total.closed, total.bytes.client_read),
            (1, 1, 100)
        );
        assert_eq!(per.len(), 1);
    }
}
