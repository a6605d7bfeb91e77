//! One agent's control channel to one gateway: dial, hello, push the config, answer client
//! offers, exchange heartbeats; on any error, back off and dial again.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::backoff::Backoff;
use super::dial::{dial, DialError, Target};
use super::{data, pool, AgentCtx};
use crate::addr::display_addrs;
use crate::config::AgentConfig;
use crate::net;
use crate::protocol::{
    ConfigResult, ControlHello, ErrorCode, Heartbeat, ListenerStatus, Message, ProtocolError,
    PushConfig, Role,
};
use tokio_util::sync::CancellationToken;

/// Why a session ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
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
            Err(e) => {
                tracing::warn!(
                    gateway = %gateway,
                    "control channel lost: {e}; reconnecting in {} ms", delay.as_millis()
                );
                ctx.status.send_modify(|s| {
                    let g = s.gateways.entry(gateway.clone()).or_default();
                    g.connected_to = None;
                    g.connected_since = None;
                    g.listeners.clear();
                    g.last_error = Some(e.to_string());
                    g.failures = if established { 1 } else { g.failures + 1 };
                });
            }
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
    let role = Role::Control(ControlHello {
        site: current.site.clone(),
        agent: current.name.clone(),
        heartbeat_ms: current.heartbeat.as_millis() as u32,
    });
    let target = Target {
        gateway,
        resolved: None,
    };
    let (mut conn, ack) = dial(&current, target, role, current.tls.is_some()).await?;
    let heartbeat = Duration::from_millis(ack.heartbeat_ms.max(100) as u64);
    let gateway_addr = conn
        .get_ref()
        .tcp()
        .peer_addr()
        .map_err(ProtocolError::Io)?;
    // Data connections use TLS when the control channel does, unless the gateway waives it.
    let data_tls = current.tls.is_some() && ack.data_tls;
    net::keepalive(conn.get_ref().tcp(), heartbeat * 3);
    let tls = conn.get_ref().is_tls();
    ctx.status.send_modify(|s| {
        let g = s.gateways.entry(gateway.to_string()).or_default();
        g.connected_to = Some(gateway_addr);
        g.connected_since = Some(std::time::SystemTime::now());
        g.tls = tls;
        g.data_tls = data_tls;
    });
    tracing::info!(
        gateway = %gateway, addr = %gateway_addr,
        "control channel up ({}, protocol v{}); pushing {} listener(s)",
        match (conn.get_ref().is_tls(), data_tls) {
            (false, _) => "PLAINTEXT",
            (true, true) => "TLS 1.3, gateway verified",
            (true, false) => "TLS 1.3, gateway verified; data connections in plaintext",
        },
        ack.version,
        current.listeners.len()
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
    // The warm pool starts once the gateway has accepted the config (the site is joined) and
    // stops with this session.
    let pool_stop = CancellationToken::new();
    let _pool_guard = pool_stop.clone().drop_guard();
    let mut pool_started = false;
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
                        let gateway = data::Gateway { name: gateway.to_string(), addr: gateway_addr, tls: data_tls };
                        ctx.tasks.spawn(data::serve_client(ctx.clone(), gateway, arrived, outbox_tx.clone(), None));
                    }
                    Message::ConfigResult(result) => {
                        log_config_result(gateway, &result);
                        if result.generation == generation {
                            *established = true;
                        }
                        if !pool_started && ctx.config().pool > 0 {
                            pool_started = true;
                            let gateway = data::Gateway { name: gateway.to_string(), addr: gateway_addr, tls: data_tls };
                            tokio::spawn(pool::maintain(ctx.clone(), gateway, outbox_tx.clone(), pool_stop.clone()));
                        }
                        ctx.status.send_modify(|s| {
                            let g = s.gateways.entry(gateway.to_string()).or_default();
                            g.listeners = result.listeners.iter().map(|l| (l.name.clone(), l.status.clone())).collect();
                            g.last_error = None;
                            g.failures = 0;
                        });
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
            ListenerStatus::Paused => tracing::warn!(
                gateway = %gateway, listener = %l.name,
                "listener accepted, but the gateway is PAUSED: the port opens when it resumes"
            ),
        }
    }
}
