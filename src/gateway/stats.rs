//! Gateway counters: plain atomics, bumped by the code that moves the numbers, read by logs
//! (and later the admin API) without locking anything on the data path.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Clients accepted on a public listener and offered to an agent.
    pub clients_accepted: AtomicU64,
    /// Clients refused by a listener's rules or limits.
    pub clients_rejected: AtomicU64,
    /// Clients closed because no data connection claimed them before their deadline.
    pub clients_unclaimed: AtomicU64,
    /// Clients closed because the agent reported it could not serve them.
    pub clients_failed: AtomicU64,
    /// Data connections refused: unknown, expired or reused id, or a wrong token.
    pub data_refused: AtomicU64,
    /// Control-port connections refused by `[peers]`.
    pub peers_denied: AtomicU64,
    /// Control-port connections dropped for a bad preamble, hello or version.
    pub bad_hellos: AtomicU64,
}

/// Adds one and returns the new total, for "(N so far)" in log lines.
pub fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::Relaxed) + 1
}
