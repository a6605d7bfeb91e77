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
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::bans::{BanAssembly, ChunkOutcome};
use super::binding::{cert_serves, refuse_wrong_site};
use super::pending::{Claim, ClaimError, DataConn, Failed};
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::access::canonical;
use crate::config::check_name;
use crate::limits::{ConnPermit, Event};
use crate::net;
use crate::protocol::liveness::{Beat, Liveness, MISSED};
use crate::protocol::outbox::{Outbox, OutboxError};
use crate::protocol::{
    self, AutoBans, BanResult, ClientFailed, Connection, ControlHello, DataHello, EdgeLimits,
    ErrorCode, Feature, Hello, HelloAck, ListenerStatus, Message, MessageReader, ProtocolError,
    PushConfig, Role, SessionSecret, Token,
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
            run_session(shared, conn, peer, &hello.software, control, version).await
        }
        Role::Data(data) => claim_data(shared, conn, peer, data, version).await,
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
async fn open(shared: &Shared, tcp: TcpStream, peer: SocketAddr) -> Option<Opened> {
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
        // With `data_tls = false` only connections that carry their own proof may skip TLS: a
        // data connection its claim token, a v2 pool or outbound connection its session secret.
        // A v1 pool or outbound hello proves nothing, so it must come over TLS.
        let why = match &hello.role {
            Role::Data(_) | Role::SessionPool(..) | Role::SessionOutbound(..)
                if !shared.config().data_tls =>
            {
                None
            }
            Role::Pool(_) | Role::Outbound(_) if !shared.config().data_tls => Some(
                "pool and outbound connections of protocol v1 carry no proof of their control \
                 session and must use TLS: upgrade the agent (protocol v2 proves them with the \
                 session secret) or set [control] data_tls = true",
            ),
            _ => Some("this gateway requires TLS: configure `tls` in agent.toml"),
        };
        if let Some(why) = why {
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

async fn claim_data(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    data: DataHello,
    version: u16,
) {
    if data.id == protocol::PROBE_ID {
        // `sallyport check` proving that TLS, the peer rules and the version check pass: the
        // same answer as for any unknown client, but an operator at work, not a knock.
        let occ = shared.stats.check_probes.hit();
        if occ.log {
            tracing::info!(peer = %peer, "control port: `sallyport check` probe from {}{}", peer.ip(), occ.tally());
        }
        conn.send_error(ErrorCode::UNKNOWN_CLIENT, UNKNOWN_CLIENT_TEXT)
            .await;
        return;
    }
    let config = shared.config();
    let serves = |site: &str| cert_serves(&config, conn.get_ref(), site);
    let tx = match shared.pending.claim_for(data.id, &data.token, serves) {
        Ok(tx) => tx,
        Err(e) => {
            // A late data connection for a client that just left, or the loser of a client
            // offered to two agents, is not an attack: not counted.
            if matches!(e, ClaimError::Gone(_) | ClaimError::Lost(_)) {
                tracing::debug!(peer = %peer, "data connection refused: {e}");
            } else if let ClaimError::WrongSite(_, why) = e {
                // It held the right token: it may learn why.
                warn_event(
                    &shared.stats.wrong_site,
                    peer,
                    format_args!("data connection refused: {why}"),
                );
                conn.send_error(ErrorCode::WRONG_SITE, why).await;
                return;
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
        agent: None,
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
    // The agent's name is shown in status, logs and the dashboard: checked like a site name.
    if let Err(e) = check_name(&control.agent) {
        let why = format!("invalid agent name {e}");
        return refuse(&shared, &mut conn, peer, ErrorCode::BAD_HELLO, why).await;
    }
    // Before anything of the site is touched: no listener opens for a site the certificate
    // does not serve.
    if refuse_wrong_site(&shared, &mut conn, peer, &control.site, "control channel").await {
        return;
    }
    let heartbeat =
        Duration::from_millis(control.heartbeat_ms as u64).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
    let ack = Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: heartbeat.as_millis() as u32,
        data_tls: shared.config().data_tls,
    });
    // v2: the secret that binds this session's pool and outbound connections to it, sent with
    // the ack, before anything else.
    let secret = Feature::SessionBinding.on(version).then(Token::random);
    let cert = conn.get_ref().peer_cert_digest();
    let chain = conn.get_ref().peer_chain().map(Arc::from);
    // A fresh connection's send queue is empty: this small write cannot block for long, and
    // the hello timeout no longer applies, so bound it like every later write.
    let mut liveness = Liveness::new(heartbeat);
    let opening = async {
        conn.feed_message(&ack).await?;
        if let Some(secret) = secret {
            conn.feed_message(&Message::SessionSecret(SessionSecret { secret }))
                .await?;
        }
        conn.flush().await
    };
    match tokio::time::timeout(liveness.write_limit(), opening).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    net::keepalive(conn.get_ref().tcp(), liveness.write_limit());
    net::user_timeout(conn.get_ref().tcp(), liveness.write_limit());
    let tls = conn.get_ref().is_tls();
    // From here on, writes go through the outbox's own task: nothing this session does waits
    // for the agent to read.
    let (mut reader, sink) = conn.split();
    let (tx, offers) = mpsc::channel(1024);
    let mut outbox = Outbox::spawn(sink, offers, liveness.write_limit());

    // An agent joins its site (and is offered clients) only once its config is known and
    // matches the site's other agents'.
    let limit = shared.config().limits.hello_timeout;
    let mut early = EarlyBans::default();
    let push = match tokio::time::timeout(limit, first_push(&mut reader, &mut early)).await {
        // The push was just heard: the agent's silence counts from here, not from the ack (a
        // push later than three intervals ended the session at once).
        Ok(Ok(push)) => {
            liveness.heard();
            push
        }
        Ok(Err(e)) => {
            let end = SessionEnd::from(e);
            end.log_before_config(&control, peer);
            let farewell = end.farewell();
            return outbox.close(farewell, FAREWELL_LIMIT).await;
        }
        Err(_) => {
            let why = format!(
                "no config pushed within {}",
                humantime::format_duration(limit)
            );
            tracing::warn!(site = %control.site, agent = %control.agent, peer = %peer, "{why}");
            let farewell = Message::error(ErrorCode::TIMEOUT, why);
            return outbox.close(Some(farewell), FAREWELL_LIMIT).await;
        }
    };
    let agent = AgentHandle {
        id: shared.next_agent_id(),
        name: control.agent.clone(),
        addr: peer,
        connected_since: SystemTime::now(),
        tx,
        inflight: Arc::new(AtomicUsize::new(0)),
        digest: Arc::new(parking_lot::Mutex::new(push.digest.clone())),
        gone: CancellationToken::new(),
        secret,
        cert,
        chain,
        cert_revoked: CancellationToken::new(),
        suspect: Arc::default(),
    };
    // A new site is a new set of listeners and pools: their number is capped.
    let max_sites = shared.config().limits.max_sites;
    let joins_new_site = shared
        .sites
        .get(&control.site)
        .map_or(true, |s| s.agent_count() == 0);
    if joins_new_site && shared.sites.active() >= max_sites {
        let why = format!(
            "the gateway serves at most {max_sites} sites ([limits] max_sites); site \"{}\" is not one of them",
            control.site
        );
        tracing::warn!(agent = %agent.name, peer = %peer, "agent refused: {why}");
        let farewell = Message::error(ErrorCode::LIMIT, why);
        return outbox.close(Some(farewell), FAREWELL_LIMIT).await;
    }
    let site = match shared.sites.join(&control.site, agent.clone()) {
        Ok(site) => site,
        Err(why) => {
            tracing::warn!(agent = %agent.name, peer = %peer, "agent refused: {why}");
            let farewell = Message::error(ErrorCode::CONFIG_REJECTED, why);
            return outbox.close(Some(farewell), FAREWELL_LIMIT).await;
        }
    };
    let _agent_addr = shared.agent_addr(peer.ip());
    tracing::info!(
        site = %site.name, agent = %agent.name, peer = %peer,
        "agent connected ({software}, protocol v{version}, {}, heartbeat {} ms, config {})",
        if tls { "TLS 1.3, certificate verified" } else { "PLAINTEXT" },
        heartbeat.as_millis(),
        push.digest.chars().take(16).collect::<String>()
    );
    let mut bans = early.assembly;
    if let Some(chunk) = early.last {
        apply_bans(&site, &agent, &outbox, chunk);
    }
    if let Some(limits) = early.limits {
        apply_limits(&site, &agent, limits);
    }
    if let Some(set) = early.auto_bans {
        apply_auto_bans(&site, &agent, set);
    }
    let end = match apply_push(&shared, &site, &agent, &outbox, &push).await {
        Ok(()) => {
            let session = Session {
                shared: &shared,
                site: &site,
                agent: &agent,
                bans: &mut bans,
            };
            session_loop(session, &mut reader, &mut outbox, liveness).await
        }
        Err(e) => Err(e),
    };
    match &end {
        Err(SessionEnd::Protocol(ProtocolError::FrameTooLarge { len, max })) => tracing::error!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "{} after {}", push_too_large(*len, *max, &agent.name), connected_for(&agent)
        ),
        Ok(()) => tracing::info!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent disconnected after {}", connected_for(&agent)
        ),
        Err(e) => tracing::warn!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent session ended after {}: {e}", connected_for(&agent)
        ),
    }
    // First, before anything that awaits: no new client may be handed to this session's pooled
    // connections, and clients offered to it and not yet claimed are offered to another agent
    // (a `gone` agent is never picked, even while it is still listed). The pool is emptied
    // after `gone` is set, so a pool connection being parked right now either sees `gone` or is
    // removed here (see `Pool::add`).
    agent.gone.cancel();
    site.pool.remove_agent(agent.id);
    shared.sites.leave(&shared, &site, agent.id).await;
    let farewell = end.err().and_then(|e| e.farewell());
    outbox.close(farewell, FAREWELL_LIMIT).await;
}

