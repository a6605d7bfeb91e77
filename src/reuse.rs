//! Reusable data connections (protocol v3 over TLS, [`Feature::DataReuse`]; v4 in plaintext,
//! [`Feature::PlainReuse`]): the framing inside the stream of a warm-pool connection, and the
//! pump that pipes one client through it.
//!
//! Rules (docs/protocol.md, "Reusable data connections"):
//! - Only pool connections that negotiated reuse are framed ([`negotiated`]): over TLS from v3
//!   on; in plaintext only from v4 on, which the gateway grants only with `[control]
//!   data_reuse = true`. Other plaintext data connections keep the raw byte stream and
//!   splice(2).
//! - After `PoolAccepted`, each direction is a sequence of records: `01 len(u16 BE) data` (1 to
//!   65,535 bytes of the client's stream), `02` end of stream for this direction (the
//!   half-close: the receiver shuts down its plain socket's send side), `03` reset (the sender's
//!   plain side was reset; the connection is closed), `04` last (the sender will not reuse this
//!   connection after this client; it may come anywhere before the sender's `02`).
//! - One client at a time per connection: never multiplexed.
//! - The connection goes back to the warm pool on both sides only when both directions ended
//!   with `02`, no error happened, and neither side sent `04`. Anything else closes it: an error
//!   or reset resets both plain sides and the data connection (as [`crate::pipe`] does), a clean
//!   end with `04` closes the connection with a TLS close_notify.
//! - Each side decides reuse from what it has seen itself, and the other side has seen the same
//!   records, so both agree without another round trip.
//! - Bytes read past the peer's `02` belong to the connection, not to the client: on the agent
//!   they are the gateway's next `PoolAssign` (the gateway may park the connection and hand it
//!   the next client before the agent has read the previous client's `02`), so they go back
//!   with the connection ([`Reusable`]) and are never a reason to close it. The gateway, to
//!   which an agent never writes between clients, closes a connection that brought any.
//!
//! Like [`crate::pipe`], every direction flushes its writer whenever its reader would block.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net;
use crate::pipe::{read_or_flush, PipeCounters, CHUNK, IDLE_CHUNK};
#[cfg(doc)]
use crate::protocol::Feature;
use crate::ratelimit::{PipeThrottle, Throttle};
use crate::transport::Stream;

/// Whether a pool connection of this negotiated version carries its clients in reuse records:
/// over TLS from v3 on ([`Feature::DataReuse`]), in plaintext from v4 on
/// ([`Feature::PlainReuse`], which the gateway offers only with `[control] data_reuse`). The
/// gateway applies it to the version it acknowledged, the agent to the version it read in that
/// ack, so both sides agree.
pub fn negotiated(version: u16, stream: &Stream) -> bool {
    use crate::protocol::Feature;
    Feature::DataReuse.on(version) && (stream.is_tls() || Feature::PlainReuse.on(version))
}

/// `01 len data`: bytes of the client's stream.
pub const DATA: u8 = 0x01;
/// `02`: end of stream for this direction.
pub const END: u8 = 0x02;
/// `03`: the sender's plain side was reset.
pub const RESET: u8 = 0x03;
/// `04`: the sender closes this connection after the current client.
pub const LAST: u8 = 0x04;
/// Record type and length.
pub const HEADER: usize = 3;

/// How long closing a connection that will not be reused may take (close_notify, then the
/// peer's).
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

/// A connection whose client ended cleanly both ways and that both sides keep: the stream and
/// the bytes read past the peer's end-of-stream record (on the agent, the start of the next
/// `PoolAssign` when the gateway was quick; the caller reads them first).
pub type Reusable = (Stream, BytesMut);

