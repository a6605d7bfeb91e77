//! The warm pool: idle, authenticated data connections an agent opens ahead of time (`pool = N`
//! in agent.toml). A new client takes one at once, with a [`PoolAssign`] frame naming the
//! listener and the client, instead of a `ClientArrived` round trip and a fresh TCP (and TLS)
//! handshake.
//!
//! What it guarantees:
//! - a pooled connection is filed under the control session that is live for its agent now, and
//!   never outlives it: a member parked while its session ends is closed with the others;
//! - a member whose agent closed, reset or wrote on it is never handed a client (checked with a
//!   syscall at the moment it is taken, not with the runtime's readiness cache);
//! - on protocol v2 a client handed to a member is not lost if the agent never answers: the
//!   client's bytes are forwarded at once but also held (up to [`HOLD_LIMIT`]) until the agent's
//!   `PoolAccepted`; without one within [`ACCEPT_LIMIT`] the member is reset, the agent's other
//!   members are closed and the caller offers the client elsewhere with the held bytes;
//! - recycling is gradual: members idle longer than [`MAX_IDLE`] are closed one per agent per
//!   second ([`Pool::recycle`]), so a pool never expires all at once;
//! - on protocol v3 over TLS ([`Feature::DataReuse`]) a member outlives its client: the client's
//!   bytes travel in reuse records ([`crate::reuse`]) from the first one on, and a member whose
//!   client ended cleanly both ways is parked again ([`park_again`]) under its agent's session,
//!   if that session is still live and the site's pool has room, until `[limits]
//!   data_reuse_clients` or `data_reuse_bytes` make its next client the last.
//!
//! It never reads a client's bytes beyond [`HOLD_LIMIT`] before an agent has answered.

use std::collections::{HashMap, VecDeque};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tokio_util::codec::FramedWrite;

use super::binding::{refuse_wrong_site, session_of, Claim};
use super::pending::DataConn;
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::net;
use crate::protocol::{
    Connection, ErrorCode, Feature, FrameCodec, Message, MessageReader, PoolAccepted, PoolAssign,
    PoolHello, Token,
};
use crate::transport::Stream;

mod handed;

pub(crate) use handed::{is_last, park_again, Answer, Held, Returned};

/// How long a pooled connection may wait for a client before the gateway recycles it.
pub const MAX_IDLE: Duration = Duration::from_secs(60);
/// Pooled connections per site, at most (several agents, several per agent).
pub const MAX_PER_SITE: usize = 256;
/// How long a v2 agent has to answer a [`PoolAssign`] before its client is offered elsewhere.
/// An agent answers before it does anything else with the client (a LAN round trip: well under
/// a millisecond), so only a hung or badly overloaded agent misses it.
pub const ACCEPT_LIMIT: Duration = Duration::from_secs(1);
/// Client bytes the gateway holds for a replay until the agent answers; it stops reading the
/// client beyond that (most protocols send far less before they need an answer).
pub const HOLD_LIMIT: usize = 64 * 1024;

struct Pooled {
    conn: Connection<Stream>,
    agent_addr: SocketAddr,
    /// The agent that opened it.
    agent: String,
    since: Instant,
    /// The version its hello negotiated: whether the agent will answer an assignment.
    version: u16,
    /// Set when reuse-framed: what it served before.
    reuse: Option<Reuse>,
}

/// What a reuse-framed connection has served so far (clients it finished, their bytes), for
/// `[limits] data_reuse_clients` and `data_reuse_bytes`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reuse {
    pub clients: u64,
    pub bytes: u64,
}

/// A reuse-framed connection handed a client: its agent session and what it served before.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub agent_id: u64,
    /// The version its hello negotiated (v3 over TLS, v4 in plaintext): kept when it is parked
    /// again.
    pub version: u16,
    pub served: Reuse,
}

/// One agent session's idle pooled connections, oldest first.
struct AgentPool {
    agent_id: u64,
    idle: VecDeque<Pooled>,
}

impl Pooled {
    /// Whether the agent's side is still there: nothing to read yet (an agent never writes on
    /// an idle pooled connection, so data, end of stream or a reset all mean it is unusable).
    /// Asks the socket itself (a non-blocking `MSG_PEEK`): the runtime's readiness cache may
    /// not have seen a FIN or RST that arrived a moment ago.
    fn alive(&self) -> bool {
        if self.conn.has_buffered_input() {
            return false;
        }
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        match SockRef::from(self.conn.get_ref().tcp()).peek(&mut probe) {
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            Ok(_) => false,
        }
    }
}

