//! Automatic bans at the edge (issue 17 item 2): per listener, configured in agent.toml and
//! pushed in `AutoBans`, decided by the gateway from what it sees.
//!
//! Rules:
//! - Off unless a listener's `auto_ban` is set. Two triggers, each optional: more than
//!   `connections` new connections from one address within `within`, or more than
//!   `short_connections` connections from one address that ended within `shorter_than`, within
//!   `within` (a cheap "failed login" signal: SSH and FTP servers close a connection soon after
//!   a failed login, scanners leave at once).
//! - Counting is per address (an IPv4 address, an IPv6 /64: [`crate::limits::limit_key`]) in
//!   fixed windows of `within` that start at the address's first connection.
//! - The ban lasts `ban` the first time, and doubles on every repeat, up to `max_ban`. An
//!   address's repeat count is forgotten once it has been quiet for `max_ban` after its last ban.
//! - The ban is added to the site's bans as the list of the automatic "agent" `gateway`, on
//!   this gateway only (gateways do not share what they see; nothing is written to disk), and
//!   it is enforced like any other ban: at accept, established connections cut, shown in
//!   `/api/bans` with its reason.
//! - At most 100,000 addresses are tracked per listener; beyond that the quiet ones are
//!   forgotten, and all of them if none is quiet.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::limits::limit_key;
use crate::protocol::{AutoBans, ListenerAutoBan};

/// Addresses tracked per listener before the quiet ones are forgotten.
const TRACKED_MAX: usize = 100_000;
/// Durations from 1 ms to ten years.
const MAX_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// What one address did lately.
#[derive(Debug)]
struct Track {
    window_start: Instant,
    connections: u32,
    short: u32,
    /// Bans so far (the next lasts `ban * 2^bans`).
    bans: u32,
    last_seen: Instant,
}

/// One listener's automatic bans.
#[derive(Debug)]
pub(crate) struct AutoBanner {
    spec: ListenerAutoBan,
    tracks: Mutex<HashMap<IpAddr, Track>>,
}

/// A ban to put in force: how long, and why.
pub(crate) struct Verdict {
    pub net: ipnet::IpNet,
    pub lasts: Duration,
    pub reason: String,
}

impl AutoBanner {
    fn new(spec: ListenerAutoBan) -> Self {
        AutoBanner {
            spec,
            tracks: Mutex::default(),
        }
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Records a new connection from `ip`; a ban if it is one too many.
    pub fn on_connect(&self, ip: IpAddr) -> Option<Verdict> {
        let max = self.spec.connections?;
        self.record(ip, |t| {
            t.connections += 1;
            (t.connections > max).then(|| format!("more than {max} connections"))
        })
    }

    /// Records the end of a connection from `ip` that lasted `lasted`; a ban if it was one
    /// short connection too many.
    pub fn on_end(&self, ip: IpAddr, lasted: Duration) -> Option<Verdict> {
        let max = self.spec.short_connections?;
        let shorter_than = Self::ms(self.spec.shorter_than_ms);
        if lasted >= shorter_than {
            return None;
        }
        self.record(ip, |t| {
            t.short += 1;
            (t.short > max).then(|| {
                format!(
                    "more than {max} connections shorter than {}",
                    humantime::format_duration(shorter_than)
                )
            })
        })
    }

    fn record(
        &self,
        ip: IpAddr,
        count: impl FnOnce(&mut Track) -> Option<String>,
    ) -> Option<Verdict> {
        let now = Instant::now();
        let within = Self::ms(self.spec.within_ms);
        let max_ban = Self::ms(self.spec.max_ban_ms);
        let key = limit_key(ip);
        let mut tracks = self.tracks.lock();
        if tracks.len() >= TRACKED_MAX && !tracks.contains_key(&key) {
            tracks.retain(|_, t| now.duration_since(t.last_seen) < within.max(max_ban));
            if tracks.len() >= TRACKED_MAX {
                tracks.clear();
            }
        }
        let t = tracks.entry(key).or_insert(Track {
            window_start: now,
            connections: 0,
            short: 0,
            bans: 0,
            last_seen: now,
        });
        if t.bans > 0 && now.duration_since(t.last_seen) > max_ban {
            t.bans = 0;
        }
        if now.duration_since(t.window_start) > within {
            (t.window_start, t.connections, t.short) = (now, 0, 0);
        }
        t.last_seen = now;
        let why = count(t)?;
        let first = Self::ms(self.spec.ban_ms);
        let lasts = first
            .saturating_mul(1u32 << t.bans.min(30))
            .min(max_ban)
            .max(first.min(max_ban));
        t.bans += 1;
        (t.window_start, t.connections, t.short) = (now, 0, 0);
        let prefix = if key.is_ipv4() { 32 } else { 64 };
        Some(Verdict {
            net: ipnet::IpNet::new(key, prefix).ok()?,
            lasts,
            reason: format!(
                "automatic: {why} within {} on listener {} (ban {} of this address)",
                humantime::format_duration(within),
                self.spec.name,
                t.bans
            ),
        })
    }
}

/// The automatic bans of one site's listeners, by listener name.
#[derive(Debug, Default)]
pub(crate) struct SiteAutoBans {
    by_listener: Mutex<Arc<HashMap<String, Arc<AutoBanner>>>>,
}

impl SiteAutoBans {
    pub fn get(&self, name: &str) -> Option<Arc<AutoBanner>> {
        let map = self.by_listener.lock().clone();
        map.get(name).cloned()
    }

