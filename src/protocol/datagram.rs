//! UDP listeners on the wire: how a pushed listener says it is UDP, and how one flow's datagrams
//! travel over its data connection.
//!
//! **Marking.** `ListenerSpec` is frozen (payloads must decode exactly, so no field can be
//! added without a new protocol version). A UDP listener is therefore pushed with
//! [`UDP_MARKER`] as the first entry of `clients.except`. A gateway that knows UDP strips it
//! and opens UDP sockets; a gateway that does not parses it as an address pattern, fails, and
//! answers that listener alone `Failed` with the marker's text in the error, so such a
//! gateway never opens a UDP listener as TCP and the agent's log says why. The second entry
//! is the listener's idle timeout ([`idle_entry`], `idle_timeout=60000ms`), so the gateway can
//! end a flow a hung or hostile agent keeps: it does so after the idle timeout plus
//! [`GATEWAY_IDLE_MARGIN`] without a datagram either way. A spec without that entry (an agent
//! of the first UDP release) gets the default 60 s.
//!
//! **Framing.** After the data connection's ack, each datagram is a 2-byte big-endian length
//! and that many payload bytes, both ways. Boundaries are kept exactly; a datagram is never
//! split or merged. A zero length is a valid (empty) datagram.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first `except` entry of a UDP listener's spec. It contains no `*`, `/` or `-`, so a
/// gateway without UDP reports it whole as an "invalid address pattern".
pub const UDP_MARKER: &str = "protocol=udp: this gateway does not forward UDP, upgrade it";

/// The largest payload a frame can carry (and more than any UDP datagram over IPv4 or IPv6
/// without jumbograms).
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// Whether a pushed listener is UDP (its first exception is the marker).
pub fn is_udp(except: &[String]) -> bool {
    except.first().map(String::as_str) == Some(UDP_MARKER)
}

/// How the idle-timeout entry starts; the milliseconds and `ms` follow. Like the marker, it is
/// no address pattern, so a gateway that does not read it fails the listener with its text.
pub const IDLE_PREFIX: &str = "idle_timeout=";

/// A flow's idle timeout when the spec does not say (agents of the first UDP release).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// The idle timeouts an agent may push (its config's bounds).
const IDLE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(86_400);

/// How much longer than the listener's idle timeout the gateway waits before it ends a silent
/// flow itself: the agent, whose timer runs first, normally ends it.
pub const GATEWAY_IDLE_MARGIN: Duration = Duration::from_secs(5);

/// The `except` entry that carries a UDP listener's idle timeout.
pub fn idle_entry(idle: Duration) -> String {
    format!("{IDLE_PREFIX}{}ms", idle.as_millis())
}

/// The client rules without the marker and the idle-timeout entry.
pub fn rules_of(except: &[String]) -> &[String] {
    if !is_udp(except) {
        return except;
    }
    match except.get(1) {
        Some(e) if e.starts_with(IDLE_PREFIX) => &except[2..],
        _ => &except[1..],
    }
}

/// A UDP listener's idle timeout: its entry, or [`DEFAULT_IDLE`] without one; an error for an
/// entry that is not `idle_timeout=<ms>ms` within 100 ms..24 h.
pub fn idle_of(except: &[String]) -> Result<Duration, String> {
    let Some(entry) = except.get(1).filter(|e| e.starts_with(IDLE_PREFIX)) else {
        return Ok(DEFAULT_IDLE);
    };
    let ms = entry[IDLE_PREFIX.len()..]
        .strip_suffix("ms")
        .and_then(|n| n.parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|d| IDLE_RANGE.contains(d));
    ms.ok_or_else(|| {
        format!("invalid UDP idle timeout {entry:?}: expected idle_timeout=<100..86400000>ms")
    })
}

