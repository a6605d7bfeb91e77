//! The control port: who may connect, TLS, the hello, and which role a connection takes.
//!
//! Order of checks on a new connection, cheapest first: `[peers]` rules (before any byte is
//! read, so before any TLS work), the handshake limits, then within `hello_timeout`: TLS (when
//! the first byte says so and TLS is configured), the preamble, the hello, the version, and the
//! TLS policy for the role. Every refusal before a valid hello is sent as [`protocol::MAGIC`]
//! plus an Error frame in the clear, logged (rate limited) and counted.
//!
//! After the hello the role decides, one file per role, named as on the agent's side:
//! - *control*: the agent session ([`super::session`]);
//! - *data*: the claim of one pending client ([`super::data`]);
//! - *pool*: a warm connection parked for later clients ([`super::pool`]);
//! - *outbound*: a connection the agent asks the gateway to open ([`super::outbound`]).
//!
//! This file owns no session state and pipes nothing: it ends when the connection is refused
//! or handed to its role.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::Shared;
use crate::access::canonical;
use crate::limits::{ConnPermit, Event};
use crate::net;
use crate::protocol::{self, Connection, ErrorCode, Hello, HelloAck, Message, ProtocolError, Role};
use crate::transport::Stream;

/// How long a refused peer gets to read the refusal before the socket closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Counts an event and logs it at warn level unless the event's log budget is spent.
pub(super) fn warn_event(event: &Event, peer: SocketAddr, what: fmt::Arguments<'_>) {
    let occ = event.hit();
    if occ.log {
        tracing::warn!(peer = %peer, "control port: {what}{}", occ.tally());
    }
}

/// Accepts connections on the control port until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            // Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; rules and logs use a.b.c.d.
            Ok((stream, peer)) => (stream, SocketAddr::new(canonical(peer.ip()), peer.port())),
            Err(e) if net::is_resource_exhaustion(&e) => {
                tracing::warn!("control port: accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("control port: accept failed: {e}");
                continue;
            }
        };
        if !shared.config().peers.allows(peer.ip()) {
            warn_event(
                &shared.stats.peers_denied,
                peer,
                format_args!("peer {} denied by the [peers] rules", peer.ip()),
            );
            let why = format!(
                "{} is not allowed by the gateway's [peers] rules",
                peer.ip()
            );
            refuse_bounded(&shared, stream, ErrorCode::PEER_DENIED, why);
            continue;
        }
        // An address holding an authenticated control session may use the places strangers
        // cannot fill: its data and pool connections are never starved by a flood.
        let trusted = shared.is_agent_addr(peer.ip());
        // An agent's data connection was counted with its client (fds::PER_CLIENT): only a
        // stranger's connection adds to the count.
        if !shared.fds.admit(usize::from(!trusted), trusted) {
            warn_event(
                &shared.stats.handshakes_over_limit,
                peer,
                format_args!("connection refused: open files near their limit"),
            );
            net::reset(stream);
            continue;
        }
        let permit = match shared.handshakes.try_acquire_for(peer.ip(), trusted) {
            Ok(p) => p,
            Err(limit) => {
                warn_event(
                    &shared.stats.handshakes_over_limit,
                    peer,
                    format_args!("connection refused: unfinished handshakes reached {limit}"),
                );
                let why = format!("too many unfinished handshakes: {limit}");
                refuse_bounded(&shared, stream, ErrorCode::LIMIT, why);
                continue;
            }
        };
        shared
            .tasks
            .spawn(handle_connection(shared.clone(), stream, peer, permit));
    }
}

/// Refusals being written at once, at most; beyond that a refused connection is just reset, so
/// a flood of refused connections cannot pile up tasks.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// Refuses with a reason while few refusals are in flight, else resets.
fn refuse_bounded(shared: &Arc<Shared>, stream: TcpStream, code: ErrorCode, why: String) {
    match shared.refusals.try_acquire(MAX_REFUSALS_IN_FLIGHT) {
        Some(permit) => {
            shared.tasks.spawn(async move {
                refuse_before_reading(stream, code, why).await;
                drop(permit);
            });
        }
        None => net::reset(stream),
    }
}

/// Sends a refusal on a connection nothing was read from, then closes it gently.
async fn refuse_before_reading(stream: TcpStream, code: ErrorCode, message: String) {
    net::tune(&stream);
    let mut conn = Connection::new(Stream::Plain(stream), protocol::frame::MIN_MAX_FRAME);
    conn.refuse(code, message).await;
    let (mut stream, _) = conn.into_parts();
    close_gently(&mut stream).await;
}

async fn close_gently<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    net::close_gently(stream, REFUSAL_LINGER).await
}

