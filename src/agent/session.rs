//! One agent's control channel to one gateway: dial, hello, push the config, answer client
//! offers, exchange heartbeats; on any error, back off and dial again.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::backoff::Backoff;
use super::dial::{dial, DialError, Target};
use super::{data, pool, AgentCtx};
use crate::addr::{display_addrs, summarize_ports};
use crate::config::AgentConfig;
use crate::net;
use crate::protocol::liveness::{Beat, Liveness, Silence};
use crate::protocol::outbox::{Outbox, OutboxError};
use crate::protocol::{
    ClientFailed, ConfigResult, Connection, ControlHello, ErrorCode, Feature, HelloAck,
    ListenerStatus, Message, ProtocolError, PushConfig, Role, Token,
};
use crate::transport::Stream;
use tokio_util::sync::CancellationToken;

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

/// A config push that does not fit in one frame: the agent's own `max_frame` stops it before it
/// is sent, or the gateway's `limits.max_frame` refuses it. Sending it again cannot help: the
/// agent says so once per attempt and does not reconnect in a loop (see [`keep_connected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PushTooLarge {
    /// The frame's length as the codecs count it (type and payload).
    pub bytes: usize,
    pub listeners: usize,
    pub limit: PushLimit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PushLimit {
    /// This agent's `max_frame`: the push was never sent.
    Agent { max: usize },
    /// The gateway refused it; its words.
    Gateway { said: String },
}

impl PushTooLarge {
    /// The Error frame's text, for the gateway's log.
    fn for_gateway(&self, max: usize) -> String {
        format!(
            "push of {} bytes exceeds max_frame {max} (the agent's own max_frame, agent.toml; {} listeners)",
            self.bytes, self.listeners
        )
    }
}

impl std::fmt::Display for PushTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (bytes, n) = (self.bytes, self.listeners);
        match &self.limit {
            PushLimit::Agent { max } => write!(
                f,
                "config push of {bytes} bytes ({n} listeners) exceeds max_frame {max} \
                 (this agent's max_frame): not sent; raise max_frame in agent.toml and \
                 limits.max_frame on every gateway (at most 67108864), or split the listeners \
                 over more sites"
            ),
            PushLimit::Gateway { said } => write!(
                f,
                "the gateway refused the config push of {bytes} bytes ({n} listeners): {said}; \
                 raise limits.max_frame in its gateway.toml (at most 67108864), or split the \
                 listeners over more sites"
            ),
        }
    }
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

/// The config push of `config` and its frame length, or why it cannot be sent: the frame would
/// exceed this agent's `max_frame`.
fn push_message(config: &AgentConfig, generation: u64) -> Result<(Message, usize), PushTooLarge> {
    let msg = Message::PushConfig(PushConfig {
        generation,
        digest: config.digest(),
        listeners: config.listener_specs(),
    });
    // Counted as the frame codec counts: the 2-byte type and the payload.
    let bytes = msg.to_frame().payload.len() + 2;
    if bytes > config.max_frame {
        return Err(PushTooLarge {
            bytes,
            listeners: config.listeners.len(),
            limit: PushLimit::Agent {
                max: config.max_frame,
            },
        });
    }
    Ok((msg, bytes))
}

/// Which edge settings (rate limits, automatic bans) a gateway was sent on this channel.
#[derive(Debug, Default)]
struct EdgeSent {
    limits: bool,
    auto_bans: bool,
}

