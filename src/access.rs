//! IP access rules: a default policy and a list of exceptions.
//!
//! The same syntax serves the gateway's `[peers]` (which agents may connect) and each listener's
//! `clients` (which internet clients may connect). An exception is one of
//!
//! - a single address: `10.0.0.5`, `2001:db8::1`
//! - a wildcard on whole IPv4 octets: `10.0.0.*`, `10.*.*.*`
//! - an inclusive range: `10.2.0.10-10.2.0.20`, `fd00::1-fd00::ff`
//! - a CIDR block: `10.1.0.0/16`, `fd00::/8`
//!
//! IPv4-mapped IPv6 addresses (`::ffff:10.0.0.5`, as seen on dual-stack sockets) are matched as
//! the IPv4 address they carry, and mapped patterns (`::ffff:10.0.0.5`, `::ffff:10.0.0.0/120`,
//! ranges of mapped addresses) are canonicalised to IPv4 when parsed, so they match the clients
//! they name: a mapped pattern that silently matched nothing would turn a deny exception into an
//! allow. This module only decides; counting and logging belong to callers.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// What happens to an address that matches no exception.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Allow,
    Deny,
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Policy::Allow),
            "deny" => Ok(Policy::Deny),
            other => Err(format!("expected \"allow\" or \"deny\", found \"{other}\"")),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Allow => "allow",
            Policy::Deny => "deny",
        })
    }
}

/// One exception pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpPattern {
    Single(IpAddr),
    Net(IpNet),
    Range(IpAddr, IpAddr),
}

impl IpPattern {
    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match *self {
            IpPattern::Single(a) => a == ip,
            IpPattern::Net(net) => net.contains(&ip),
            IpPattern::Range(lo, hi) => match (lo, hi, ip) {
                (IpAddr::V4(lo), IpAddr::V4(hi), IpAddr::V4(ip)) => lo <= ip && ip <= hi,
                (IpAddr::V6(lo), IpAddr::V6(hi), IpAddr::V6(ip)) => lo <= ip && ip <= hi,
                _ => false,
            },
        }
    }
}

/// An IPv4-mapped IPv6 block (`::ffff:a.b.c.d/N`, N >= 96) as the IPv4 block it covers
/// (`a.b.c.d/N-96`), since addresses are matched in their IPv4 form. Other blocks are unchanged
/// (an IPv6 block wider than the mapped range, such as `::/0`, is an IPv6 rule and matches only
/// IPv6 addresses).
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                    .expect("a prefix of at most 32 bits")
                    .trunc(),
            ),
            None => net,
        },
        other => other,
    }
}

