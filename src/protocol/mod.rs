//! The control protocol (versions 1 to 3): the preamble, frames, messages, version negotiation,
//! and [`Connection`], the only type that turns bytes into messages and back.
//!
//! The protocol is specified for humans in `docs/protocol.md`; keep the two in step. This module
//! holds no I/O policy (timeouts, retries, who may connect): the gateway and the agent decide
//! those.
//!
//! Every connection to the gateway's control port starts with the 4-byte [`MAGIC`], then a
//! [`Message::Hello`] frame naming the version range and the role. The gateway answers with
//! [`Message::HelloAck`] carrying the chosen version, or [`Message::Error`] and a close.

pub mod datagram;
pub mod frame;
pub mod hostnames;
pub mod liveness;
pub mod message;
pub mod outbox;
pub mod token;

use std::io;

use bytes::BytesMut;
use futures::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{Encoder, Framed, FramedParts, FramedWrite};

pub use frame::{FrameCodec, RawFrame, DEFAULT_MAX_FRAME};
pub use message::*;
pub use token::Token;

/// The first bytes of every connection to the control port.
pub const MAGIC: [u8; 4] = *b"SPRT";

/// The oldest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// The newest protocol version this build speaks. Every version in between is spoken in full, so
/// a peer of any older version keeps exactly the behaviour it had.
pub const MAX_VERSION: u16 = 4;

/// The newest version this process offers and accepts: [`MAX_VERSION`], lowered by the
/// environment for tests and comparisons. `SALLYPORT_MAX_PROTOCOL=N` makes the daemon speak as
/// a build whose newest version is N (an old peer, for the fallback tests);
/// `SALLYPORT_DATA_REUSE=off` (or `0`, `false`, `no`) caps it at 2, the last version without
/// [`Feature::DataReuse`]. Read once per process.
pub fn max_version() -> u16 {
    static MAX: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let mut max = MAX_VERSION;
        if let Some(n) = std::env::var("SALLYPORT_MAX_PROTOCOL")
            .ok()
            .and_then(|v| v.trim().parse::<u16>().ok())
        {
            max = max.min(n.max(MIN_VERSION));
        }
        if matches!(
            std::env::var("SALLYPORT_DATA_REUSE").as_deref(),
            Ok("off" | "0" | "false" | "no")
        ) {
            max = max.min(Feature::DataReuse.since() - 1);
        }
        max
    })
}

/// A behaviour that exists from some protocol version on. Each connection negotiates its own
/// version (its hello names a range; the gateway picks the highest common one), and a feature is
/// used on a connection only when that connection's version has it: code asks
/// `Feature::X.on(version)`, never compares version numbers itself.
///
/// A new feature needs a new version and a row here and in docs/protocol.md (section 5).
/// Versions only add: new message types or new role variants, never a changed layout of an
/// existing message (postcard payloads must decode exactly, so an appended field would break
/// every older peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// v2: the agent answers a `PoolAssign` with `PoolAccepted` on the pool connection before
    /// any raw byte, so the gateway can tell a frozen agent's pooled connection from a live one
    /// and offer the client elsewhere.
    PoolAccepted,
    /// v2: the gateway hands each control session a random secret ([`SessionSecret`], right
    /// after the HelloAck), and the agent proves its pool and outbound connections with it
    /// ([`Role::SessionPool`], [`Role::SessionOutbound`]), so they are bound to a live control
    /// session of their site and agent even in plaintext (`data_tls = false`).
    SessionBinding,
    /// v3: a pool connection over TLS outlives its client. After `PoolAccepted` both sides
    /// carry the client's bytes in reuse records ([`crate::reuse`]), and a connection whose
    /// client ended cleanly both ways goes back to the warm pool on both sides.
    DataReuse,
    /// v4: [`Feature::DataReuse`] on plaintext pool connections too. The gateway offers v4 on a
    /// plaintext pool connection only when its owner chose it (`[control] data_reuse = true`):
    /// such a connection gives up splice(2) for the reuse records, so it is a trade of bulk
    /// throughput for connection rate (docs/performance.md). Otherwise it answers with at most
    /// v3, and plaintext pool connections keep the raw byte stream.
    PlainReuse,
}

impl Feature {
    /// The first protocol version with this feature.
    pub const fn since(self) -> u16 {
        match self {
            Feature::PoolAccepted | Feature::SessionBinding => 2,
            Feature::DataReuse => 3,
            Feature::PlainReuse => 4,
        }
    }

    /// Whether a connection that negotiated `version` uses this feature.
    pub const fn on(self, version: u16) -> bool {
        version >= self.since()
    }
}

/// `sallyport/<version>`, for hellos and logs.
pub const SOFTWARE: &str = concat!("sallyport/", env!("CARGO_PKG_VERSION"));

