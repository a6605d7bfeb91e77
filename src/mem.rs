//! Giving freed heap memory back to the kernel after a load peak.
//!
//! glibc's allocator keeps what a program frees for reuse: after 8,000 connections close, a
//! daemon's resident memory stays near its peak although nothing leaked (measured by
//! tests/load.rs: the gateway stayed at ~333 MB). [`trim_after_peaks`] watches a connection
//! count and, once it has fallen well below its peak, asks glibc to release the free memory
//! (`malloc_trim(0)`), so RSS follows the load down. Elsewhere (musl, other systems) it does
//! nothing.

use std::time::Duration;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn malloc_trim(pad: usize) -> std::os::raw::c_int;
}

/// Returns free heap memory to the kernel where the allocator supports it.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a plain integer (bytes of padding to keep) and no pointers; it
    // is thread-safe in glibc (it takes each arena's lock) and only releases memory no
    // allocation refers to, so no Rust object is affected.
    unsafe {
        malloc_trim(0);
    }
}

/// How often at most a fall in the connection count smaller than `min_drop` releases memory.
const SMALL_DROP_INTERVAL: Duration = Duration::from_secs(60);

/// Every second, compares `current()` with its peak since the last trim and releases free
/// memory when [`should_trim`] says so. Runs until the task is dropped.
pub async fn trim_after_peaks(current: impl Fn() -> usize, min_drop: usize) {
    let mut peak = current();
    let mut last = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = current();
        peak = peak.max(now);
        if should_trim(peak, now, min_drop, last.elapsed()) {
            // malloc_trim walks the heap: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            tracing::debug!(
                "connections fell from {peak} to {now}: returned free memory to the system"
            );
            peak = now;
            last = tokio::time::Instant::now();
        }
    }
}

/// Whether a connection count that fell from `peak` (since the last trim, `since` ago) to `now`
/// should release free memory: at once when it fell by at least `min_drop` and to half the
/// peak or less (after a load peak); for a smaller fall to half or less, at most once per
/// [`SMALL_DROP_INTERVAL`]. The second rule was found by bench/soak: a daemon with tens of
/// connections never falls by `min_drop` (256), and after a phase of small socket buffers an
/// agent kept 1.3 MiB (12 % of its RSS) it no longer used for the rest of a 30-minute run.
pub fn should_trim(peak: usize, now: usize, min_drop: usize, since: Duration) -> bool {
    let halved = now <= peak / 2 && now < peak;
    halved && (peak - now >= min_drop || since >= SMALL_DROP_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_fall_to_half_trims_at_once() {
        assert!(should_trim(8000, 100, 256, Duration::ZERO));
        assert!(!should_trim(8000, 4500, 256, Duration::ZERO), "not halved");
        assert!(!should_trim(8000, 7900, 256, Duration::from_secs(3600)));
    }

    #[test]
    fn a_small_fall_to_half_trims_at_most_once_a_minute() {
        assert!(!should_trim(30, 0, 256, Duration::from_secs(59)));
        assert!(should_trim(30, 0, 256, Duration::from_secs(60)));
        assert!(should_trim(30, 12, 256, Duration::from_secs(600)));
        assert!(
            !should_trim(30, 20, 256, Duration::from_secs(600)),
            "not halved"
        );
    }

    #[test]
    fn a_count_that_never_fell_never_trims() {
        assert!(!should_trim(0, 0, 256, Duration::from_secs(600)));
        assert!(!should_trim(12, 12, 256, Duration::from_secs(600)));
    }
}
