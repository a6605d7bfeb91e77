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

/// TLS session resumption for connections after the first (pool refills, data connections,
/// reconnects): TLS 1.3 PSK with (EC)DHE, so they skip the certificate signatures and chain
/// checks of a full handshake. On by default; `SALLYPORT_TLS_RESUMPTION=off` (or `0`, `false`,
/// `no`) turns it off on the side that reads it, for comparisons. Read once per process.
pub fn resumption_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("SALLYPORT_TLS_RESUMPTION").as_deref(),
            Ok("off" | "0" | "false" | "no")
        )
    })
}

/// Sessions a gateway keeps for resumption (each a few hundred bytes plus the agent's
/// certificate chain: about 0.8 KiB each, 0.2 MiB when full). An agent keeps at most 8 tickets per
/// gateway name (rustls's client cache), so this serves 32 agents without a full handshake.
pub const SERVER_SESSIONS: usize = 256;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("invalid PEM certificate in {}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found",
        path.display()
    );
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

fn load_crls(
    path: &Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>> {
    use rustls::pki_types::CertificateRevocationListDer;
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the CRL {}", path.display()))?;
    let crls = if bytes.starts_with(b"-----") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("invalid PEM CRL in {}", path.display()))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    anyhow::ensure!(!crls.is_empty(), "{}: no CRL found", path.display());
    Ok(crls)
}

fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(roots)
}

/// The gateway's TLS side: its identity, the CA its agents' certificates must chain to, and
/// the revocation list they are checked against.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The same verifier the acceptor uses: a reload re-checks connected agents' certificates
    /// with the new one (a CRL that now revokes them, a CA that no longer issues them).
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The sessions kept for resumption (empty when it is off).
    sessions: Arc<SessionCache>,
}

impl ServerTls {
    /// Sessions kept for resumption now, and the heap they hold.
    pub fn sessions(&self) -> SessionFigures {
        self.sessions.figures()
    }

    pub fn load(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
        crl: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let mut builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(load_roots(client_ca)?),
            provider(),
        );
        if let Some(crl) = crl {
            // Only the agents' own certificates are looked up: the CRL comes from the CA that
            // issued them (`sallyport cert revoke`), and a certificate it does not cover is
            // refused (unknown status), so a CRL of another CA cannot pass everything.
            builder = builder
                .with_crls(load_crls(crl)?)
                .only_check_end_entity_revocation();
        }
        // The builder parses the CRLs: a broken file is refused here, by name.
        let verifier = builder.build().map_err(|e| match crl {
            Some(crl) => anyhow::anyhow!("{}: not a usable CRL: {e}", crl.display()),
            None => anyhow::anyhow!("cannot build the client certificate verifier: {e}"),
        })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 unavailable")?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(load_certs(cert)?, load_key(key)?)
            .with_context(|| {
                format!(
                    "{} and {} do not form a usable identity",
                    cert.display(),
                    key.display()
                )
            })?;
        // Stateful tickets: the session (with the agent's certificate chain) stays in this
        // process's memory, never in a ticket the agent could carry to another config. A reload
        // builds a new config, so a new CA or CRL also starts with an empty cache.
        let sessions = Arc::new(SessionCache::new(SERVER_SESSIONS));
        if resumption_enabled() {
            config.session_storage = sessions.clone();
        } else {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            verifier,
            sessions,
        })
    }

    /// Checks an agent's certificate chain (leaf first) as a new handshake would now: `Err`
    /// says why it would be refused (revoked, expired, unknown issuer).
    pub fn verify_client(&self, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        let now = rustls::pki_types::UnixTime::now();
        self.verifier
            .verify_client_cert(leaf, intermediates, now)
            .map(|_| ())
    }

    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Stream> {
        Ok(Stream::ServerTls(Box::new(
            self.acceptor.accept(tcp).await?,
        )))
    }
}

/// What a [`SessionCache`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionFigures {
    pub entries: usize,
    /// Keys and values plus [`SessionCache::OVERHEAD`] per entry: an estimate of the heap held.
    pub bytes: usize,
}

/// The gateway's store of TLS 1.3 sessions for resumption: at most `capacity` entries, the
/// oldest dropped first (as rustls's own `ServerSessionMemoryCache`), each ticket usable once
/// (`take`). Counted, so `/metrics` shows what it holds and bench/soak's leak check can tell
/// this bounded cache filling up from a leak.
#[derive(Debug)]
pub struct SessionCache {
    capacity: usize,
    inner: parking_lot::Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    map: std::collections::HashMap<Vec<u8>, Vec<u8>>,
    /// Keys in insertion order; may name keys already taken (skipped when evicting).
    order: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
}

impl SessionCache {
    /// Bookkeeping per entry beyond its key and value: the map's slot, the order queue's copy
    /// of the key, allocator headers.
    pub const OVERHEAD: usize = 160;

