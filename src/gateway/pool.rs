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

/// What became of a client handed to a pooled connection.
pub(crate) enum Answer {
    /// The agent took it. `forwarded` bytes of the held ones already went to it.
    Accepted { data: DataConn, forwarded: usize },
    /// No answer within [`ACCEPT_LIMIT`] (or the connection failed first): the connection was
    /// reset; offer the client elsewhere with the held bytes.
    Unanswered,
    /// The agent had closed the connection in an orderly way (its pool shrank) as the client
    /// was handed to it: not a sign of a hung agent. Offer the client to the next one.
    Closed,
    /// The client reset its connection meanwhile.
    ClientGone,
}

/// Client bytes read before any agent has taken the client, to be replayed on another data
/// connection if the first does not answer.
#[derive(Default)]
pub(crate) struct Held {
    pub bytes: BytesMut,
    /// The client half-closed after them.
    pub eof: bool,
}

impl Handed {
    /// Waits for the agent's `PoolAccepted` (v2), forwarding the client's bytes meanwhile and
    /// holding a copy; a v1 agent never answers, so its connection is taken as it is.
    pub async fn answer<C>(self, id: u64, client: &mut C, held: &mut Held) -> Answer
    where
        C: tokio::io::AsyncRead + Unpin,
    {
        if !Feature::PoolAccepted.on(self.version) {
            return self.taken_unanswered();
        }
        let (mut reader, mut sink) = self.conn.split();
        let deadline = Instant::now() + ACCEPT_LIMIT;
        let mut forwarded = 0;
        // Bytes written since the last completed flush (a TLS writer holds them until then).
        let mut unflushed = false;
        let mut chunk = [0u8; 8192];
        // Reuse-framed: held bytes go as whole records; `out` is the record being written, and
        // `encoded` counts the held bytes put in records so far.
        let framed = self.reuse.is_some();
        let mut out = BytesMut::new();
        let mut encoded = 0;
        loop {
            let room = HOLD_LIMIT.saturating_sub(held.bytes.len()).min(chunk.len());
            if framed && out.is_empty() && encoded < held.bytes.len() {
                let n = (held.bytes.len() - encoded).min(u16::MAX as usize);
                out.extend_from_slice(&crate::reuse::data_header(n));
                out.extend_from_slice(&held.bytes[encoded..encoded + n]);
                encoded += n;
            }
            let to_send = if framed {
                &out[..]
            } else {
                &held.bytes[forwarded..]
            };
            let event = tokio::select! {
                biased;
                msg = reader.read_message() => match msg {
                    Ok(Some(Message::PoolAccepted(PoolAccepted { id: answered }))) if answered == id => Waiting::Accepted,
                    Ok(None) => Waiting::Closed,
                    _ => Waiting::Failed,
                },
                read = client.read(&mut chunk[..room]), if room > 0 && !held.eof => Waiting::Read(read),
                pushed = push(sink.get_mut(), to_send), if !to_send.is_empty() || unflushed => Waiting::Pushed(pushed),
                () = tokio::time::sleep_until(deadline) => Waiting::Failed,
            };
            match event {
                Waiting::Accepted => break,
                Waiting::Failed | Waiting::Pushed(Err(_)) => {
                    abort(reader, sink);
                    return Answer::Unanswered;
                }
                Waiting::Closed => {
                    abort(reader, sink);
                    return Answer::Closed;
                }
                Waiting::Read(Err(_)) => {
                    abort(reader, sink);
                    return Answer::ClientGone;
                }
                Waiting::Read(Ok(0)) => held.eof = true,
                Waiting::Read(Ok(n)) => held.bytes.extend_from_slice(&chunk[..n]),
                Waiting::Pushed(Ok(Pushed::Wrote(n))) if framed => {
                    out.advance(n);
                    if out.is_empty() {
                        forwarded = encoded;
                    }
                    unflushed = true;
                }
                Waiting::Pushed(Ok(Pushed::Wrote(n))) => {
                    forwarded += n;
                    unflushed = true;
                }
                Waiting::Pushed(Ok(Pushed::Flushed)) => unflushed = false,
            }
        }
        if !out.is_empty() {
            // The rest of a record begun: the pipe's records follow it. Not bounded by a
            // timeout (a record cut in the middle would corrupt the stream); an agent that
            // stops reading stalls this client only, as it would stall the pipe.
            if sink.get_mut().write_all(&out).await.is_ok() {
                forwarded = encoded;
                unflushed = true;
            }
        }
        let (stream, leftover) = rejoin(reader, sink, unflushed).await;
        let data = DataConn {
            stream,
            leftover,
            agent_addr: self.agent_addr,
            agent: Some(self.agent),
            reuse: self.reuse.map(|served| Ticket {
                agent_id: self.agent_id,
                served,
            }),
        };
        Answer::Accepted { data, forwarded }
    }
}

