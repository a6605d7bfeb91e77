//! The agent session: a control connection after its hello, until it ends.
//!
//! Rules:
//! - The agent joins its site (and is offered clients) only once its first config push is read
//!   and matches the site's other agents' (`hello_timeout` for that push); ban lists, rate
//!   limits and automatic-ban settings sent before it are in force before the listeners open
//!   (what pushes put in force: [`super::push`], the mirror of the agent's `push.rs`).
//! - Config pushes in, client offers out, heartbeats both ways ([`crate::protocol::liveness`]:
//!   three silent intervals end the session). Every write goes through the
//!   [`Outbox`]'s own task: nothing here waits for the agent to read.
//! - The session ends on the agent's close or Error, silence, a stalled write, a revocation
//!   (`[peers]` rules, certificate) or shutdown; the agent is owed an Error frame
//!   ([`SessionEnd::farewell`]) for everything but silence, a failed write or its own Error.
//! - When it ends, the agent is marked gone first (no new client is handed to its pooled
//!   connections, unclaimed offers go to another agent), then leaves its site.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bans::BanAssembly;
use super::binding::refuse_wrong_site;
use super::control::refuse;
use super::pending::Failed;
use super::push::{apply_auto_bans, apply_bans, apply_limits, apply_push, first_push, EarlyBans};
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::config::check_name;
use crate::protocol::liveness::{Beat, Liveness, Silence};
use crate::protocol::outbox::{Outbox, OutboxError};
use crate::protocol::{
    self, ClientFailed, Connection, ControlHello, ErrorCode, Feature, HelloAck, Message,
    MessageReader, ProtocolError, PushConfig, SessionSecret, Token,
};
use crate::transport::Stream;

/// Heartbeat intervals an agent may ask for.
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);