/// Appends one framed datagram to `out`. `payload` must be at most [`MAX_PAYLOAD`] bytes.
pub fn encode(payload: &[u8], out: &mut BytesMut) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Takes one whole datagram off the front of `buf`, if one is there.
pub fn decode(buf: &mut BytesMut) -> Option<BytesMut> {
    if buf.len() < 2 {
        return None;
    }
    let len = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if buf.len() < 2 + len {
        return None;
    }
    buf.advance(2);
    Some(buf.split_to(len))
}

/// Reads the next datagram from a data connection, `buf` holding bytes read before. `None` at
/// a clean end of stream between datagrams; an end inside one is an error.
pub async fn read<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<Option<BytesMut>> {
    loop {
        if let Some(d) = decode(buf) {
            return Ok(Some(d));
        }
        buf.reserve(2 + MAX_PAYLOAD);
        if reader.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "data connection closed in the middle of a datagram",
                ))
            };
        }
    }
}

/// Writes one datagram and flushes it (a TLS writer would otherwise hold it).
pub async fn write<W: AsyncWrite + Unpin>(writer: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(2 + payload.len());
    encode(payload, &mut out);
    writer.write_all(&out).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_boundaries() {
        let mut buf = BytesMut::new();
        encode(b"abc", &mut buf);
        encode(b"", &mut buf);
        encode(&[7u8; MAX_PAYLOAD], &mut buf);
        assert_eq!(&buf[..5], &[0, 3, b'a', b'b', b'c']);
        assert_eq!(&decode(&mut buf).unwrap()[..], b"abc");
        assert!(decode(&mut buf).unwrap().is_empty());
        let mut partial = buf.split_to(1000);
        assert!(decode(&mut partial).is_none(), "an incomplete frame waits");
        partial.unsplit(buf);
        assert_eq!(decode(&mut partial).unwrap().len(), MAX_PAYLOAD);
        assert!(partial.is_empty());
    }

    #[test]
    fn the_marker_fails_as_an_address_pattern_on_a_gateway_without_udp() {
        let err = crate::access::AccessRules::parse(
            crate::access::Policy::Allow,
            &[UDP_MARKER.to_string()],
        )
        .unwrap_err();
        assert!(err.contains(UDP_MARKER), "{err}");
        let except = vec![UDP_MARKER.to_string(), "10.0.0.1".to_string()];
        assert!(is_udp(&except));
        assert_eq!(rules_of(&except), &["10.0.0.1".to_string()]);
        assert!(!is_udp(&except[1..]));
        assert_eq!(idle_of(&except), Ok(DEFAULT_IDLE));
    }

    #[test]
    fn the_idle_entry_round_trips_and_is_checked() {
        let mut except = vec![
            UDP_MARKER.to_string(),
            idle_entry(Duration::from_millis(700)),
        ];
        except.push("10.0.0.1".into());
        assert_eq!(except[1], "idle_timeout=700ms");
        assert_eq!(idle_of(&except), Ok(Duration::from_millis(700)));
        assert_eq!(rules_of(&except), &["10.0.0.1".to_string()]);
        for bad in [
            "idle_timeout=5ms",
            "idle_timeout=x",
            "idle_timeout=700",
            "idle_timeout=99999999999ms",
        ] {
            except[1] = bad.into();
            assert!(idle_of(&except).unwrap_err().contains(bad), "{bad}");
        }
        // A gateway without UDP idle support fails it as an address pattern, with its text.
        let err = crate::access::AccessRules::parse(
            crate::access::Policy::Allow,
            &[idle_entry(DEFAULT_IDLE)],
        )
        .unwrap_err();
        assert!(err.contains("idle_timeout=60000ms"), "{err}");
    }

    #[tokio::test]
    async fn read_reports_a_cut_datagram() {
        let mut buf = BytesMut::new();
        let mut src: &[u8] = &[0, 5, 1, 2];
        assert!(read(&mut src, &mut buf).await.is_err());
        let mut src: &[u8] = &[0, 1, 9];
        let mut buf = BytesMut::new();
        assert_eq!(&read(&mut src, &mut buf).await.unwrap().unwrap()[..], &[9]);
        assert!(read(&mut src, &mut buf).await.unwrap().is_none());
    }
}
