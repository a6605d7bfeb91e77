//! The life of one public client, as one value ([`Handler`], mini-redis's idea): admitted
//! (an agent is there, a pending place), then a data connection obtained (a warm pool
//! connection, else an offer to an agent, offered again when that agent leaves or cannot serve
//! it, until a data connection claims it: [`super::offer`]), then piped (a TCP client or a UDP
//! flow alike: [`super::public`]).
//!
//! Every way a client fails to obtain its data connection is one [`Unserved`] variant, logged,
//! counted and recorded in one place ([`Handler::unserved`], in `client/unserved.rs`). Every
//! accepted client ends with exactly one audit record, however it ends; its task is the
//! gateway's (not its listener's), so closing a listener never touches it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;

use super::admit::{over_limit, EndWatch};
use super::listener::ListenerInfo;
use super::offer::Offering;
use super::pending::{Claim, DataConn};
use super::pool::{Answer, Held, ACCEPT_LIMIT};
use super::public::{pipe_data, PublicClient};
use super::site::Site;
use super::stats::{ConnEntry, ListenerStats};
use super::Shared;
use crate::audit::{ConnectionEnd, Daemon};
use crate::limits::{ConnPermit, GaugePermit};
use crate::pipe::{tracked, PipeCounters};
use crate::protocol::PoolAssign;

mod unserved;

use unserved::Unserved;

