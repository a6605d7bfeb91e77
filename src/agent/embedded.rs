//! The embeddable listener: a server that speaks to the gateway itself, without a separate
//! agent process or a TCP hop to a backend. [`GatewayListener::bind`] runs an agent inside the
//! application whose only listener hands each client to [`GatewayListener::accept`], which
//! yields a stream and the client's real address, like a `TcpListener`.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Mutex};
use tokio_util::sync::CancellationToken;

use super::Agent;
use crate::access::{AccessRules, Policy};
use crate::addr::PublicAddr;
use crate::config::{AgentConfig, AgentTls, Backend, Impersonation, ListenerConfig, ProxyProtocol};
use crate::protocol::{ClientRules, ListenerStatus};
use crate::transport::{ClientTls, Stream};

/// A client handed to the application.
pub struct Accepted {
    pub stream: GatewayStream,
    /// The client's real address, as the gateway saw it.
    pub client_addr: SocketAddr,
    /// The gateway address the client connected to.
    pub gateway_addr: SocketAddr,
}

/// One client's connection through the gateway: reads what the client sent, writes to it.
///
/// Over TLS data connections, written bytes can wait in the TLS layer until the next write or
/// a flush: call `flush()` after a reply before waiting for the client (hyper and axum do), and
/// `shutdown()` to end the stream; its end of stream reaches the client as a FIN. Dropping the
/// stream without `shutdown()` still ends it cleanly when the close can be written at once;
/// [`GatewayStream::abort`] ends it with a reset instead.
pub struct GatewayStream {
    inner: Stream,
    /// Client bytes that arrived together with the gateway's ack, served first.
    prefix: BytesMut,
    client_addr: SocketAddr,
    /// Set by [`GatewayStream::abort`]: close with a reset, not an end of stream.
    abort: bool,
}

impl GatewayStream {
    pub(crate) fn new(inner: Stream, prefix: BytesMut, client_addr: SocketAddr) -> Self {
        GatewayStream {
            inner,
            prefix,
            client_addr,
            abort: false,
        }
    }

    /// The client's real address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// Ends the connection with a reset: the client sees "connection reset", never a clean
    /// end of stream (like closing a `TcpStream` with SO_LINGER 0). For an aborted transfer.
    pub fn abort(mut self) {
        self.abort = true;
    }
}

impl Drop for GatewayStream {
    fn drop(&mut self) {
        // A TLS stream dropped without close_notify reads as a truncation, which the gateway
        // passes on to the client as a reset (docs/protocol.md): send it now if we can, so a
        // dropped stream ends like a dropped TcpStream.
        if self.abort {
            self.inner.reset_on_close();
        } else {
            self.inner.try_close_notify();
        }
    }
}

impl AsyncRead for GatewayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GatewayStream {
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

/// Builds a [`GatewayListener`].
pub struct GatewayListenerBuilder {
    config: AgentConfig,
    bind_timeout: Duration,
}

impl GatewayListenerBuilder {
    /// The name this agent shows in the gateway's logs (default: the host name).
    pub fn agent_name(mut self, name: &str) -> Self {
        self.config.name = name.to_string();
        self
    }

    /// Mutual TLS with the gateway: the CA to verify it with, and this agent's certificate.
    pub fn tls(
        mut self,
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> io::Result<Self> {
        let (ca, cert, key) = (ca.as_ref(), cert.as_ref(), key.as_ref());
        let client = ClientTls::load(ca, cert, key, None)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:#}")))?;
        self.config.tls = Some(AgentTls {
            ca: ca.to_path_buf(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            server_name: None,
            client,
            identity: crate::certinfo::CertInfo::from_pem_file(cert)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:#}")))?,
            fingerprint: crate::config::reference::fingerprint(&[ca, cert, key]),
        });
        Ok(self)
    }

    /// Client IP rules the gateway applies before a client reaches the application.
    pub fn clients(mut self, default: Policy, except: &[&str]) -> io::Result<Self> {
        let rules = AccessRules::parse(default, except)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = &mut self.config.listeners[0];
        listener.clients = rules;
        listener.clients_text = ClientRules {
            default,
            except: except.iter().map(|s| s.to_string()).collect(),
        };
        Ok(self)
    }

    /// How long [`GatewayListenerBuilder::bind`] waits for the gateway to open the port.
    pub fn bind_timeout(mut self, timeout: Duration) -> Self {
        self.bind_timeout = timeout;
        self
    }

    /// Connects to the gateway and waits until it listens on the public address. Fails with
    /// the gateway's reason (e.g. "address in use") or the last connection error.
    pub async fn bind(self) -> io::Result<GatewayListener> {
        let (tx, rx) = mpsc::channel(1024);
        let name = self.config.listeners[0].name.clone();
        let agent = Arc::new(Agent::with_local_acceptor(self.config, tx));
        let mut status = agent.status();
        let shutdown = CancellationToken::new();
        let runner = agent.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { runner.run(stop).await });

        let waited = tokio::time::timeout(self.bind_timeout, async {
            loop {
                {
                    let s = status.borrow_and_update();
                    if s.bound_everywhere(&name) {
                        let addrs: Vec<SocketAddr> = s
                            .gateways
                            .values()
                            .filter_map(|g| match g.listeners.get(&name) {
                                Some(ListenerStatus::Bound { addrs, .. }) => addrs.first().copied(),
                                _ => None,
                            })
                            .collect();
                        return Ok(addrs);
                    }
                    let failed =
                        s.gateways
                            .iter()
                            .find_map(|(gw, g)| match g.listeners.get(&name) {
                                Some(ListenerStatus::Failed { error }) => {
                                    Some(format!("gateway {gw}: {error}"))
                                }
                                _ => None,
                            });
                    if let Some(error) = failed {
                        return Err(io::Error::new(io::ErrorKind::AddrInUse, error));
                    }
                }
                if status.changed().await.is_err() {
                    return Err(io::Error::other("the embedded agent stopped"));
                }
            }
        })
        .await;
        let result = match waited {
            Ok(r) => r,
            Err(_) => {
                let last = status
                    .borrow()
                    .gateways
                    .iter()
                    .filter_map(|(gw, g)| g.last_error.as_ref().map(|e| format!("{gw}: {e}")))
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the gateway did not open the listener within {:?} ({last})",
                        self.bind_timeout
                    ),
                ))
            }
        };
        match result {
            Ok(addrs) => Ok(GatewayListener {
                accepted: Mutex::new(rx),
                addrs,
                shutdown,
            }),
            Err(e) => {
                shutdown.cancel();
                Err(e)
            }
        }
    }
}

