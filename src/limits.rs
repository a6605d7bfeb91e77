//! Bounds on what peers and clients can make a daemon hold, and log lines that cannot flood.
//!
//! - [`ConnLimiter`]: at most N connections in total and M per source address (an IPv4 address,
//!   or an IPv6 /64: [`limit_key`]), optionally keeping part of the total for trusted addresses;
//!   a permit is released when dropped, however the connection ends.
//! - [`Gauge`]: a plain bounded count (pending clients per listener, in total).
//! - [`Event`]: a counter with a rate-limited log: the first few occurrences are logged, then at
//!   most one line per interval saying how many were suppressed meanwhile.
//!
//! Nothing here closes sockets or writes logs itself; callers do, with their own context.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::access::canonical;

/// Which bound was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Total(usize),
    PerIp(usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Total(n) => write!(f, "the limit of {n} in total"),
            Exceeded::PerIp(n) => write!(f, "the limit of {n} per IP address"),
        }
    }
}

/// The key a per-address limit counts under: the IPv4 address (IPv4-mapped IPv6 included), or
/// the /64 of an IPv6 address. One host or customer usually holds a whole /64, so a limit per
/// single IPv6 address would be no limit at all.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

/// Counts open connections in total and per source address ([`limit_key`]).
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    /// Places of the total only trusted callers may take (see [`ConnLimiter::try_acquire_for`]).
    reserved: AtomicUsize,
    inner: Arc<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    ip: IpAddr,
    state: Arc<LimiterState>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut per_ip = self.state.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.state.total.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        ConnLimiter {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            reserved: AtomicUsize::new(0),
            inner: Arc::default(),
        }
    }

    /// Keeps `reserved` places of the total for trusted callers: strangers can fill at most
    /// `max_total - reserved`.
    pub fn set_reserved(&self, reserved: usize) {
        self.reserved.store(reserved, Ordering::Relaxed);
    }

    /// New bounds (a reload); connections already admitted stay.
    pub fn set_limits(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnPermit, Exceeded> {
        self.try_acquire_for(ip, false)
    }

    /// Like [`ConnLimiter::try_acquire`]; a `trusted` caller may also take the reserved places.
    pub fn try_acquire_for(&self, ip: IpAddr, trusted: bool) -> Result<ConnPermit, Exceeded> {
        let ip = limit_key(ip);
        let (max_total, max_per_ip) = (
            self.max_total.load(Ordering::Relaxed),
            self.max_per_ip.load(Ordering::Relaxed),
        );
        let open_to_caller = if trusted {
            max_total
        } else {
            max_total.saturating_sub(self.reserved.load(Ordering::Relaxed))
        };
        let mut per_ip = self.inner.per_ip.lock();
        if self.inner.total.load(Ordering::Relaxed) >= open_to_caller {
            return Err(Exceeded::Total(open_to_caller));
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            return Err(Exceeded::PerIp(max_per_ip));
        }
        *n += 1;
        self.inner.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPermit {
            ip,
            state: self.inner.clone(),
        })
    }

    pub fn current(&self) -> usize {
        self.inner.total.load(Ordering::Relaxed)
    }
}

/// A bounded count with permits.
#[derive(Debug, Default)]
pub struct Gauge {
    value: Arc<AtomicUsize>,
}

#[derive(Debug)]
pub struct GaugePermit(Arc<AtomicUsize>);

impl Drop for GaugePermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `n` places of a [`Gauge`], given back together when dropped.
#[derive(Debug)]
pub struct GaugePermits(Arc<AtomicUsize>, usize);

impl Drop for GaugePermits {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::Relaxed);
    }
}