    pub fn new(capacity: usize) -> Self {
        SessionCache {
            capacity,
            inner: parking_lot::Mutex::new(Sessions::default()),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Sessions> {
        self.inner.lock()
    }

    pub fn figures(&self) -> SessionFigures {
        let s = self.lock();
        SessionFigures {
            entries: s.map.len(),
            bytes: s.bytes,
        }
    }
}

fn entry_size(key: &[u8], value: &[u8]) -> usize {
    2 * key.len() + value.len() + SessionCache::OVERHEAD
}

impl rustls::server::StoresServerSessions for SessionCache {
    fn put(&self, mut key: Vec<u8>, mut value: Vec<u8>) -> bool {
        if self.capacity == 0 {
            return false;
        }
        // rustls encodes a session into a Vec grown by doubling: kept as is, a 0.5 KiB session
        // would hold 1 KiB of heap.
        key.shrink_to_fit();
        value.shrink_to_fit();
        let mut s = self.lock();
        let size = entry_size(&key, &value);
        match s.map.insert(key.clone(), value) {
            Some(old) => s.bytes -= entry_size(&key, &old),
            None => s.order.push_back(key),
        }
        s.bytes += size;
        while s.map.len() > self.capacity {
            let Some(oldest) = s.order.pop_front() else {
                break;
            };
            if let Some(old) = s.map.remove(&oldest) {
                s.bytes -= entry_size(&oldest, &old);
            }
        }
        // Taken keys leave stale names in `order`: keep it from outgrowing the map.
        if s.order.len() > 2 * self.capacity.max(1) {
            let Sessions { map, order, .. } = &mut *s;
            order.retain(|k| map.contains_key(k));
        }
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().map.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut s = self.lock();
        let value = s.map.remove(key)?;
        s.bytes -= entry_size(key, &value);
        Some(value)
    }

    fn can_cache(&self) -> bool {
        self.capacity > 0
    }
}

/// The agent's TLS side: its identity and the CA the gateway's certificate must chain to.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    /// Name to verify instead of the host in the gateway address.
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 unavailable")?
            .with_root_certificates(load_roots(ca)?)
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .with_context(|| {
                format!(
                    "{} and {} do not form a usable identity",
                    cert.display(),
                    key.display()
                )
            })?;
        if !resumption_enabled() {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .with_context(|| format!("invalid TLS server name \"{n}\""))
            })
            .transpose()?;
        Ok(ClientTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to verify for a gateway dialed as `host:port`.
    pub fn name_for(&self, gateway: &str) -> io::Result<ServerName<'static>> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = host_of(gateway);
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        ServerName::try_from(host.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid TLS server name \"{host}\""),
            )
        })
    }

    pub async fn connect(&self, name: ServerName<'static>, tcp: TcpStream) -> io::Result<Stream> {
        let tls = self.connector.connect(name, Sniff::new(tcp)).await?;
        Ok(Stream::ClientTls(Box::new(tls)))
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
mod tests {
    use super::*;
    use crate::protocol::{with_preamble, ErrorCode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_session_cache_is_bounded_single_use_and_counted() {
        use rustls::server::StoresServerSessions;
        let cache = SessionCache::new(3);
        for i in 0u8..10 {
            assert!(cache.put(vec![i; 32], vec![i; 100]));
        }
        let one = entry_size(&[0; 32], &[0; 100]);
        assert_eq!(
            cache.figures(),
            SessionFigures {
                entries: 3,
                bytes: 3 * one
            }
        );
        // The oldest went first.
        assert_eq!(cache.get(&[6; 32]), None);
        assert_eq!(cache.get(&[7; 32]), Some(vec![7; 100]));
        // A ticket is used once.
        assert_eq!(cache.take(&[9; 32]), Some(vec![9; 100]));
        assert_eq!(cache.take(&[9; 32]), None);
        assert_eq!(
            cache.figures(),
            SessionFigures {
                entries: 2,
                bytes: 2 * one
            }
        );
        // Replacing a value keeps one entry; many puts and takes keep the queue bounded.
        assert!(cache.put(vec![7; 32], vec![7; 10]));
        assert_eq!(cache.figures().entries, 2);
        for i in 0u16..1000 {
            let key = i.to_be_bytes().to_vec();
            cache.put(key.clone(), vec![1; 10]);
            cache.take(&key);
        }
        assert!(cache.lock().order.len() <= 6);
        assert_eq!(cache.figures().entries, 2);
        assert!(!SessionCache::new(0).put(vec![1], vec![1]));
    }

    #[tokio::test]
    async fn sniff_turns_a_refusal_into_an_error() {
        let (mut gw, agent) = tokio::io::duplex(1024);
        let refusal = with_preamble(&Message::error(ErrorCode::PEER_DENIED, "go away"));
        gw.write_all(&refusal).await.unwrap();
        let mut sniff = Sniff::new(agent);
        let err = sniff.read(&mut [0u8; 64]).await.unwrap_err();
        let msg = refusal_of(&err);
        assert_eq!(msg.code, ErrorCode::PEER_DENIED);
        assert_eq!(msg.message, "go away");
    }

    fn refusal_of(e: &io::Error) -> ErrorMsg {
        refusal(e).cloned().expect("a refusal")
    }

    #[tokio::test]
    async fn sniff_passes_other_bytes_through_unchanged() {
        for data in [
            &b"\x16\x03\x03hello world"[..],
            b"SP",
            b"SPRX-not-magic",
            b"",
        ] {
            let (mut gw, agent) = tokio::io::duplex(1024);
            gw.write_all(data).await.unwrap();
            drop(gw);
            let mut sniff = Sniff::new(agent);
            let mut got = Vec::new();
            sniff.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, data);
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("gw.example:44500"), "gw.example");
        assert_eq!(host_of("[::1]:44500"), "::1");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
    }
}