/// The edge settings to send before a config push: the listeners' rate limits and automatic
/// bans when any listener has them, and an empty set that lifts what was sent before and is
/// no longer configured. A message over `max_frame` is not sent (logged; the gateway then
/// enforces none of it).
fn edge_messages(config: &AgentConfig, gateway: &str, sent: &mut EdgeSent) -> Vec<Message> {
    let mut out = Vec::new();
    match (config.edge_limits(), sent.limits) {
        (Some(l), _) => out.push(Message::EdgeLimits(l)),
        (None, true) => out.push(Message::EdgeLimits(Default::default())),
        (None, false) => {}
    }
    match (config.auto_bans(), sent.auto_bans) {
        (Some(a), _) => out.push(Message::AutoBans(a)),
        (None, true) => out.push(Message::AutoBans(Default::default())),
        (None, false) => {}
    }
    out.retain(|msg| {
        let bytes = msg.to_frame().payload.len() + 2;
        let fits = bytes <= config.max_frame;
        if !fits {
            tracing::error!(
                gateway = %gateway,
                "the listeners' {} take {bytes} bytes, over max_frame {}: not sent, the gateway enforces none",
                msg.name(), config.max_frame
            );
        }
        fits
    });
    sent.limits = out
        .iter()
        .any(|m| matches!(m, Message::EdgeLimits(l) if !l.listeners.is_empty()));
    sent.auto_bans = out
        .iter()
        .any(|m| matches!(m, Message::AutoBans(a) if !a.listeners.is_empty()));
    out
}

/// What the gateway was last sent, to explain its refusal of it.
#[derive(Debug, Clone, Copy)]
struct LastPush {
    bytes: usize,
    listeners: usize,
}

