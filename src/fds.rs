//! The process's file descriptors as a budget: how many it may open (the `RLIMIT_NOFILE` soft
//! limit, read at start), how many are open (counted in `/proc/self/fd` a few times a second,
//! plus what was admitted since), and a reserve that new connections from strangers may not
//! take. At the limit the admin API, the control port and established connections keep working,
//! because new clients are refused before the last descriptors go, instead of the kernel
//! refusing accept() for everyone (issue 12, item 4).
//!
//! Nothing here opens or closes sockets; callers ask [`FdBudget::admit`] before they accept or
//! dial, and refuse when it says no.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the open descriptors are counted.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// What each kind of use costs, for callers and for the operations guide.
pub const PER_LISTEN_PORT: usize = 1;
/// A piping client: its socket and the agent's data connection.
pub const PER_CLIENT: usize = 2;

#[derive(Debug)]
pub struct FdBudget {
    /// The soft open-files limit at start.
    limit: usize,
    /// Kept free of new clients and strangers' handshakes: for the admin API, agents, logging,
    /// name resolution.
    reserve: usize,
    /// Open descriptors at the last count.
    sampled: AtomicUsize,
    /// Admitted since the last count (the next count sees them).
    since: AtomicUsize,
}

impl FdBudget {
    /// A budget for `limit` descriptors, keeping a sixteenth (at least 64) in reserve.
    pub fn new(limit: usize) -> Self {
        FdBudget {
            limit,
            reserve: (limit / 16).max(64),
            sampled: AtomicUsize::new(count_open().unwrap_or(0)),
            since: AtomicUsize::new(0),
        }
    }

    /// The budget of this process: its `RLIMIT_NOFILE` soft limit.
    pub fn of_process() -> Self {
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        FdBudget::new(usize::try_from(limit).unwrap_or(usize::MAX).min(1 << 24))
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// Descriptors believed open right now.
    pub fn in_use(&self) -> usize {
        self.sampled.load(Ordering::Relaxed) + self.since.load(Ordering::Relaxed)
    }

    /// Whether `cost` more descriptors fit while leaving the reserve free; if so they are
    /// counted until the next sample. `trusted` callers (agents' own connections) may use half
    /// of the reserve.
    pub fn admit(&self, cost: usize, trusted: bool) -> bool {
        let keep = if trusted {
            self.reserve / 2
        } else {
            self.reserve
        };
        if self.in_use() + cost + keep > self.limit {
            return false;
        }
        self.since.fetch_add(cost, Ordering::Relaxed);
        true
    }

    /// Counts the open descriptors every [`SAMPLE_EVERY`] until `stop`.
    pub async fn sample_until(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            }
            let counted = tokio::task::spawn_blocking(count_open).await.ok().flatten();
            if let Some(n) = counted {
                self.sampled.store(n, Ordering::Relaxed);
                self.since.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Open descriptors of this process (Linux: the entries of `/proc/self/fd`, minus the one the
/// listing itself holds); `None` where that cannot be read.
fn count_open() -> Option<usize> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(entries.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_until_the_reserve() {
        let budget = FdBudget {
            limit: 1000,
            reserve: 100,
            sampled: AtomicUsize::new(800),
            since: AtomicUsize::new(0),
        };
        assert!(budget.admit(PER_CLIENT, false));
        assert_eq!(budget.in_use(), 802);
        budget.since.store(99, Ordering::Relaxed);
        assert!(
            !budget.admit(PER_CLIENT, false),
            "strangers stop at the reserve"
        );
        assert!(budget.admit(PER_CLIENT, true), "agents may use half of it");
        assert!(count_open().unwrap_or(1) > 0);
    }
}