impl Handed {
    /// A v1 agent never answers: its connection is the client's as it is, unframed.
    fn taken_unanswered(self) -> Answer {
        let (stream, leftover) = self.conn.into_parts();
        let data = DataConn {
            stream,
            leftover,
            agent_addr: self.agent_addr,
            agent: Some(self.agent),
            reuse: None,
        };
        Answer::Accepted { data, forwarded: 0 }
    }
}

/// The halves of a connection an agent accepted, whole again, with the bytes read past its
/// answer. What was written goes out now (if the agent reads slowly, the pipe's next write or
/// flush pushes the rest: it is in the writer, never written twice).
async fn rejoin(reader: PoolReader, mut sink: PoolSink, unflushed: bool) -> (Stream, BytesMut) {
    if unflushed {
        let _ = tokio::time::timeout(ACCEPT_LIMIT, sink.get_mut().flush()).await;
    }
    let (read, leftover) = reader.into_parts();
    (read.unsplit(sink.into_inner()), leftover)
}

/// What happened while a pooled connection had not answered yet.
enum Waiting {
    Accepted,
    /// The agent closed the connection (an orderly end) before it read the assignment.
    Closed,
    /// No answer in time, something else than the answer, or the connection ended.
    Failed,
    Read(std::io::Result<usize>),
    Pushed(std::io::Result<Pushed>),
}

/// One step of forwarding held bytes.
enum Pushed {
    /// This many bytes were taken by the writer.
    Wrote(usize),
    Flushed,
}

type PoolReader = MessageReader<ReadHalf<Stream>>;
type PoolSink = FramedWrite<WriteHalf<Stream>, FrameCodec>;

/// One cancel-safe step of forwarding: a single write while there is something to write (its
/// count is returned as soon as the writer took the bytes, so a `select!` that drops this future
/// loses no count), else a flush (which may be interrupted and simply run again). Writing and
/// flushing in one future would not be safe: bytes a TLS writer took before a pending flush
/// would go uncounted and be sent a second time.
async fn push<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8]) -> std::io::Result<Pushed> {
    if buf.is_empty() {
        w.flush().await?;
        Ok(Pushed::Flushed)
    } else {
        Ok(Pushed::Wrote(w.write(buf).await?))
    }
}

/// Resets a pooled connection that is being given up, so an agent that wakes up later sees a
/// reset, not a client: its `PoolAccepted` write fails and it drops the assignment.
fn abort(reader: PoolReader, sink: PoolSink) {
    let (read, _) = reader.into_parts();
    let stream = read.unsplit(sink.into_inner());
    let _ = SockRef::from(stream.tcp()).set_linger(Some(Duration::ZERO));
}

/// A reuse-framed connection whose client ended cleanly both ways, and what it served.
pub(crate) struct Returned {
    pub stream: Stream,
    /// Bytes read past the agent's end-of-stream record.
    pub leftover: BytesMut,
    pub agent_id: u64,
    pub agent_addr: SocketAddr,
    pub agent: String,
    pub reuse: Reuse,
}