/// A connection whose hello was accepted.
struct Opened {
    conn: Connection<Stream>,
    hello: Hello,
    version: u16,
}

/// Reads the preamble and hello within the hello timeout, then dispatches on the role.
async fn handle_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: ConnPermit,
) {
    net::tune(&stream);
    let timeout = shared.config().limits.hello_timeout;
    let opened = match tokio::time::timeout(timeout, open(&shared, stream, peer)).await {
        Ok(Some(opened)) => opened,
        Ok(None) => return,
        Err(_) => {
            warn_event(
                &shared.stats.bad_hellos,
                peer,
                format_args!("no hello within {}", humantime::format_duration(timeout)),
            );
            return;
        }
    };
    // The handshake is over: this connection no longer counts against the handshake limits.
    drop(permit);
    // A reload may have revoked this peer while it was in its handshake.
    if !shared.config().peers.allows(peer.ip()) {
        let mut conn = opened.conn;
        warn_event(
            &shared.stats.peers_denied,
            peer,
            format_args!("peer {} denied by the [peers] rules", peer.ip()),
        );
        let why = format!(
            "{} is not allowed by the gateway's [peers] rules",
            peer.ip()
        );
        conn.refuse(ErrorCode::PEER_DENIED, why).await;
        return close_gently(conn.get_mut()).await;
    }
    let Opened {
        conn,
        hello,
        version,
    } = opened;
    match hello.role {
        Role::Control(control) => {
            super::session::run_session(shared, conn, peer, &hello.software, control, version).await
        }
        Role::Data(data) => super::data::claim_data(shared, conn, peer, data, version).await,
        Role::Outbound(out) => super::outbound::serve(shared, conn, peer, out, None, version).await,
        Role::SessionOutbound(out, secret) => {
            super::outbound::serve(shared, conn, peer, out, Some(secret), version).await
        }
        Role::Pool(pool) => super::pool::accept(shared, conn, peer, pool, None, version).await,
        Role::SessionPool(pool, secret) => {
            super::pool::accept(shared, conn, peer, pool, Some(secret), version).await
        }
    }
}

/// Everything between accept and an accepted hello. `None` when the connection was refused
/// (already logged, counted and told) or closed.
///
/// A resumed TLS session exchanged no certificates: its agent's chain, kept with the session,
/// is checked again as a new handshake would check it (expiry; the CA and CRL are this
/// config's, since a reload starts a new session cache), so resumption never outlives the
/// certificate. That costs one signature check, not the four signatures of a full handshake.
fn resumed_still_valid(
    shared: &Shared,
    server: &crate::transport::ServerTls,
    stream: Stream,
    peer: SocketAddr,
) -> Option<Stream> {
    use std::sync::atomic::Ordering::Relaxed;
    if !stream.resumed() {
        shared.stats.tls_full.fetch_add(1, Relaxed);
        return Some(stream);
    }
    shared.stats.tls_resumed.fetch_add(1, Relaxed);
    let chain = stream.peer_chain().unwrap_or_default();
    match server.verify_client(&chain) {
        Ok(()) => Some(stream),
        Err(e) => {
            warn_event(
                &shared.stats.tls_failures,
                peer,
                format_args!("TLS session resumed with a certificate no longer valid: {e}"),
            );
            stream.reset_on_close();
            None
        }
    }
}

