//! The control port: who may connect, TLS, the hello, and the two roles a connection can take.
//!
//! Order of checks on a new connection, cheapest first: `[peers]` rules (before any byte is
//! read, so before any TLS work), the handshake limits, then within `hello_timeout`: TLS (when
//! the first byte says so and TLS is configured), the preamble, the hello, the version, and the
//! TLS policy for the role. Every refusal before a valid hello is sent as [`protocol::MAGIC`]
//! plus an Error frame in the clear, logged (rate limited) and counted.
//!
//! After the hello:
//! - a *control* connection becomes an agent session: config pushes in, client offers out,
//!   heartbeats both ways; when it ends, the agent leaves its site.
//! - a *data* connection claims one pending client with its id and token, is acknowledged, and
//!   is handed to that client's task, which pipes it. It never depends on a control session.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::pending::{Claim, ClaimError, DataConn};
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::access::canonical;
use crate::config::check_name;
use crate::limits::{ConnPermit, Event};
use crate::net;
use crate::protocol::{
    self, Connection, ControlHello, DataHello, ErrorCode, Heartbeat, Hello, HelloAck,
    ListenerStatus, Message, ProtocolError, PushConfig, Role,
};
use crate::transport::Stream;
use tokio_util::sync::CancellationToken;

/// Heartbeat intervals an agent may ask for.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);

/// The refusal text for every failed claim.
const UNKNOWN_CLIENT_TEXT: &str = "unknown, expired or already claimed client id, or wrong token";

/// How long a refused peer gets to read the refusal before the socket closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Counts an event and logs it at warn level unless the event's log budget is spent.
fn warn_event(event: &Event, peer: SocketAddr, what: fmt::Arguments<'_>) {
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
        let permit = match shared.handshakes.try_acquire(peer.ip()) {
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
    let Opened {
        conn,
        hello,
        version,
    } = opened;
    match hello.role {
        Role::Control(control) => {
            run_session(shared, conn, peer, &hello.software, control, version).await
        }
        Role::Data(data) => claim_data(shared, conn, peer, data, version).await,
        Role::Outbound(out) => super::outbound::serve(shared, conn, peer, out, version).await,
        Role::Pool(pool) => super::pool::accept(shared, conn, peer, pool, version).await,
    }
}

/// Everything between accept and an accepted hello. `None` when the connection was refused
/// (already logged, counted and told) or closed.
async fn open(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> Option<Opened> {
    let config = shared.config();
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(1) => {}
        _ => return None,
    }
    let stream = match (&config.tls, protocol::looks_like_tls(&[first[0], 0x03])) {
        (Some(tls), true) => match tls.server.accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                warn_event(
                    &shared.stats.tls_failures,
                    peer,
                    format_args!("TLS handshake failed: {e}"),
                );
                return None;
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
            return None;
        }
        (_, false) => Stream::Plain(tcp),
    };
    let mut stream = stream;
    if let Err(e) = protocol::read_preamble(&mut stream).await {
        let mut conn = Connection::new(stream, protocol::frame::MIN_MAX_FRAME);
        refuse(shared, &mut conn, peer, ErrorCode::BAD_HELLO, e.to_string()).await;
        return None;
    }
    // Until its hello is accepted a peer gets small frames only (a hello is well under 1 KiB),
    // so thousands of unauthenticated handshakes cannot pin max_frame-sized buffers each.
    let mut conn = Connection::new(stream, protocol::frame::HELLO_MAX_FRAME);
    let hello = match conn.read_message().await {
        Ok(Some(Message::Hello(h))) => h,
        Ok(None) => {
            tracing::debug!(peer = %peer, "control port: closed before hello");
            return None;
        }
        Ok(Some(other)) => {
            let why = format!("expected hello, received {}", other.name());
            refuse(shared, &mut conn, peer, ErrorCode::BAD_HELLO, why).await;
            return None;
        }
        Err(ProtocolError::BadPayload {
            kind: protocol::kind::HELLO,
            reason,
        }) => {
            let why = format!("hello not understood ({reason})");
            refuse(shared, &mut conn, peer, ErrorCode::BAD_HELLO, why).await;
            return None;
        }
        Err(e) => {
            refuse(shared, &mut conn, peer, e.code(), e.to_string()).await;
            return None;
        }
    };
    let version = match protocol::negotiate(hello.min_version, hello.max_version) {
        Ok(v) => v,
        Err(e) => {
            refuse(shared, &mut conn, peer, e.code(), e.to_string()).await;
            return None;
        }
    };
    if shared.config().tls.is_some() && !conn.get_ref().is_tls() {
        let plaintext_data_ok = matches!(
            hello.role,
            Role::Data(_) | Role::Outbound(_) | Role::Pool(_)
        ) && !shared.config().data_tls;
        if !plaintext_data_ok {
            let why = "this gateway requires TLS: configure `tls` in agent.toml";
            refuse(
                shared,
                &mut conn,
                peer,
                ErrorCode::TLS_REQUIRED,
                why.to_string(),
            )
            .await;
            return None;
        }
    }
    conn.set_max_frame(shared.config().limits.max_frame);
    Some(Opened {
        conn,
        hello,
        version,
    })
}