/// Everything that can go wrong on a framed connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame length {len} is shorter than its 2-byte type")]
    FrameTooShort { len: usize },
    #[error("connection closed in the middle of a frame ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("unknown critical message type 0x{kind:04x}")]
    UnknownMessage { kind: u16 },
    #[error("malformed payload for message type 0x{kind:04x}: {reason}")]
    BadPayload { kind: u16, reason: String },
    #[error("peer does not speak the Sallyport protocol (first bytes {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("peer started a TLS handshake, but this side expects plaintext (is `tls` configured on one side only?)")]
    UnexpectedTls,
    #[error("expected {expected}, received {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("no common protocol version: we speak {our_min}..={our_max}, the peer {their_min}..={their_max}")]
    NoCommonVersion {
        our_min: u16,
        our_max: u16,
        their_min: u16,
        their_max: u16,
    },
    #[error("peer reported {0}")]
    Peer(ErrorMsg),
    #[error("connection closed by peer")]
    Closed,
    /// A TLS peer's connection ended without a close_notify: the peer process died, or
    /// something on the path cut the connection (an orderly close sends one).
    #[error("connection cut: closed without a TLS close_notify (the peer stopped abruptly, or the network dropped the connection)")]
    Cut,
}

impl ProtocolError {
    /// The code to send the peer before closing, for errors the peer caused.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            ProtocolError::UnknownMessage { .. } => ErrorCode::UNKNOWN_MESSAGE,
            ProtocolError::NoCommonVersion { .. } => ErrorCode::UNSUPPORTED_VERSION,
            _ => ErrorCode::PROTOCOL,
        }
    }
}

/// Picks the highest version both sides speak.
pub fn negotiate(their_min: u16, their_max: u16) -> Result<u16, ProtocolError> {
    negotiate_up_to(max_version(), their_min, their_max)
}

/// [`negotiate`] for a side whose newest version is `our_max`.
fn negotiate_up_to(our_max: u16, their_min: u16, their_max: u16) -> Result<u16, ProtocolError> {
    let version = our_max.min(their_max);
    if version < MIN_VERSION.max(their_min) || their_min > their_max {
        return Err(ProtocolError::NoCommonVersion {
            our_min: MIN_VERSION,
            our_max,
            their_min,
            their_max,
        });
    }
    Ok(version)
}

/// A hello from this build with the given role.
pub fn hello(role: Role) -> Message {
    hello_up_to(role, max_version())
}

/// A hello that offers versions up to `max` at most (a connection that must not use a newer
/// feature, e.g. an embedded agent's pool connections and [`Feature::DataReuse`]).
pub fn hello_up_to(role: Role, max: u16) -> Message {
    Message::Hello(Hello {
        min_version: MIN_VERSION,
        max_version: max.clamp(MIN_VERSION, max_version()),
        software: SOFTWARE.to_string(),
        role,
    })
}

/// Reads and checks the 4-byte preamble. Recognizes a TLS ClientHello so the error can say so.
pub async fn read_preamble<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(), ProtocolError> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed
        } else {
            ProtocolError::Io(e)
        }
    })?;
    if magic == MAGIC {
        Ok(())
    } else if looks_like_tls(&magic) {
        Err(ProtocolError::UnexpectedTls)
    } else {
        Err(ProtocolError::BadMagic(magic))
    }
}

/// A TLS record header: handshake (0x16), version 3.x.
pub fn looks_like_tls(first: &[u8]) -> bool {
    first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03
}

