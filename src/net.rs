//! Socket helpers: how Sallyport binds, connects and tunes TCP sockets, in one place.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Backlog of every listening socket: enough for a burst of thousands of new clients while the
/// accept loop catches up.
const BACKLOG: u32 = 4096;

/// Binds a listening socket with `SO_REUSEADDR`, so a listener closed while its connections live
/// on (in `TIME_WAIT` or still piping) can be reopened at once on the same port.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Connects with a timeout; `target` may be a host name (resolved on every call, so DNS changes
/// are seen at the next connect).
pub async fn connect(target: &str, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(target))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect timed out after {}",
                    humantime::format_duration(timeout)
                ),
            )
        })??;
    tune(&stream);
    Ok(stream)
}

/// Like [`connect`], but from `source` when given (for multi-homed hosts and source-based
/// firewall rules): only addresses of the source's family are tried, in resolver order.
pub async fn connect_from(
    target: &str,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return connect(target, timeout).await;
    };
    let attempt = async {
        let mut last = None;
        for addr in tokio::net::lookup_host(target).await? {
            if addr.is_ipv4() != source.is_ipv4() {
                continue;
            }
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(source, 0))?;
            match socket.connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{target} has no address of the same family as source_ip {source}"),
            )
        }))
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    tune(&stream);
    Ok(stream)
}

/// Connects to `target` from `source`, an address that is not this host's: the client's own,
/// with `IP_TRANSPARENT` (needs root or CAP_NET_ADMIN, and policy routing that delivers the
/// replies to this host: see packaging/transparent-routing.sh). The client's port is kept when
/// it is free here, else the kernel picks one. IPv4 only.
pub async fn connect_transparent(
    source: SocketAddr,
    target: &str,
    timeout: Duration,
) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let IpAddr::V4(source_ip) = source.ip() else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("transparent mode supports IPv4 clients only (client {source}); use proxy_protocol for IPv6"),
        ));
    };
    let attempt = async {
        let addr = tokio::net::lookup_host(target)
            .await?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    format!("{target} has no IPv4 address"),
                )
            })?;
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_ip_transparent(true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "IP_TRANSPARENT refused ({e}): transparent mode needs root or CAP_NET_ADMIN"
                ),
            )
        })?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        let with_port = SocketAddr::new(IpAddr::V4(source_ip), source.port());
        if socket.bind(&with_port.into()).is_err() {
            socket.bind(&SocketAddr::new(IpAddr::V4(source_ip), 0).into())?;
        }
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        socket.connect(addr).await
    };
    let stream = tokio::time::timeout(timeout, attempt).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out (is the reply route through this host in place?)",
        )
    })??;
    tune(&stream);
    Ok(stream)
}

/// Whether this process may set `IP_TRANSPARENT` (root or CAP_NET_ADMIN), tried on a socket
/// that is never bound: transparent mode's backend connections need it.
pub fn may_connect_transparent() -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_ip_transparent(true)
}

/// Connects to an already resolved address with a timeout.
pub async fn connect_addr(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    tune(&stream);
    Ok(stream)
}

/// Disables Nagle: interactive protocols (SSH keystrokes, TLS handshakes) must not wait 40 ms
/// for an ACK, and bulk transfers write full buffers anyway.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// TCP keepalive on long-lived control connections, so a vanished peer behind a NAT or firewall
/// is noticed by the kernel even if heartbeats are delayed.
pub fn keepalive(stream: &TcpStream, idle: Duration) {
    let ka = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(idle)
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// A second descriptor of a connected TCP socket, to read its round-trip time while the
/// connection itself is owned elsewhere (a control channel split into reader and writer). Drop
/// it with the connection: while it lives, the socket stays open.
pub struct RttProbe(std::os::fd::OwnedFd);

impl RttProbe {
    pub fn of(stream: &TcpStream) -> Option<RttProbe> {
        use std::os::fd::AsFd;
        stream.as_fd().try_clone_to_owned().ok().map(RttProbe)
    }

    /// The kernel's smoothed round-trip time of the connection (`TCP_INFO`), once measured.
    pub fn rtt(&self) -> Option<Duration> {
        use std::os::fd::AsRawFd;
        tcp_rtt(self.0.as_raw_fd())
    }
}

#[cfg(target_os = "linux")]
// The crate denies unsafe code; getsockopt is allowed here with its SAFETY proofs below.
#[allow(unsafe_code)]
fn tcp_rtt(fd: std::os::fd::RawFd) -> Option<Duration> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call, and the kernel
    // writes at most `len` bytes into it; `fd` is an open descriptor (owned by the probe) for
    // the duration of the call. getsockopt has no other memory effects.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: `tcp_info` is plain integers, for which all-zero bytes (the initial value, for
    // any field an older kernel did not write) are a valid value.
    let info = unsafe { info.assume_init() };
    (info.tcpi_rtt > 0).then(|| Duration::from_micros(info.tcpi_rtt.into()))
}

#[cfg(not(target_os = "linux"))]
fn tcp_rtt(_fd: std::os::fd::RawFd) -> Option<Duration> {
    None
}

/// Bounds how long data sent on a control connection may stay unacknowledged before the kernel
/// gives up on the connection (`TCP_USER_TIMEOUT`, Linux only): a peer host that vanished, or a
/// path that black-holes, ends the connection even while bytes wait in the send queue, which
/// keepalive alone does not cover.
pub fn user_timeout(stream: &TcpStream, timeout: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = SockRef::from(stream).set_tcp_user_timeout(Some(timeout));
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, timeout);
}

/// Closes with a reset instead of a FIN: the peer sees "connection reset" at once.
pub fn reset(stream: TcpStream) {
    reset_on_close(&stream);
    drop(stream);
}

/// Makes the socket's close send a reset (SO_LINGER 0) instead of a FIN; bytes still in its
/// send buffer are discarded, as with any reset.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Whether an accept error is about running out of a resource (file descriptors, memory),
/// after which the accept loop should pause briefly rather than spin.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The few errno values needed above (stable on Linux and the BSDs for these four).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    #[cfg(target_os = "linux")]
    pub const ENOBUFS: i32 = 105;
    #[cfg(not(target_os = "linux"))]
    pub const ENOBUFS: i32 = 55;
}

/// Half-closes, then drains what the peer still sends for up to `linger`: closing a socket with
/// unread input sends a reset, which can destroy what was sent last (a refusal, the end of a
/// reply) before the peer reads it, and turns a clean close into "connection reset".
pub async fn close_gently<S>(stream: &mut S, linger: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(linger, async {
        let _ = stream.shutdown().await;
        // On the heap, and only while draining: an array here would make every future that
        // may close a connection gently 4 KiB larger for its whole life (a client's pipe
        // included: docs/performance.md, idle memory).
        let mut sink = vec![0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
