//! Giving freed heap memory back to the kernel after a load peak.
//!
//! glibc's allocator keeps what a program frees for reuse: after 8,000 connections close, a
//! daemon's resident memory stays near its peak although nothing leaked (measured by
//! tests/load.rs: the gateway stayed at ~333 MB). [`trim_after_peaks`] watches a connection
//! count and, once it has fallen well below its peak, asks glibc to release the free memory
//! (`malloc_trim(0)`), so RSS follows the load down. Elsewhere (musl, other systems) it does
//! nothing.
//!
//! [`MemoryFigures`] splits resident memory the way an operator needs to tell a leak from
//! the rest: anonymous (heap, stacks) versus file-backed (the executable's pages, which the
//! kernel can drop), and, inside the heap, what is allocated versus what the allocator keeps
//! free for reuse. Both daemons export them in `/metrics`.

use std::time::Duration;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn malloc_trim(pad: usize) -> std::os::raw::c_int;
}

/// Where the process's memory is, in bytes; `None` where the system does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Resident set (`VmRSS`).
    pub resident: Option<u64>,
    /// Resident anonymous memory (`RssAnon`): the heap, thread stacks.
    pub resident_anonymous: Option<u64>,
    /// Resident file-backed memory (`RssFile`): the executable and libraries.
    pub resident_file: Option<u64>,
    /// Heap bytes in allocated blocks (glibc `mallinfo2`: `uordblks` + `hblkhd`).
    pub heap_allocated: Option<u64>,
    /// Heap bytes the allocator holds free for reuse (`fordblks`).
    pub heap_free: Option<u64>,
}

impl MemoryFigures {
    /// Reads `/proc/self/status` and asks the allocator.
    // The crate denies unsafe code; this FFI call is allowed with its SAFETY proof below.
    #[allow(unsafe_code)]
    pub fn read() -> Self {
        let mut figures = MemoryFigures::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            figures.resident = status_kib(&status, "VmRSS:");
            figures.resident_anonymous = status_kib(&status, "RssAnon:");
            figures.resident_file = status_kib(&status, "RssFile:");
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value; glibc
            // takes each arena's lock while it sums, so it is safe to call from any thread.
            let info = unsafe { libc::mallinfo2() };
            figures.heap_allocated = Some((info.uordblks + info.hblkhd) as u64);
            figures.heap_free = Some(info.fordblks as u64);
        }
        figures
    }
}

/// The value of a `Key:   123 kB` line of `/proc/self/status`, in bytes.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Returns free heap memory to the kernel where the allocator supports it.
// The crate denies unsafe code; this FFI call is allowed with its SAFETY proof below.
#[allow(unsafe_code)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_in_bytes() {
        let status =
            "Name:\tsallyport\nVmRSS:\t   12252 kB\nRssAnon:\t    2972 kB\nRssFile:\t9344 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(12252 * 1024));
        assert_eq!(status_kib(status, "RssAnon:"), Some(2972 * 1024));
        assert_eq!(status_kib(status, "RssShmem:"), None);
    }

    #[test]
    fn this_process_has_figures_that_add_up() {
        let f = MemoryFigures::read();
        let (rss, anon, file) = (
            f.resident.unwrap(),
            f.resident_anonymous.unwrap(),
            f.resident_file.unwrap(),
        );
        assert!(rss > 0 && anon > 0 && file > 0);
        // RssShmem is the third part; a test process has none or little.
        assert!(anon + file <= rss, "{anon} + {file} > {rss}");
        let keep: Vec<u8> = vec![7; 1 << 20];
        let g = MemoryFigures::read();
        assert!(g.heap_allocated.unwrap() >= 1 << 20, "{g:?}");
        drop(keep);
    }
}
