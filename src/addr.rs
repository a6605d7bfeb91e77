//! Address syntax shared by config files and the wire: port ranges, public listener addresses
//! and backend addresses.
//!
//! - public: `"2222"`, `"30000-30100"`, `"192.0.2.10:2222"`, `"[2001:db8::1]:30000-30100"`
//! - backend: `"10.0.0.5:22"`, `"sftp.internal:22"`, `"[fd00::5]:22"`, `"10.0.0.5:30000-30100"`
//!
//! A range backend maps port for port onto a public range of the same length.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An inclusive, non-empty range of TCP ports; a single port is a range of one. Deserializing
/// checks the same invariants as [`PortRange::new`], so a range from the wire is as sound as one
/// from a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "UncheckedPortRange")]
pub struct PortRange {
    first: u16,
    last: u16,
}

#[derive(Deserialize)]
struct UncheckedPortRange {
    first: u16,
    last: u16,
}

impl TryFrom<UncheckedPortRange> for PortRange {
    type Error = String;
    fn try_from(r: UncheckedPortRange) -> Result<Self, String> {
        PortRange::new(r.first, r.last)
    }
}

impl PortRange {
    /// Most ports a single listener may span (an FTP passive range is typically 50-1000).
    pub const MAX_LEN: usize = 4096;

    pub fn new(first: u16, last: u16) -> Result<Self, String> {
        if first > last {
            return Err(format!("port range {first}-{last} ends before it starts"));
        }
        let range = PortRange { first, last };
        if range.len() > Self::MAX_LEN {
            return Err(format!(
                "port range {first}-{last} spans {} ports, more than the maximum {}",
                range.len(),
                Self::MAX_LEN
            ));
        }
        Ok(range)
    }

    pub fn single(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    pub fn len(&self) -> usize {
        (self.last - self.first) as usize + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }

    /// The port at `offset` from the start, if the range has one.
    pub fn port_at(&self, offset: u16) -> Option<u16> {
        let port = self.first.checked_add(offset)?;
        (port <= self.last).then_some(port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port \"{p}\" (expected 0-65535)"))
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(port(a)?, port(b)?),
            None => Ok(PortRange::single(port(s)?)),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Splits `host:ports` where host may be `[v6]`. Returns (host without brackets, ports).
fn split_host_ports(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let ports = after.strip_prefix(':')?;
        Some((host, ports))
    } else {
        let (host, ports) = s.rsplit_once(':')?;
        // A bare IPv6 address without brackets is ambiguous; refuse it.
        if host.contains(':') {
            return None;
        }
        Some((host, ports))
    }
}

/// Where a listener listens on the gateway: an optional IP (else the gateway's `[clients] bind`)
/// and a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicAddr {
    pub ip: Option<IpAddr>,
    pub ports: PortRange,
}

impl PublicAddr {
    /// The socket addresses to bind, with `default_ip` where no IP was given.
    pub fn socket_addrs(&self, default_ip: IpAddr) -> impl Iterator<Item = SocketAddr> {
        let ip = self.ip.unwrap_or(default_ip);
        self.ports.iter().map(move |p| SocketAddr::new(ip, p))
    }

    /// Whether two listeners would fight over a port (same or unspecified IP, overlapping ports).
    pub fn conflicts(&self, other: &PublicAddr) -> bool {
        let same_ip = match (self.ip, other.ip) {
            (Some(a), Some(b)) => a == b || a.is_unspecified() || b.is_unspecified(),
            _ => true,
        };
        same_ip && self.ports.overlaps(&other.ports)
    }
}

/// The public addresses a set of listeners holds, to tell whether one more conflicts with any
/// of them ([`PublicAddr::conflicts`]) in O(log n) rather than by comparing it with each: a file
/// of 16,000 listeners is checked in one pass.
#[derive(Debug, Default)]
pub struct Occupancy {
    /// Ranges on one address, per address: disjoint within an address.
    by_ip: HashMap<IpAddr, BTreeMap<u16, u16>>,
    /// Ranges on every address (no IP, `0.0.0.0`, `::`): disjoint from every other range.
    wildcard: BTreeMap<u16, u16>,
    /// The union of the ranges on single addresses, merged (what a wildcard must stay clear of).
    specific: BTreeMap<u16, u16>,
}

/// Whether a set of disjoint ranges (first -> last) has one overlapping `r`: only the range
/// starting last at or before `r.last` can.
fn overlaps_any(set: &BTreeMap<u16, u16>, r: &PortRange) -> bool {
    set.range(..=r.last)
        .next_back()
        .is_some_and(|(_, &last)| last >= r.first)
}

