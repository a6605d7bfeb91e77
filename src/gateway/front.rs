//! The real client address behind a front balancer (issue 18 item 3): public TCP connections
//! from the addresses in gateway.toml's `[clients] proxy_protocol_from` start with a PROXY v1
//! or v2 header, and the client address it carries stands for the connection's peer.
//!
//! Rules:
//! - Trust is by the connection's own peer address (the balancer's), checked at accept against
//!   the configuration in force then (a reload applies to connections accepted after it).
//! - From a trusted address the header is required: it is read before anything else of the
//!   connection (at most [`HEADER_LIMIT`] bytes, within [`HEADER_TIMEOUT`]); bytes after it are
//!   the client's first bytes and reach the backend unchanged. A connection without a valid
//!   header in time is closed (reset when malformed) and counted as `proxy_header`.
//! - The header's source address then replaces the peer for everything that follows: the
//!   listener's bans, rate limits, automatic bans and client rules, the connection limits per
//!   address, statistics, logs, audit records, routing logs, and the address the agent writes
//!   in its own PROXY header or uses in transparent mode. A v2 `LOCAL` header (a balancer's own
//!   health check), a v1 `UNKNOWN` one, or an address family other than IPv4/IPv6 keeps the
//!   balancer's address.
//! - From any other address a header is never read: the bytes are the client's, passed on as
//!   data like any other (a backend that expects PROXY reads the agent's header first, which
//!   carries the connection's real peer), so nobody can claim another address. On a port shared
//!   by host name such bytes are neither TLS nor HTTP and the client is reset as garbage.
//! - UDP listeners never read a header: a datagram from a trusted address is that address's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::admit::{admit_to_listener, take_permit};
use super::listener::ListenerInfo;
use super::site::Site;
use super::Shared;
use crate::access::canonical;
use crate::net;

/// The time a trusted balancer has to send the whole header after the accept.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The most bytes a header may take: a v1 header is at most 107; a v2 header is 16 bytes and
/// its addresses (36 for IPv6) plus TLVs, which real balancers keep under a few hundred bytes.
pub const HEADER_LIMIT: usize = 4096;

/// The v2 signature, the first 12 bytes of a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The start of a v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header, its CRLF included.
const V1_MAX: usize = 107;

/// Whether connections from `peer` must start with a PROXY header.
pub(super) fn trusted(shared: &Shared, peer: SocketAddr) -> bool {
    let list = &shared.config().proxy_protocol_from;
    let ip = canonical(peer.ip());
    !list.is_empty() && list.iter().any(|net| net.contains(&ip))
}

/// What the bytes read so far from a trusted balancer say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    NeedMore,
    /// A complete header of `len` bytes; the client's address when it names one.
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
    /// Not a PROXY header (or one over [`HEADER_LIMIT`]); why, for the log.
    Malformed(String),
}

/// Classifies the first bytes of a trusted connection: the framing is checked here (so an
/// incomplete header is told from a bad one exactly), the fields by the `ppp` crate.
pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    let n = bytes.len();
    if bytes[..n.min(12)] == V2_SIGNATURE[..n.min(12)] {
        if n < 16 {
            return Parsed::NeedMore;
        }
        let len = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if len > HEADER_LIMIT {
            return Parsed::Malformed(format!(
                "a PROXY v2 header of {len} bytes (at most {HEADER_LIMIT})"
            ));
        }
        if n < len {
            return Parsed::NeedMore;
        }
        return match ppp::v2::Header::try_from(&bytes[..len]) {
            Ok(h) => Parsed::Header {
                len,
                client: v2_client(&h),
            },
            Err(e) => Parsed::Malformed(format!("an invalid PROXY v2 header: {e}")),
        };
    }
    if bytes[..n.min(6)] == V1_PREFIX[..n.min(6)] {
        let Some(lf) = bytes.iter().take(V1_MAX).position(|&b| b == b'\n') else {
            if n >= V1_MAX {
                return Parsed::Malformed(format!("a PROXY v1 line longer than {V1_MAX} bytes"));
            }
            return Parsed::NeedMore;
        };
        return match ppp::v1::Header::try_from(&bytes[..=lf]) {
            Ok(h) => Parsed::Header {
                len: lf + 1,
                client: v1_client(&h.addresses),
            },
            Err(e) => Parsed::Malformed(format!("an invalid PROXY v1 header: {e}")),
        };
    }
    Parsed::Malformed("no PROXY header (the connection's first bytes are not one)".into())
}

fn v2_client(h: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == ppp::v2::Command::Local {
        return None;
    }
    match h.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(addr(a.source_address.into(), a.source_port)),
        ppp::v2::Addresses::IPv6(a) => Some(addr(a.source_address.into(), a.source_port)),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    }
}

