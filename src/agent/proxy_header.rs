//! PROXY protocol headers (v1 text, v2 binary) telling a backend the real client address and
//! the gateway address it connected to, written before the first byte of the connection.

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2};

use crate::access::canonical;
use crate::config::ProxyProtocol;

/// Both addresses in one family: PROXY headers cannot mix IPv4 and IPv6, so an IPv4 address
/// beside an IPv6 one is written as IPv4-mapped IPv6.
fn same_family(client: SocketAddr, gateway: SocketAddr) -> (SocketAddr, SocketAddr) {
    let c = SocketAddr::new(canonical(client.ip()), client.port());
    let g = SocketAddr::new(canonical(gateway.ip()), gateway.port());
    let to_v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if c.is_ipv4() == g.is_ipv4() {
        (c, g)
    } else {
        (to_v6(c), to_v6(g))
    }
}

/// The header bytes for `kind`, empty for [`ProxyProtocol::None`].
pub fn header(kind: ProxyProtocol, client: SocketAddr, gateway: SocketAddr) -> Vec<u8> {
    let (client, gateway) = same_family(client, gateway);
    match kind {
        ProxyProtocol::None => Vec::new(),
        ProxyProtocol::V1 => v1::Addresses::from((client, gateway))
            .to_string()
            .into_bytes(),
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, gateway),
        )
        .build()
        .expect("a v2 header of two socket addresses always builds"),
    }
}

/// The PROXY v2 header of a UDP flow (transport DGRAM: 0x12 over IPv4, 0x22 over IPv6),
/// empty for [`ProxyProtocol::None`]. v1 has no UDP form; the config refuses it.
pub fn header_dgram(kind: ProxyProtocol, client: SocketAddr, gateway: SocketAddr) -> Vec<u8> {
    let (client, gateway) = same_family(client, gateway);
    match kind {
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Datagram,
            (client, gateway),
        )
        .build()
        .expect("a v2 header of two socket addresses always builds"),
        ProxyProtocol::None | ProxyProtocol::V1 => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_text() {
        let h = header(
            ProxyProtocol::V1,
            a("198.51.100.7:50000"),
            a("192.0.2.1:443"),
        );
        assert_eq!(h, b"PROXY TCP4 198.51.100.7 192.0.2.1 50000 443\r\n");
        let h = header(
            ProxyProtocol::V1,
            a("[2001:db8::7]:50000"),
            a("192.0.2.1:443"),
        );
        assert_eq!(
            String::from_utf8(h).unwrap(),
            "PROXY TCP6 2001:db8::7 ::ffff:192.0.2.1 50000 443\r\n"
        );
    }

    #[test]
    fn v2_binary_parses_back() {
        let h = header(
            ProxyProtocol::V2,
            a("198.51.100.7:50000"),
            a("[::ffff:192.0.2.1]:443"),
        );
        let parsed = v2::Header::try_from(h.as_slice()).unwrap();
        match parsed.addresses {
            v2::Addresses::IPv4(ip) => {
                assert_eq!(ip.source_address.to_string(), "198.51.100.7");
                assert_eq!(ip.source_port, 50000);
                assert_eq!(ip.destination_address.to_string(), "192.0.2.1");
                assert_eq!(ip.destination_port, 443);
            }
            other => panic!("{other:?}"),
        }
        assert!(header(ProxyProtocol::None, a("1.2.3.4:5"), a("6.7.8.9:10")).is_empty());
    }

    #[test]
    fn v2_dgram_has_the_udp_transport_byte() {
        let h = header_dgram(
            ProxyProtocol::V2,
            a("198.51.100.7:50000"),
            a("192.0.2.1:53"),
        );
        assert_eq!(h[13], 0x12, "AF_INET + DGRAM");
        let h6 = header_dgram(ProxyProtocol::V2, a("[2001:db8::7]:5"), a("192.0.2.1:53"));
        assert_eq!(h6[13], 0x22, "AF_INET6 + DGRAM");
        assert!(header_dgram(ProxyProtocol::None, a("1.2.3.4:5"), a("6.7.8.9:10")).is_empty());
    }
}