impl fmt::Display for IpPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpPattern::Single(ip) => write!(f, "{ip}"),
            IpPattern::Net(net) => write!(f, "{net}"),
            IpPattern::Range(lo, hi) => write!(f, "{lo}-{hi}"),
        }
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d` so IPv4 rules apply on dual-stack sockets.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

impl FromStr for IpPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains('*') {
            return parse_wildcard(s);
        }
        if s.contains('/') {
            return s
                .parse::<IpNet>()
                .map(|n| IpPattern::Net(canonical_net(n.trunc())))
                .map_err(|_| format!("invalid CIDR block \"{s}\""));
        }
        if let Some((lo, hi)) = s.split_once('-') {
            let lo: IpAddr = lo
                .trim()
                .parse()
                .map_err(|_| format!("invalid range start in \"{s}\""))?;
            let hi: IpAddr = hi
                .trim()
                .parse()
                .map_err(|_| format!("invalid range end in \"{s}\""))?;
            let (lo, hi) = (canonical(lo), canonical(hi));
            if lo.is_ipv4() != hi.is_ipv4() {
                return Err(format!("range \"{s}\" mixes IPv4 and IPv6"));
            }
            if lo > hi {
                return Err(format!("range \"{s}\" ends before it starts"));
            }
            return Ok(IpPattern::Range(lo, hi));
        }
        s.parse::<IpAddr>()
            .map(|ip| IpPattern::Single(canonical(ip)))
            .map_err(|_| {
                format!(
                    "invalid address pattern \"{s}\" (expected an IP, a wildcard like 10.0.0.*, \
                     a range like 10.0.0.1-10.0.0.9 or a CIDR block like 10.0.0.0/8)"
                )
            })
    }
}

/// `10.0.*.*` → `10.0.0.0/16`. Wildcards must be whole trailing octets.
fn parse_wildcard(s: &str) -> Result<IpPattern, String> {
    let bad =
        || format!("invalid wildcard \"{s}\" (only whole trailing IPv4 octets, e.g. 10.0.0.*)");
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() != 4 {
        return Err(bad());
    }
    let mut octets = [0u8; 4];
    let mut fixed = 0;
    let mut seen_star = false;
    for (i, part) in parts.iter().enumerate() {
        if *part == "*" {
            seen_star = true;
        } else if seen_star {
            return Err(bad());
        } else {
            octets[i] = part.parse().map_err(|_| bad())?;
            fixed += 1;
        }
    }
    let net = ipnet::Ipv4Net::new(Ipv4Addr::from(octets), fixed * 8).map_err(|_| bad())?;
    Ok(IpPattern::Net(IpNet::V4(net)))
}

/// A default policy plus exceptions, e.g. allow all but `198.51.100.0/24`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessRules {
    pub default: Policy,
    pub except: Vec<IpPattern>,
}

impl AccessRules {
    pub fn allow_all() -> Self {
        AccessRules::default()
    }

    /// Parses exception strings; the error names the first bad one.
    pub fn parse<S: AsRef<str>>(default: Policy, except: &[S]) -> Result<Self, String> {
        let except = except
            .iter()
            .map(|s| s.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AccessRules { default, except })
    }

    /// The exceptions as a list, e.g. `["10.0.0.0/24", "10.2.0.10-10.2.0.20"]`.
    pub fn except_text(&self) -> String {
        let items: Vec<String> = self.except.iter().map(|p| format!("\"{p}\"")).collect();
        format!("[{}]", items.join(", "))
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let excepted = self.except.iter().any(|p| p.matches(ip));
        match self.default {
            Policy::Allow => !excepted,
            Policy::Deny => excepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_pattern_form() {
        let rules = AccessRules::parse(
            Policy::Allow,
            &[
                "10.0.0.*",
                "10.1.0.0/16",
                "10.2.0.10-10.2.0.20",
                "fd00::/8",
                "192.0.2.7",
            ],
        )
        .unwrap();
        for denied in [
            "10.0.0.1",
            "10.0.0.255",
            "10.1.200.3",
            "10.2.0.10",
            "10.2.0.20",
            "fd12::1",
            "192.0.2.7",
            "::ffff:10.0.0.9",
        ] {
            assert!(!rules.allows(ip(denied)), "{denied} should be denied");
        }
        for allowed in ["10.0.1.1", "10.2.0.9", "10.2.0.21", "fe80::1", "192.0.2.8"] {
            assert!(rules.allows(ip(allowed)), "{allowed} should be allowed");
        }
    }

    #[test]
    fn deny_by_default() {
        let rules = AccessRules::parse(Policy::Deny, &["127.0.0.2"]).unwrap();
        assert!(rules.allows(ip("127.0.0.2")));
        assert!(!rules.allows(ip("127.0.0.3")));
    }

    #[test]
    fn ipv4_mapped_patterns_match_the_ipv4_clients_they_name() {
        for (pattern, inside, outside) in [
            ("::ffff:127.0.0.7", "127.0.0.7", "127.0.0.8"),
            ("::ffff:127.0.0.7/128", "127.0.0.7", "127.0.0.8"),
            ("::ffff:10.1.0.0/112", "10.1.200.3", "10.2.0.1"),
            ("::ffff:10.0.0.1-::ffff:10.0.0.9", "10.0.0.5", "10.0.0.10"),
        ] {
            let p: IpPattern = pattern.parse().unwrap();
            assert!(p.matches(ip(inside)), "{pattern} must match {inside}");
            assert!(p.matches(ip(&format!("::ffff:{inside}"))), "{pattern}");
            assert!(
                !p.matches(ip(outside)),
                "{pattern} must not match {outside}"
            );
        }
        assert_eq!(
            "::ffff:127.0.0.0/120".parse::<IpPattern>().unwrap(),
            IpPattern::Net("127.0.0.0/24".parse().unwrap())
        );
        // A wide IPv6 block stays an IPv6 rule.
        let all_v6: IpPattern = "::/0".parse().unwrap();
        assert!(all_v6.matches(ip("2001:db8::1")));
        assert!(!all_v6.matches(ip("127.0.0.1")));
    }

    #[test]
    fn bad_patterns_explain_themselves() {
        for bad in [
            "10.0.*.1",
            "10.0.0",
            "1.2.3.4/33",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-::1",
            "host",
        ] {
            assert!(bad.parse::<IpPattern>().is_err(), "{bad}");
        }
    }
}