fn v1_client(a: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match a {
        ppp::v1::Addresses::Tcp4(a) => Some(addr(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => Some(addr(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Unknown => None,
    }
}

/// Client addresses are compared and shown in one form (IPv4-mapped IPv6 as IPv4).
fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(canonical(ip), port)
}

/// Reads the header of a trusted connection; the client's address (the balancer's when the
/// header names none) and the bytes read after the header. `None`: the connection was closed
/// (it left, or its header was missing or bad: counted and logged under `label`).
pub(super) async fn read_client(
    shared: &Shared,
    stream: &mut TcpStream,
    peer: SocketAddr,
    label: &str,
) -> Option<(SocketAddr, BytesMut)> {
    net::tune(stream);
    let mut buf = BytesMut::with_capacity(512);
    let bad = |why: &str| {
        let occ = shared.stats.proxy_header.hit();
        if occ.log {
            tracing::warn!(
                listener = %label, balancer = %peer,
                "connection from a trusted front balancer closed: {why}{}", occ.tally()
            );
        }
    };
    let read = tokio::time::timeout(HEADER_TIMEOUT, read_header(stream, &mut buf)).await;
    match read {
        Ok(Ok(Parsed::Header { len, client })) => {
            let rest = buf.split_off(len);
            Some((client.unwrap_or(peer), rest))
        }
        Ok(Ok(Parsed::Malformed(why))) => {
            bad(&why);
            net::reset_on_close(stream);
            None
        }
        // It left without a byte (a balancer's check that gave up at once): nothing to count.
        Ok(Ok(Parsed::NeedMore)) if buf.is_empty() => None,
        Ok(Ok(Parsed::NeedMore)) => {
            bad("it closed before its PROXY header was complete");
            None
        }
        // It reset: nothing to count.
        Ok(Err(_)) => None,
        Err(_) => {
            let why = format!(
                "no complete PROXY header within {} ({} bytes)",
                humantime::format_duration(HEADER_TIMEOUT),
                buf.len()
            );
            bad(&why);
            None
        }
    }
}

/// Reads until the bytes are a complete header or cannot become one; `NeedMore` at the end
/// of stream.
async fn read_header(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Parsed> {
    let mut chunk = [0u8; 1024];
    loop {
        let room = (HEADER_LIMIT + 1 - buf.len()).min(chunk.len());
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Ok(Parsed::NeedMore);
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(buf) {
            Parsed::NeedMore => continue,
            decided => return Ok(decided),
        }
    }
}

/// A trusted connection to a listener of its own port: the header, then the listener's checks
/// and the gateway's connection limits with the client's address, then the client is served.
pub(super) async fn serve_fronted(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    let label = info.spec.name.clone();
    let Some((client, first)) = read_client(&shared, &mut stream, peer, &label).await else {
        return;
    };
    if !admit_to_listener(&shared, &site, &info, client) {
        net::reset(stream);
        return;
    }
    let Some(permit) = take_permit(&shared, Some(&info), &label, client) else {
        net::reset(stream);
        return;
    };
    super::client::serve(shared, site, info, stream, client, permit, first).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(client: SocketAddr, gateway: SocketAddr) -> Vec<u8> {
        let kind = crate::config::ProxyProtocol::V2;
        crate::agent::proxy_header::header(kind, client, gateway)
    }

    #[test]
    fn v1_and_v2_headers_give_the_client_and_their_length_byte_by_byte() {
        let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let gw: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 443\r\n".to_vec();
        for header in [v1, v2(client, gw)] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            // Every cut inside the header needs more; the whole one is found, not beyond.
            for cut in 1..header.len() {
                assert_eq!(parse(&bytes[..cut]), Parsed::NeedMore, "cut at {cut}");
            }
            let want = Parsed::Header {
                len: header.len(),
                client: Some(client),
            };
            assert_eq!(parse(&bytes), want);
        }
        // IPv6, and an IPv4-mapped source shown as IPv4.
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 5 443\r\n";
        let Parsed::Header { client, .. } = parse(v6) else {
            panic!()
        };
        assert_eq!(client, Some("[2001:db8::7]:5".parse().unwrap()));
        let mapped = v2(
            "[::ffff:198.51.100.9]:6".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
        );
        let Parsed::Header { client, .. } = parse(&mapped) else {
            panic!()
        };
        assert_eq!(client, Some("198.51.100.9:6".parse().unwrap()));
    }

    #[test]
    fn local_and_unknown_headers_keep_the_peer_and_garbage_is_malformed() {
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(unknown),
            Parsed::Header {
                len: unknown.len(),
                client: None
            }
        );
        // v2 LOCAL (HAProxy's own health checks): 16 bytes, no addresses.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Parsed::Header {
                len: 16,
                client: None
            }
        );
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PROXY TCP4 not-an-address 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 443\r\n",
            b"\x16\x03\x01\x02\x00",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A v1 line without its end within 107 bytes, a v2 header over the limit.
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Parsed::Malformed(_)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Parsed::Malformed(_)));
        // A wrong version nibble.
        let mut v3 = V2_SIGNATURE.to_vec();
        v3.extend_from_slice(&[0x31, 0x11, 0, 12]);
        v3.extend_from_slice(&[0; 12]);
        assert!(matches!(parse(&v3), Parsed::Malformed(_)));
    }
}
