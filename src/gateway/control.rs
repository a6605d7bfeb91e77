//! The control port: who may connect, the hello, and the two roles a connection can take.
//!
//! - a *control* connection becomes an agent session: config pushes in, client offers out,
//!   heartbeats both ways; when it ends, the agent leaves its site.
//! - a *data* connection claims one pending client with its id and token, is acknowledged, and
//!   is handed to that client's task, which pipes it. It never depends on a control session.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::pending::{Claim, DataConn};
use super::site::{AgentHandle, Site};
use super::stats::bump;
use super::Shared;
use crate::config::check_name;
use crate::net;
use crate::protocol::{
    self, Connection, ControlHello, DataHello, ErrorCode, Heartbeat, HelloAck, ListenerStatus,
    Message, ProtocolError, Role,
};

/// Heartbeat intervals an agent may ask for.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);

/// Accepts connections on the control port until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
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
        if !shared.config.peers.allows(peer.ip()) {
            let n = bump(&shared.stats.peers_denied);
            tracing::warn!(peer = %peer, "control port: peer denied by [peers] rules ({n} so far)");
            net::reset(stream);
            continue;
        }
        shared
            .tasks
            .spawn(handle_connection(shared.clone(), stream, peer));
    }
}

/// Reads the preamble and hello within the hello timeout, then dispatches on the role.
async fn handle_connection(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    net::tune(&stream);
    let limits = &shared.config.limits;
    let hello = tokio::time::timeout(limits.hello_timeout, async {
        protocol::read_preamble(&mut stream).await?;
        let mut conn = Connection::new(stream, limits.max_frame);
        let first = conn.read_message().await;
        Ok::<_, ProtocolError>((conn, first))
    })
    .await;

    let (mut conn, first) = match hello {
        Err(_) => {
            let n = bump(&shared.stats.bad_hellos);
            tracing::warn!(peer = %peer, "control port: no hello within {} ({n} bad hellos so far)",
                humantime::format_duration(limits.hello_timeout));
            return;
        }
        Ok(Err(e)) => {
            let n = bump(&shared.stats.bad_hellos);
            tracing::warn!(peer = %peer, "control port: {e} ({n} bad hellos so far)");
            return;
        }
        Ok(Ok(x)) => x,
    };
    let hello = match first {
        Ok(Some(Message::Hello(h))) => h,
        Ok(None) => {
            tracing::debug!(peer = %peer, "control port: closed before hello");
            return;
        }
        Ok(Some(other)) => {
            return refuse(
                &shared,
                &mut conn,
                peer,
                ErrorCode::BAD_HELLO,
                format!("expected hello, received {}", other.name()),
            )
            .await;
        }
        Err(ProtocolError::BadPayload {
            kind: protocol::kind::HELLO,
            reason,
        }) => {
            return refuse(
                &shared,
                &mut conn,
                peer,
                ErrorCode::BAD_HELLO,
                format!("hello not understood ({reason})"),
            )
            .await;
        }
        Err(e) => return refuse(&shared, &mut conn, peer, e.code(), e.to_string()).await,
    };
    let version = match protocol::negotiate(hello.min_version, hello.max_version) {
        Ok(v) => v,
        Err(e) => return refuse(&shared, &mut conn, peer, e.code(), e.to_string()).await,
    };
    match hello.role {
        Role::Control(control) => {
            run_session(shared, conn, peer, &hello.software, control, version).await
        }
        Role::Data(data) => claim_data(shared, conn, peer, data, version).await,
    }
}

/// Tells the peer why, logs it, counts it, closes.
async fn refuse(
    shared: &Shared,
    conn: &mut Connection<TcpStream>,
    peer: SocketAddr,
    code: ErrorCode,
    message: String,
) {
    let n = bump(&shared.stats.bad_hellos);
    tracing::warn!(peer = %peer, "control port: refused: {code}: {message} ({n} bad hellos so far)");
    conn.send_error(code, message).await;
}

async fn claim_data(
    shared: Arc<Shared>,
    mut conn: Connection<TcpStream>,
    peer: SocketAddr,
    data: DataHello,
    version: u16,
) {
    let tx = match shared.pending.claim(data.id, &data.token) {
        Ok(tx) => tx,
        Err(e) => {
            let n = bump(&shared.stats.data_refused);
            tracing::warn!(peer = %peer, "data connection refused: {e} ({n} refused so far)");
            conn.send_error(ErrorCode::UNKNOWN_CLIENT, e.to_string())
                .await;
            return;
        }
    };
    let ack = Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: 0,
    });
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

/// Runs one agent's control channel until it ends, then removes the agent from its site.
async fn run_session(
    shared: Arc<Shared>,
    mut conn: Connection<TcpStream>,
    peer: SocketAddr,
    software: &str,
    control: ControlHello,
    version: u16,
) {
    if let Err(e) = check_name(&control.site) {
        return refuse(
            &shared,
            &mut conn,
            peer,
            ErrorCode::BAD_HELLO,
            format!("invalid site name {e}"),
        )
        .await;
    }
    let heartbeat =
        Duration::from_millis(control.heartbeat_ms as u64).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
    let ack = Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: heartbeat.as_millis() as u32,
    });
    if conn.write_message(&ack).await.is_err() {
        return;
    }
    net::keepalive(conn.get_ref(), heartbeat * 3);

    let (tx, rx) = mpsc::channel(1024);
    let agent = AgentHandle {
        id: shared.next_agent_id(),
        name: control.agent.clone(),
        addr: peer,
        connected_since: SystemTime::now(),
        tx,
        inflight: Arc::new(AtomicUsize::new(0)),
    };
    let site = shared.sites.join(&control.site, agent.clone());
    tracing::info!(
        site = %site.name, agent = %agent.name, peer = %peer,
        "agent connected ({software}, protocol v{version}, heartbeat {} ms)", heartbeat.as_millis()
    );

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
    shared.sites.leave(&site, agent.id).await;
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
}

async fn session_loop(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    agent: &AgentHandle,
    conn: &mut Connection<TcpStream>,
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
                    Message::PushConfig(push) => {
                        let result = site.apply_config(shared, &push).await;
                        let failed = result.listeners.iter()
                            .filter(|l| matches!(l.status, ListenerStatus::Failed { .. })).count();
                        tracing::info!(
                            site = %site.name, agent = %agent.name,
                            "config generation {} applied: {} listener(s), {failed} failed",
                            push.generation, push.listeners.len()
                        );
                        conn.write_message(&Message::ConfigResult(result)).await?;
                    }
                    Message::ClientFailed(f) => {
                        if !shared.pending.fail(f.id, &site.name, f.reason) {
                            tracing::debug!(id = f.id, "client-failed for a client no longer pending");
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