/// A pooled connection that was just handed a client.
pub(crate) struct Handed {
    conn: Connection<Stream>,
    pub agent_id: u64,
    pub agent_addr: SocketAddr,
    /// The agent's name (for the client's audit record).
    agent: String,
    version: u16,
    /// Reuse-framed ([`crate::reuse`]): what the connection has served so far. `None`: one
    /// client, unframed.
    pub reuse: Option<Reuse>,
}

/// Why a pooled connection could not be parked.
#[derive(Debug, PartialEq, Eq)]
enum NotParked {
    /// The site holds [`MAX_PER_SITE`] already.
    Full,
    /// Its agent's control session has just ended.
    AgentGone,
}

#[derive(Default)]
pub(crate) struct Pool {
    agents: Mutex<Vec<AgentPool>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.agents.lock().iter().map(|a| a.idle.len()).sum()
    }

    /// A client's turn among the agents with idle pooled connections: taken once per client
    /// ([`Self::assign`] keeps it), so handing the client to the next agent after one declined
    /// it does not move the rotation on a second time. (It did: with two agents, one that
    /// declines every client was then first in line for every client, and each paid for it.)
    pub fn next_turn(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes the newest pooled connection of the agent whose `turn` it is, or the next one
    /// that has one, leaving out the `shunned` agents. In turn, not "the agent with the most
    /// idle ones": agents size their pools by the clients they get (`agent::pool`), so
    /// favouring the biggest pool would feed one agent ever more clients and starve the others;
    /// turns split the clients evenly, and a saturated agent (none idle) is passed over.
    fn take(&self, turn: usize, shunned: &[u64]) -> Option<(u64, Pooled)> {
        let mut agents = self.agents.lock();
        agents.retain(|a| !a.idle.is_empty());
        let n = agents.len();
        if n == 0 {
            return None;
        }
        let start = turn % n;
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| !shunned.contains(&agents[i].agent_id))?;
        let agent_id = agents[pick].agent_id;
        agents[pick].idle.pop_back().map(|p| (agent_id, p))
    }

    /// Hands a live pooled connection the client (`PoolAssign`), starting at the agent whose
    /// `turn` it is ([`Self::next_turn`]); `None` when no agent but the `shunned` ones has one.
    pub async fn assign(
        &self,
        assign: &PoolAssign,
        turn: usize,
        shunned: &[u64],
    ) -> Option<Handed> {
        loop {
            let (agent_id, mut pooled) = self.take(turn, shunned)?;
            if !pooled.alive() {
                continue;
            }
            let frame = Message::PoolAssign(assign.clone());
            // An idle connection's send queue is empty: this cannot block unless the path did.
            match tokio::time::timeout(ACCEPT_LIMIT, pooled.conn.write_message(&frame)).await {
                Ok(Ok(())) => {}
                _ => continue,
            }
            return Some(Handed {
                conn: pooled.conn,
                agent_id,
                agent_addr: pooled.agent_addr,
                agent: pooled.agent,
                version: pooled.version,
                reuse: pooled.reuse,
            });
        }
    }

    /// Parks a connection under `agent`'s session; gives it back when the site's pool is full
    /// or the session has ended. Checked under the pool's lock, and a departing session sets
    /// `gone` before it empties its pool, so no connection is parked under a session that left.
    fn add(&self, agent: &AgentHandle, pooled: Pooled) -> Result<(), (NotParked, Box<Pooled>)> {
        let mut agents = self.agents.lock();
        if agent.gone.is_cancelled() {
            return Err((NotParked::AgentGone, Box::new(pooled)));
        }
        if agents.iter().map(|a| a.idle.len()).sum::<usize>() >= MAX_PER_SITE {
            return Err((NotParked::Full, Box::new(pooled)));
        }
        match agents.iter_mut().find(|a| a.agent_id == agent.id) {
            Some(a) => a.idle.push_back(pooled),
            None => agents.push(AgentPool {
                agent_id: agent.id,
                idle: VecDeque::from([pooled]),
            }),
        }
        Ok(())
    }

    /// Closes the pooled connections from addresses `denied` says no to (a reload revoked
    /// them: their sessions end too, and this counts what they held); returns how many per
    /// address.
    pub fn remove_peers(&self, denied: impl Fn(IpAddr) -> bool) -> HashMap<IpAddr, usize> {
        let mut removed = HashMap::new();
        let mut agents = self.agents.lock();
        for a in agents.iter_mut() {
            a.idle.retain(|p| {
                let ip = p.agent_addr.ip();
                let keep = !denied(ip);
                if !keep {
                    *removed.entry(ip).or_default() += 1;
                }
                keep
            });
        }
        agents.retain(|a| !a.idle.is_empty());
        removed
    }

    /// How many idle pooled connections an agent session has.
    pub fn agent_count(&self, agent_id: u64) -> usize {
        self.agents
            .lock()
            .iter()
            .filter(|a| a.agent_id == agent_id)
            .map(|a| a.idle.len())
            .sum()
    }

    /// Closes an agent session's pooled connections (its control channel ended, or one of them
    /// did not answer: it may be hung, and a client handed to it would wait for nothing).
    pub fn remove_agent(&self, agent_id: u64) {
        self.agents.lock().retain(|a| a.agent_id != agent_id);
    }

    /// Closes, for each agent, its oldest idle connection if it has waited longer than
    /// [`MAX_IDLE`]; the agent opens a fresh one. Called every second, so a pool that filled at
    /// once is renewed one connection at a time instead of vanishing at once. Returns how many
    /// were closed so. Before that, drops the connections the agent closed (its pool shrank:
    /// `agent::pool`) or lost, so the pool's count is true within a second and their sockets
    /// do not linger.
    pub fn recycle(&self) -> usize {
        let mut agents = self.agents.lock();
        let mut closed = 0;
        for a in agents.iter_mut() {
            a.idle.retain(Pooled::alive);
            if a.idle.front().is_some_and(|p| p.since.elapsed() > MAX_IDLE) {
                a.idle.pop_front();
                closed += 1;
            }
        }
        closed
    }
}