/// Tells the peer why (before its hello was accepted), logs it, counts it, closes.
async fn refuse(
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

async fn claim_data(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    data: DataHello,
    version: u16,
) {
    let tx = match shared.pending.claim(data.id, &data.token) {
        Ok(tx) => tx,
        Err(e) => {
            // A late data connection for a client that just left is not an attack: not counted.
            if matches!(e, ClaimError::Gone(_)) {
                tracing::debug!(peer = %peer, "data connection refused: {e}");
            } else {
                warn_event(
                    &shared.stats.data_refused,
                    peer,
                    format_args!("data connection refused: {e}"),
                );
            }
            // The same words whatever the cause: the peer learns nothing about which ids wait.
            conn.send_error(ErrorCode::UNKNOWN_CLIENT, UNKNOWN_CLIENT_TEXT)
                .await;
            return;
        }
    };
    let ack = data_ack(&shared, version);
    if let Err(e) = conn.write_message(&ack).await {
        // Dropping `tx` wakes the client task, which closes the client.
        tracing::warn!(peer = %peer, id = data.id, "data connection failed during hello: {e}");
        return;
    }
    let (stream, leftover) = conn.into_parts();
    let claim = Claim::Data(DataConn {
        stream,
        leftover,
        agent_addr: peer,
    });
    if tx.send(claim).is_err() {
        tracing::debug!(peer = %peer, id = data.id, "client gave up just before its data connection arrived");
    }
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

/// Runs one agent's control channel until it ends, then removes the agent from its site.
async fn run_session(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    software: &str,
    control: ControlHello,
    version: u16,
) {
    if let Err(e) = check_name(&control.site) {
        let why = format!("invalid site name {e}");
        return refuse(&shared, &mut conn, peer, ErrorCode::BAD_HELLO, why).await;
    }
    let heartbeat =
        Duration::from_millis(control.heartbeat_ms as u64).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
    let ack = Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: heartbeat.as_millis() as u32,
        data_tls: shared.config().data_tls,
    });
    if conn.write_message(&ack).await.is_err() {
        return;
    }
    net::keepalive(conn.get_ref().tcp(), heartbeat * 3);

    // An agent joins its site (and is offered clients) only once its config is known and
    // matches the site's other agents'.
    let limit = shared.config().limits.hello_timeout;
    let push = match tokio::time::timeout(limit, first_push(&mut conn)).await {
        Ok(Ok(push)) => push,
        Ok(Err(e)) => {
            tracing::warn!(site = %control.site, agent = %control.agent, peer = %peer, "agent session ended before its config: {e}");
            conn.send_error(e.code(), e.to_string()).await;
            return;
        }
        Err(_) => {
            let why = format!(
                "no config pushed within {}",
                humantime::format_duration(limit)
            );
            tracing::warn!(site = %control.site, agent = %control.agent, peer = %peer, "{why}");
            conn.send_error(ErrorCode::TIMEOUT, why).await;
            return;
        }
    };
    let (tx, rx) = mpsc::channel(1024);
    let agent = AgentHandle {
        id: shared.next_agent_id(),
        name: control.agent.clone(),
        addr: peer,
        connected_since: SystemTime::now(),
        tx,
        inflight: Arc::new(AtomicUsize::new(0)),
        digest: Arc::new(std::sync::Mutex::new(push.digest.clone())),
        gone: CancellationToken::new(),
    };
    let site = match shared.sites.join(&control.site, agent.clone()) {
        Ok(site) => site,
        Err(why) => {
            tracing::warn!(agent = %agent.name, peer = %peer, "agent refused: {why}");
            conn.send_error(ErrorCode::CONFIG_REJECTED, why).await;
            return;
        }
    };
    tracing::info!(
        site = %site.name, agent = %agent.name, peer = %peer,
        "agent connected ({software}, protocol v{version}, {}, heartbeat {} ms, config {})",
        if conn.get_ref().is_tls() { "TLS 1.3, certificate verified" } else { "PLAINTEXT" },
        heartbeat.as_millis(),
        push.digest.chars().take(16).collect::<String>()
    );
    if let Err(e) = apply_push(&shared, &site, &agent, &mut conn, &push).await {
        tracing::warn!(site = %site.name, agent = %agent.name, "agent session ended: {e}");
        shared.sites.leave(&shared, &site, agent.id).await;
        agent.gone.cancel();
        return;
    }

    let end = session_loop(&shared, &site, &agent, &mut conn, rx, heartbeat).await;
    match &end {
        Ok(()) => tracing::info!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent disconnected after {}", connected_for(&agent)
        ),
        Err(e) => tracing::warn!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent session ended after {}: {e}", connected_for(&agent)
        ),
    }
    shared.sites.leave(&shared, &site, agent.id).await;
    site.pool.remove_agent(agent.id);
    // Clients offered to this agent and not yet claimed are offered to another one now.
    agent.gone.cancel();
}

