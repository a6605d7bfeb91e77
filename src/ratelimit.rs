//! Rate limits at the edge (issue 17 item 3): token buckets for bytes per second and for new
//! connections per second, and the text forms operators write them in.
//!
//! Rules:
//! - A bucket fills at its rate up to its burst and starts full. Bytes are taken *after* they
//!   were read (the bucket may go into debt by one read); the reader then waits until the debt
//!   is paid before it reads again. So the long-run rate is the set rate whatever the read
//!   sizes, and a pipe reads at most [`TokenBucket::max_read`] bytes at a time so a single read
//!   never runs far ahead.
//! - The burst of a byte bucket is a tenth of a second of its rate (at least 16 KiB): over a
//!   10 s transfer the start-up burst is under 1 % of the bytes.
//! - A connection bucket's burst is one second of its rate: `20/s` admits 20 at once, then one
//!   every 50 ms.
//! - Several buckets can apply to one direction (the client's own and its listener's): every
//!   read is taken from each, and the reader waits for the slowest.
//! - Datagrams (UDP flows) are never delayed: one passes whole if every bucket of its
//!   direction holds its size (or, for one larger than a bucket's burst, the whole burst, which
//!   leaves a debt), and is dropped otherwise ([`Throttle::try_pass`]). The long-run rate is
//!   still the set rate.
//! - Per-address connection buckets ([`PerIpRate`]) are keyed like connection limits
//!   ([`crate::limits::limit_key`]: an IPv4 address or an IPv6 /64) and bounded in number:
//!   full (idle) buckets are dropped when the table reaches 100,000 addresses, and all of them
//!   if none is idle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::limits::limit_key;

/// The smallest burst of a byte bucket.
const MIN_BYTE_BURST: f64 = 16.0 * 1024.0;
/// Addresses a [`PerIpRate`] tracks before it drops its idle ones.
const PER_IP_MAX: usize = 100_000;

