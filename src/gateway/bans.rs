//! A site's bans on the gateway: the lists its agents pushed, merged into one table that the
//! accept loops consult before anything else happens to a client.
//!
//! Rules:
//! - Bans are per site: an agent's list applies to its own site's listeners only (the list
//!   carries no site name; the session's site is the one it joined).
//! - Each agent's list replaces that agent's previous one, as a whole, and only when every entry
//!   is valid ([`crate::bans::validate`]); a refused list leaves the previous one in force.
//! - An agent's list outlives its session (by agent name) until its entries expire or the agent
//!   pushes again: bans are not lifted by an agent restart or a network cut.
//! - Expiry is checked against this host's monotonic clock at every lookup, so a ban lifts on
//!   time with no agent connected. Nothing is written to disk.
//! - The lookup is one hash probe per prefix length in use (a single probe for the common case of
//!   single addresses), never a scan of the list.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;

use crate::protocol::{Ban, BanList, MAX_BANS};

/// Refusals of one ban are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The most bans the admin API lists per site (the total is always given).
const VIEW_LIMIT: usize = 1000;

/// One ban in force on this gateway.
#[derive(Debug)]
pub(crate) struct BanEntry {
    pub net: IpNet,
    /// When it lifts; `None`: when the agent removes it.
    pub until: Option<Instant>,
    pub reason: String,
    /// The agent whose list holds it.
    pub agent: String,
    /// Milliseconds since [`epoch`] of the last logged refusal (0: never).
    last_logged: AtomicU64,
}

impl BanEntry {
    fn live(&self, now: Instant) -> bool {
        self.until.map_or(true, |t| t > now)
    }

    /// Whether a refusal by this ban should be logged now (at most once per 10 s).
    pub fn should_log(&self) -> bool {
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last_logged.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64)
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// ` (203.0.113.0/24, "reason", agent a1, lifts in 5m)` for log lines.
    pub fn describe(&self) -> String {
        let lifts = match self.until {
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now()).as_secs();
                format!(
                    "lifts in {}",
                    humantime::format_duration(Duration::from_secs(left))
                )
            }
            None => "until removed".to_string(),
        };
        format!(
            "{}, {:?}, by agent {}, {lifts}",
            self.net, self.reason, self.agent
        )
    }
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The merged bans of a site, built once per change and read by every accept.
#[derive(Debug, Default)]
pub(crate) struct BanTable {
    /// One map per prefix length in use, longest first; keys are network addresses.
    by_prefix: Vec<(u8, HashMap<IpAddr, Arc<BanEntry>>)>,
    len: usize,
}

impl BanTable {
    fn build<'a>(entries: impl Iterator<Item = &'a Arc<BanEntry>>) -> BanTable {
        let mut maps: HashMap<(bool, u8), HashMap<IpAddr, Arc<BanEntry>>> = HashMap::new();
        let now = Instant::now();
        for e in entries.filter(|e| e.live(now)) {
            let map = maps
                .entry((e.net.addr().is_ipv4(), e.net.prefix_len()))
                .or_default();
            // Two agents banning the same network: the later expiry wins.
            let keep = match map.get(&e.net.network()) {
                Some(old) => match (old.until, e.until) {
                    (None, _) => false,
                    (Some(_), None) => true,
                    (Some(a), Some(b)) => b > a,
                },
                None => true,
            };
            if keep {
                map.insert(e.net.network(), e.clone());
            }
        }
        let len = maps.values().map(HashMap::len).sum();
        let mut by_prefix: Vec<_> = maps.into_iter().map(|((_, p), m)| (p, m)).collect();
        by_prefix.sort_by_key(|(prefix, _)| std::cmp::Reverse(*prefix));
        BanTable { by_prefix, len }
    }

    /// The live ban covering `ip`, if any.
    pub fn lookup(&self, ip: IpAddr, now: Instant) -> Option<&Arc<BanEntry>> {
        self.by_prefix.iter().find_map(|(prefix, map)| {
            let key = match ip {
                IpAddr::V4(v4) => IpAddr::V4(ipnet::Ipv4Net::new(v4, *prefix).ok()?.network()),
                IpAddr::V6(v6) => IpAddr::V6(ipnet::Ipv6Net::new(v6, *prefix).ok()?.network()),
            };
            map.get(&key).filter(|e| e.live(now))
        })
    }
}