/// A new control-port connection up to its accepted hello: the first byte, TLS (or a refusal
/// of TLS without it), the preamble, the hello, the version, TLS where it is required.
async fn open(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> Option<Opened> {
    let stream = handshake(shared, tcp, peer).await?;
    let (mut conn, hello) = read_hello(shared, stream, peer).await?;
    let version = match protocol::negotiate(hello.min_version, hello.max_version) {
        Ok(v) => v,
        Err(e) => {
            refuse(shared, &mut conn, peer, e.code(), e.to_string()).await;
            return None;
        }
    };
    if let Some(why) = tls_missing(shared, &conn, &hello.role) {
        let why = why.to_string();
        refuse(shared, &mut conn, peer, ErrorCode::TLS_REQUIRED, why).await;
        return None;
    }
    conn.set_max_frame(shared.config().limits.max_frame);
    Some(Opened {
        conn,
        hello,
        version,
    })
}

/// Waits for the first byte, then runs the TLS handshake when the peer starts one (and this
/// gateway has TLS); a plain connection is taken as it is.
async fn handshake(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> Option<Stream> {
    let config = shared.config();
    let mut first = [0u8; 1];
    // A real agent sends at once (TLS ClientHello or preamble): a silent connection holds a
    // handshake place for `first_byte_timeout` only, not the whole hello timeout.
    let wait = config.limits.first_byte_timeout;
    match tokio::time::timeout(wait, tcp.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return None,
        Err(_) => {
            warn_event(
                &shared.stats.bad_hellos,
                peer,
                format_args!("no first byte within {}", humantime::format_duration(wait)),
            );
            return None;
        }
    }
    match (&config.tls, protocol::looks_like_tls(&[first[0], 0x03])) {
        (Some(tls), true) => match tls.server.accept(tcp).await {
            Ok(s) => resumed_still_valid(shared, &tls.server, s, peer),
            Err(e) => {
                warn_event(
                    &shared.stats.tls_failures,
                    peer,
                    format_args!("TLS handshake failed: {e}"),
                );
                None
            }
        },
        (None, true) => {
            let why = "this gateway has no TLS configured: remove `tls` from agent.toml or configure [control] tls on the gateway";
            warn_event(
                &shared.stats.bad_hellos,
                peer,
                format_args!("refused a TLS client: {why}"),
            );
            refuse_before_reading(tcp, ErrorCode::PROTOCOL, why.to_string()).await;
            None
        }
        (_, false) => Some(Stream::Plain(tcp)),
    }
}

/// Reads the preamble and the hello; refuses (and logs, and counts) anything else.
async fn read_hello(
    shared: &Shared,
    mut stream: Stream,
    peer: SocketAddr,
) -> Option<(Connection<Stream>, Hello)> {
    if let Err(e) = protocol::read_preamble(&mut stream).await {
        let mut conn = Connection::new(stream, protocol::frame::MIN_MAX_FRAME);
        refuse(shared, &mut conn, peer, ErrorCode::BAD_HELLO, e.to_string()).await;
        return None;
    }
    // Until its hello is accepted a peer gets small frames only (a hello is well under 1 KiB),
    // so thousands of unauthenticated handshakes cannot pin max_frame-sized buffers each.
    let mut conn = Connection::new(stream, protocol::frame::HELLO_MAX_FRAME);
    let (code, why) = match conn.read_message().await {
        Ok(Some(Message::Hello(h))) => return Some((conn, h)),
        Ok(None) => {
            tracing::debug!(peer = %peer, "control port: closed before hello");
            return None;
        }
        Ok(Some(other)) => (
            ErrorCode::BAD_HELLO,
            format!("expected hello, received {}", other.name()),
        ),
        Err(ProtocolError::BadPayload {
            kind: protocol::kind::HELLO,
            reason,
        }) => (
            ErrorCode::BAD_HELLO,
            format!("hello not understood ({reason})"),
        ),
        Err(e) => (e.code(), e.to_string()),
    };
    refuse(shared, &mut conn, peer, code, why).await;
    None
}

/// Why a connection that came without TLS must not go on, when this gateway has TLS. With
/// `data_tls = false` only connections that carry their own proof may skip TLS: a data
/// connection its claim token, a v2 pool or outbound connection its session secret. A v1 pool
/// or outbound hello proves nothing, so it must come over TLS.
fn tls_missing(shared: &Shared, conn: &Connection<Stream>, role: &Role) -> Option<&'static str> {
    let config = shared.config();
    if config.tls.is_none() || conn.get_ref().is_tls() {
        return None;
    }
    match role {
        Role::Data(_) | Role::SessionPool(..) | Role::SessionOutbound(..) if !config.data_tls => {
            None
        }
        Role::Pool(_) | Role::Outbound(_) if !config.data_tls => Some(
            "pool and outbound connections of protocol v1 carry no proof of their control \
             session and must use TLS: upgrade the agent (protocol v2 proves them with the \
             session secret) or set [control] data_tls = true",
        ),
        _ => Some("this gateway requires TLS: configure `tls` in agent.toml"),
    }
}

/// Tells the peer why (before its hello was accepted), logs it, counts it, closes.
pub(super) async fn refuse(
    shared: &Shared,
    conn: &mut Connection<Stream>,
    peer: SocketAddr,
    code: ErrorCode,
    message: String,
) {
    warn_event(
        &shared.stats.bad_hellos,
        peer,
        format_args!("refused: {code}: {message}"),
    );
    conn.refuse(code, message).await;
    close_gently(conn.get_mut()).await;
}

/// Refuses a pool or outbound connection before its HelloAck, as every refusal: `SPRT` and an
/// Error frame, then a gentle close (counting and logging are the caller's).
pub(crate) async fn refuse_role(
    conn: &mut Connection<Stream>,
    code: ErrorCode,
    message: impl Into<String>,
) {
    conn.refuse(code, message).await;
    close_gently(conn.get_mut()).await;
}

/// The gateway's answer to an accepted data, outbound or pool hello (no heartbeats on those).
pub(crate) fn data_ack(shared: &Shared, version: u16) -> Message {
    Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: 0,
        data_tls: shared.config().data_tls,
    })
}
