//! One agent's control channel to one gateway: dial, hello, push the config, answer client
//! offers, exchange heartbeats; on any error, back off and dial again. The channel's state once
//! up and its event handlers are in [`super::channel`]; what it pushes and how it reads the
//! answers, in [`super::push`].

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::backoff::Backoff;
use super::channel::{Channel, Link};
use super::dial::{dial, DialError, Target};
use super::push::{push_bans, send_first_bans, PushLimit, PushTooLarge};
use super::{data, AgentCtx};
use crate::config::AgentConfig;
use crate::protocol::liveness::{Beat, Liveness, Silence};
use crate::protocol::outbox::{Outbox, OutboxError};
use crate::protocol::{
    ClientFailed, Connection, ControlHello, ErrorCode, Feature, HelloAck, Message, ProtocolError,
    Role, Token,
};
use crate::transport::Stream;

/// Why a session ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Write(#[from] OutboxError),
    #[error("no message from the gateway for {0}")]
    HeartbeatsMissed(Silence),
    #[error("unexpected {0} from the gateway")]
    Unexpected(&'static str),
    /// A message that cannot be true: a ConfigResult for a push never made, or answered twice.
    #[error("the gateway answered a config push it was never sent: {0}")]
    NeverPushed(String),
    #[error("{0}")]
    PushTooLarge(PushTooLarge),
}