impl LastPush {
    /// The gateway's Error frame as a [`PushTooLarge`], when it says the push was too large.
    fn refused(self, e: &crate::protocol::ErrorMsg) -> Option<PushTooLarge> {
        (e.code == ErrorCode::FRAME_TOO_LARGE).then(|| PushTooLarge {
            bytes: self.bytes,
            listeners: self.listeners,
            limit: PushLimit::Gateway {
                said: e.message.clone(),
            },
        })
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
    let mut channel = Channel {
        ctx,
        gateway,
        link,
        outbox_tx,
        established,
        up,
        site: current.site.clone(),
        generation: 1,
        answered: 0,
        last_push: None,
        edge_sent: EdgeSent::default(),
        pool: None,
        pool_stop: CancellationToken::new(),
        demand: pool::Demand::new(),
    };
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

/// What this session's data connections need to know of the control channel they belong to.
struct Link {
    /// The address the control channel reached: data goes to the same gateway instance.
    addr: std::net::SocketAddr,
    /// Data connections use TLS when the control channel does, unless the gateway waives it.
    data_tls: bool,
    session: Option<Token>,
    limits: std::sync::Arc<super::limits::GatewayLimits>,
    /// The socket's round-trip time stays readable after the channel is split.
    rtt: Option<net::RttProbe>,
}

impl Link {
    /// Records the channel in the agent's status (what `/api/status` shows of this gateway)
    /// and logs it.
    fn record(
        ctx: &AgentCtx,
        current: &AgentConfig,
        gateway: &str,
        conn: &Connection<Stream>,
        ack: &HelloAck,
        session: Option<Token>,
    ) -> Result<Link, SessionError> {
        let stream = conn.get_ref();
        let addr = stream.tcp().peer_addr().map_err(ProtocolError::Io)?;
        let data_tls = current.tls.is_some() && ack.data_tls;
        let tls = stream.is_tls();
        let server_name = current
            .tls
            .as_ref()
            .filter(|_| tls)
            .and_then(|t| t.client.name_for(gateway).ok())
            .map(|n| n.to_str().into_owned());
        let peer_cert = stream
            .peer_certificate()
            .and_then(|der| crate::certinfo::CertInfo::parse(der.as_ref()).ok());
        let link = Link {
            addr,
            data_tls,
            session,
            limits: ctx.limits.gateway(gateway),
            rtt: net::RttProbe::of(stream.tcp()),
        };
        ctx.status.send_modify(|s| {
            let g = s.gateways.entry(gateway.to_string()).or_default();
            g.connected_to = Some(addr);
            g.connected_since = Some(std::time::SystemTime::now());
            g.tls = tls;
            g.data_tls = data_tls;
            g.tls_version = stream.tls_version();
            g.server_name = server_name;
            g.cert = peer_cert;
            g.protocol = Some(ack.version);
            g.heartbeat_ms = Some(ack.heartbeat_ms);
            g.rtt = link.read_rtt();
            g.sessions += 1;
            g.session = session;
        });
        tracing::info!(
            gateway = %gateway, addr = %addr,
            "control channel up ({}, protocol v{}); pushing {} listener(s)",
            match (tls, data_tls) {
                (false, _) => "PLAINTEXT",
                (true, true) => "TLS 1.3, gateway verified",
                (true, false) => "TLS 1.3, gateway verified; data connections in plaintext",
            },
            ack.version,
            current.listeners.len()
        );
        Ok(link)
    }

    fn read_rtt(&self) -> Option<Duration> {
        self.rtt.as_ref().and_then(net::RttProbe::rtt)
    }

    /// The previous heartbeats' acknowledgements keep the kernel's figure fresh.
    fn refresh_rtt(&self, ctx: &AgentCtx, gateway: &str) {
        let rtt = self.read_rtt();
        ctx.status.send_if_modified(|s| {
            let g = s.gateways.entry(gateway.to_string()).or_default();
            let changed = g.rtt != rtt;
            g.rtt = rtt;
            changed
        });
    }

    /// Where a client of this session goes ([`data::Gateway`]).
    fn for_data(&self, gateway: &str) -> data::Gateway {
        data::Gateway {
            name: gateway.to_string(),
            addr: self.addr,
            tls: self.data_tls,
            session: self.session,
            limits: self.limits.clone(),
        }
    }
}

/// One control channel's state once it is up: what was pushed and answered, the warm pool.
struct Channel<'a> {
    ctx: &'a AgentCtx,
    gateway: &'a str,
    link: Link,
    /// Where data tasks report clients they cannot serve (the outbox's queue).
    outbox_tx: mpsc::Sender<Message>,
    established: &'a mut bool,
    up: &'a mut Option<oneshot::Sender<()>>,
    /// The site this channel speaks for.
    site: String,
    /// The latest generation pushed, and the latest the gateway answered.
    generation: u64,
    answered: u64,
    /// What the gateway was last sent, to explain its refusal of it.
    last_push: Option<LastPush>,
    edge_sent: EdgeSent,
    /// The warm pool starts once the gateway has accepted the config (the site is joined) and
    /// stops with this session.
    pool: Option<tokio::task::JoinHandle<()>>,
    pool_stop: CancellationToken,
    /// This gateway's clients per second, which size the pool (see `pool::Demand`).
    demand: std::sync::Arc<pool::Demand>,
}

impl Channel<'_> {
    /// Rate limits and automatic bans, then the first push: they are in force when the
    /// listeners open. `Ok(Err)`: the push is too large for this agent's `max_frame` and was
    /// not sent.
    fn push_first(
        &mut self,
        current: &AgentConfig,
        outbox: &Outbox,
    ) -> Result<Result<(), PushTooLarge>, SessionError> {
        for msg in edge_messages(current, self.gateway, &mut self.edge_sent) {
            outbox.send(msg)?;
        }
        let (push, bytes) = match push_message(current, self.generation) {
            Ok(ready) => ready,
            Err(too_large) => return Ok(Err(too_large)),
        };
        outbox.send(push)?;
        let listeners = current.listeners.len();
        self.last_push = Some(LastPush { bytes, listeners });
        Ok(Ok(()))
    }