/// Parks a connection that served a client back in `site`'s pool, under its agent's session;
/// closes it (close_notify) when that session has ended or the pool is full, or when the agent
/// wrote past its end-of-stream record (it never writes between clients). Whether its next
/// client is its last is decided when that client is assigned ([`is_last`]).
pub(crate) async fn park_again(site: &Site, max_frame: usize, back: Returned) {
    let Returned {
        mut stream,
        leftover,
        agent_id,
        agent_addr,
        agent,
        reuse,
    } = back;
    if !leftover.is_empty() || !idle_now(&mut stream) {
        tracing::debug!(agent = %agent, "bytes or an end after a reused connection's client: closed, not parked");
        net::close_gently(&mut stream, Duration::from_secs(1)).await;
        return;
    }
    let conn = Connection::with_prefix(stream, max_frame, &leftover);
    let pooled = Pooled {
        conn,
        agent_addr,
        agent,
        since: Instant::now(),
        version: Feature::DataReuse.since(),
        reuse: Some(reuse),
    };
    let refused = match site.agents().into_iter().find(|a| a.id == agent_id) {
        Some(handle) => site.pool.add(&handle, pooled).err().map(|(_, p)| *p),
        None => Some(pooled),
    };
    if let Some(mut pooled) = refused {
        net::close_gently(pooled.conn.get_mut(), Duration::from_secs(1)).await;
    }
}

/// One read attempt that never waits: true when nothing is there to read (the connection is
/// idle, as it must be between clients: bytes or an end of stream here mean it is not).
fn idle_now(stream: &mut Stream) -> bool {
    use futures::FutureExt;
    let mut probe = [0u8; 1];
    stream.read(&mut probe).now_or_never().is_none()
}