    /// Replaces the site's settings when every entry is valid (unchanged listeners keep what
    /// they counted); how many listeners ban automatically, or why the set was refused.
    pub fn replace(&self, set: AutoBans) -> Result<usize, String> {
        for l in &set.listeners {
            check(l).map_err(|e| format!("listener {:?}: {e}", l.name))?;
        }
        let mut current = self.by_listener.lock();
        let mut next = HashMap::with_capacity(set.listeners.len());
        for spec in set.listeners {
            let banner = match current.get(&spec.name) {
                Some(old) if old.spec == spec => old.clone(),
                _ => Arc::new(AutoBanner::new(spec.clone())),
            };
            next.insert(spec.name, banner);
        }
        let n = next.len();
        *current = Arc::new(next);
        Ok(n)
    }
}

fn check(l: &ListenerAutoBan) -> Result<(), String> {
    crate::config::check_name(&l.name)?;
    if l.connections.is_none() && l.short_connections.is_none() {
        return Err("neither connections nor short_connections is set".into());
    }
    for (key, ms) in [
        ("within", l.within_ms),
        ("ban", l.ban_ms),
        ("max_ban", l.max_ban_ms),
        ("shorter_than", l.shorter_than_ms.max(1)),
    ] {
        if !(1..=MAX_MS).contains(&ms) {
            return Err(format!("{key} of {ms} ms is out of range"));
        }
    }
    if l.ban_ms > l.max_ban_ms {
        return Err("ban is longer than max_ban".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ban_doubles_up_to_the_cap_and_short_connections_count() {
        let b = AutoBanner::new(ListenerAutoBan {
            name: "web".into(),
            connections: Some(2),
            short_connections: Some(1),
            shorter_than_ms: 1000,
            within_ms: 60_000,
            ban_ms: 1000,
            max_ban_ms: 3000,
        });
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut lasts = Vec::new();
        for _ in 0..4 {
            assert!(b.on_connect(ip).is_none() && b.on_connect(ip).is_none());
            let v = b.on_connect(ip).unwrap();
            assert_eq!(v.net.to_string(), "192.0.2.7/32");
            lasts.push(v.lasts.as_millis());
        }
        assert_eq!(lasts, [1000, 2000, 3000, 3000]);
        let other: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(b.on_end(other, Duration::from_millis(10)).is_none());
        assert!(b.on_end(other, Duration::from_secs(5)).is_none());
        let v = b.on_end(other, Duration::from_millis(10)).unwrap();
        assert_eq!(v.net.to_string(), "2001:db8::/64");
        assert!(v.reason.contains("shorter than 1s"), "{}", v.reason);
    }
}