    /// One message from the gateway; `Err`: the session ends with it.
    fn on_message(&mut self, msg: Message) -> Result<(), SessionError> {
        match msg {
            Message::Heartbeat(_) => Ok(()),
            Message::ClientArrived(arrived) => {
                self.demand.arrived(false);
                let gateway = self.link.for_data(self.gateway);
                offered(self.ctx, gateway, arrived, &self.outbox_tx);
                Ok(())
            }
            Message::ConfigResult(result) => self.on_config_result(result),
            Message::BanResult(result) => {
                ban_result(self.ctx, self.gateway, result);
                Ok(())
            }
            Message::Error(e) => match self.last_push.and_then(|p| p.refused(&e)) {
                Some(too_large) => Err(SessionError::PushTooLarge(too_large)),
                None => Err(ProtocolError::Peer(e).into()),
            },
            other => Err(SessionError::Unexpected(other.name())),
        }
    }

    /// The gateway's answer to a push: one per push, in order (anything else is made up).
    /// The answer to the latest push establishes the session and starts the warm pool.
    fn on_config_result(&mut self, mut result: ConfigResult) -> Result<(), SessionError> {
        let (generation, answered) = (self.generation, self.answered);
        if result.generation <= answered || result.generation > generation {
            return Err(SessionError::NeverPushed(format!(
                "config-result for generation {} (pushed: {generation}, answered: {answered})",
                result.generation
            )));
        }
        self.answered = result.generation;
        // Only listeners of this agent are shown and logged, whatever the gateway names.
        let config = self.ctx.config();
        result
            .listeners
            .retain(|l| config.listener(&l.name).is_some());
        log_config_result(self.gateway, &result);
        if result.generation == generation {
            *self.established = true;
            if let Some(up) = self.up.take() {
                let _ = up.send(());
            }
        }
        if self.pool.is_none() && self.ctx.config().pool.enabled() {
            let (ctx, gateway) = (self.ctx.clone(), self.link.for_data(self.gateway));
            let (outbox, demand) = (self.outbox_tx.clone(), self.demand.clone());
            let maintain = pool::maintain(ctx, gateway, outbox, demand, self.pool_stop.clone());
            self.pool = Some(tokio::spawn(maintain));
        }
        self.ctx.status.send_modify(|s| {
            let g = s.gateways.entry(self.gateway.to_string()).or_default();
            g.listeners = result
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.status.clone()))
                .collect();
            g.last_error = None;
            g.failures = 0;
        });
        Ok(())
    }

    /// A reloaded configuration: pushed as the next generation (edge settings first). A push
    /// too large is logged and not sent: the channel stays up with the listeners the gateway
    /// has. A new site is not this channel's: a new channel replaces it.
    fn on_reload(&mut self, new: &AgentConfig, outbox: &Outbox) -> Result<(), SessionError> {
        if new.site != self.site {
            return Ok(());
        }
        let gateway = self.gateway;
        match push_message(new, self.generation + 1) {
            Ok((push, bytes)) => {
                let edge = edge_messages(new, gateway, &mut self.edge_sent);
                if let Some(e) = edge.into_iter().find_map(|m| outbox.send(m).err()) {
                    return Err(e.into());
                }
                self.generation += 1;
                let listeners = new.listeners.len();
                self.last_push = Some(LastPush { bytes, listeners });
                let generation = self.generation;
                tracing::info!(gateway = %gateway, "configuration reloaded; pushing generation {generation}");
                outbox.send(push)?;
            }
            Err(too_large) => tracing::error!(
                gateway = %gateway,
                "configuration reloaded, but {too_large}; the gateway keeps the listeners of generation {}",
                self.generation
            ),
        }
        Ok(())
    }
}