/// A token bucket, shared by whatever it limits.
#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket of `rate` tokens per second holding at most `burst`, full.
    pub fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// A bucket for `bytes_per_sec` (burst: a tenth of a second of it, at least 16 KiB).
    pub fn bytes(bytes_per_sec: u64) -> Arc<Self> {
        let rate = bytes_per_sec as f64;
        Arc::new(TokenBucket::new(rate, (rate / 10.0).max(MIN_BYTE_BURST)))
    }

    /// The most a reader under this bucket should read at once.
    pub fn max_read(&self) -> usize {
        self.burst as usize
    }

    fn refill(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.rate).min(self.burst);
        state.1 = now;
    }

    /// Takes `n` tokens, into debt if need be; how long to wait until the debt is paid.
    pub fn take(&self, n: usize) -> Duration {
        let mut state = self.state.lock();
        self.refill(&mut state, Instant::now());
        state.0 -= n as f64;
        if state.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.0 / self.rate)
        }
    }

    /// Takes `n` tokens if the bucket holds them, or holds its whole burst (`n` larger than the
    /// burst then passes alone and leaves a debt); never waits.
    pub fn try_take(&self, n: usize) -> bool {
        let mut state = self.state.lock();
        self.refill(&mut state, Instant::now());
        if state.0 >= (n as f64).min(self.burst) {
            state.0 -= n as f64;
            true
        } else {
            false
        }
    }

    /// Returns `n` tokens taken by a [`Self::try_take`] whose datagram did not go after all.
    fn give_back(&self, n: usize) {
        let mut state = self.state.lock();
        state.0 = (state.0 + n as f64).min(self.burst);
    }

    /// Takes one token if there is one (never into debt).
    pub fn try_take_one(&self) -> bool {
        let mut state = self.state.lock();
        self.refill(&mut state, Instant::now());
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The buckets one direction of a pipe is under (none: unlimited).
#[derive(Debug, Clone, Default)]
pub struct Throttle(Vec<Arc<TokenBucket>>);

impl Throttle {
    pub fn new(buckets: Vec<Arc<TokenBucket>>) -> Self {
        Throttle(buckets)
    }

    pub fn is_unlimited(&self) -> bool {
        self.0.is_empty()
    }

    /// How much to read at most, given a buffer of `len`.
    pub fn read_cap(&self, len: usize) -> usize {
        self.0
            .iter()
            .map(|b| b.max_read())
            .fold(len, usize::min)
            .max(1)
    }

    /// Takes `n` bytes from every bucket and waits for the slowest.
    pub async fn pass(&self, n: usize) {
        let wait = self.0.iter().map(|b| b.take(n)).max().unwrap_or_default();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Throttle {
    /// Takes `n` bytes (one datagram) from every bucket if each has them; otherwise takes
    /// nothing and says no: the datagram is dropped, never delayed or split.
    pub fn try_pass(&self, n: usize) -> bool {
        for (i, bucket) in self.0.iter().enumerate() {
            if !bucket.try_take(n) {
                self.0[..i].iter().for_each(|b| b.give_back(n));
                return false;
            }
        }
        true
    }
}

/// The throttles of both directions of a pipe between `a` and `b`.
#[derive(Debug, Clone, Default)]
pub struct PipeThrottle {
    /// Bytes read from `a` (written to `b`).
    pub a_to_b: Throttle,
    /// Bytes read from `b` (written to `a`).
    pub b_to_a: Throttle,
}

/// New connections per second per source address.
#[derive(Debug)]
pub struct PerIpRate {
    per_sec: f64,
    buckets: Mutex<HashMap<IpAddr, Arc<TokenBucket>>>,
}

impl PerIpRate {
    /// A rate of `per_hour` connections per hour, with a burst of one second of it (at least 1).
    pub fn hourly(per_hour: u64) -> Self {
        PerIpRate::new(per_hour as f64 / 3600.0)
    }

    pub fn new(per_sec: f64) -> Self {
        PerIpRate {
            per_sec,
            buckets: Mutex::default(),
        }
    }

    /// Whether a new connection from `ip` is within the rate (and counts it if so).
    pub fn admit(&self, ip: IpAddr) -> bool {
        let bucket = {
            let mut buckets = self.buckets.lock();
            if buckets.len() >= PER_IP_MAX {
                // Idle addresses are back to a full bucket: forgetting them changes nothing.
                // If every one is busy (a storm from 100,000 addresses), all are forgotten.
                buckets.retain(|_, b| !b.is_full());
                if buckets.len() >= PER_IP_MAX {
                    buckets.clear();
                }
            }
            buckets
                .entry(limit_key(ip))
                .or_insert_with(|| {
                    let burst = self.per_sec.max(1.0);
                    Arc::new(TokenBucket::new(self.per_sec, burst))
                })
                .clone()
        };
        bucket.try_take_one()
    }
}

impl TokenBucket {
    fn is_full(&self) -> bool {
        let mut state = self.state.lock();
        self.refill(&mut state, Instant::now());
        state.0 >= self.burst
    }
}

/// Parses `20/s`, `600/min`, `5/h`: connections per hour (a whole number for each unit).
pub fn parse_conn_rate(s: &str) -> Result<u64, String> {
    let (count, per) = s
        .split_once('/')
        .ok_or_else(|| format!("expected a count per time such as \"20/s\", found \"{s}\""))?;
    let count: u64 = count
        .trim()
        .parse()
        .map_err(|_| format!("\"{count}\" is not a whole number of connections"))?;
    let per_hour = match per.trim() {
        "s" | "sec" | "second" => 3600,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 1,
        o => return Err(format!("unknown unit \"{o}\": use /s, /min or /h")),
    };
    if count == 0 || count > 1_000_000 {
        return Err(format!("{count} is out of range (1 to 1000000)"));
    }
    Ok(count * per_hour)
}

/// Parses `8MiB/s`, `100MB/s`, `512KiB/s`, `1000000B/s`: bytes per second.
pub fn parse_byte_rate(s: &str) -> Result<u64, String> {
    let amount = s
        .strip_suffix("/s")
        .ok_or_else(|| format!("expected bytes per second such as \"8MiB/s\", found \"{s}\""))?
        .trim();
    let split = amount
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(amount.len());
    let (number, unit) = amount.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("\"{amount}\" does not start with a number"))?;
    let unit: f64 = match unit.trim() {
        "B" | "" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        o => {
            return Err(format!(
                "unknown unit \"{o}\": use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = (number * unit).round();
    if !(1024.0..=1e12).contains(&bytes) {
        return Err(format!("{s} is out of range (1KiB/s to 1000GB/s)"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_bad_ones_are_explained() {
        assert_eq!(parse_conn_rate("20/s").unwrap(), 72_000);
        assert_eq!(parse_conn_rate("600/min").unwrap(), 36_000);
        assert!(parse_conn_rate("20").unwrap_err().contains("20/s"));
        assert!(parse_conn_rate("0/s").unwrap_err().contains("out of range"));
        assert!(parse_conn_rate("5/day")
            .unwrap_err()
            .contains("unknown unit"));
        assert_eq!(parse_byte_rate("8MiB/s").unwrap(), 8 << 20);
        assert_eq!(parse_byte_rate("100MB/s").unwrap(), 100_000_000);
        assert_eq!(parse_byte_rate("1.5 KiB/s").unwrap(), 1536);
        assert!(parse_byte_rate("8MiB").unwrap_err().contains("per second"));
        assert!(parse_byte_rate("8mb/s")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_byte_rate("10B/s")
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn datagrams_pass_whole_or_not_at_all() {
        let small = Arc::new(TokenBucket::new(1000.0, 3000.0));
        let big = Arc::new(TokenBucket::new(1_000_000.0, 1_000_000.0));
        let throttle = Throttle::new(vec![big.clone(), small.clone()]);
        assert!(throttle.try_pass(2000));
        assert!(!throttle.try_pass(2000), "1000 left in the small bucket");
        // The refused datagram was given back to the big bucket.
        assert!(big.state.lock().0 > 997_000.0);
        assert!(throttle.try_pass(900));
        // Larger than the burst: passes when the bucket is full, then leaves a debt.
        let full = Throttle::new(vec![Arc::new(TokenBucket::new(1000.0, 3000.0))]);
        assert!(full.try_pass(5000));
        assert!(!full.try_pass(1));
        assert!(Throttle::default().try_pass(65_535));
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let b = TokenBucket::new(1000.0, 100.0);
        assert_eq!(b.take(100), Duration::ZERO);
        let wait = b.take(50);
        assert!(wait > Duration::from_millis(45) && wait <= Duration::from_millis(50));
        let ip = PerIpRate::new(2.0);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(ip.admit(a) && ip.admit(a) && !ip.admit(a));
        assert!(ip.admit("192.0.2.2".parse().unwrap()));
    }
}