/// Pipes `plain` (the client, or the backend) and `framed` (a reuse-framed data connection)
/// until both directions have ended. `plain_prefix` was read from `plain` and goes to `framed`
/// first; `framed_buf` holds records already read from `framed`; `to_plain_first` goes to
/// `plain` before anything (a PROXY header). `last`: this side will not reuse the connection.
///
/// Returns the connection when it may serve another client, `None` when it was closed (a `04`
/// either way). On an error (or when dropped before the end) both sides are reset. Counters and
/// `throttle` as in [`crate::pipe::pipe_throttled`], `a` being `plain` and `b` the framed side,
/// in payload bytes.
#[allow(clippy::too_many_arguments)]
pub async fn pipe_framed(
    plain: TcpStream,
    plain_prefix: &[u8],
    framed: Stream,
    framed_buf: BytesMut,
    to_plain_first: &[u8],
    last: bool,
    counters: &PipeCounters,
    throttle: &PipeThrottle,
) -> io::Result<Option<Reusable>> {
    let mut ends = Armed {
        plain: Some(plain),
        framed: Some(framed),
    };
    let result = {
        let (Some(plain), Some(framed)) = (ends.plain.as_mut(), ends.framed.as_mut()) else {
            unreachable!("both ends are set above");
        };
        let (mut pr, mut pw) = plain.split();
        let (mut fr, mut fw) = tokio::io::split(framed);
        let up = encode(
            &mut pr,
            plain_prefix,
            &mut fw,
            last,
            counters,
            &throttle.a_to_b,
        );
        let down = decode(
            &mut fr,
            framed_buf,
            to_plain_first,
            &mut pw,
            counters,
            &throttle.b_to_a,
        );
        tokio::try_join!(up, down)
    };
    let ((), (leftover, peer_last)) = result?;
    let (plain, framed) = ends.disarm();
    drop(plain);
    let mut framed = framed;
    if last || peer_last {
        net::close_gently(&mut framed, CLOSE_LIMIT).await;
        return Ok(None);
    }
    Ok(Some((framed, leftover)))
}

/// Both ends of a framed pipe; dropped while armed (an error, a cancellation), both are reset.
struct Armed {
    plain: Option<TcpStream>,
    framed: Option<Stream>,
}

impl Armed {
    fn disarm(&mut self) -> (TcpStream, Stream) {
        match (self.plain.take(), self.framed.take()) {
            (Some(p), Some(f)) => (p, f),
            _ => unreachable!("disarmed once"),
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(p) = &self.plain {
            net::reset_on_close(p);
        }
        if let Some(f) = &self.framed {
            f.reset_on_close();
        }
    }
}

/// Plain to framed: `04` first when `last`, the prefix and every read as `01` records, `02` at
/// end of stream. A reset read from the plain side is announced with `03` (best effort). Reads
/// are capped and paced by `throttle` after the prefix, as in [`crate::pipe`].
async fn encode<R, W>(
    reader: &mut R,
    prefix: &[u8],
    writer: &mut W,
    last: bool,
    counters: &PipeCounters,
    throttle: &Throttle,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (read, written) = (&counters.a_read, &counters.b_written);
    let mut unflushed = false;
    if last {
        writer.write_all(&[LAST]).await?;
        unflushed = true;
    }
    for chunk in prefix.chunks(u16::MAX as usize) {
        read.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let mut record = Vec::with_capacity(HEADER + chunk.len());
        record.extend_from_slice(&data_header(chunk.len()));
        record.extend_from_slice(chunk);
        writer.write_all(&record).await?;
        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        unflushed = true;
    }
    // The header goes in front of the payload in the same buffer: one write, one TLS record.
    // Records of header + payload fill whole TLS records (16 KiB each): a full CHUNK with the
    // header on top would add a 3-byte TLS record to every write.
    let mut buf = vec![0u8; IDLE_CHUNK];
    loop {
        let cap = HEADER + throttle.read_cap(buf.len() - HEADER);
        let n = match read_or_flush(reader, &mut buf[HEADER..cap], writer, &mut unflushed).await {
            Ok(n) => n,
            Err(e) => {
                let announce = async {
                    writer.write_all(&[RESET]).await?;
                    writer.flush().await
                };
                let _ = tokio::time::timeout(Duration::from_millis(200), announce).await;
                return Err(e);
            }
        };
        if n == 0 {
            break;
        }
        read.fetch_add(n as u64, Ordering::Relaxed);
        buf[..HEADER].copy_from_slice(&data_header(n));
        writer.write_all(&buf[..HEADER + n]).await?;
        unflushed = true;
        written.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() - HEADER && buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        if !throttle.is_unlimited() {
            // The TLS writer may hold bytes while this direction sleeps off its debt.
            writer.flush().await?;
            unflushed = false;
            throttle.pass(n).await;
        }
    }
    writer.write_all(&[END]).await?;
    writer.flush().await
}

/// The header of a data record of `len` (1 to 65,535) bytes.
pub fn data_header(len: usize) -> [u8; HEADER] {
    let len = u16::try_from(len).expect("records carry at most 65,535 bytes");
    let [hi, lo] = len.to_be_bytes();
    [DATA, hi, lo]
}

/// Framed to plain: `to_plain_first`, then each record's payload, a half-close at `02`.
/// Returns the bytes read past the `02` and whether the peer sent `04`. Payload is paced by
/// `throttle` once written (a record is already read whole, so reads are not capped).
async fn decode<R, W>(
    reader: &mut R,
    mut buf: BytesMut,
    to_plain_first: &[u8],
    writer: &mut W,
    counters: &PipeCounters,
    throttle: &Throttle,
) -> io::Result<(BytesMut, bool)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (read, written) = (&counters.b_read, &counters.a_written);
    if !to_plain_first.is_empty() {
        read.fetch_add(to_plain_first.len() as u64, Ordering::Relaxed);
        writer.write_all(to_plain_first).await?;
        written.fetch_add(to_plain_first.len() as u64, Ordering::Relaxed);
    }
    let mut records = Records::default();
    let mut room = IDLE_CHUNK;
    loop {
        while let Some(step) = records.next(&mut buf)? {
            match step {
                Step::Payload(n) => {
                    read.fetch_add(n as u64, Ordering::Relaxed);
                    writer.write_all(&buf[..n]).await?;
                    buf.advance(n);
                    written.fetch_add(n as u64, Ordering::Relaxed);
                    if !throttle.is_unlimited() {
                        throttle.pass(n).await;
                    }
                }
                Step::End => {
                    writer.flush().await?;
                    writer.shutdown().await?;
                    return Ok((buf, records.last));
                }
            }
        }
        if buf.capacity() - buf.len() < room / 2 {
            buf.reserve(room);
        }
        // A plain TCP writer holds nothing back: no flush needed while waiting.
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the data connection ended in the middle of a client (no end-of-stream record)",
            ));
        }
        if n >= room && room < CHUNK {
            room = CHUNK;
        }
    }
}

