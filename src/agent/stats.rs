//! The agent's counters: per listener, the clients gateways offered it, those it served, those
//! it could not (backend unreachable, data connection failed), bytes both ways and the active
//! count; per outcome, the outbound proxy's requests. Read by the admin API and `/metrics`;
//! never written to disk.
//!
//! Bytes live in each connection's [`PipeCounters`] (atomics the pipe bumps per chunk). A
//! connection registers them once when it starts piping and folds them into its listener's
//! totals once when it ends ([`Serving`]), so the data path takes no lock per chunk and a
//! long transfer shows in the totals while it runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::pipe::PipeCounters;

/// Every counter of one agent.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// By listener name; a listener's counters outlive its removal by a reload (they stay
    /// in the totals).
    listeners: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    pub outbound: OutboundStats,
    /// Offers refused before any connection was made, by reason (`agent::limits`).
    pub refused: RefusalStats,
    /// The backends of listeners that have several, and their health ([`super::backends`]).
    pub backends: Arc<super::backends::Registry>,
}

/// Why the agent refused a gateway's offer before dialing anything: one counter each, all
/// reported (zeros too) so the metric's label set is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `limits.offers_per_second` (the token bucket was empty).
    Rate,
    /// `limits.max_data_connections` of this gateway in use.
    DataConnections,
    /// `limits.max_backend_connections` of this gateway in use.
    BackendConnections,
    /// `limits.max_backend_connections_per_listener` in use.
    ListenerBackendConnections,
    /// The offer names a listener this agent does not have.
    UnknownListener,
    /// The offer's port offset is outside the listener's range.
    BadPort,
    /// Every backend of the listener fails its health checks (`health`): another agent of
    /// the site may reach one ([`super::backends`]).
    NoHealthyBackend,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Rate,
        Refusal::DataConnections,
        Refusal::BackendConnections,
        Refusal::ListenerBackendConnections,
        Refusal::UnknownListener,
        Refusal::BadPort,
        Refusal::NoHealthyBackend,
    ];

    /// The key in `/api/stats` and the `reason` label in `/metrics`.
    pub fn key(self) -> &'static str {
        match self {
            Refusal::Rate => "rate",
            Refusal::DataConnections => "data_connections",
            Refusal::BackendConnections => "backend_connections",
            Refusal::ListenerBackendConnections => "listener_backend_connections",
            Refusal::UnknownListener => "unknown_listener",
            Refusal::BadPort => "bad_port",
            Refusal::NoHealthyBackend => "no_healthy_backend",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL
            .iter()
            .position(|r| *r == self)
            .expect("ALL lists every reason")
    }
}

/// Refused offers by reason.
#[derive(Debug, Default)]
pub struct RefusalStats([AtomicU64; Refusal::ALL.len()]);