/// An announced client: admitted against its gateway's limits before anything is dialed, then
/// served as an agent task; refused with `ClientFailed` (dropped when the outbox is full: the
/// gateway's deadline closes the client then).
fn offered(
    ctx: &AgentCtx,
    gateway: data::Gateway,
    arrived: crate::protocol::ClientArrived,
    outbox: &mpsc::Sender<Message>,
) {
    let config = ctx.config();
    let limits = gateway.limits.clone();
    match limits.admit(&config, &ctx.stats, &arrived.listener, arrived.port_offset) {
        Ok(admission) => {
            let serve = data::serve_client(
                ctx.clone(),
                gateway,
                arrived,
                outbox.clone(),
                None,
                admission,
            );
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

/// Writes the whole ban list (generation 1 of this session) before the channel is split.
async fn send_first_bans(
    ctx: &AgentCtx,
    conn: &mut Connection<Stream>,
    limit: Duration,
) -> Result<(), SessionError> {
    let write = async {
        for chunk in ctx.bans.wire_chunks(1) {
            conn.feed_message(&Message::BanList(chunk)).await?;
        }
        conn.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(DialError::Timeout(limit).into()),
    }
}

/// Sends the whole list again after every change (generations 2, 3 ... of this session). The
/// bulk queue keeps one list's chunks together and in order.
async fn push_bans(
    store: std::sync::Arc<super::bans::BanStore>,
    mut seen: tokio::sync::watch::Receiver<u64>,
    outbox: mpsc::Sender<Message>,
) {
    let mut generation = 1;
    while seen.changed().await.is_ok() {
        seen.borrow_and_update();
        generation += 1;
        for chunk in store.wire_chunks(generation) {
            if outbox.send(Message::BanList(chunk)).await.is_err() {
                return;
            }
        }
    }
}

/// Records (and logs, when refused) the gateway's answer to a ban list.
fn ban_result(ctx: &AgentCtx, gateway: &str, result: crate::protocol::BanResult) {
    match &result.error {
        Some(error) => {
            // A hostile gateway can refuse every list it gets: 5 lines per 10 s.
            static REFUSED: crate::limits::Event =
                crate::limits::Event::new(5, Duration::from_secs(10));
            let occ = REFUSED.hit();
            if occ.log {
                tracing::warn!(
                    gateway = %gateway,
                    "the gateway refused the ban list: {error}{}",
                    occ.tally()
                )
            }
        }
        None => tracing::debug!(
            gateway = %gateway,
            "ban list generation {} applied: {} ban(s)", result.generation, result.applied
        ),
    }
    ctx.status.send_modify(|s| {
        s.gateways.entry(gateway.to_string()).or_default().bans = Some(result);
    });
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

/// Logs the gateway's answer to a push: one INFO line for the listeners it opened or kept and
/// one WARN for those waiting on a paused gateway, with ports summarized (5,000 listeners were
/// 5,000 lines at every reconnection); each listener's line is at DEBUG, and every failed
/// listener keeps its own ERROR.
fn log_config_result(gateway: &str, result: &ConfigResult) {
    let (mut opened, mut kept, mut paused) = (0usize, 0usize, 0usize);
    let mut ports = Vec::new();
    for l in &result.listeners {
        match &l.status {
            ListenerStatus::Bound {
                addrs,
                kept: was_kept,
            } => {
                *(if *was_kept { &mut kept } else { &mut opened }) += 1;
                ports.extend(addrs.iter().map(|a| (a.port(), a.port())));
                tracing::debug!(
                    gateway = %gateway, listener = %l.name,
                    "listener {} on the gateway at {}",
                    if *was_kept { "kept" } else { "open" },
                    display_addrs(addrs)
                );
            }
            ListenerStatus::Failed { error } => tracing::error!(
                gateway = %gateway, listener = %l.name,
                "listener FAILED on the gateway: {error}"
            ),
            ListenerStatus::Paused => {
                paused += 1;
                tracing::debug!(gateway = %gateway, listener = %l.name, "listener accepted, gateway paused");
            }
        }
    }
    if opened + kept > 0 {
        tracing::info!(
            gateway = %gateway,
            "{} listener(s) open on the gateway ({}): {opened} opened, {kept} kept",
            opened + kept,
            summarize_ports(ports)
        );
    }
    if paused > 0 {
        tracing::warn!(
            gateway = %gateway,
            "{paused} listener(s) accepted, but the gateway is PAUSED: their ports open when it resumes"
        );
    }
}