impl Occupancy {
    /// Holds `public` unless it conflicts with an address already held; `false` then (the
    /// caller names the other listener, once).
    pub fn claim(&mut self, public: &PublicAddr) -> bool {
        let r = &public.ports;
        match public.ip.filter(|ip| !ip.is_unspecified()) {
            None => {
                if overlaps_any(&self.wildcard, r) || overlaps_any(&self.specific, r) {
                    return false;
                }
                self.wildcard.insert(r.first, r.last);
            }
            Some(ip) => {
                let own = self.by_ip.entry(ip).or_default();
                if overlaps_any(own, r) || overlaps_any(&self.wildcard, r) {
                    return false;
                }
                own.insert(r.first, r.last);
                // Merge into the union: it stays a set of disjoint ranges.
                let (mut first, mut last) = (r.first, r.last);
                if let Some((&f, &l)) = self.specific.range(..=first).next_back() {
                    if l >= first {
                        first = f;
                        last = last.max(l);
                        self.specific.remove(&f);
                    }
                }
                while let Some((&f, &l)) = self.specific.range(first..).next() {
                    if f > last {
                        break;
                    }
                    last = last.max(l);
                    self.specific.remove(&f);
                }
                self.specific.insert(first, last);
            }
        }
        true
    }
}

impl FromStr for PublicAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let hint = "expected a port, a range like 30000-30100, or IP:port";
        if !s.contains(':') {
            let ports = s.parse().map_err(|e| format!("{e}; {hint}"))?;
            return Ok(PublicAddr { ip: None, ports });
        }
        let (host, ports) =
            split_host_ports(s).ok_or_else(|| format!("invalid public address \"{s}\"; {hint}"))?;
        let ip = host
            .parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address \"{host}\" in \"{s}\"; {hint}"))?;
        let ports = ports.parse().map_err(|e| format!("{e} in \"{s}\""))?;
        Ok(PublicAddr {
            ip: Some(ip),
            ports,
        })
    }
}

impl fmt::Display for PublicAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            None => write!(f, "{}", self.ports),
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.ports),
            Some(ip) => write!(f, "{ip}:{}", self.ports),
        }
    }
}

/// Where the agent connects for a listener: a host (IP or DNS name) and a port range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BackendAddr {
    pub host: String,
    pub ports: PortRange,
}

impl BackendAddr {
    /// `host:port` for the given offset within the range, ready for `TcpStream::connect`.
    pub fn target(&self, offset: u16) -> Option<String> {
        let port = self.ports.port_at(offset)?;
        Some(if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        })
    }
}

impl FromStr for BackendAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad =
            || format!("invalid socket address \"{s}\" (expected host:port, e.g. 10.0.0.5:22)");
        let (host, ports) = split_host_ports(s).ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        let is_ip = host.parse::<IpAddr>().is_ok();
        let is_name = host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !is_ip && !is_name {
            return Err(format!("invalid host \"{host}\" in \"{s}\""));
        }
        let ports = ports.parse().map_err(|e| format!("{e} in \"{s}\""))?;
        Ok(BackendAddr {
            host: host.to_string(),
            ports,
        })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.ports)
        } else {
            write!(f, "{}:{}", self.host, self.ports)
        }
    }
}

/// A short form of a listener's bound addresses for log lines: one address, or the first and the
/// last of a range with the count.
pub fn display_addrs(addrs: &[SocketAddr]) -> String {
    match addrs {
        [] => "nothing".to_string(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first} .. {last} ({} ports)", addrs.len()),
    }
}

/// Ranges a port summary names before it says how many more there are.
const SUMMARY_RANGES: usize = 8;