/// The bans of one site: every agent's list and the merged table.
pub(crate) struct SiteBans {
    /// Each agent's last accepted list, by agent name.
    lists: Mutex<HashMap<String, Vec<Arc<BanEntry>>>>,
    table: watch::Sender<Arc<BanTable>>,
}

impl Default for SiteBans {
    fn default() -> Self {
        SiteBans {
            lists: Mutex::default(),
            table: watch::Sender::new(Arc::new(BanTable::default())),
        }
    }
}

/// One ban as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BanView {
    pub net: String,
    pub agent: String,
    pub reason: String,
    /// Seconds until it lifts; absent: until removed.
    pub expires_in_secs: Option<u64>,
}

/// A site's bans for the admin API: the total and up to 1000 of them.
#[derive(Debug, Clone, Serialize)]
pub struct SiteBansView {
    pub site: String,
    pub total: usize,
    pub bans: Vec<BanView>,
}

impl SiteBans {
    /// The ban in force for `ip` right now, if any.
    pub fn check(&self, ip: IpAddr) -> Option<Arc<BanEntry>> {
        self.table.borrow().lookup(ip, Instant::now()).cloned()
    }

    /// Resolves once `ip` is banned (at once if it is already): established connections from an
    /// address banned after they started end with it.
    pub async fn until_banned(&self, ip: IpAddr) {
        let mut table = self.table.subscribe();
        loop {
            if table
                .borrow_and_update()
                .lookup(ip, Instant::now())
                .is_some()
            {
                return;
            }
            if table.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Replaces `agent`'s list when every entry is valid; the number of its bans in force, or
    /// why the list was refused (the previous one stays).
    pub fn replace(&self, agent: &str, bans: &[Ban]) -> Result<usize, String> {
        let now = Instant::now();
        let mut entries = Vec::with_capacity(bans.len());
        for (i, ban) in bans.iter().enumerate() {
            let net = crate::bans::validate(ban).map_err(|e| format!("ban {}: {e}", i + 1))?;
            let until = (ban.remaining_ms > 0)
                .then(|| now.checked_add(Duration::from_millis(ban.remaining_ms)))
                .map(|t| t.ok_or_else(|| format!("ban {}: {net}: expiry out of range", i + 1)))
                .transpose()?;
            entries.push(Arc::new(BanEntry {
                net,
                until,
                reason: ban.reason.clone(),
                agent: agent.to_string(),
                last_logged: AtomicU64::new(0),
            }));
        }
        let count = entries.len();
        let mut lists = self.lists.lock();
        lists.insert(agent.to_string(), entries);
        // Expired entries are dropped from the lists here; lookups ignore them before that.
        for list in lists.values_mut() {
            list.retain(|e| e.live(now));
        }
        lists.retain(|_, l| !l.is_empty());
        let table = BanTable::build(lists.values().flatten());
        self.table.send_replace(Arc::new(table));
        Ok(count)
    }

    /// Adds one ban decided by this gateway (automatic bans: [`super::autoban`]) to the list
    /// named `list`, which no agent can have (agent names have no parentheses).
    pub fn add(&self, list: &str, net: IpNet, lasts: Duration, reason: String) {
        let now = Instant::now();
        let mut lists = self.lists.lock();
        let entry = Arc::new(BanEntry {
            net,
            until: now.checked_add(lasts),
            reason,
            agent: list.to_string(),
            last_logged: AtomicU64::new(0),
        });
        let own = lists.entry(list.to_string()).or_default();
        own.retain(|e| e.net != net);
        own.push(entry);
        for l in lists.values_mut() {
            l.retain(|e| e.live(now));
        }
        lists.retain(|_, l| !l.is_empty());
        let table = BanTable::build(lists.values().flatten());
        self.table.send_replace(Arc::new(table));
    }

    /// Bans in force (distinct networks, all agents merged).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        let table = self.table.borrow();
        if table.len == 0 {
            return 0;
        }
        table
            .by_prefix
            .iter()
            .map(|(_, m)| m.values().filter(|e| e.live(now)).count())
            .sum()
    }

    pub fn view(&self, site: &str) -> SiteBansView {
        let now = Instant::now();
        let table = self.table.borrow().clone();
        let mut all: Vec<&Arc<BanEntry>> = table
            .by_prefix
            .iter()
            .flat_map(|(_, m)| m.values())
            .filter(|e| e.live(now))
            .collect();
        all.sort_by_key(|e| (e.net.addr(), e.net.prefix_len()));
        SiteBansView {
            site: site.to_string(),
            total: all.len(),
            bans: all
                .into_iter()
                .take(VIEW_LIMIT)
                .map(|e| BanView {
                    net: e.net.to_string(),
                    agent: e.agent.clone(),
                    reason: e.reason.clone(),
                    expires_in_secs: e.until.map(|t| t.saturating_duration_since(now).as_secs()),
                })
                .collect(),
        }
    }
}

/// What one chunk did: nothing yet, a complete list `(generation, bans)`, or why it was refused.
pub(crate) type ChunkOutcome = Result<Option<(u64, Vec<Ban>)>, String>;

/// Collects the chunks of one ban list from one control session.
#[derive(Debug, Default)]
pub(crate) struct BanAssembly {
    generation: u64,
    total: u32,
    bans: Vec<Ban>,
}

impl BanAssembly {
    /// Adds a chunk: the whole list once its last chunk is in, or why the chunk is refused (an
    /// announced total over [`MAX_BANS`], more bans than announced).
    pub fn add(&mut self, chunk: BanList) -> ChunkOutcome {
        if chunk.total > MAX_BANS {
            return Err(format!(
                "ban list of {} entries refused: at most {MAX_BANS} per agent",
                chunk.total
            ));
        }
        if chunk.generation != self.generation || self.bans.is_empty() {
            // A new list (an unfinished older one is abandoned).
            self.generation = chunk.generation;
            self.total = chunk.total;
            self.bans.clear();
        }
        if chunk.total != self.total {
            let (was, now) = (self.total, chunk.total);
            *self = BanAssembly::default();
            return Err(format!(
                "ban list generation {}: total changed from {was} to {now} mid-list",
                chunk.generation
            ));
        }
        if self.bans.len() + chunk.bans.len() > self.total as usize {
            *self = BanAssembly::default();
            return Err(format!(
                "ban list generation {}: more entries than the {} announced",
                chunk.generation, chunk.total
            ));
        }
        self.bans.extend(chunk.bans);
        if self.bans.len() == self.total as usize {
            let done = std::mem::take(self);
            return Ok(Some((done.generation, done.bans)));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(net: &str, remaining_ms: u64) -> Ban {
        let net: IpNet = net.parse().unwrap();
        Ban {
            addr: net.addr(),
            prefix: net.prefix_len(),
            remaining_ms,
            reason: "test".into(),
        }
    }

    #[test]
    fn lookups_find_addresses_and_networks() {
        let bans = SiteBans::default();
        bans.replace("a1", &[ban("203.0.113.7/32", 0), ban("10.1.0.0/16", 0)])
            .unwrap();
        bans.replace("a2", &[ban("2001:db8::/32", 0)]).unwrap();
        assert!(bans.check("203.0.113.7".parse().unwrap()).is_some());
        assert!(bans.check("203.0.113.8".parse().unwrap()).is_none());
        assert!(bans.check("10.1.200.3".parse().unwrap()).is_some());
        assert!(bans.check("10.2.0.1".parse().unwrap()).is_none());
        assert!(bans.check("2001:db8:1::9".parse().unwrap()).is_some());
        assert_eq!(bans.len(), 3);
        // a1's new list replaces its old one; a2's stays.
        bans.replace("a1", &[]).unwrap();
        assert!(bans.check("203.0.113.7".parse().unwrap()).is_none());
        assert!(bans.check("2001:db8::1".parse().unwrap()).is_some());
    }

    /// The lookup's cost does not grow with the list: 10,000 single addresses are one map
    /// (one probe per lookup), and a lookup takes about as long as with one ban (printed:
    /// `cargo nextest run --lib --no-capture lookup_cost`).
    #[test]
    fn lookup_cost_does_not_grow_with_the_list() {
        let time = |n: u32| {
            let bans = SiteBans::default();
            let list: Vec<Ban> = (0..n)
                .map(|i| {
                    let [_, b, c, d] = i.to_be_bytes();
                    ban(&format!("10.{b}.{c}.{d}/32"), 0)
                })
                .collect();
            bans.replace("a1", &list).unwrap();
            assert_eq!(bans.table.borrow().by_prefix.len(), 1);
            let probes: Vec<IpAddr> = (0..1000u32)
                .map(|i| IpAddr::from([192, 0, (i >> 8) as u8, i as u8]))
                .collect();
            let start = Instant::now();
            let mut hits = 0;
            for _ in 0..100 {
                for ip in &probes {
                    hits += bans.check(*ip).is_some() as u32;
                }
            }
            assert_eq!(hits, 0);
            start.elapsed().as_nanos() as f64 / 100_000.0
        };
        let (one, many) = (time(1), time(10_000));
        println!("ban lookup: {one:.0} ns with 1 ban, {many:.0} ns with 10,000 bans");
    }

    #[test]
    fn expired_bans_do_not_match() {
        let bans = SiteBans::default();
        bans.replace("a1", &[ban("203.0.113.7/32", 30)]).unwrap();
        assert!(bans.check("203.0.113.7".parse().unwrap()).is_some());
        std::thread::sleep(Duration::from_millis(50));
        assert!(bans.check("203.0.113.7".parse().unwrap()).is_none());
        assert_eq!(bans.view("s").total, 0);
    }

    #[test]
    fn an_invalid_entry_refuses_the_whole_list() {
        let bans = SiteBans::default();
        bans.replace("a1", &[ban("203.0.113.7/32", 0)]).unwrap();
        let mut bad = ban("10.0.0.0/8", 0);
        bad.addr = "10.0.0.1".parse().unwrap();
        let err = bans
            .replace("a1", &[ban("198.51.100.1/32", 0), bad])
            .unwrap_err();
        assert!(err.contains("ban 2") && err.contains("host bits"), "{err}");
        // The previous list is still in force, the refused one is not.
        assert!(bans.check("203.0.113.7".parse().unwrap()).is_some());
        assert!(bans.check("198.51.100.1".parse().unwrap()).is_none());
    }

    #[test]
    fn chunks_assemble_and_bad_totals_are_refused() {
        let mut a = BanAssembly::default();
        let chunk = |g, total, n: usize| BanList {
            generation: g,
            total,
            bans: (0..n).map(|i| ban(&format!("10.0.0.{i}/32"), 0)).collect(),
        };
        assert_eq!(a.add(chunk(1, 3, 2)).unwrap(), None);
        let (g, all) = a.add(chunk(1, 3, 1)).unwrap().unwrap();
        assert_eq!((g, all.len()), (1, 3));
        assert_eq!(a.add(chunk(2, 0, 0)).unwrap().unwrap().1.len(), 0);
        assert!(a.add(chunk(3, 2, 3)).unwrap_err().contains("more entries"));
        assert!(a.add(chunk(4, MAX_BANS + 1, 0)).is_err());
    }
}
