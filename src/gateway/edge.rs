//! A site's rate limits on the gateway (issue 17 item 3): what its agents pushed in
//! `EdgeLimits`, turned into token buckets that the accept loops and the pipes consult.
//!
//! Rules:
//! - Limits are per site and per listener name; each `EdgeLimits` replaces the site's previous
//!   set as a whole (agents of one site push the same, their digests agree). A listener it
//!   does not name is unlimited.
//! - A listener whose limits did not change keeps its buckets (an agent reconnecting or a
//!   second agent pushing the same limits resets nothing); changed limits get new buckets.
//! - `new_connections_per_ip` is checked at accept, after the ban check and before anything
//!   else: over it the connection is reset and counted as `rate_limited`.
//! - `client_rate` gives each client connection its own buckets (one per direction);
//!   `listener_rate` is one pair of buckets per listener shared by all its clients. Both
//!   apply to the splice path and the copy loop ([`crate::pipe::pipe_tcp_throttled`]), and to
//!   UDP flows, whose datagrams over the rate are dropped whole ([`crate::ratelimit::Throttle::try_pass`]).
//! - A set with an invalid entry (a bad name, a rate out of range) is refused whole and the
//!   previous one stays; the agent's log is not told (the message is advisory), the gateway's
//!   log says why (rate limited).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::protocol::{EdgeLimits, ListenerLimits};
use crate::ratelimit::{PerIpRate, PipeThrottle, Throttle, TokenBucket};

/// The most connections per address per hour a listener may allow (1,000,000 per second).
const MAX_HOURLY: u64 = 3_600_000_000;
/// Byte rates from 1 KiB/s to 1000 GB/s.
const BYTE_RATES: std::ops::RangeInclusive<u64> = 1024..=1_000_000_000_000;

/// One listener's limits in force.
#[derive(Debug)]
pub(crate) struct ListenerLimiter {
    spec: ListenerLimits,
    per_ip: Option<PerIpRate>,
    /// Client to backend, backend to client.
    listener: Option<(Arc<TokenBucket>, Arc<TokenBucket>)>,
}

impl ListenerLimiter {
    fn new(spec: ListenerLimits) -> Self {
        ListenerLimiter {
            per_ip: spec.new_connections_per_ip_hourly.map(PerIpRate::hourly),
            listener: spec
                .listener_rate
                .map(|r| (TokenBucket::bytes(r), TokenBucket::bytes(r))),
            spec,
        }
    }

    /// Whether a new connection from `ip` is within `new_connections_per_ip`.
    pub fn admit(&self, ip: IpAddr) -> bool {
        self.per_ip.as_ref().map_or(true, |r| r.admit(ip))
    }

    /// The throttle of one client's pipe (client is side `a`).
    pub fn throttle(&self) -> PipeThrottle {
        let mut up = Vec::new();
        let mut down = Vec::new();
        if let Some(rate) = self.spec.client_rate {
            up.push(TokenBucket::bytes(rate));
            down.push(TokenBucket::bytes(rate));
        }
        if let Some((u, d)) = &self.listener {
            up.push(u.clone());
            down.push(d.clone());
        }
        PipeThrottle {
            a_to_b: Throttle::new(up),
            b_to_a: Throttle::new(down),
        }
    }
}

/// The limits of one site, by listener name.
#[derive(Debug, Default)]
pub(crate) struct SiteLimits {
    by_listener: Mutex<Arc<HashMap<String, Arc<ListenerLimiter>>>>,
}

impl SiteLimits {
    /// The limits of listener `name`, if it has any.
    pub fn get(&self, name: &str) -> Option<Arc<ListenerLimiter>> {
        let map = self.by_listener.lock().clone();
        map.get(name).cloned()
    }

    /// Replaces the site's limits when every entry is valid; how many listeners have limits,
    /// or why the set was refused.
    pub fn replace(&self, limits: EdgeLimits) -> Result<usize, String> {
        for l in &limits.listeners {
            check(l).map_err(|e| format!("listener {:?}: {e}", l.name))?;
        }
        let mut current = self.by_listener.lock();
        let mut next = HashMap::with_capacity(limits.listeners.len());
        for spec in limits.listeners {
            let limiter = match current.get(&spec.name) {
                Some(old) if old.spec == spec => old.clone(),
                _ => Arc::new(ListenerLimiter::new(spec.clone())),
            };
            next.insert(spec.name, limiter);
        }
        let n = next.len();
        *current = Arc::new(next);
        Ok(n)
    }
}

fn check(l: &ListenerLimits) -> Result<(), String> {
    crate::config::check_name(&l.name)?;
    if let Some(h) = l.new_connections_per_ip_hourly {
        if !(1..=MAX_HOURLY).contains(&h) {
            return Err(format!("new_connections_per_ip of {h}/h is out of range"));
        }
    }
    for (key, rate) in [
        ("client_rate", l.client_rate),
        ("listener_rate", l.listener_rate),
    ] {
        if let Some(r) = rate {
            if !BYTE_RATES.contains(&r) {
                return Err(format!("{key} of {r} B/s is out of range"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, hourly: Option<u64>, rate: Option<u64>) -> ListenerLimits {
        ListenerLimits {
            name: name.into(),
            new_connections_per_ip_hourly: hourly,
            client_rate: None,
            listener_rate: rate,
        }
    }

    #[test]
    fn unchanged_limits_keep_their_buckets_and_bad_sets_are_refused() {
        let site = SiteLimits::default();
        let set = |l: Vec<ListenerLimits>| EdgeLimits { listeners: l };
        site.replace(set(vec![spec("web", Some(3600), Some(1 << 20))]))
            .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let web = site.get("web").unwrap();
        assert!(web.admit(ip) && !web.admit(ip));
        assert!(site.get("other").is_none());
        // The same limits again: the same limiter, so the address is still over its rate.
        site.replace(set(vec![spec("web", Some(3600), Some(1 << 20))]))
            .unwrap();
        assert!(Arc::ptr_eq(&web, &site.get("web").unwrap()));
        assert!(!site.get("web").unwrap().admit(ip));
        let err = site
            .replace(set(vec![spec("web", Some(0), None)]))
            .unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        assert!(Arc::ptr_eq(&web, &site.get("web").unwrap()));
        site.replace(set(vec![])).unwrap();
        assert!(site.get("web").is_none());
    }
}