/// Ports as one short phrase for a summary log line: `port 2222`, `ports 20000-24999`,
/// `ports 22, 80, 30000-30100`; adjacent and overlapping ranges merge, and past
/// [`SUMMARY_RANGES`] ranges the rest is counted, not listed. Sorting makes it O(n log n).
pub fn summarize_ports(ranges: impl IntoIterator<Item = (u16, u16)>) -> String {
    let mut ranges: Vec<(u16, u16)> = ranges.into_iter().collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (first, last) in ranges {
        match merged.last_mut() {
            Some(prev) if first as u32 <= prev.1 as u32 + 1 => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    let single = matches!(merged.as_slice(), [(a, b)] if a == b);
    let mut out = String::from(if single { "port " } else { "ports " });
    if merged.is_empty() {
        out.push_str("none");
    }
    for (i, (first, last)) in merged.iter().take(SUMMARY_RANGES).enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&first.to_string());
        if last != first {
            out.push('-');
            out.push_str(&last.to_string());
        }
    }
    if merged.len() > SUMMARY_RANGES {
        out.push_str(&format!(
            " and {} more ranges",
            merged.len() - SUMMARY_RANGES
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_summaries_merge_and_stay_short() {
        assert_eq!(summarize_ports([(2222, 2222)]), "port 2222");
        assert_eq!(
            summarize_ports((20000..25000).rev().map(|p| (p, p))),
            "ports 20000-24999"
        );
        assert_eq!(
            summarize_ports([(80, 80), (22, 22), (30000, 30100), (30050, 30200)]),
            "ports 22, 80, 30000-30200"
        );
        let many = summarize_ports((0..20u16).map(|i| (i * 10, i * 10)));
        assert!(many.ends_with("and 12 more ranges"), "{many}");
        assert_eq!(
            summarize_ports([(65535, 65535), (65534, 65535)]),
            "ports 65534-65535"
        );
    }

    #[test]
    fn public_forms() {
        let p: PublicAddr = "2222".parse().unwrap();
        assert_eq!((p.ip, p.ports), (None, PortRange::single(2222)));
        let p: PublicAddr = "30000-30100".parse().unwrap();
        assert_eq!(p.ports.len(), 101);
        let p: PublicAddr = "192.0.2.10:2222".parse().unwrap();
        assert_eq!(p.ip, Some("192.0.2.10".parse().unwrap()));
        let p: PublicAddr = "[2001:db8::1]:30000-30010".parse().unwrap();
        assert_eq!(p.to_string(), "[2001:db8::1]:30000-30010");
        for bad in [
            "", "x", "70000", "10-5", "1.2.3:4", "::1:22", "host:22", "1-9999",
        ] {
            assert!(bad.parse::<PublicAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backend_forms() {
        let b: BackendAddr = "10.0.0.5:22".parse().unwrap();
        assert_eq!(b.target(0).unwrap(), "10.0.0.5:22");
        assert_eq!(b.target(1), None);
        let b: BackendAddr = "sftp.internal:30000-30049".parse().unwrap();
        assert_eq!(b.target(49).unwrap(), "sftp.internal:30049");
        let b: BackendAddr = "[fd00::5]:22".parse().unwrap();
        assert_eq!(b.target(0).unwrap(), "[fd00::5]:22");
        let err = "10.0.0.5".parse::<BackendAddr>().unwrap_err();
        assert!(
            err.starts_with("invalid socket address \"10.0.0.5\""),
            "{err}"
        );
        for bad in [":22", "a b:22", "10.0.0.5:x", "fd00::5:22"] {
            assert!(bad.parse::<BackendAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn wire_ranges_are_checked() {
        let good = postcard::to_stdvec(&PortRange::new(10, 20).unwrap()).unwrap();
        assert_eq!(postcard::from_bytes::<PortRange>(&good).unwrap().len(), 11);
        for (first, last) in [(20u16, 10u16), (1, 65535)] {
            let bad = postcard::to_stdvec(&(first, last)).unwrap();
            assert!(
                postcard::from_bytes::<PortRange>(&bad).is_err(),
                "{first}-{last}"
            );
        }
    }

    proptest::proptest! {
        /// The index agrees with comparing every pair: a listener is refused exactly when it
        /// conflicts with one accepted before it.
        #[test]
        fn occupancy_agrees_with_pairwise_conflicts(
            addrs in proptest::collection::vec((0u8..4, 1u16..60, 0u16..8), 1..40)
        ) {
            let ips = [None, Some("0.0.0.0"), Some("127.0.0.1"), Some("127.0.0.2")];
            let mut held = Occupancy::default();
            let mut accepted: Vec<PublicAddr> = Vec::new();
            for (ip, first, len) in addrs {
                let public = PublicAddr {
                    ip: ips[ip as usize].map(|s| s.parse().unwrap()),
                    ports: PortRange::new(first, first + len).unwrap(),
                };
                let pairwise = accepted.iter().any(|o| o.conflicts(&public));
                proptest::prop_assert_eq!(held.claim(&public), !pairwise, "{}", public);
                if !pairwise {
                    accepted.push(public);
                }
            }
        }
    }

    #[test]
    fn conflicts() {
        let a: PublicAddr = "30000-30010".parse().unwrap();
        let b: PublicAddr = "127.0.0.1:30010".parse().unwrap();
        let c: PublicAddr = "127.0.0.2:30010".parse().unwrap();
        assert!(a.conflicts(&b));
        assert!(!b.conflicts(&c));
    }
}
