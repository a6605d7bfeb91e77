//! How bytes travel between agent and gateway: plain TCP or TLS 1.3 with mutual
//! authentication, behind one [`Stream`] type so the protocol and the pipe do not care.
//!
//! - The gateway presents its certificate and requires a client certificate that chains to its
//!   `client_ca` ([`ServerTls`]).
//! - The agent trusts only its configured CA (never the system store) and checks the gateway's
//!   name ([`ClientTls`]).
//! - Before a valid hello, a gateway that refuses a connection writes the plaintext [`MAGIC`]
//!   and an Error frame. [`Sniff`] recognizes that in place of a TLS ServerHello, so an agent
//!   logs "peer denied by the gateway's [peers] rules" rather than a TLS decoding error.

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;

use crate::protocol::{ErrorMsg, FrameCodec, Message, MAGIC};

mod tls;

pub use tls::{
    resumption_enabled, ClientTls, ServerTls, SessionCache, SessionFigures, SERVER_SESSIONS,
};

/// A connection between agent and gateway, encrypted or not.
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<Sniff<TcpStream>>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => &s.get_ref().0.inner,
        }
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// The negotiated TLS version (`TLS 1.3`), on a TLS stream.
    pub fn tls_version(&self) -> Option<&'static str> {
        let version = match self {
            Stream::Plain(_) => return None,
            Stream::ServerTls(s) => s.get_ref().1.protocol_version(),
            Stream::ClientTls(s) => s.get_ref().1.protocol_version(),
        }?;
        Some(match version {
            rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3",
            rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2",
            _ => "TLS",
        })
    }

    /// On the gateway's side of a TLS connection: the SHA-256 of the agent's end-entity
    /// certificate, which pool and outbound connections must share with their control session.
    pub fn peer_cert_digest(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        match self {
            Stream::ServerTls(s) => {
                let cert = s.get_ref().1.peer_certificates()?.first()?;
                Some(Sha256::digest(cert.as_ref()).into())
            }
            _ => None,
        }
    }

    /// The peer's end-entity certificate: the agent's on the gateway's side, the gateway's on
    /// the agent's side. `None` in plaintext.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        match self {
            Stream::Plain(_) => None,
            Stream::ServerTls(s) => s.get_ref().1.peer_certificates()?.first(),
            Stream::ClientTls(s) => s.get_ref().1.peer_certificates()?.first(),
        }
    }

    /// The peer's certificate chain as it sent it (leaf first); `None` in plaintext.
    /// Whether this TLS connection resumed an earlier session (no certificates exchanged).
    pub fn resumed(&self) -> bool {
        let kind = match self {
            Stream::Plain(_) => return false,
            Stream::ServerTls(s) => s.get_ref().1.handshake_kind(),
            Stream::ClientTls(s) => s.get_ref().1.handshake_kind(),
        };
        kind == Some(rustls::HandshakeKind::Resumed)
    }

    pub fn peer_chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        let certs = match self {
            Stream::Plain(_) => return None,
            Stream::ServerTls(s) => s.get_ref().1.peer_certificates()?,
            Stream::ClientTls(s) => s.get_ref().1.peer_certificates()?,
        };
        Some(certs.to_vec())
    }

    /// Makes dropping this stream a reset of the TCP connection under it (SO_LINGER 0). For
    /// TLS that is also a close without close_notify, which the peer reads as a truncation:
    /// dropping a TLS stream never sends one, only `shutdown()` does.
    pub fn reset_on_close(&self) {
        crate::net::reset_on_close(self.tcp());
    }

    /// Without waiting: for TLS, queues close_notify (unless already sent) and writes what the
    /// socket takes at once, so a stream dropped without `shutdown()` can still end cleanly.
    /// When the socket is full the rest is lost and the peer sees a truncation, which is what
    /// it is. For plain TCP nothing to do: the kernel sends FIN at close.
    pub fn try_close_notify(&mut self) {
        match self {
            Stream::Plain(_) => {}
            Stream::ServerTls(s) => {
                let (tcp, conn) = s.get_mut();
                close_notify_now(tcp, &mut **conn);
            }
            Stream::ClientTls(s) => {
                let (sniff, conn) = s.get_mut();
                close_notify_now(&sniff.inner, &mut **conn);
            }
        }
    }
}

/// Queues close_notify and writes pending TLS records while `tcp` takes them without blocking.
fn close_notify_now<D>(tcp: &TcpStream, conn: &mut rustls::ConnectionCommon<D>) {
    struct NoWait<'a>(&'a TcpStream);
    impl io::Write for NoWait<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.try_write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    conn.send_close_notify();
    while conn.wants_write() {
        match conn.write_tls(&mut NoWait(tcp)) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::ServerTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::ClientTls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
        }
    }
}

/// The gateway refused the connection before any TLS or hello, and said why.
#[derive(Debug, thiserror::Error)]
#[error("the gateway refused the connection: {0}")]
pub struct Refused(pub ErrorMsg);

/// Extracts a [`Refused`] from an I/O error produced by [`Sniff`], if that is what it is.
pub fn refusal(e: &io::Error) -> Option<&ErrorMsg> {
    e.get_ref()?.downcast_ref::<Refused>().map(|r| &r.0)
}

/// Reads through to `inner`, except that if the peer's first bytes are [`MAGIC`] it collects
/// the Error frame that follows and fails the read with [`Refused`].
pub struct Sniff<S> {
    pub inner: S,
    /// Bytes read while deciding; `None` once decided (then reads pass straight through).
    pending: Option<BytesMut>,
    /// After deciding "not a refusal", bytes still to hand out before reading `inner` again.
    replay: BytesMut,
}

impl<S> Sniff<S> {
    pub fn new(inner: S) -> Self {
        Sniff {
            inner,
            pending: Some(BytesMut::new()),
            replay: BytesMut::new(),
        }
    }
}

/// Longest refusal frame we are willing to collect.
const MAX_REFUSAL: usize = 16 * 1024;

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(seen) = this.pending.as_mut() {
            loop {
                let prefix_len = seen.len().min(MAGIC.len());
                if seen[..prefix_len] != MAGIC[..prefix_len] {
                    // Not a refusal: hand out what was read, then pass through.
                    this.replay = this.pending.take().expect("checked above");
                    break;
                }
                if seen.len() >= MAGIC.len() {
                    let mut frame = BytesMut::from(&seen[MAGIC.len()..]);
                    match FrameCodec::new(MAX_REFUSAL).decode(&mut frame) {
                        Ok(Some(raw)) => {
                            let msg = match Message::from_frame(&raw) {
                                Ok(Some(Message::Error(e))) => e,
                                _ => ErrorMsg {
                                    code: crate::protocol::ErrorCode::PROTOCOL,
                                    message: "unreadable refusal".into(),
                                },
                            };
                            this.pending = None;
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                Refused(msg),
                            )));
                        }
                        Ok(None) => {}
                        Err(e) => {
                            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
                        }
                    }
                }
                let mut tmp = [0u8; 512];
                let mut tmp_buf = ReadBuf::new(&mut tmp);
                match Pin::new(&mut this.inner).poll_read(cx, &mut tmp_buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) if tmp_buf.filled().is_empty() => {
                        // End of stream while deciding: hand out what we have (maybe nothing).
                        this.replay = this.pending.take().expect("checked above");
                        break;
                    }
                    Poll::Ready(Ok(())) => seen.extend_from_slice(tmp_buf.filled()),
                }
            }
        }
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `host` of `host:port` or `[v6]:port`.
pub fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

#[cfg(test)]
mod tests;