/// Recycles expired pooled connections of every site, once a second, until shutdown.
pub(crate) async fn recycle_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for site in shared.sites.all() {
            site.pool.recycle();
        }
    }
}

/// The version a pool connection gets: a plaintext one is held below
/// [`Feature::PlainReuse`] unless the gateway's owner chose reuse for plaintext
/// (`[control] data_reuse`), so it keeps the raw byte stream and splice(2).
fn reuse_cap(shared: &Shared, stream: &Stream, version: u16) -> u16 {
    if stream.is_tls() || shared.config().data_reuse {
        version
    } else {
        version.min(Feature::PlainReuse.since() - 1)
    }
}

/// A pool hello was accepted: acknowledge and park the connection in its site's pool.
pub(crate) async fn accept(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    hello: PoolHello,
    secret: Option<Token>,
    version: u16,
) {
    let claim = Claim {
        site: &hello.site,
        agent: Some(&hello.agent),
        secret: secret.as_ref(),
    };
    if refuse_wrong_site(&shared, &mut conn, peer, claim.site, "pool connection").await {
        return;
    }
    let (site, agent) = match session_of(&shared, &claim, conn.get_ref(), peer) {
        Ok(bound) => bound,
        Err(why) => {
            let occ = shared.stats.session_unproven.hit();
            if occ.log {
                tracing::warn!(peer = %peer, "pool connection refused: {why}{}", occ.tally());
            }
            super::control::refuse_role(&mut conn, ErrorCode::BAD_HELLO, why).await;
            return;
        }
    };
    // A full pool refuses before the ack, so the agent never counts a connection it cannot
    // use (a race with another member after this check is closed after the ack, below).
    if site.pool.len() >= MAX_PER_SITE {
        let occ = shared.stats.pool_full.hit();
        if occ.log {
            tracing::warn!(
                site = %site.name, agent = %agent.name, peer = %peer,
                "pool connection refused: the site already has {MAX_PER_SITE} idle{}",
                occ.tally()
            );
        }
        let why = format!("the site's pool is full ({MAX_PER_SITE})");
        super::control::refuse_role(&mut conn, ErrorCode::LIMIT, why).await;
        return;
    }
    let version = reuse_cap(&shared, conn.get_ref(), version);
    let ack = super::control::data_ack(&shared, version);
    if conn.write_message(&ack).await.is_err() {
        return;
    }
    net::keepalive(conn.get_ref().tcp(), Duration::from_secs(30));
    let reuse = crate::reuse::negotiated(version, conn.get_ref()).then(Reuse::default);
    let pooled = Pooled {
        conn,
        agent_addr: peer,
        agent: agent.name.clone(),
        since: Instant::now(),
        version,
        reuse,
    };
    match site.pool.add(&agent, pooled) {
        Ok(()) => {}
        Err((NotParked::AgentGone, _)) => {
            tracing::debug!(site = %site.name, peer = %peer, "pool connection closed: its agent's session just ended");
        }
        Err((NotParked::Full, mut pooled)) => {
            let occ = shared.stats.pool_full.hit();
            if occ.log {
                tracing::warn!(
                    site = %site.name, agent = %agent.name, peer = %peer,
                    "pool connection refused: the site already has {MAX_PER_SITE} idle{}",
                    occ.tally()
                );
            }
            pooled
                .conn
                .send_error(
                    ErrorCode::LIMIT,
                    format!("the site's pool is full ({MAX_PER_SITE})"),
                )
                .await;
        }
    }
}

#[cfg(test)]
mod tests;