/// Counts an accepted client as closed when its task ends before piping.
struct ClosedOnDrop(Option<Arc<ListenerStats>>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        if let Some(stats) = &self.0 {
            stats.closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Serves one public client a listener (or a shared port, or a UDP port) accepted and admitted:
/// `permit` is its place among the gateway's client connections, `first` the bytes read to
/// route it (they reach the agent first, on whichever path, unchanged).
pub(crate) async fn serve<C: PublicClient>(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    client: C,
    client_addr: SocketAddr,
    permit: ConnPermit,
    first: BytesMut,
) {
    let end = EndWatch::new(site.clone(), info.clone(), client_addr);
    let Ok(gateway_addr) = client.start() else {
        return;
    };
    let accepted = Accepted {
        client_addr,
        gateway_addr,
        first,
        _end: end,
        _permit: permit,
        client,
    };
    if let Some((handler, waiting)) = Handler::admit(shared, site, info, accepted) {
        handler.run(waiting).await;
    }
}

/// A client as its listener accepted it, before [`Handler::admit`].
struct Accepted<C> {
    client_addr: SocketAddr,
    gateway_addr: SocketAddr,
    first: BytesMut,
    /// Reports the client's end to its listener's `auto_ban`, however it ends.
    _end: EndWatch,
    _permit: ConnPermit,
    client: C,
}

/// The client's places among the clients waiting for an agent (in total and in its listener),
/// held until it has its data connection or gives up.
type Waiting = (GaugePermit, GaugePermit);

/// One public client from admission to the end of its pipe. (Fields drop in this order: the
/// counters first, the client's socket last, as when this was one function.)
struct Handler<C> {
    /// Counts it as closed unless it reaches the pipe (whose end the connection table counts).
    closed: ClosedOnDrop,
    _accepted: (EndWatch, ConnPermit),
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    /// What its offer says, on whichever path it goes, and what its audit record says.
    offer: Offer,
    /// Its bytes read before a data connection took it (a warm pool connection's forwarded
    /// copy, or the routing peek's): they go to the agent first.
    held: Held,
    client: C,
}

/// What a client's offer says, on whichever path it goes (pool or announcement).
pub(super) struct Offer {
    pub id: u64,
    pub listener: String,
    pub port_offset: u16,
    pub client_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    /// When the client was admitted: its record's duration.
    started: Instant,
}

/// A data connection the client obtained: `forwarded` of its held bytes already went through
/// it; `via` says which path, for the log.
struct Obtained {
    data: DataConn,
    forwarded: usize,
    via: &'static str,
}

impl<C: PublicClient> Handler<C> {
    /// Admits the client to wait for an agent: one must be connected, and the client needs a
    /// place among the waiting ones (refused, counted and logged otherwise).
    fn admit(
        shared: Arc<Shared>,
        site: Arc<Site>,
        info: Arc<ListenerInfo>,
        accepted: Accepted<C>,
    ) -> Option<(Self, Waiting)> {
        let (listener, client_addr) = (info.spec.name.as_str(), accepted.client_addr);
        if site.agent_count() == 0 {
            // The last agent left between accept and now.
            tracing::info!(listener, client = %client_addr, "no agent connected; closing client");
            return None;
        }
        let limits = &shared.config().limits;
        let (Some(total), Some(here)) = (
            shared.pending_total.try_acquire(limits.max_pending),
            info.stats
                .pending
                .try_acquire(limits.max_pending_per_listener),
        ) else {
            let what = format_args!(
                "clients waiting for the agent reached the limit ({} in total, {} per listener)",
                limits.max_pending, limits.max_pending_per_listener
            );
            info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            over_limit(&shared, listener, client_addr, what);
            accepted.client.refuse();
            return None;
        };
        info.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let gateway_addr = accepted.gateway_addr;
        let offer = Offer {
            id: shared.next_client_id(),
            listener: listener.to_string(),
            port_offset: gateway_addr
                .port()
                .saturating_sub(info.spec.public.ports.first()),
            client_addr,
            gateway_addr,
            started: Instant::now(),
        };
        let handler = Handler {
            closed: ClosedOnDrop(Some(info.stats.clone())),
            shared: shared.clone(),
            site,
            info,
            client: accepted.client,
            offer,
            held: Held {
                bytes: accepted.first,
                eof: false,
            },
            _accepted: (accepted._end, accepted._permit),
        };
        Some((handler, (total, here)))
    }

    /// Obtains a data connection, then pipes; or records why it could not.
    async fn run(mut self, waiting: Waiting) {
        // Boxed, and freed once the client has its data connection: the warm-pool answer and
        // the offer are the largest states of a client's task, and inline they would stay in
        // it, unused, for as long as the client is piped (docs/performance.md, idle memory).
        let obtained = Box::pin(self.obtain()).await;
        match obtained {
            Ok(obtained) => {
                drop(waiting);
                self.pipe(obtained).await
            }
            // Boxed too: only a client that goes unserved needs its state.
            Err(unserved) => Box::pin(self.unserved(unserved)).await,
        }
    }

    /// A warm pool connection, when an agent keeps some: no notification round trip. Otherwise,
    /// or when the pooled connections handed this client did not answer, an announcement.
    async fn obtain(&mut self) -> Result<Obtained, Unserved> {
        let mut shunned = Vec::new();
        if let Some((data, forwarded)) = self.take_pooled(&mut shunned).await? {
            let via = " (warm pool)";
            return Ok(Obtained {
                data,
                forwarded,
                via,
            });
        }
        let data = self.announce(&shunned).await?;
        Ok(Obtained {
            data,
            forwarded: 0,
            via: "",
        })
    }

    /// Hands the client to pooled connections until one takes it (`None`: none could). An
    /// agent whose pooled connection does not answer (a hung agent, on protocol v2) is shunned
    /// for this client: its idle connections are closed, and the client's bytes are held for
    /// the next try.
    async fn take_pooled(
        &mut self,
        shunned: &mut Vec<u64>,
    ) -> Result<Option<(DataConn, usize)>, Unserved> {
        let offer = &self.offer;
        let assign = PoolAssign {
            id: offer.id,
            listener: offer.listener.clone(),
            port_offset: offer.port_offset,
            client_addr: offer.client_addr,
            gateway_addr: offer.gateway_addr,
        };
        let turn = self.site.pool.next_turn();
        while let Some(mut handed) = self.site.pool.assign(&assign, turn, shunned).await {
            if !C::REUSABLE {
                // Carried unframed, and closed after the flow on both sides (protocol.md 7.16).
                handed.reuse = None;
            }
            let (agent_id, agent_addr) = (handed.agent_id, handed.agent_addr);
            match handed
                .answer(offer.id, &mut self.client, &mut self.held)
                .await
            {
                Answer::Accepted { data, forwarded } => return Ok(Some((data, forwarded))),
                Answer::ClientGone => return Err(Unserved::LeftPooled),
                Answer::Closed => {
                    // Not this agent for this client; not a hung agent either.
                    shunned.push(agent_id);
                    let occ = self.shared.stats.pool_declined.hit();
                    if occ.log {
                        tracing::info!(
                            listener = %offer.listener, client = %offer.client_addr, id = offer.id,
                            "the agent at {agent_addr} closed the pooled connection handed this client \
                             (it declined it, or its pool was shrinking); the client is offered again{}",
                            occ.tally()
                        );
                    }
                }
                Answer::Unanswered => {
                    shunned.push(agent_id);
                    self.site.pool.remove_agent(agent_id);
                    // Other clients avoid it too until it is heard from again.
                    self.site.mark_suspect(agent_id);
                    let occ = self.shared.stats.pool_unanswered.hit();
                    if occ.log {
                        tracing::warn!(
                            listener = %offer.listener, client = %offer.client_addr, id = offer.id,
                            "the agent at {agent_addr} did not answer on its pooled connection within {}; \
                             its idle pooled connections are closed and the client is offered again{}",
                            humantime::format_duration(ACCEPT_LIMIT), occ.tally()
                        );
                    }
                }
            }
        }
        Ok(None)
    }

    /// The slow path: records the client as pending, offers it ([`Offering`]) and waits for the
    /// data connection that claims it, until its deadline, its departure or the gateway's stop.
    async fn announce(&mut self, shunned: &[u64]) -> Result<DataConn, Unserved> {
        let waited = self.shared.config().limits.pending_timeout;
        let deadline = tokio::time::Instant::now() + waited;
        let mut offering = Offering::new(&self.shared, &self.site, &self.offer);
        let (client, held) = (&self.client, &self.held);
        // A client that leaves while waiting gives its pending place back at once instead of
        // at its deadline (otherwise connect-and-close loops could hold every pending place).
        // One that half-closed after its first bytes (already held) has not left, whether the
        // hold read its end of stream or stopped at its limit just before it (a 64 KiB request).
        let left = async {
            if held.eof {
                std::future::pending::<()>().await
            }
            client.left(!held.bytes.is_empty()).await
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(deadline, offering.until_claimed(shunned)) => outcome,
            () = left => return Err(Unserved::Left),
            // The control port is closed: no data connection can claim it any more.
            () = self.shared.shutdown.cancelled() => return Err(Unserved::Stopping),
        };
        let agent = offering.offered_to.unwrap_or_else(|| "-".to_string());
        match outcome {
            Ok(Ok(Claim::Data(mut data))) => {
                data.agent.get_or_insert(agent);
                Ok(data)
            }
            Ok(Ok(Claim::Failed(reason))) => Err(Unserved::AgentFailed { agent, reason }),
            Ok(Err(reason)) => Err(Unserved::Withdrawn(reason)),
            Err(_) => Err(Unserved::Unclaimed { agent, waited }),
        }
    }

    /// Pipes the client and its data connection until either ends, the gateway kills what is
    /// left, a reload revokes the agent, or the client's address is banned; then records it.
    async fn pipe(mut self, obtained: Obtained) {
        let Obtained {
            data,
            forwarded,
            via,
        } = obtained;
        // One info line per connection, when it ends (with bytes and duration): logging costs
        // CPU on the connection path, and a second line per connection halves the
        // new-connection rate's headroom.
        tracing::debug!(
            listener = self.offer.listener.as_str(), client = %self.offer.client_addr,
            agent = %data.agent_addr, id = self.offer.id,
            "client connected after {} ms{via}", self.offer.started.elapsed().as_millis()
        );
        let entry = self.entry(data.agent_addr, forwarded);
        self.closed.0 = None;
        let (shared, site) = (self.shared.clone(), self.site.clone());
        let throttle = site
            .limits
            .get(&self.offer.listener)
            .map(|l| l.throttle())
            .unwrap_or_default();
        // The agent's certificate, for a reload that revokes it to cut this connection.
        let (chain, agent) = (data.stream.peer_chain(), data.agent.clone());
        let agent_addr = data.agent_addr;
        let unsent = &self.held.bytes[forwarded..];
        // Boxed: the wrappers below (ban, cut, tracking) each hold the future they wrap, and
        // an async fn's argument is stored in its state besides the awaited copy, so inline it
        // would be counted about eight times in every client's task (49 KiB per idle
        // connection; boxed, the task holds a pointer and the pipe's ~6 KiB once).
        let piped = Box::pin(pipe_data(
            &shared,
            &site,
            self.client,
            unsent,
            data,
            &entry.counters,
            &throttle,
        ));
        let banned = site.bans.until_banned(self.offer.client_addr.ip());
        let pipe = async {
            tokio::select! {
                r = piped => r,
                () = banned => Err(std::io::Error::other("cut: the client's address was banned")),
            }
        };
        let pipe = shared.pipe_unless_cut(agent_addr.ip(), chain.as_deref(), pipe);
        let end = tracked(shared.traffic.track(entry.clone()), &entry.counters, pipe).await;
        let moved = (end.bytes.a_read, end.bytes.a_written);
        let failure = entry.failure.get().cloned();
        let (outcome, error) = match end.result {
            _ if failure.is_some() => ("agent_failed", failure),
            Ok(()) => ("closed", None),
            Err(e) if shared.kill.is_cancelled() => ("killed", Some(e.to_string())),
            Err(e) => ("error", Some(e.to_string())),
        };
        let (error, agent) = (error.as_deref(), agent.as_deref());
        let offer = &self.offer;
        offer.record(&site.name, outcome, error, agent, Some(agent_addr), moved);
    }

    /// The client's entry in the connection table; `forwarded` client bytes already reached the
    /// agent while it had not answered yet.
    fn entry(&self, agent_addr: SocketAddr, forwarded: usize) -> Arc<ConnEntry> {
        let offer = &self.offer;
        let entry = Arc::new(ConnEntry {
            id: offer.id,
            listener: self.info.stats.clone(),
            client_addr: offer.client_addr,
            gateway_addr: offer.gateway_addr,
            agent_addr,
            started: SystemTime::now(),
            started_at: Instant::now(),
            counters: PipeCounters::default(),
            failure: Default::default(),
        });
        let counters = &entry.counters;
        counters
            .a_read
            .fetch_add(forwarded as u64, Ordering::Relaxed);
        counters
            .b_written
            .fetch_add(forwarded as u64, Ordering::Relaxed);
        entry
    }
}
