//! The warm pool: idle, authenticated data connections an agent opens ahead of time (`pool = N`
//! in agent.toml). A new client takes one at once, with a [`PoolAssign`] frame naming the
//! listener and the client, instead of a `ClientArrived` round trip and a fresh TCP (and TLS)
//! handshake.
//!
//! The gateway owns recycling: a pooled connection idle for [`MAX_IDLE`] is closed when the
//! pool is next used, and the agent, seeing it close, opens a fresh one. A pooled connection
//! that has died (EOF, reset, or unexpected bytes) is noticed and discarded when taken.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;

use super::pending::DataConn;
use super::Shared;
use crate::net;
use crate::protocol::{Connection, ErrorCode, Message, PoolAssign, PoolHello};
use crate::transport::Stream;

/// How long a pooled connection may wait for a client before the gateway recycles it.
pub const MAX_IDLE: Duration = Duration::from_secs(60);
/// Pooled connections per site, at most (several agents, several per agent).
pub const MAX_PER_SITE: usize = 256;

struct Pooled {
    conn: Connection<Stream>,
    agent_addr: SocketAddr,
    since: Instant,
}

/// One agent's idle pooled connections, oldest first.
struct AgentPool {
    agent_id: u64,
    idle: VecDeque<Pooled>,
}

impl Pooled {
    /// Whether the agent's side is still there: nothing to read yet (an agent never writes on
    /// an idle pooled connection, so data or EOF both mean it is unusable).
    fn alive(&self) -> bool {
        let mut probe = [0u8; 1];
        self.conn
            .get_ref()
            .tcp()
            .peek(&mut probe)
            .now_or_never()
            .is_none()
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    agents: Mutex<Vec<AgentPool>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.agents
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.idle.len())
            .sum()
    }

    /// Takes a pooled connection from the agent with the most idle ones (the least busy; ties
    /// rotate), recycling expired ones on the way.
    fn take(&self) -> Option<Pooled> {
        let mut agents = self.agents.lock().unwrap();
        for a in agents.iter_mut() {
            while a.idle.front().is_some_and(|p| p.since.elapsed() > MAX_IDLE) {
                a.idle.pop_front();
            }
        }
        agents.retain(|a| !a.idle.is_empty());
        if agents.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % agents.len();
        let n = agents.len();
        let pick = (0..n)
            .map(|i| (start + i) % n)
            .max_by_key(|&i| (agents[i].idle.len(), std::cmp::Reverse((i + n - start) % n)))?;
        agents[pick].idle.pop_back()
    }

    /// Hands a live pooled connection the client; `None` when the pool is empty.
    pub async fn assign(&self, assign: &PoolAssign) -> Option<DataConn> {
        loop {
            let mut pooled = self.take()?;
            if !pooled.alive() {
                continue;
            }
            if pooled
                .conn
                .write_message(&Message::PoolAssign(assign.clone()))
                .await
                .is_err()
            {
                continue;
            }
            let (stream, leftover) = pooled.conn.into_parts();
            return Some(DataConn {
                stream,
                leftover,
                agent_addr: pooled.agent_addr,
            });
        }
    }

    /// Parks a connection; gives it back when the site's pool is full.
    fn add(&self, agent_id: u64, pooled: Pooled) -> Option<Pooled> {
        let mut agents = self.agents.lock().unwrap();
        if agents.iter().map(|a| a.idle.len()).sum::<usize>() >= MAX_PER_SITE {
            return Some(pooled);
        }
        match agents.iter_mut().find(|a| a.agent_id == agent_id) {
            Some(a) => a.idle.push_back(pooled),
            None => agents.push(AgentPool {
                agent_id,
                idle: VecDeque::from([pooled]),
            }),
        }
        None
    }

    /// Closes an agent's pooled connections (its control channel ended: it may be hung, and a
    /// client handed to it would wait for nothing).
    pub fn remove_agent(&self, agent_id: u64) {
        self.agents
            .lock()
            .unwrap()
            .retain(|a| a.agent_id != agent_id);
    }
}

/// A pool hello was accepted: acknowledge and park the connection in its site's pool.
pub(crate) async fn accept(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    hello: PoolHello,
    version: u16,
) {
    let site = shared.sites.get(&hello.site);
    let agent = site.as_ref().and_then(|s| {
        s.agents()
            .into_iter()
            .find(|a| a.name == hello.agent && a.addr.ip() == peer.ip())
    });
    let (Some(site), Some(agent)) = (site, agent) else {
        let why = format!(
            "agent \"{}\" of site \"{}\" has no control channel from {} on this gateway",
            hello.agent,
            hello.site,
            peer.ip()
        );
        tracing::debug!(peer = %peer, "pool connection refused: {why}");
        conn.send_error(ErrorCode::BAD_HELLO, why).await;
        return;
    };
    let ack = super::control::data_ack(&shared, version);
    if conn.write_message(&ack).await.is_err() {
        return;
    }
    net::keepalive(conn.get_ref().tcp(), Duration::from_secs(30));
    let pooled = Pooled {
        conn,
        agent_addr: peer,
        since: Instant::now(),
    };
    if let Some(mut pooled) = site.pool.add(agent.id, pooled) {
        tracing::warn!(site = %site.name, peer = %peer, "pool connection refused: the site already has {MAX_PER_SITE} idle");
        pooled
            .conn
            .send_error(
                ErrorCode::LIMIT,
                format!("the site's pool is full ({MAX_PER_SITE})"),
            )
            .await;
    }
}