/// Keeps a control channel to `gateway` until shutdown (of the agent, or of this channel: a
/// reload removed or replaced it), reconnecting after every failure. `up` hears when the
/// gateway first accepts the config.
///
/// A push too large for a frame is not retried in a loop: when the agent's own `max_frame` is
/// the limit, the channel waits for the configuration to change (a reload); when the gateway's
/// is, it waits `reconnect.max` (the gateway may be reconfigured meanwhile) or for a reload.
pub(crate) async fn keep_connected(
    ctx: AgentCtx,
    gateway: String,
    mut up: Option<oneshot::Sender<()>>,
) {
    let mut backoff = Backoff::new(ctx.config().reconnect);
    let mut reloads = ctx.config.clone();
    loop {
        let mut established = false;
        reloads.mark_unchanged();
        // The session watches for shutdown itself, so that it can close its channel properly.
        let result = run_session(&ctx, &gateway, &mut established, &mut up).await;
        if established {
            backoff.reset();
        }
        // `[reconnect]` applies from the next delay after a reload.
        backoff.set_config(ctx.config().reconnect);
        let needs_operator = matches!(&result, Err(SessionError::Dial(e)) if e.needs_operator())
            || matches!(&result, Err(SessionError::Protocol(ProtocolError::Peer(e)))
                if e.code == ErrorCode::REVOKED || e.code == ErrorCode::WRONG_SITE);
        if needs_operator {
            backoff.exhaust();
        }
        let delay = backoff.next_delay();
        let e = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        let wait = match &e {
            SessionError::PushTooLarge(too_large) => {
                let wait = match too_large.limit {
                    PushLimit::Agent { .. } => None,
                    PushLimit::Gateway { .. } => Some(ctx.config().reconnect.max),
                };
                tracing::error!(
                    gateway = %gateway,
                    "{too_large}; {}",
                    match wait {
                        None => "not retrying until the configuration changes".to_string(),
                        Some(d) => format!(
                            "trying again in {} s or when the configuration changes",
                            d.as_secs_f64()
                        ),
                    }
                );
                wait
            }
            e if needs_operator => {
                tracing::error!(
                    gateway = %gateway,
                    "control channel refused: {e}; this needs an operator: trying again in {}",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                );
                Some(delay)
            }
            e => {
                tracing::warn!(
                    gateway = %gateway,
                    "control channel lost: {e}; reconnecting in {} ms", delay.as_millis()
                );
                Some(delay)
            }
        };
        ctx.status.send_modify(|s| {
            let g = s.gateways.entry(gateway.clone()).or_default();
            g.connected_to = None;
            g.connected_since = None;
            g.session = None;
            g.bans = None;
            g.listeners.clear();
            g.last_error = Some(e.to_string());
            g.failures = if established { 1 } else { g.failures + 1 };
        });
        let too_large = matches!(e, SessionError::PushTooLarge(_));
        let sleep = async {
            match wait {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = sleep => {}
            Ok(()) = reloads.changed(), if too_large => {}
        }
    }
}

/// One session; returns `Ok(())` only on shutdown. Sets `established` once the gateway has
/// accepted the hello and answered the first config push.
async fn run_session(
    ctx: &AgentCtx,
    gateway: &str,
    established: &mut bool,
    up: &mut Option<oneshot::Sender<()>>,
) -> Result<(), SessionError> {
    let mut config = ctx.config.clone();
    let current = config.borrow_and_update().clone();
    let Some((mut conn, ack, session)) = connect(ctx, &current, gateway).await? else {
        return Ok(());
    };
    let heartbeat = Duration::from_millis(ack.heartbeat_ms.max(100) as u64);
    let link = Link::record(ctx, &current, gateway, &conn, &ack, session)?;
    // The ban list goes first, before the config push, so that a gateway that opens this
    // site's listeners for us already refuses the banned addresses.
    let mut bans_seen = ctx.bans.subscribe();
    bans_seen.borrow_and_update();
    send_first_bans(ctx, &mut conn, current.connect_timeout).await?;
    let mut liveness = Liveness::new(heartbeat);
    liveness.arm(conn.get_ref().tcp());
    // Writes go through the outbox's own task, so a gateway that stops reading cannot stop the
    // heartbeat check or shutdown. Data tasks report clients they cannot serve through it too.
    let (mut reader, sink) = conn.split();
    let (outbox_tx, failures) = mpsc::channel::<Message>(256);
    let mut outbox = Outbox::spawn(sink, failures, liveness.write_limit());
    let site = current.site.clone();
    let mut channel = Channel::new(ctx, gateway, link, outbox_tx, established, up, site);
    if let Err(too_large) = channel.push_first(&current, &outbox)? {
        // The gateway is told why, so its log says it too, rather than "closed by peer".
        let why = too_large.for_gateway(current.max_frame);
        let farewell = Message::error(ErrorCode::FRAME_TOO_LARGE, why);
        outbox.close(Some(farewell), FAREWELL_LIMIT).await;
        return Err(SessionError::PushTooLarge(too_large));
    }
    let _pool_guard = channel.pool_stop.clone().drop_guard();
    // Later ban changes: one task per session sends each new list whole, in order.
    let _bans_pusher = AbortOnDrop(tokio::spawn(push_bans(
        ctx.bans.clone(),
        bans_seen,
        channel.outbox_tx.clone(),
    )));
    let end = loop {
        tokio::select! {
            // A stopping agent closes its control channels without an Error frame, but
            // properly (TLS close_notify, then FIN): the gateway logs an orderly end.
            _ = ctx.shutdown.cancelled() => {
                // The pool's idle members close themselves just as properly (within a second).
                let pool_closed = async {
                    if let Some(pool) = channel.pool.take() {
                        let _ = pool.await;
                    }
                };
                tokio::join!(outbox.close(None, FAREWELL_LIMIT), pool_closed);
                return Ok(());
            }
            incoming = reader.read_message() => {
                let msg = match incoming {
                    Ok(Some(msg)) => msg,
                    Ok(None) => break SessionError::Protocol(ProtocolError::Closed),
                    Err(e) => break e.into(),
                };
                liveness.heard();
                if let Err(e) = channel.on_message(msg) {
                    break e;
                }
            }
            why = outbox.failed() => break why.into(),
            Ok(()) = config.changed() => {
                let new = config.borrow_and_update().clone();
                if let Err(e) = channel.on_reload(&new, &outbox) {
                    break e;
                }
            }
            beat = liveness.next() => match beat {
                Beat::Send(heartbeat) => {
                    if let Err(e) = outbox.send(heartbeat) {
                        break e.into();
                    }
                    channel.link.refresh_rtt(ctx, gateway);
                }
                Beat::Dead(silence) => break SessionError::HeartbeatsMissed(Silence(silence)),
            },
        }
    };
    outbox.close(end.farewell(), FAREWELL_LIMIT).await;
    Err(end)
}

/// Dials the gateway's control port with this agent's hello and, on protocol v2, reads the
/// session's secret (the gateway's next frame, which proves our pool and outbound
/// connections). `None`: the agent is stopping.
async fn connect(
    ctx: &AgentCtx,
    current: &AgentConfig,
    gateway: &str,
) -> Result<Option<(Connection<Stream>, HelloAck, Option<Token>)>, SessionError> {
    let role = Role::Control(ControlHello {
        site: current.site.clone(),
        agent: current.name.clone(),
        heartbeat_ms: current.heartbeat.as_millis() as u32,
    });
    let target = Target {
        gateway,
        resolved: None,
    };
    let (mut conn, ack) = tokio::select! {
        _ = ctx.shutdown.cancelled() => return Ok(None),
        dialed = dial(current, target, role, current.tls.is_some()) => dialed?,
    };
    if !Feature::SessionBinding.on(ack.version) {
        return Ok(Some((conn, ack, None)));
    }
    let limit = current.connect_timeout;
    match tokio::time::timeout(limit, conn.expect_message()).await {
        Ok(Ok(Message::SessionSecret(s))) => Ok(Some((conn, ack, Some(s.secret)))),
        Ok(Ok(other)) => Err(ProtocolError::Unexpected {
            expected: "session-secret",
            got: other.name(),
        }
        .into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(DialError::Timeout(limit).into()),
    }
}

/// An announced client: admitted against its gateway's limits before anything is dialed, then
/// served as an agent task; refused with `ClientFailed` (dropped when the outbox is full: the
/// gateway's deadline closes the client then).
pub(super) fn offered(
    ctx: &AgentCtx,
    gateway: data::Gateway,
    arrived: crate::protocol::ClientArrived,
    outbox: &mpsc::Sender<Message>,
) {
    let config = ctx.config();
    let limits = gateway.limits.clone();
    match limits.admit(&config, &ctx.stats, &arrived.listener, arrived.port_offset) {
        Ok(admission) => {
            let serve =
                data::serve_client(ctx.clone(), gateway, arrived, outbox.clone(), admission);
            ctx.tasks.spawn(serve);
        }
        Err(reason) => {
            let failed = ClientFailed {
                id: arrived.id,
                reason,
            };
            let _ = outbox.try_send(Message::ClientFailed(failed));
        }
    }
}

/// Aborts a task when dropped (the session's helpers end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a failing session waits for its last words (an Error frame) to be written.
const FAREWELL_LIMIT: Duration = Duration::from_secs(1);

impl SessionError {
    /// The Error frame the gateway is owed before the close: for what it sent wrong, not for
    /// silence, a failed write or its own Error.
    fn farewell(&self) -> Option<Message> {
        let (code, text) = match self {
            SessionError::Unexpected(_) | SessionError::NeverPushed(_) => {
                (ErrorCode::PROTOCOL, self.to_string())
            }
            SessionError::Protocol(
                ProtocolError::Peer(_)
                | ProtocolError::Closed
                | ProtocolError::Cut
                | ProtocolError::Io(_),
            ) => return None,
            SessionError::Protocol(e) => (e.code(), e.to_string()),
            // A push too large was answered (by the gateway, or by the agent before the close).
            SessionError::Dial(_)
            | SessionError::Write(_)
            | SessionError::HeartbeatsMissed(_)
            | SessionError::PushTooLarge(_) => return None,
        };
        Some(Message::error(code, text))
    }
}