/// A framed connection: reads and writes whole [`Message`]s.
pub struct Connection<S> {
    framed: Framed<S, FrameCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S, max_frame: usize) -> Self {
        Connection {
            framed: Framed::new(stream, FrameCodec::new(max_frame)),
        }
    }

    /// A connection whose first bytes were already read (e.g. while checking for a refusal).
    pub fn with_prefix(stream: S, max_frame: usize, prefix: &[u8]) -> Self {
        let mut parts = FramedParts::new::<RawFrame>(stream, FrameCodec::new(max_frame));
        parts.read_buf = BytesMut::from(prefix);
        Connection {
            framed: Framed::from_parts(parts),
        }
    }

    /// Changes the maximum frame size for the frames still to come.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.framed.codec_mut().set_max_frame(max_frame);
    }

    /// The next message; `Ok(None)` on a clean end of stream between frames. Unknown advisory
    /// messages are skipped here so callers never see them.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        next_message(&mut self.framed).await
    }

    /// Separates reading from writing, for a long-lived channel whose writes must never hold up
    /// its reads (see [`outbox`]). Bytes already read stay with the reader; nothing is left
    /// unwritten, since every write here flushes.
    pub fn split(
        self,
    ) -> (
        MessageReader<ReadHalf<S>>,
        FramedWrite<WriteHalf<S>, FrameCodec>,
    ) {
        let FramedParts {
            io,
            codec,
            read_buf,
            ..
        } = self.framed.into_parts();
        let (read, write) = tokio::io::split(io);
        // `from_parts` (unlike swapping in a read buffer) decodes frames already buffered
        // before it waits for the socket again.
        let mut parts = FramedParts::new::<RawFrame>(read, codec.clone());
        parts.read_buf = read_buf;
        let reader = Framed::from_parts(parts);
        (
            MessageReader { framed: reader },
            FramedWrite::new(write, codec),
        )
    }

    /// Like [`Connection::read_message`], but the end of stream is an error and an `Error` frame
    /// from the peer becomes [`ProtocolError::Peer`].
    pub async fn expect_message(&mut self) -> Result<Message, ProtocolError> {
        match self.read_message().await? {
            None => Err(ProtocolError::Closed),
            Some(Message::Error(e)) => Err(ProtocolError::Peer(e)),
            Some(msg) => Ok(msg),
        }
    }

    /// Writes one message and flushes it.
    pub async fn write_message(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        self.framed.send(msg.to_frame()).await
    }

    /// Queues one message without flushing; call [`Connection::flush`] after a batch.
    pub async fn feed_message(&mut self, msg: &Message) -> Result<(), ProtocolError> {
        self.framed.feed(msg.to_frame()).await
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        SinkExt::<RawFrame>::flush(&mut self.framed).await
    }

    /// Sends an error frame and gives up on the connection; failures to send are ignored since
    /// the connection is being abandoned anyway.
    pub async fn send_error(&mut self, code: ErrorCode, message: impl Into<String>) {
        let _ = self.write_message(&Message::error(code, message)).await;
    }

    /// The stream and any bytes read past the last frame, which belong to whatever follows the
    /// framed part of the conversation (a data connection's payload).
    pub fn into_parts(self) -> (S, BytesMut) {
        let FramedParts { io, read_buf, .. } = self.framed.into_parts();
        (io, unread(read_buf))
    }

    pub fn get_ref(&self) -> &S {
        self.framed.get_ref()
    }

    /// Whether bytes the peer sent are waiting, read but not yet decoded.
    pub fn has_buffered_input(&self) -> bool {
        !self.framed.read_buffer().is_empty()
    }

    pub fn get_mut(&mut self) -> &mut S {
        self.framed.get_mut()
    }

    /// Refuses the connection before its hello was accepted: [`MAGIC`] and an Error frame (on
    /// this stream: in the clear on a plain connection, inside TLS after a TLS handshake), so a
    /// peer that has not seen a hello-ack yet can tell a refusal from a frame. Errors are ignored.
    pub async fn refuse(&mut self, code: ErrorCode, message: impl Into<String>) {
        use tokio::io::AsyncWriteExt;
        let bytes = with_preamble(&Message::error(code, message));
        let _ = self.framed.get_mut().write_all(&bytes).await;
        let _ = self.framed.get_mut().flush().await;
    }
}

/// The read half of a [`Connection`] after [`Connection::split`].
pub struct MessageReader<R> {
    /// Used as a stream only (a `FramedRead` cannot be built with bytes already buffered).
    framed: Framed<R, FrameCodec>,
}

impl<R> MessageReader<R> {
    /// The read half and the bytes read past the last decoded frame (raw payload that follows
    /// the framed part of a conversation).
    pub fn into_parts(self) -> (R, BytesMut) {
        let FramedParts { io, read_buf, .. } = self.framed.into_parts();
        (io, unread(read_buf))
    }
}

/// The bytes a framed reader read past its last frame, in a buffer of their own size. The
/// reader's buffer (8 KiB or more, mostly empty) would otherwise go with them, and a data
/// connection keeps its leftover for its whole life: measured with heaptrack, those buffers were
/// 7.6 KiB of every idle piped connection in the gateway and about as much in the agent
/// (docs/performance.md).
fn unread(read_buf: BytesMut) -> BytesMut {
    if read_buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&read_buf[..])
    }
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    /// As [`Connection::read_message`]; cancel safe (a partial frame stays buffered).
    pub async fn read_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        next_message(&mut self.framed).await
    }

    pub fn get_ref(&self) -> &R {
        self.framed.get_ref()
    }
}

/// The next decoded message of a frame stream, skipping unknown advisory ones.
async fn next_message<F>(frames: &mut F) -> Result<Option<Message>, ProtocolError>
where
    F: Stream<Item = Result<RawFrame, ProtocolError>> + Unpin,
{
    loop {
        // At end of stream the codec reports a partial frame as `Truncated`. rustls reports an
        // end without close_notify as an UnexpectedEof error whose text is a manual's URL.
        let next = match frames.next().await.transpose() {
            Err(ProtocolError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::Cut)
            }
            next => next?,
        };
        let Some(frame) = next else {
            return Ok(None);
        };
        if let Some(msg) = Message::from_frame(&frame)? {
            return Ok(Some(msg));
        }
        tracing::debug!(kind = frame.kind, "skipping unknown advisory message");
    }
}

/// [`MAGIC`] and one message in one buffer: how a connection opens (with a hello) and how a
/// refusal before the hello is sent (with an error), each in a single write.
pub fn with_preamble(msg: &Message) -> BytesMut {
    let mut buf = BytesMut::with_capacity(64);
    buf.extend_from_slice(&MAGIC);
    FrameCodec::default()
        .encode(msg.to_frame(), &mut buf)
        .expect("a hello or an error always fits in a frame");
    buf
}

#[cfg(test)]
mod tests;
