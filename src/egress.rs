//! The gateway's `[egress] allow` list: which destinations the outbound proxy may reach.
//!
//! The list lives in gateway.toml, so the DMZ's owner decides; agents never push it. An empty
//! list allows nothing. Entries are `HOST:PORTS`:
//!
//! | entry                      | allows                                                    |
//! |----------------------------|-----------------------------------------------------------|
//! | `sftp.partner.example:22`  | that name (as the client asked for it), port 22           |
//! | `*.partner.example:443`    | any name below `partner.example` (not the bare domain)    |
//! | `203.0.113.7:443`          | that address                                              |
//! | `203.0.113.0/24:443`       | any address in that network                               |
//! | `[2001:db8::/32]:443`      | IPv6 networks and addresses go in brackets                |
//!
//! `PORTS` is a port, a range `8000-8099`, or `*`. A name rule allows whatever the name
//! resolves to (the operator trusts that name); an address rule applies to the addresses a
//! requested name resolves to as well, and only those addresses are dialed.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    /// A lower-case name, without a trailing dot.
    Name(String),
    /// `*.domain`: stored as `.domain`.
    Below(String),
    Net(IpNet),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    host: Host,
    ports: (u16, u16),
}

/// A parsed `[egress] allow` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressRules {
    rules: Vec<Rule>,
    /// The entries as written (for reload reports and `--check`).
    entries: Vec<String>,
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port \"{p}\""))
    };
    if s == "*" {
        return Ok((1, u16::MAX));
    }
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b {
                return Err(format!("empty port range \"{s}\""));
            }
            Ok((a, b))
        }
        None => port(s).map(|p| (p, p)),
    }
}

fn parse_rule(entry: &str) -> Result<Rule, String> {
    let entry = entry.trim();
    let (host, ports) = if let Some(rest) = entry.strip_prefix('[') {
        let (host, ports) = rest
            .split_once("]:")
            .ok_or_else(|| format!("\"{entry}\": expected [IPv6]:PORT"))?;
        (host, ports)
    } else {
        entry
            .rsplit_once(':')
            .ok_or_else(|| format!("\"{entry}\": expected HOST:PORT (the port is required)"))?
    };
    if host.contains(':') && !entry.starts_with('[') {
        return Err(format!(
            "\"{entry}\": put IPv6 addresses in brackets: [{host}]:PORT"
        ));
    }
    let ports = parse_ports(ports).map_err(|e| format!("\"{entry}\": {e}"))?;
    let host = if let Ok(net) = host.parse::<IpNet>() {
        Host::Net(crate::access::canonical_net(net.trunc()))
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        Host::Net(crate::access::canonical_net(IpNet::from(ip)))
    } else if let Some(domain) = host.strip_prefix("*.") {
        check_name(domain).map_err(|e| format!("\"{entry}\": {e}"))?;
        Host::Below(format!(".{}", normalize(domain)))
    } else {
        check_name(host).map_err(|e| format!("\"{entry}\": {e}"))?;
        Host::Name(normalize(host))
    };
    Ok(Rule { host, ports })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("invalid host name \"{name}\""))
    }
}

/// Checks a destination host as an agent's proxy client or an outbound hello names it: an IP
/// address literal or a DNS name (letters, digits, '-', '_' in dot-separated labels). Anything
/// else (spaces, control characters, '%', '@', '/') is refused at the edge, before it is
/// resolved, logged or shown; the error shows the host escaped.
pub fn check_destination(host: &str) -> Result<(), String> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    check_name(host).map_err(|_| {
        format!(
            "invalid destination host \"{}\"",
            crate::escape::escape(host)
        )
    })
}

impl EgressRules {
    /// Parses the list; the error names the entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| parse_rule(e.as_ref()))
            .collect::<Result<_, _>>()
            .map(|rules| EgressRules {
                rules,
                entries: entries.iter().map(|e| e.as_ref().to_string()).collect(),
            })
    }

    /// Parses one entry (for errors that name the line of the entry).
    pub fn check_entry(entry: &str) -> Result<(), String> {
        parse_rule(entry).map(|_| ())
    }

    /// The entries as written.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule is an address or network rule.
    pub fn has_addr_rules(&self) -> bool {
        self.rules.iter().any(|r| matches!(r.host, Host::Net(_)))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether a name rule allows `name:port` (whatever it resolves to). IP literals are
    /// matched by [`EgressRules::allows_addr`] instead.
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        let name = normalize(name);
        self.rules.iter().any(|r| {
            (r.ports.0..=r.ports.1).contains(&port)
                && match &r.host {
                    Host::Name(n) => *n == name,
                    Host::Below(suffix) => name.ends_with(suffix.as_str()),
                    Host::Net(_) => false,
                }
        })
    }

    /// Whether an address rule allows `ip:port`.
    pub fn allows_addr(&self, ip: IpAddr, port: u16) -> bool {
        let ip = crate::access::canonical(ip);
        self.rules.iter().any(|r| {
            (r.ports.0..=r.ports.1).contains(&port)
                && matches!(&r.host, Host::Net(net) if net.contains(&ip))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(list: &[&str]) -> EgressRules {
        EgressRules::parse(list).unwrap()
    }

    #[test]
    fn names_wildcards_networks_and_ports() {
        let r = rules(&[
            "sftp.partner.example:22",
            "*.cdn.example:443",
            "203.0.113.0/24:443",
            "198.51.100.7:8000-8099",
            "[2001:db8::/32]:*",
        ]);
        assert!(r.allows_name("SFTP.Partner.Example.", 22));
        assert!(!r.allows_name("sftp.partner.example", 23));
        assert!(!r.allows_name("partner.example", 22));
        assert!(r.allows_name("a.b.cdn.example", 443));
        assert!(
            !r.allows_name("cdn.example", 443),
            "*.domain is below the domain only"
        );
        assert!(!r.allows_name("evilcdn.example", 443));
        assert!(r.allows_addr("203.0.113.200".parse().unwrap(), 443));
        assert!(!r.allows_addr("203.0.114.1".parse().unwrap(), 443));
        assert!(r.allows_addr("198.51.100.7".parse().unwrap(), 8099));
        assert!(!r.allows_addr("198.51.100.7".parse().unwrap(), 8100));
        assert!(r.allows_addr("2001:db8::1".parse().unwrap(), 1));
        assert!(r.allows_addr("::ffff:203.0.113.9".parse().unwrap(), 443));
        // A name is not an address: "203.0.113.5" as a name matches no name rule.
        assert!(!r.allows_name("203.0.113.5", 443));
    }

    #[test]
    fn empty_allows_nothing() {
        let r = EgressRules::default();
        assert!(!r.allows_name("example.com", 443));
        assert!(!r.allows_addr("127.0.0.1".parse().unwrap(), 80));
    }

    #[test]
    fn bad_entries_are_named() {
        for (entry, want) in [
            ("example.com", "the port is required"),
            ("example.com:0", "invalid port"),
            ("example.com:9-8", "empty port range"),
            ("2001:db8::1:443", "brackets"),
            ("[2001:db8::1:443", "expected [IPv6]:PORT"),
            ("exa mple.com:1", "invalid host name"),
        ] {
            let e = EgressRules::parse(&[entry]).unwrap_err();
            assert!(e.contains(want), "{entry}: {e}");
        }
    }
}
