//! Gateway counters: plain atomics bumped by the code that moves the numbers, read by logs (and
//! the admin API) without locking anything on the data path. Refusals are [`Event`]s, so their
//! log lines are rate limited where they are counted.

use std::sync::atomic::AtomicU64;

use crate::limits::Event;

#[derive(Debug)]
pub struct GatewayStats {
    /// Clients accepted on a public listener and offered to an agent.
    pub clients_accepted: AtomicU64,
    /// Clients refused by a listener's client rules.
    pub clients_rejected: Event,
    /// Clients refused by a limit (connections in total or per IP, pending clients).
    pub clients_over_limit: Event,
    /// Clients closed because no data connection claimed them before their deadline.
    pub clients_unclaimed: Event,
    /// Clients closed because the agent reported it could not serve them.
    pub clients_failed: Event,
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
}

impl Default for GatewayStats {
    fn default() -> Self {
        GatewayStats {
            clients_accepted: AtomicU64::new(0),
            clients_rejected: Event::some_per_10s(),
            clients_over_limit: Event::once_per_10s(),
            clients_unclaimed: Event::some_per_10s(),
            clients_failed: Event::some_per_10s(),
            data_refused: Event::some_per_10s(),
            peers_denied: Event::some_per_10s(),
            bad_hellos: Event::some_per_10s(),
            tls_failures: Event::some_per_10s(),
            handshakes_over_limit: Event::once_per_10s(),
        }
    }
}
