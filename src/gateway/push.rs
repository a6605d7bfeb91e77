//! What an agent pushes on its control channel, received: its first config push (ban lists,
//! rate limits and automatic bans may come before it, and are put in force before the site's
//! listeners open), every config push applied and answered, and the edge settings and ban
//! lists put in force for its site (a refused set leaves the previous one, and is logged at
//! most a few times per 10 s). The agent's side is `agent/push.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::bans::{BanAssembly, ChunkOutcome};
use super::session::SessionEnd;
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::limits::Event;
use crate::protocol::outbox::Outbox;
use crate::protocol::{
    AutoBans, BanResult, EdgeLimits, ListenerStatus, Message, MessageReader, ProtocolError,
    PushConfig,
};

/// Reads up to the agent's first config push (heartbeats may come first, and its ban list,
/// which `bans` collects so that it is in force before the site's listeners open).
pub(super) async fn first_push<R>(
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
pub(super) async fn apply_push(
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

/// Ban-list chunks (and rate limits) received before the first config push.
#[derive(Default)]
pub(super) struct EarlyBans {
    assembly: BanAssembly,
    /// What the last chunk completed (or why it was refused).
    last: Option<ChunkOutcome>,
    limits: Option<EdgeLimits>,
    auto_bans: Option<AutoBans>,
}

impl EarlyBans {
    /// Puts what came before the first push in force for the site; returns the ban list being
    /// assembled, for the session's later chunks.
    pub(super) fn apply(self, site: &Site, agent: &AgentHandle, outbox: &Outbox) -> BanAssembly {
        if let Some(chunk) = self.last {
            apply_bans(site, agent, outbox, chunk);
        }
        if let Some(limits) = self.limits {
            apply_limits(site, agent, limits);
        }
        if let Some(set) = self.auto_bans {
            apply_auto_bans(site, agent, set);
        }
        self.assembly
    }
}

/// Puts an agent's automatic-ban settings in force for its site (a refused set leaves the
/// previous one).
pub(super) fn apply_auto_bans(site: &Site, agent: &AgentHandle, set: AutoBans) {
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
pub(super) fn apply_limits(site: &Site, agent: &AgentHandle, limits: EdgeLimits) {
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
pub(super) fn report_edge_settings(
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
pub(super) fn apply_bans(site: &Site, agent: &AgentHandle, outbox: &Outbox, chunk: ChunkOutcome) {
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