/// How long a closing session waits for its last words (an Error frame) to be written: a hung
/// agent must not hold a stopping gateway.
const FAREWELL_LIMIT: Duration = Duration::from_secs(1);

/// Reads up to the agent's first config push (heartbeats may come first, and its ban list,
/// which `bans` collects so that it is in force before the site's listeners open).
async fn first_push<R>(
    reader: &mut MessageReader<R>,
    bans: &mut EarlyBans,
) -> Result<PushConfig, ProtocolError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    loop {
        match reader.read_message().await? {
            Some(Message::Heartbeat(_)) => continue,
            Some(Message::BanList(chunk)) => {
                bans.last = Some(bans.assembly.add(chunk));
                continue;
            }
            Some(Message::EdgeLimits(limits)) => {
                bans.limits = Some(limits);
                continue;
            }
            Some(Message::AutoBans(set)) => {
                bans.auto_bans = Some(set);
                continue;
            }
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

/// Applies a config push and queues the per-listener results.
async fn apply_push(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    agent: &AgentHandle,
    outbox: &Outbox,
    push: &PushConfig,
) -> Result<(), SessionEnd> {
    if let Err(why) = site.check_digest(agent.id, &push.digest) {
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
    outbox.send(Message::ConfigResult(result))?;
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
    #[error("{0}")]
    Write(#[from] OutboxError),
    #[error("no message for {0:?} ({MISSED} heartbeats missed)")]
    HeartbeatsMissed(Duration),
    #[error("unexpected {0} on a control channel")]
    Unexpected(&'static str),
    #[error("gateway shutting down")]
    Shutdown,
    #[error("config rejected: {0}")]
    Rejected(String),
    #[error("revoked: {0} is no longer allowed by the gateway's [peers] rules")]
    Revoked(IpAddr),
    #[error("revoked: this agent's certificate no longer passes the gateway's checks (revoked by its [control] tls.crl, or not issued by its client_ca)")]
    CertificateRevoked,
}

/// The gateway's log line for a config push larger than its `limits.max_frame` (the only
/// message an agent sends that can be that large).
fn push_too_large(len: usize, max: usize, agent: &str) -> String {
    format!(
        "push of {len} bytes exceeds max_frame {max} (limits.max_frame) from agent \"{agent}\": \
         the agent was told; raise limits.max_frame (at most 67108864) or split its listeners"
    )
}

impl SessionEnd {
    /// Logs a session that ended before the agent's first push was read: a push too large for
    /// either side's max_frame is an ERROR that says so, anything else a warning.
    fn log_before_config(&self, control: &ControlHello, peer: SocketAddr) {
        let (site, agent) = (&control.site, &control.agent);
        match self {
            SessionEnd::Protocol(ProtocolError::FrameTooLarge { len, max }) => tracing::error!(
                site = %site, agent = %agent, peer = %peer,
                "{}", push_too_large(*len, *max, agent)
            ),
            SessionEnd::Protocol(ProtocolError::Peer(e))
                if e.code == ErrorCode::FRAME_TOO_LARGE =>
            {
                tracing::error!(
                    site = %site, agent = %agent, peer = %peer,
                    "agent \"{agent}\" cannot push its config: {}", e.message
                )
            }
            e => tracing::warn!(
                site = %site, agent = %agent, peer = %peer,
                "agent session ended before its config: {e}"
            ),
        }
    }

    /// The Error frame to send the agent before closing, when it is owed one. Neither side
    /// sends one for silence or a failed write, nor answers the peer's own Error.
    fn farewell(&self) -> Option<Message> {
        let (code, text) = match self {
            SessionEnd::Shutdown => (ErrorCode::SHUTTING_DOWN, self.to_string()),
            SessionEnd::Rejected(why) => (ErrorCode::CONFIG_REJECTED, why.clone()),
            SessionEnd::Revoked(_) => (ErrorCode::PEER_DENIED, self.to_string()),
            SessionEnd::CertificateRevoked => (ErrorCode::REVOKED, self.to_string()),
            SessionEnd::Unexpected(_) => (ErrorCode::PROTOCOL, self.to_string()),
            SessionEnd::Protocol(
                ProtocolError::Peer(_)
                | ProtocolError::Closed
                | ProtocolError::Cut
                | ProtocolError::Io(_),
            ) => return None,
            SessionEnd::Protocol(ProtocolError::FrameTooLarge { len, max }) => (
                ErrorCode::FRAME_TOO_LARGE,
                format!(
                    "push of {len} bytes exceeds the gateway's max_frame {max} (limits.max_frame)"
                ),
            ),
            SessionEnd::Protocol(e) => (e.code(), e.to_string()),
            SessionEnd::Write(_) | SessionEnd::HeartbeatsMissed(_) => return None,
        };
        Some(Message::error(code, text))
    }
}

/// What a joined control session works on.
struct Session<'a> {
    shared: &'a Arc<Shared>,
    site: &'a Arc<Site>,
    agent: &'a AgentHandle,
    /// The ban list being received.
    bans: &'a mut BanAssembly,
}

/// Ban-list chunks (and rate limits) received before the first config push.
#[derive(Default)]
struct EarlyBans {
    assembly: BanAssembly,
    /// What the last chunk completed (or why it was refused).
    last: Option<ChunkOutcome>,
    limits: Option<EdgeLimits>,
    auto_bans: Option<AutoBans>,
}

/// Puts an agent's automatic-ban settings in force for its site (a refused set leaves the
/// previous one).
fn apply_auto_bans(site: &Site, agent: &AgentHandle, set: AutoBans) {
    static REFUSED: Event = Event::new(5, Duration::from_secs(10));
    let applied = site.autobans.replace(set);
    report_edge_settings(
        site,
        agent,
        applied,
        "automatic bans on",
        "automatic-ban settings",
        &REFUSED,
    );
}

/// Puts an agent's rate limits in force for its site (a refused set leaves the previous one).
fn apply_limits(site: &Site, agent: &AgentHandle, limits: EdgeLimits) {
    static REFUSED: Event = Event::new(5, Duration::from_secs(10));
    let applied = site.limits.replace(limits);
    report_edge_settings(
        site,
        agent,
        applied,
        "rate limits in force",
        "rate limits",
        &REFUSED,
    );
}

/// Logs what a set of per-listener edge settings did: "`in_force` for N listener(s)", or
/// "`what` refused (the previous ones stay in force)", rate limited by `refused` (one per kind).
fn report_edge_settings(
    site: &Site,
    agent: &AgentHandle,
    applied: Result<usize, String>,
    in_force: &str,
    what: &str,
    refused: &Event,
) {
    match applied {
        Ok(n) => tracing::info!(
            site = %site.name, agent = %agent.name,
            "{in_force} for {n} listener(s)"
        ),
        Err(error) => {
            let occ = refused.hit();
            if occ.log {
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "{what} refused (the previous ones stay in force): {error}{}",
                    occ.tally()
                );
            }
        }
    }
}

/// Applies a completed ban list (or reports a refused chunk) and answers the agent with a
/// `BanResult`. A refused list leaves the agent's previous one in force; the session goes on.
fn apply_bans(site: &Site, agent: &AgentHandle, outbox: &Outbox, chunk: ChunkOutcome) {
    let (generation, result) = match chunk {
        Ok(None) => return,
        Ok(Some((generation, bans))) => (generation, site.bans.replace(&agent.name, &bans)),
        Err(e) => (0, Err(e)),
    };
    let answer = match result {
        Ok(applied) => {
            tracing::info!(
                site = %site.name, agent = %agent.name,
                "ban list generation {generation} applied: {applied} ban(s) from this agent, {} in force for the site",
                site.bans.len()
            );
            BanResult {
                generation,
                applied: applied as u32,
                error: None,
            }
        }
        Err(error) => {
            // A hostile agent can send bad lists as fast as it likes: 5 lines per 10 s.
            static REFUSED: Event = Event::new(5, Duration::from_secs(10));
            let occ = REFUSED.hit();
            if occ.log {
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %agent.addr,
                    "ban list refused (the agent's previous list stays in force): {error}{}",
                    occ.tally()
                );
            }
            BanResult {
                generation,
                applied: 0,
                error: Some(error),
            }
        }
    };
    // A full urgent queue means a stalled writer, which the session loop notices itself.
    let _ = outbox.send(Message::BanResult(answer));
}

async fn session_loop<R>(
    s: Session<'_>,
    reader: &mut MessageReader<R>,
    outbox: &mut Outbox,
    mut liveness: Liveness,
) -> Result<(), SessionEnd>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let Session {
        shared,
        site,
        agent,
        bans,
    } = s;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            () = shared.denied(agent.addr.ip(), false) => return Err(SessionEnd::Revoked(agent.addr.ip())),
            () = agent.cert_revoked.cancelled() => return Err(SessionEnd::CertificateRevoked),
            incoming = reader.read_message() => {
                let Some(msg) = incoming? else {
                    return Ok(());
                };
                liveness.heard();
                agent.suspect.store(false, std::sync::atomic::Ordering::Relaxed);
                match msg {
                    Message::Heartbeat(_) => {}
                    Message::PushConfig(push) => apply_push(shared, site, agent, outbox, &push).await?,
                    Message::ClientFailed(f) => client_failed(shared, site, agent, f),
                    Message::BanList(chunk) => apply_bans(site, agent, outbox, bans.add(chunk)),
                    Message::EdgeLimits(limits) => apply_limits(site, agent, limits),
                    Message::AutoBans(set) => apply_auto_bans(site, agent, set),
                    Message::Error(e) => return Err(ProtocolError::Peer(e).into()),
                    other => return Err(SessionEnd::Unexpected(other.name())),
                }
            }
            why = outbox.failed() => return Err(why.into()),
            beat = liveness.next() => match beat {
                Beat::Send(heartbeat) => outbox.send(heartbeat)?,
                Beat::Dead(silence) => return Err(SessionEnd::HeartbeatsMissed(silence)),
            },
        }
    }
}

/// The agent cannot serve client `f.id`. A pending client is woken and closed (and counted) by
/// its own task. Usually the agent's data connection claimed it already, and closes it itself;
/// the report still explains why, so count and log it here.
fn client_failed(shared: &Shared, site: &Site, agent: &AgentHandle, f: ClientFailed) {
    let failed = shared
        .pending
        .fail(f.id, &site.name, agent.id, f.reason.clone());
    if failed == Failed::OfferedElsewhere {
        tracing::debug!(
            site = %site.name, agent = %agent.name, id = f.id,
            "late failure report for a client now offered to another agent: {}", f.reason
        );
        return;
    }
    if failed == Failed::NotPending && !shared.pending.is_gone(f.id) {
        // A warm-pool client pipes already: its audit record says the agent failed it.
        shared.traffic.fail(f.id, &f.reason);
        let occ = shared.stats.clients_failed.hit();
        if occ.log {
            tracing::warn!(
                site = %site.name, agent = %agent.name, id = f.id,
                "agent could not serve client: {}{}", f.reason, occ.tally()
            );
        }
    }
}