impl RefusalStats {
    pub fn count(&self, why: Refusal) {
        self.0[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason's count, by key.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        Refusal::ALL
            .iter()
            .map(|r| {
                (
                    r.key().to_string(),
                    self.0[r.index()].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

impl AgentStats {
    /// The counters of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        let mut all = self.listeners.lock();
        if let Some(l) = all.get(name) {
            return l.clone();
        }
        let l = Arc::new(ListenerStats::default());
        all.insert(name.to_string(), l.clone());
        l
    }

    /// Every listener's counters, by name.
    pub fn snapshot(&self) -> Vec<(String, ListenerSnapshot)> {
        let all: Vec<_> = self
            .listeners
            .lock()
            .iter()
            .map(|(n, l)| (n.clone(), l.clone()))
            .collect();
        all.into_iter().map(|(n, l)| (n, l.snapshot())).collect()
    }
}

/// One listener's counters.
#[derive(Debug, Default)]
pub struct ListenerStats {
    offered: AtomicU64,
    served: AtomicU64,
    backend_failures: AtomicU64,
    data_failures: AtomicU64,
    active: AtomicU64,
    /// Bytes of connections that ended.
    finished: Mutex<Bytes>,
    /// Connections piping now, with the length of the PROXY header each wrote to its backend
    /// (not client bytes).
    live: Mutex<HashMap<u64, (Arc<PipeCounters>, u64)>>,
    next_live: AtomicU64,
    last_failure: Mutex<Option<Failure>>,
}

/// Bytes of client payload, as the agent moved them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// Written to the backend (without any PROXY header).
    pub from_client: u64,
    /// Written to the data connection, towards the client.
    pub to_client: u64,
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, o: Bytes) {
        self.from_client += o.from_client;
        self.to_client += o.to_client;
    }
}

/// The last client a listener could not serve, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Unix seconds.
    pub at: u64,
    pub error: String,
}

/// A listener's counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSnapshot {
    /// Clients a gateway offered this agent (announced, or handed over a warm-pool connection).
    pub offered: u64,
    /// Clients piped to their backend.
    pub served: u64,
    /// Clients whose backend could not be reached.
    pub backend_failures: u64,
    /// Clients whose data connection to the gateway could not be opened.
    pub data_failures: u64,
    /// Clients piping now.
    pub active: u64,
    pub bytes: Bytes,
    pub last_failure: Option<Failure>,
}

/// Bytes of a pipe whose side `a` is the backend and side `b` the data connection.
fn pipe_bytes(c: &PipeCounters, header: u64) -> Bytes {
    let s = c.snapshot();
    Bytes {
        from_client: s.a_written.saturating_sub(header),
        to_client: s.b_written,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ListenerStats {
    pub fn offered(&self) {
        self.offered.fetch_add(1, Ordering::Relaxed);
    }

    pub fn backend_failed(&self, error: &str) {
        self.backend_failures.fetch_add(1, Ordering::Relaxed);
        self.remember(error);
    }

    pub fn data_failed(&self, error: &str) {
        self.data_failures.fetch_add(1, Ordering::Relaxed);
        self.remember(error);
    }

    fn remember(&self, error: &str) {
        *self.last_failure.lock() = Some(Failure {
            at: unix_now(),
            error: error.to_string(),
        });
    }

    /// A client served by the embedding application: counted, its bytes are the application's.
    pub fn served_locally(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// A client starts piping through `counters` (`a` = backend, `b` = data connection) after
    /// a PROXY header of `header` bytes; its bytes count until the returned guard drops.
    pub fn serving(self: &Arc<Self>, counters: Arc<PipeCounters>, header: u64) -> Serving {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        let key = self.next_live.fetch_add(1, Ordering::Relaxed);
        self.live.lock().insert(key, (counters, header));
        Serving {
            listener: self.clone(),
            key,
        }
    }

    pub fn snapshot(&self) -> ListenerSnapshot {
        let mut bytes = *self.finished.lock();
        for (c, header) in self.live.lock().values() {
            bytes += pipe_bytes(c, *header);
        }
        ListenerSnapshot {
            offered: self.offered.load(Ordering::Relaxed),
            served: self.served.load(Ordering::Relaxed),
            backend_failures: self.backend_failures.load(Ordering::Relaxed),
            data_failures: self.data_failures.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            bytes,
            last_failure: self.last_failure.lock().clone(),
        }
    }
}

/// A connection piping now; dropping it folds its bytes into the listener's totals.
#[derive(Debug)]
pub struct Serving {
    listener: Arc<ListenerStats>,
    key: u64,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let l = &self.listener;
        let gone = l.live.lock().remove(&self.key);
        if let Some((c, header)) = gone {
            *l.finished.lock() += pipe_bytes(&c, header);
        }
        l.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How an outbound proxy request ended: one counter each, all reported (zeros too) so the
/// metric's label set is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundOutcome {
    /// A gateway dialed the destination; the client is piped.
    Connected,
    /// Refused by the gateway's `[egress]` list.
    Denied,
    Unreachable,
    Timeout,
    /// No gateway connected.
    NoGateway,
    Failed,
    /// The client's address is refused by `[outbound] clients`.
    Refused,
    /// Missing or wrong proxy credentials.
    AuthFailed,
    /// Not SOCKS5 or HTTP CONNECT, or a malformed request.
    BadRequest,
}

impl OutboundOutcome {
    pub const ALL: [OutboundOutcome; 9] = [
        OutboundOutcome::Connected,
        OutboundOutcome::Denied,
        OutboundOutcome::Unreachable,
        OutboundOutcome::Timeout,
        OutboundOutcome::NoGateway,
        OutboundOutcome::Failed,
        OutboundOutcome::Refused,
        OutboundOutcome::AuthFailed,
        OutboundOutcome::BadRequest,
    ];

    /// The key in `/api/stats` and the `outcome` label in `/metrics`.
    pub fn key(self) -> &'static str {
        match self {
            OutboundOutcome::Connected => "connected",
            OutboundOutcome::Denied => "denied",
            OutboundOutcome::Unreachable => "unreachable",
            OutboundOutcome::Timeout => "timeout",
            OutboundOutcome::NoGateway => "no_gateway",
            OutboundOutcome::Failed => "failed",
            OutboundOutcome::Refused => "refused",
            OutboundOutcome::AuthFailed => "auth_failed",
            OutboundOutcome::BadRequest => "bad_request",
        }
    }
}

/// The outbound proxy's counters.
#[derive(Debug, Default)]
pub struct OutboundStats {
    requests: [AtomicU64; OutboundOutcome::ALL.len()],
    /// Clients piping through a gateway now.
    active: AtomicU64,
}

/// The outbound proxy's counters at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundSnapshot {
    /// Requests by outcome key.
    pub requests: BTreeMap<String, u64>,
    pub active: u64,
}

impl OutboundStats {
    pub fn count(&self, outcome: OutboundOutcome) {
        let i = OutboundOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .expect("ALL lists every outcome");
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A client piping through a gateway until the returned guard drops.
    pub fn piping(&self) -> OutboundPiping<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        OutboundPiping(&self.active)
    }

    pub fn snapshot(&self) -> OutboundSnapshot {
        OutboundSnapshot {
            requests: OutboundOutcome::ALL
                .iter()
                .zip(&self.requests)
                .map(|(o, n)| (o.key().to_string(), n.load(Ordering::Relaxed)))
                .collect(),
            active: self.active.load(Ordering::Relaxed),
        }
    }
}

/// An outbound client piping now.
pub struct OutboundPiping<'a>(&'a AtomicU64);

impl Drop for OutboundPiping<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_bytes_count_while_piping_and_stay_after() {
        let stats = AgentStats::default();
        let l = stats.listener("web");
        l.offered();
        let counters = Arc::new(PipeCounters::default());
        let serving = l.serving(counters.clone(), 38);
        // The PROXY header (38 bytes) went to the backend first: not client bytes.
        counters.a_written.store(38 + 100, Ordering::Relaxed);
        counters.b_written.store(5000, Ordering::Relaxed);
        let s = stats.listener("web").snapshot();
        assert_eq!((s.served, s.active), (1, 1));
        assert_eq!((s.bytes.from_client, s.bytes.to_client), (100, 5000));
        counters.b_written.store(6000, Ordering::Relaxed);
        drop(serving);
        let s = l.snapshot();
        assert_eq!(s.active, 0);
        assert_eq!((s.bytes.from_client, s.bytes.to_client), (100, 6000));
        l.backend_failed("backend 10.0.0.5:22 unreachable");
        let s = l.snapshot();
        assert_eq!(s.backend_failures, 1);
        assert!(s.last_failure.unwrap().error.contains("10.0.0.5:22"));
        assert_eq!(stats.snapshot().len(), 1);
    }

    #[test]
    fn every_outbound_outcome_is_reported() {
        let o = OutboundStats::default();
        o.count(OutboundOutcome::Denied);
        o.count(OutboundOutcome::Denied);
        let s = o.snapshot();
        assert_eq!(s.requests.len(), OutboundOutcome::ALL.len());
        assert_eq!(s.requests["denied"], 2);
        assert_eq!(s.requests["connected"], 0);
        let piping = o.piping();
        assert_eq!(o.snapshot().active, 1);
        drop(piping);
        assert_eq!(o.snapshot().active, 0);
    }
}
