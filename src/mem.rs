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

/// Every second, compares `current()` with its peak since the last trim: when the count has
/// fallen by at least `min_drop` and to half the peak or less, releases free memory. Runs
/// until the task is dropped.
pub async fn trim_after_peaks(current: impl Fn() -> usize, min_drop: usize) {
    let mut peak = current();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = current();
        peak = peak.max(now);
        if peak - now >= min_drop && now <= peak / 2 {
            // malloc_trim walks the heap: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            tracing::debug!(
                "connections fell from {peak} to {now}: returned free memory to the system"
            );
            peak = now;
        }
    }
}
