//! Text a peer controls, through the checks and the escaping it meets (issue 12): access-rule
//! patterns (IPv4-mapped ones are canonicalised), egress rules, destination hosts, names. No
//! panic; escaped text keeps no unsafe character and safe text reads unchanged; an accepted
//! destination is plain; a parsed pattern never keeps an IPv4-mapped form.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use sallyport::access::IpPattern;
use sallyport::egress::{check_destination, EgressRules};
use sallyport::escape::{escape, is_unsafe};

/// An address rules would never match: IPv4-mapped IPv6 (clients are canonicalised to IPv4).
fn mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let shown = escape(text);
    assert!(!shown.chars().any(is_unsafe), "{shown:?}");
    if !text.chars().any(is_unsafe) {
        assert_eq!(shown, text);
    }
    if check_destination(text).is_ok() {
        assert!(
            text.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c)),
            "{text:?}"
        );
    }
    match text.parse::<IpPattern>() {
        // A mapped pattern matches the IPv4 form of what it names, never a mapped form only.
        Ok(IpPattern::Net(ipnet::IpNet::V6(net))) => {
            assert!(net.prefix_len() < 96 || !mapped(IpAddr::V6(net.network())), "{text:?}")
        }
        Ok(IpPattern::Single(ip)) => assert!(!mapped(ip), "{text:?}"),
        Ok(IpPattern::Range(lo, hi)) => assert!(!mapped(lo) && !mapped(hi), "{text:?}"),
        _ => {}
    }
    let _ = EgressRules::parse(&[text]);
});
