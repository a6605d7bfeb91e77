//! One agent's control channel to one gateway: dial, hello, push the config, answer client
//! offers, exchange heartbeats; on any error, back off and dial again.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::backoff::Backoff;
use super::{data, AgentCtx};
use crate::addr::display_addrs;
use crate::config::AgentConfig;
use crate::net;
use crate::protocol::{
    self, ConfigResult, Connection, ControlHello, ErrorCode, Heartbeat, ListenerStatus, Message,
    ProtocolError, PushConfig, Role,
};

/// Why a session ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("no hello-ack within {0:?}")]
    HelloTimeout(Duration),
    #[error("no message from the gateway for {0:?} (3 heartbeats missed)")]
    HeartbeatsMissed(Duration),
    #[error("unexpected {0} from the gateway")]
    Unexpected(&'static str),
}

/// Keeps a control channel to `gateway` until shutdown, reconnecting after every failure.
pub(crate) async fn keep_connected(ctx: AgentCtx, gateway: String) {
    let mut backoff = Backoff::new(ctx.config().reconnect);
    loop {
        let mut established = false;
        let result = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = run_session(&ctx, &gateway, &mut established) => r,
        };
        if established {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        match result {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                gateway = %gateway,
                "control channel lost: {e}; reconnecting in {} ms", delay.as_millis()
            ),
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn push_message(config: &AgentConfig, generation: u64) -> Message {
    Message::PushConfig(PushConfig {
        generation,
        digest: config.digest(),
        listeners: config.listener_specs(),
    })
}

/// One session; returns `Ok(())` only on shutdown. Sets `established` once the gateway has
/// accepted the hello and answered the first config push.
async fn run_session(
    ctx: &AgentCtx,
    gateway: &str,
    established: &mut bool,
) -> Result<(), SessionError> {
    let mut config = ctx.config.clone();
    let current = config.borrow_and_update().clone();
    let stream = net::connect(gateway, current.connect_timeout)
        .await
        .map_err(SessionError::Connect)?;
    let gateway_addr = stream.peer_addr().map_err(SessionError::Connect)?;
    let (mut conn, heartbeat) = handshake(stream, &current).await?;
    net::keepalive(conn.get_ref(), heartbeat * 3);
    tracing::info!(
        gateway = %gateway, addr = %gateway_addr,
        "control channel up; pushing {} listener(s)", current.listeners.len()
    );

    let mut generation = 1;
    conn.write_message(&push_message(&current, generation))
        .await?;

    // Data tasks report clients they cannot serve through this outbox.
    let (outbox_tx, mut outbox) = mpsc::channel::<Message>(256);
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            incoming = conn.read_message() => {
                let msg = match incoming {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return Err(ProtocolError::Closed.into()),
                    Err(e) => {
                        conn.send_error(e.code(), e.to_string()).await;
                        return Err(e.into());
                    }
                };
                last_heard = Instant::now();
                match msg {
                    Message::Heartbeat(_) => {}
                    Message::ClientArrived(arrived) => {
                        ctx.tasks.spawn(data::serve_client(ctx.clone(), gateway_addr, arrived, outbox_tx.clone()));
                    }
                    Message::ConfigResult(result) => {
                        log_config_result(gateway, &result);
                        if result.generation == generation {
                            *established = true;
                        }
                    }
                    Message::Error(e) => return Err(ProtocolError::Peer(e).into()),
                    other => {
                        let err = SessionError::Unexpected(other.name());
                        conn.send_error(ErrorCode::PROTOCOL, err.to_string()).await;
                        return Err(err);
                    }
                }
            }
            Some(out) = outbox.recv() => conn.write_message(&out).await?,
            Ok(()) = config.changed() => {
                let new = config.borrow_and_update().clone();
                generation += 1;
                tracing::info!(gateway = %gateway, "configuration reloaded; pushing generation {generation}");
                conn.write_message(&push_message(&new, generation)).await?;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(SessionError::HeartbeatsMissed(last_heard.elapsed()));
                }
                seq += 1;
                conn.write_message(&Message::Heartbeat(Heartbeat { seq })).await?;
            }
        }
    }
}

/// Sends the preamble and hello, waits for the hello-ack; returns the heartbeat in force.
async fn handshake(
    mut stream: TcpStream,
    config: &Arc<AgentConfig>,
) -> Result<(Connection<TcpStream>, Duration), SessionError> {
    use tokio::io::AsyncWriteExt;
    let hello = protocol::hello(Role::Control(ControlHello {
        site: config.site.clone(),
        agent: config.name.clone(),
        heartbeat_ms: config.heartbeat.as_millis() as u32,
    }));
    stream
        .write_all(&protocol::preamble_and_hello(&hello))
        .await
        .map_err(ProtocolError::Io)?;
    let mut conn = Connection::new(stream, config.max_frame);
    let wait = config.connect_timeout;
    let reply = tokio::time::timeout(wait, conn.expect_message())
        .await
        .map_err(|_| SessionError::HelloTimeout(wait))??;
    match reply {
        Message::HelloAck(ack) => {
            let heartbeat = Duration::from_millis(ack.heartbeat_ms.max(100) as u64);
            Ok((conn, heartbeat))
        }
        other => Err(SessionError::Unexpected(other.name())),
    }
}

fn log_config_result(gateway: &str, result: &ConfigResult) {
    for l in &result.listeners {
        match &l.status {
            ListenerStatus::Bound { addrs, kept } => tracing::info!(
                gateway = %gateway, listener = %l.name,
                "listener {} on the gateway at {}",
                if *kept { "kept" } else { "open" },
                display_addrs(addrs)
            ),
            ListenerStatus::Failed { error } => tracing::error!(
                gateway = %gateway, listener = %l.name,
                "listener FAILED on the gateway: {error}"
            ),
        }
    }
}