/// Runs one agent's control channel until it ends, then removes the agent from its site.
pub(super) async fn run_session(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    software: &str,
    control: ControlHello,
    version: u16,
) {
    if !names_allowed(&shared, &mut conn, peer, &control).await {
        return;
    }
    let heartbeat =
        Duration::from_millis(control.heartbeat_ms as u64).clamp(HEARTBEAT_MIN, HEARTBEAT_MAX);
    // v2: the secret that binds this session's pool and outbound connections to it, sent with
    // the ack, before anything else.
    let secret = Feature::SessionBinding.on(version).then(Token::random);
    let cert = conn.get_ref().peer_cert_digest();
    let chain = conn.get_ref().peer_chain().map(Arc::from);
    let mut liveness = Liveness::new(heartbeat);
    if !acknowledge(&shared, &mut conn, version, heartbeat, secret, &liveness).await {
        return;
    }
    liveness.arm(conn.get_ref().tcp());
    let tls = conn.get_ref().is_tls();
    // From here on, writes go through the outbox's own task: nothing this session does waits
    // for the agent to read.
    let (mut reader, sink) = conn.split();
    let (tx, offers) = mpsc::channel(1024);
    let mut outbox = Outbox::spawn(sink, offers, liveness.write_limit());
    let mut early = EarlyBans::default();
    let push = match await_push(&shared, &mut reader, &mut early, &control, peer).await {
        // The push was just heard: the agent's silence counts from here, not from the ack (a
        // push later than three intervals ended the session at once).
        Ok(push) => {
            liveness.heard();
            push
        }
        Err(farewell) => return outbox.close(farewell, FAREWELL_LIMIT).await,
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
    let site = match join_site(&shared, &control.site, &agent) {
        Ok(site) => site,
        Err((code, why)) => {
            let farewell = Message::error(code, why);
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
    let mut bans = early.apply(&site, &agent, &outbox);
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
    leave(&shared, &site, &agent, outbox, end).await;
}

/// The site and agent names must be valid (they are shown in status, logs and the dashboard),
/// and the certificate must serve the site: checked before anything of the site is touched,
/// so no listener opens for a site the certificate does not serve.
async fn names_allowed(
    shared: &Shared,
    conn: &mut Connection<Stream>,
    peer: SocketAddr,
    control: &ControlHello,
) -> bool {
    for (what, name) in [("site", &control.site), ("agent", &control.agent)] {
        if let Err(e) = check_name(name) {
            let why = format!("invalid {what} name {e}");
            refuse(shared, conn, peer, ErrorCode::BAD_HELLO, why).await;
            return false;
        }
    }
    !refuse_wrong_site(shared, conn, peer, &control.site, "control channel").await
}

/// Sends the hello-ack (and, v2, the session secret). A fresh connection's send queue is
/// empty: this small write cannot block for long, and the hello timeout no longer applies, so
/// it is bounded like every later write. `false`: the agent did not take it.
async fn acknowledge(
    shared: &Shared,
    conn: &mut Connection<Stream>,
    version: u16,
    heartbeat: Duration,
    secret: Option<Token>,
    liveness: &Liveness,
) -> bool {
    let ack = Message::HelloAck(HelloAck {
        version,
        software: protocol::SOFTWARE.to_string(),
        heartbeat_ms: heartbeat.as_millis() as u32,
        data_tls: shared.config().data_tls,
    });
    let opening = async {
        conn.feed_message(&ack).await?;
        if let Some(secret) = secret {
            conn.feed_message(&Message::SessionSecret(SessionSecret { secret }))
                .await?;
        }
        conn.flush().await
    };
    matches!(
        tokio::time::timeout(liveness.write_limit(), opening).await,
        Ok(Ok(()))
    )
}

/// An agent joins its site (and is offered clients) only once its config is known and matches
/// the site's other agents': waits for its first push within the hello timeout. `Err`: the
/// last words for the agent (logged here), if any.
async fn await_push<R>(
    shared: &Shared,
    reader: &mut MessageReader<R>,
    early: &mut EarlyBans,
    control: &ControlHello,
    peer: SocketAddr,
) -> Result<PushConfig, Option<Message>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let limit = shared.config().limits.hello_timeout;
    match tokio::time::timeout(limit, first_push(reader, early)).await {
        Ok(Ok(push)) => Ok(push),
        Ok(Err(e)) => {
            let end = SessionEnd::from(e);
            end.log_before_config(control, peer);
            Err(end.farewell())
        }
        Err(_) => {
            let why = format!(
                "no config pushed within {}",
                humantime::format_duration(limit)
            );
            tracing::warn!(site = %control.site, agent = %control.agent, peer = %peer, "{why}");
            Err(Some(Message::error(ErrorCode::TIMEOUT, why)))
        }
    }
}

/// Joins the agent to its site; a new site is a new set of listeners and pools, so their
/// number is capped. `Err`: the refusal for the agent (logged here).
fn join_site(
    shared: &Arc<Shared>,
    site: &str,
    agent: &AgentHandle,
) -> Result<Arc<Site>, (ErrorCode, String)> {
    let max_sites = shared.config().limits.max_sites;
    let joins_new_site = shared
        .sites
        .get(site)
        .map_or(true, |s| s.agent_count() == 0);
    if joins_new_site && shared.sites.active() >= max_sites {
        let why = format!(
            "the gateway serves at most {max_sites} sites ([limits] max_sites); site \"{site}\" is not one of them"
        );
        tracing::warn!(agent = %agent.name, peer = %agent.addr, "agent refused: {why}");
        return Err((ErrorCode::LIMIT, why));
    }
    shared.sites.join(site, agent.clone()).map_err(|why| {
        tracing::warn!(agent = %agent.name, peer = %agent.addr, "agent refused: {why}");
        (ErrorCode::CONFIG_REJECTED, why)
    })
}

/// Logs how the session ended and takes the agent out of its site.
async fn leave(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    agent: &AgentHandle,
    outbox: Outbox,
    end: Result<(), SessionEnd>,
) {
    match &end {
        Err(SessionEnd::Protocol(ProtocolError::FrameTooLarge { len, max })) => tracing::error!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "{} after {}", push_too_large(*len, *max, &agent.name), connected_for(agent)
        ),
        Ok(()) => tracing::info!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent disconnected after {}", connected_for(agent)
        ),
        Err(e) => tracing::warn!(
            site = %site.name, agent = %agent.name, peer = %agent.addr,
            "agent session ended after {}: {e}", connected_for(agent)
        ),
    }
    // First, before anything that awaits: no new client may be handed to this session's pooled
    // connections, and clients offered to it and not yet claimed are offered to another agent
    // (a `gone` agent is never picked, even while it is still listed). The pool is emptied
    // after `gone` is set, so a pool connection being parked right now either sees `gone` or is
    // removed here (see `Pool::add`).
    agent.gone.cancel();
    site.pool.remove_agent(agent.id);
    shared.sites.leave(shared, site, agent.id).await;
    let farewell = end.err().and_then(|e| e.farewell());
    outbox.close(farewell, FAREWELL_LIMIT).await;
}

/// How long a closing session waits for its last words (an Error frame) to be written: a hung
/// agent must not hold a stopping gateway.
const FAREWELL_LIMIT: Duration = Duration::from_secs(1);

fn connected_for(agent: &AgentHandle) -> String {
    let secs = agent
        .connected_since
        .elapsed()
        .unwrap_or_default()
        .as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionEnd {
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Write(#[from] OutboxError),
    #[error("no message for {0}")]
    HeartbeatsMissed(Silence),
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
                Beat::Dead(silence) => return Err(SessionEnd::HeartbeatsMissed(Silence(silence))),
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
