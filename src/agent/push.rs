//! What an agent sends a gateway over its control channel besides heartbeats, and how it reads
//! the answers: the config push (refused before sending when it exceeds this agent's
//! `max_frame`, explained when the gateway refuses it), the edge settings that go before it
//! (rate limits, automatic bans), the ban list (whole, first before the push, then after every
//! change), and the logs of the gateway's answers.

use std::time::Duration;

use tokio::sync::mpsc;

use super::dial::DialError;
use super::session::SessionError;
use super::AgentCtx;
use crate::addr::{display_addrs, summarize_ports};
use crate::config::AgentConfig;
use crate::protocol::{ConfigResult, Connection, ErrorCode, ListenerStatus, Message, PushConfig};
use crate::transport::Stream;

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
    pub(super) fn for_gateway(&self, max: usize) -> String {
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

/// The config push of `config` and its frame length, or why it cannot be sent: the frame would
/// exceed this agent's `max_frame`.
pub(super) fn push_message(
    config: &AgentConfig,
    generation: u64,
) -> Result<(Message, usize), PushTooLarge> {
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
pub(super) struct EdgeSent {
    limits: bool,
    auto_bans: bool,
}

/// The edge settings to send before a config push: the listeners' rate limits and automatic
/// bans when any listener has them, and an empty set that lifts what was sent before and is
/// no longer configured. A message over `max_frame` is not sent (logged; the gateway then
/// enforces none of it).
pub(super) fn edge_messages(
    config: &AgentConfig,
    gateway: &str,
    sent: &mut EdgeSent,
) -> Vec<Message> {
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
pub(super) struct LastPush {
    pub bytes: usize,
    pub listeners: usize,
}

impl LastPush {
    /// The gateway's Error frame as a [`PushTooLarge`], when it says the push was too large.
    pub(super) fn refused(self, e: &crate::protocol::ErrorMsg) -> Option<PushTooLarge> {
        (e.code == ErrorCode::FRAME_TOO_LARGE).then(|| PushTooLarge {
            bytes: self.bytes,
            listeners: self.listeners,
            limit: PushLimit::Gateway {
                said: e.message.clone(),
            },
        })
    }
}

/// Writes the whole ban list (generation 1 of this session) before the channel is split.
pub(super) async fn send_first_bans(
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
pub(super) async fn push_bans(
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
pub(super) fn ban_result(ctx: &AgentCtx, gateway: &str, result: crate::protocol::BanResult) {
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

/// Logs the gateway's answer to a push: one INFO line for the listeners it opened or kept and
/// one WARN for those waiting on a paused gateway, with ports summarized (5,000 listeners were
/// 5,000 lines at every reconnection); each listener's line is at DEBUG, and every failed
/// listener keeps its own ERROR.
pub(super) fn log_config_result(gateway: &str, result: &ConfigResult) {
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
