//! Ban entries as both halves see them: parsing an operator's `IP|CIDR`, and the checks every
//! entry of a pushed ban list must pass on the gateway (docs/protocol.md section 4).
//!
//! Rules: a ban names one address or one network whose host bits are zero, IPv4 written as
//! IPv4 (an IPv4-mapped IPv6 form is turned into IPv4 when typed, refused when pushed); its reason
//! is printable text of at most [`MAX_BAN_REASON`] bytes; it lasts at most [`MAX_BAN_MS`]. A list
//! holds at most [`MAX_BANS`] entries.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::access::canonical_net;
pub use crate::protocol::{Ban, MAX_BANS, MAX_BAN_REASON};

/// The longest ban: ten years (longer is refused rather than overflowing a clock).
pub const MAX_BAN_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// Parses what an operator typed: `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/32`. A network
/// with host bits set is refused with the network it probably meant.
pub fn parse_target(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR network"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text} has host bits set: did you mean {}?",
                net.trunc()
            ));
        }
        net
    } else {
        let ip: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR network"))?;
        IpNet::from(ip)
    };
    Ok(canonical_net(net))
}

/// Checks a reason text: printable (no control characters: it reaches logs and pages), short.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.len() > MAX_BAN_REASON {
        return Err(format!(
            "reason is {} bytes; at most {MAX_BAN_REASON} are allowed",
            reason.len()
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("reason contains control characters".to_string());
    }
    Ok(())
}

/// Checks one pushed entry; the network it bans, or why it is refused.
pub fn validate(ban: &Ban) -> Result<IpNet, String> {
    let max = if ban.addr.is_ipv4() { 32 } else { 128 };
    if ban.prefix > max {
        return Err(format!(
            "{}/{}: prefix longer than {max} bits",
            ban.addr, ban.prefix
        ));
    }
    let net = IpNet::new(ban.addr, ban.prefix).expect("prefix checked above");
    if net.trunc() != net {
        return Err(format!("{net}: host bits set"));
    }
    if canonical_net(net) != net {
        return Err(format!(
            "{net}: an IPv4-mapped address must be sent as IPv4"
        ));
    }
    if ban.remaining_ms > MAX_BAN_MS {
        return Err(format!("{net}: lasts longer than ten years"));
    }
    check_reason(&ban.reason).map_err(|e| format!("{net}: {e}"))?;
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(addr: &str, prefix: u8) -> Ban {
        Ban {
            addr: addr.parse().unwrap(),
            prefix,
            remaining_ms: 0,
            reason: "x".into(),
        }
    }

    #[test]
    fn targets_parse_and_canonicalize() {
        assert_eq!(
            parse_target("203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_target("::ffff:203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_target("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        let err = parse_target("10.0.0.5/24").unwrap_err();
        assert!(err.contains("did you mean 10.0.0.0/24"), "{err}");
        assert!(parse_target("nonsense").is_err());
        assert!(parse_target("10.0.0.0/33").is_err());
    }

    #[test]
    fn pushed_entries_are_checked() {
        assert!(validate(&ban("10.0.0.0", 8)).is_ok());
        assert!(validate(&ban("10.0.0.1", 8))
            .unwrap_err()
            .contains("host bits"));
        assert!(validate(&ban("10.0.0.1", 33))
            .unwrap_err()
            .contains("prefix"));
        assert!(validate(&ban("::ffff:10.0.0.1", 128))
            .unwrap_err()
            .contains("IPv4"));
        let mut long = ban("10.0.0.1", 32);
        long.reason = "r".repeat(MAX_BAN_REASON + 1);
        assert!(validate(&long).is_err());
        long.reason = "a\x1b[31mred".into();
        assert!(validate(&long).unwrap_err().contains("control"));
        long.reason = "ok".into();
        long.remaining_ms = MAX_BAN_MS + 1;
        assert!(validate(&long).is_err());
    }
}