/// The decoder's state between reads.
#[derive(Default)]
struct Records {
    /// Payload bytes of the current `01` record still to come.
    payload_left: usize,
    /// The peer sent `04`.
    last: bool,
}

/// What the buffer's front holds.
enum Step {
    /// This many payload bytes at the front of the buffer: write them, then advance.
    Payload(usize),
    /// The peer's `02` (consumed).
    End,
}

impl Records {
    /// The next step from `buf`, consuming headers; `None` when more bytes are needed.
    fn next(&mut self, buf: &mut BytesMut) -> io::Result<Option<Step>> {
        loop {
            if self.payload_left > 0 {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = self.payload_left.min(buf.len());
                self.payload_left -= n;
                return Ok(Some(Step::Payload(n)));
            }
            let Some(&kind) = buf.first() else {
                return Ok(None);
            };
            match kind {
                DATA if buf.len() < HEADER => return Ok(None),
                DATA => {
                    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
                    if len == 0 {
                        return Err(bad("an empty data record"));
                    }
                    buf.advance(HEADER);
                    self.payload_left = len;
                }
                END => {
                    buf.advance(1);
                    return Ok(Some(Step::End));
                }
                RESET => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the other side's connection was reset",
                    ))
                }
                LAST => {
                    buf.advance(1);
                    self.last = true;
                }
                other => return Err(bad(&format!("unknown record type 0x{other:02x}"))),
            }
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("reuse framing: {what} on a data connection"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(records: &mut Records, buf: &mut BytesMut) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(step) = records.next(buf)? {
            match step {
                Step::Payload(n) => {
                    out.extend_from_slice(&buf[..n]);
                    buf.advance(n);
                }
                Step::End => {
                    out.extend_from_slice(b"<END>");
                    break;
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn records_decode_across_any_split() {
        let mut wire = vec![LAST];
        wire.extend_from_slice(&data_header(5));
        wire.extend_from_slice(b"hello");
        wire.extend_from_slice(&data_header(1));
        wire.extend_from_slice(b"!");
        wire.push(END);
        wire.extend_from_slice(b"after");
        for split in 0..wire.len() {
            let mut records = Records::default();
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = steps(&mut records, &mut buf).unwrap();
            buf.extend_from_slice(&wire[split..]);
            if !got.ends_with(b"<END>") {
                got.extend(steps(&mut records, &mut buf).unwrap());
            }
            assert_eq!(got, b"hello!<END>", "split at {split}");
            assert!(records.last);
            assert_eq!(&buf[..], b"after", "split at {split}");
        }
    }

    #[test]
    fn reset_unknown_and_empty_records_are_errors() {
        for (wire, kind) in [
            (vec![RESET], io::ErrorKind::ConnectionReset),
            (vec![0x09], io::ErrorKind::InvalidData),
            (vec![DATA, 0, 0], io::ErrorKind::InvalidData),
        ] {
            let err = steps(&mut Records::default(), &mut BytesMut::from(&wire[..])).unwrap_err();
            assert_eq!(err.kind(), kind, "{wire:?}");
        }
    }
}