/// A listener on a gateway's public port, usable where a `TcpListener` is: `accept()` yields a
/// stream and the client's real address. Dropping it closes the port on the gateway.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use sallyport::agent::GatewayListener;
/// use tokio::io::AsyncWriteExt;
///
/// let listener = GatewayListener::builder("dmz-gw1.example:44500", "acme-web", "8080")?
///     .tls("ca.crt", "agent.crt", "agent.key")?
///     .bind()
///     .await?;
/// loop {
///     let (mut stream, client) = listener.accept().await?;
///     stream.write_all(format!("hello, {client}\n").as_bytes()).await?;
///     stream.shutdown().await?;
/// }
/// # }
/// ```
pub struct GatewayListener {
    accepted: Mutex<mpsc::Receiver<Accepted>>,
    /// The public address on each gateway.
    addrs: Vec<SocketAddr>,
    shutdown: CancellationToken,
}

impl GatewayListener {
    /// Starts describing a listener: the gateway to dial (`host:port`), the site name, and the
    /// public address on the gateway (`"8080"`, `"IP:port"`).
    pub fn builder(gateway: &str, site: &str, public: &str) -> io::Result<GatewayListenerBuilder> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        crate::config::check_name(site).map_err(invalid)?;
        let public: PublicAddr = public.parse().map_err(invalid)?;
        let mut config = AgentConfig::new(site, &[gateway]).map_err(invalid)?;
        config.listeners.push(ListenerConfig {
            name: "embedded".to_string(),
            public,
            backend: Backend::Local,
            proxy_protocol: ProxyProtocol::None,
            impersonation: Impersonation::None,
            protocol: Default::default(),
            clients: AccessRules::allow_all(),
            clients_text: ClientRules::default(),
            edge: Default::default(),
            auto_ban: None,
            hostnames: Vec::new(),
            group: None,
        });
        Ok(GatewayListenerBuilder {
            config,
            bind_timeout: Duration::from_secs(15),
        })
    }

    /// The next client and its real address.
    pub async fn accept(&self) -> io::Result<(GatewayStream, SocketAddr)> {
        match self.accepted.lock().await.recv().await {
            Some(a) => Ok((a.stream, a.client_addr)),
            None => Err(io::Error::other("the embedded agent stopped")),
        }
    }

    /// The public address on the (first) gateway.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.addrs
            .first()
            .copied()
            .ok_or_else(|| io::Error::other("no gateway address"))
    }
}

impl Drop for GatewayListener {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The client's real address, for axum's `ConnectInfo` with a [`GatewayListener`]:
/// `app.into_make_service_with_connect_info::<ClientAddr>()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl axum::serve::Listener for GatewayListener {
    type Io = GatewayStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GatewayStream, SocketAddr) {
        loop {
            match GatewayListener::accept(self).await {
                Ok(x) => return x,
                Err(e) => {
                    tracing::error!("embedded listener: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        GatewayListener::local_addr(self)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GatewayListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GatewayListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// For the embedded listener: the data connection itself is the application's stream (handed
/// to `local`). `Err`: why the client cannot be served, for the gateway.
pub(super) async fn hand_over(
    ctx: &super::AgentCtx,
    local: &mpsc::Sender<Accepted>,
    arrived: &crate::protocol::ClientArrived,
    data: Result<(Stream, BytesMut), super::dial::DialError>,
) -> Result<(), String> {
    use super::dial::DialError;
    match data {
        Ok((stream, leftover)) => {
            ctx.stats.listener(&arrived.listener).served_locally();
            let accepted = Accepted {
                stream: GatewayStream::new(stream, leftover, arrived.client_addr),
                client_addr: arrived.client_addr,
                gateway_addr: arrived.gateway_addr,
            };
            if local.send(accepted).await.is_err() {
                tracing::debug!(client = %arrived.client_addr, "the application stopped accepting");
            }
            Ok(())
        }
        Err(DialError::Refused(e)) if e.code == crate::protocol::ErrorCode::UNKNOWN_CLIENT => {
            tracing::info!(client = %arrived.client_addr, id = arrived.id, "client already taken by another agent or gone; not serving it");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(client = %arrived.client_addr, "data connection failed: {e}");
            let why = format!("agent's data connection failed: {e}");
            ctx.stats.listener(&arrived.listener).data_failed(&why);
            Err(why)
        }
    }
}