/// Whether a reuse-framed connection that served `reuse` takes its last client now.
pub(crate) fn is_last(reuse: &Reuse, limits: &crate::config::Limits) -> bool {
    reuse.clients + 1 >= limits.data_reuse_clients || reuse.bytes >= limits.data_reuse_bytes
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
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::SystemTime;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    fn agent(id: u64) -> AgentHandle {
        AgentHandle {
            id,
            name: format!("agent-{id}"),
            addr: "127.0.0.1:1".parse().unwrap(),
            connected_since: SystemTime::now(),
            tx: mpsc::channel(1).0,
            inflight: Arc::new(AtomicUsize::new(0)),
            digest: Arc::new(Mutex::new(String::new())),
            gone: CancellationToken::new(),
            secret: None,
            cert: None,
            chain: None,
            cert_revoked: CancellationToken::new(),
            suspect: Arc::default(),
        }
    }

    /// A pooled connection over real loopback sockets, and the agent's end of it.
    async fn member() -> (Pooled, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_end = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (gateway_end, peer) = listener.accept().await.unwrap();
        let pooled = Pooled {
            conn: Connection::new(Stream::Plain(gateway_end), 4096),
            agent_addr: peer,
            agent: "agent".to_string(),
            since: Instant::now(),
            version: crate::protocol::MAX_VERSION,
            reuse: None,
        };
        (pooled, agent_end)
    }

    #[tokio::test]
    async fn a_member_closed_a_moment_ago_is_not_taken_for_alive() {
        let (pooled, agent_end) = member().await;
        assert!(pooled.alive());
        // The agent closes; its FIN is in the gateway socket's queue at once (loopback), but
        // this runtime has not polled its reactor since: a readiness-cache check calls it alive.
        drop(agent_end);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pooled.alive(), "a closed member was taken for alive");

        // Bytes from the agent on an idle member (it never writes there) make it unusable too.
        let (pooled, mut agent_end) = member().await;
        agent_end.write_all(b"x").await.unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pooled.alive());
    }

    #[tokio::test]
    async fn no_member_is_parked_under_a_session_that_has_left() {
        let pool = Pool::default();
        let a = agent(1);
        let (first, _keep1) = member().await;
        assert!(pool.add(&a, first).is_ok());
        // The session ends: `gone` first, then its pool is emptied (as run_session does). A
        // member whose hello was accepted just before arrives in between.
        a.gone.cancel();
        pool.remove_agent(a.id);
        let (late, _keep2) = member().await;
        let refused = pool.add(&a, late);
        assert!(matches!(refused, Err((NotParked::AgentGone, _))));
        assert_eq!(
            pool.len(),
            0,
            "a member was parked under a departed session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pool_is_renewed_one_member_at_a_time_not_all_at_once() {
        let pool = Pool::default();
        let a = agent(1);
        let mut agent_ends = Vec::new();
        for _ in 0..4 {
            let (m, end) = member().await;
            assert!(pool.add(&a, m).is_ok());
            agent_ends.push(end);
        }
        // An idle minute and more: every member is past MAX_IDLE.
        tokio::time::advance(MAX_IDLE + Duration::from_secs(1)).await;
        // A client arriving now still finds a pooled connection.
        let (id, taken) = pool
            .take(pool.next_turn(), &[])
            .expect("the whole pool expired at once");
        assert_eq!(id, 1);
        drop(taken);
        assert_eq!(pool.len(), 3);
        // The recycler closes one expired member per agent and tick.
        assert_eq!(pool.recycle(), 1);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.recycle(), 1);
        assert_eq!(pool.len(), 1);
    }

    #[tokio::test]
    async fn members_their_agent_closed_leave_the_pool_at_the_next_tick() {
        let pool = Pool::default();
        let a = agent(1);
        let mut ends = Vec::new();
        for _ in 0..3 {
            let (m, end) = member().await;
            assert!(pool.add(&a, m).is_ok());
            ends.push(end);
        }
        // The agent closes two of them (its target fell); none has expired.
        drop(ends.drain(..2));
        // Loopback: their FINs are queued at once (the check asks the socket, not the runtime).
        assert_eq!(pool.recycle(), 0, "none had expired");
        assert_eq!(pool.len(), 1, "closed members stayed counted");
    }

    #[tokio::test]
    async fn a_shunned_agent_s_members_are_left_alone() {
        let pool = Pool::default();
        let (a, b) = (agent(1), agent(2));
        let mut ends = Vec::new();
        for owner in [&a, &a, &b] {
            let (m, end) = member().await;
            assert!(pool.add(owner, m).is_ok());
            ends.push(end);
        }
        // a has members (two), but it is shunned for this client.
        let (id, _) = pool.take(pool.next_turn(), &[a.id]).unwrap();
        assert_eq!(id, b.id);
        assert!(pool.take(pool.next_turn(), &[a.id]).is_none());
        assert_eq!(pool.take(pool.next_turn(), &[]).unwrap().0, a.id);
    }

    #[tokio::test]
    async fn agents_take_turns_however_many_idle_members_each_has() {
        let pool = Pool::default();
        let (a, b) = (agent(1), agent(2));
        let mut ends = Vec::new();
        // a's pool is three times b's (it grew with the clients it got).
        for owner in [&a, &a, &a, &a, &a, &a, &b, &b] {
            let (m, end) = member().await;
            assert!(pool.add(owner, m).is_ok());
            ends.push(end);
        }
        let taken: Vec<u64> = (0..4)
            .map(|_| pool.take(pool.next_turn(), &[]).unwrap().0)
            .collect();
        assert_eq!(
            taken.iter().filter(|&&id| id == b.id).count(),
            2,
            "{taken:?}"
        );
        // b is out of members: a serves the rest.
        assert!((0..4).all(|_| pool.take(pool.next_turn(), &[]).unwrap().0 == a.id));
    }

    #[tokio::test]
    async fn a_client_handed_on_after_a_decline_keeps_its_turn() {
        let pool = Pool::default();
        let (a, b) = (agent(1), agent(2));
        let mut ends = Vec::new();
        for owner in [&a, &a, &a, &a, &b, &b, &b, &b] {
            let (m, end) = member().await;
            assert!(pool.add(owner, m).is_ok());
            ends.push(end);
        }
        // Each client: its first pick, and after that agent declined it, the next one. Which
        // agent is asked first must still alternate between clients.
        let mut first = Vec::new();
        for _ in 0..4 {
            let turn = pool.next_turn();
            let (id, _) = pool.take(turn, &[]).unwrap();
            first.push(id);
            let (other, _) = pool.take(turn, &[id]).unwrap();
            assert_ne!(other, id);
        }
        assert_eq!(
            first.iter().filter(|&&id| id == a.id).count(),
            2,
            "{first:?}"
        );
    }
}