impl Gauge {
    /// Takes `n` places if that keeps the count at or below `max`.
    pub fn try_acquire_many(&self, n: usize, max: usize) -> Option<GaugePermits> {
        self.value
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v + n <= max).then_some(v + n)
            })
            .ok()
            .map(|_| GaugePermits(self.value.clone(), n))
    }

    /// Takes a place if fewer than `max` are taken.
    pub fn try_acquire(&self, max: usize) -> Option<GaugePermit> {
        self.value
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v < max).then_some(v + 1)
            })
            .ok()
            .map(|_| GaugePermit(self.value.clone()))
    }

    pub fn get(&self) -> usize {
        self.value.load(Ordering::Relaxed)
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A counted event whose log lines are rate limited.
#[derive(Debug)]
pub struct Event {
    count: AtomicU64,
    burst: u64,
    interval_ms: u64,
    /// Start of the current window, in ms since process start.
    window_start: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

/// What a caller needs to write a log line for an event, when it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    /// Total occurrences so far, this one included.
    pub total: u64,
    /// Whether to log this occurrence.
    pub log: bool,
    /// Occurrences not logged since the last logged one.
    pub suppressed: u64,
}

impl Occurrence {
    /// ` (N so far)` or ` (N so far, M not logged)` for the end of a log line.
    pub fn tally(&self) -> String {
        if self.suppressed > 0 {
            format!(
                " ({} so far; {} more not logged)",
                self.total, self.suppressed
            )
        } else {
            format!(" ({} so far)", self.total)
        }
    }
}

impl Event {
    /// Logs up to `burst` occurrences per `interval`.
    pub const fn new(burst: u64, interval: Duration) -> Self {
        Event {
            count: AtomicU64::new(0),
            burst,
            interval_ms: interval.as_millis() as u64,
            window_start: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// For limits: one line per 10 s.
    pub const fn once_per_10s() -> Self {
        Event::new(1, Duration::from_secs(10))
    }

    /// For refusals a test or an operator wants to see individually, until they flood: 20 lines
    /// per 10 s.
    pub const fn some_per_10s() -> Self {
        Event::new(20, Duration::from_secs(10))
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Records one occurrence.
    pub fn hit(&self) -> Occurrence {
        let total = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= self.interval_ms
            && self
                .window_start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < self.burst {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            Occurrence {
                total,
                log: true,
                suppressed,
            }
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            Occurrence {
                total,
                log: false,
                suppressed: 0,
            }
        }
    }
}

impl Default for Event {
    fn default() -> Self {
        Event::some_per_10s()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_limits_total_and_per_ip() {
        let limiter = ConnLimiter::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = limiter.try_acquire(a).unwrap();
        let _p2 = limiter.try_acquire(a).unwrap();
        assert_eq!(limiter.try_acquire(a).unwrap_err(), Exceeded::PerIp(2));
        // The same address seen as IPv4-mapped IPv6 counts as the same client.
        assert!(limiter
            .try_acquire("::ffff:10.0.0.1".parse().unwrap())
            .is_err());
        let _p3 = limiter.try_acquire(b).unwrap();
        assert_eq!(limiter.try_acquire(b).unwrap_err(), Exceeded::Total(3));
        drop(p1);
        assert!(limiter.try_acquire(b).is_ok());
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_trusted_callers_keep_a_reserve() {
        let limiter = ConnLimiter::new(10, 2);
        let _a = limiter
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        let _b = limiter
            .try_acquire("2001:db8:1:2::ffff".parse().unwrap())
            .unwrap();
        // A third address of the same /64 is the same client.
        assert_eq!(
            limiter
                .try_acquire("2001:db8:1:2:aaaa::7".parse().unwrap())
                .unwrap_err(),
            Exceeded::PerIp(2)
        );
        assert!(limiter
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_ok());

        let limiter = ConnLimiter::new(4, 4);
        limiter.set_reserved(1);
        let stranger: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| limiter.try_acquire(stranger).unwrap())
            .collect();
        assert_eq!(
            limiter.try_acquire(stranger).unwrap_err(),
            Exceeded::Total(3)
        );
        let agent: IpAddr = "10.0.0.2".parse().unwrap();
        let _reserved = limiter.try_acquire_for(agent, true).unwrap();
        assert!(limiter.try_acquire_for(agent, true).is_err());
        drop(held);
    }

    #[test]
    fn gauge_bounds() {
        let g = Gauge::default();
        let a = g.try_acquire(2).unwrap();
        let _b = g.try_acquire(2).unwrap();
        assert!(g.try_acquire(2).is_none());
        drop(a);
        assert_eq!(g.get(), 1);
        assert!(g.try_acquire(2).is_some());
    }

    #[test]
    fn events_log_a_burst_then_summarize() {
        let e = Event::new(2, Duration::from_secs(3600));
        let logged: Vec<bool> = (0..5).map(|_| e.hit().log).collect();
        assert_eq!(logged, [true, true, false, false, false]);
        assert_eq!(e.count(), 5);
    }
}