/// Reads up to the agent's first config push (heartbeats may come first).
async fn first_push(conn: &mut Connection<Stream>) -> Result<PushConfig, ProtocolError> {
    loop {
        match conn.read_message().await? {
            Some(Message::Heartbeat(_)) => continue,
            Some(Message::PushConfig(push)) => return Ok(push),
            Some(Message::Error(e)) => return Err(ProtocolError::Peer(e)),
            Some(other) => {
                return Err(ProtocolError::Unexpected {
                    expected: "push-config",
                    got: other.name(),
                })
            }
            None => return Err(ProtocolError::Closed),
        }
    }
}

/// Applies a config push and answers with the per-listener results.
async fn apply_push(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    agent: &AgentHandle,
    conn: &mut Connection<Stream>,
    push: &PushConfig,
) -> Result<(), SessionEnd> {
    if let Err(why) = site.check_digest(agent.id, &push.digest) {
        conn.send_error(ErrorCode::CONFIG_REJECTED, why.clone())
            .await;
        return Err(SessionEnd::Rejected(why));
    }
    let result = site.apply_config(shared, push).await;
    let failed = result
        .listeners
        .iter()
        .filter(|l| matches!(l.status, ListenerStatus::Failed { .. }))
        .count();
    tracing::info!(
        site = %site.name, agent = %agent.name,
        "config generation {} applied: {} listener(s), {failed} failed",
        push.generation, push.listeners.len()
    );
    conn.write_message(&Message::ConfigResult(result)).await?;
    Ok(())
}

fn connected_for(agent: &AgentHandle) -> String {
    let secs = agent
        .connected_since
        .elapsed()
        .unwrap_or_default()
        .as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("no message for {0:?} (3 heartbeats missed)")]
    HeartbeatsMissed(Duration),
    #[error("unexpected {0} on a control channel")]
    Unexpected(&'static str),
    #[error("gateway shutting down")]
    Shutdown,
    #[error("config rejected: {0}")]
    Rejected(String),
}

async fn session_loop(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    agent: &AgentHandle,
    conn: &mut Connection<Stream>,
    mut outbox: mpsc::Receiver<Message>,
    heartbeat: Duration,
) -> Result<(), SessionEnd> {
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => {
                conn.send_error(ErrorCode::SHUTTING_DOWN, "gateway shutting down").await;
                return Err(SessionEnd::Shutdown);
            }
            incoming = conn.read_message() => {
                let msg = match incoming {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        conn.send_error(e.code(), e.to_string()).await;
                        return Err(e.into());
                    }
                };
                last_heard = Instant::now();
                match msg {
                    Message::Heartbeat(_) => {}
                    Message::PushConfig(push) => apply_push(shared, site, agent, conn, &push).await?,
                    Message::ClientFailed(f) => {
                        // A pending client is woken and closed (and counted) by its own task.
                        // Usually the agent's data connection claimed it already, and closes it
                        // itself; the report still explains why, so count and log it here.
                        let pending = shared.pending.fail(f.id, &site.name, f.reason.clone());
                        if !pending && !shared.pending.is_gone(f.id) {
                            let occ = shared.stats.clients_failed.hit();
                            if occ.log {
                                tracing::warn!(
                                    site = %site.name, agent = %agent.name, id = f.id,
                                    "agent could not serve client: {}{}", f.reason, occ.tally()
                                );
                            }
                        }
                    }
                    Message::Error(e) => return Err(ProtocolError::Peer(e).into()),
                    other => {
                        let end = SessionEnd::Unexpected(other.name());
                        conn.send_error(ErrorCode::PROTOCOL, end.to_string()).await;
                        return Err(end);
                    }
                }
            }
            Some(out) = outbox.recv() => {
                conn.write_message(&out).await?;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(SessionEnd::HeartbeatsMissed(last_heard.elapsed()));
                }
                seq += 1;
                conn.write_message(&Message::Heartbeat(Heartbeat { seq })).await?;
            }
        }
    }
}
