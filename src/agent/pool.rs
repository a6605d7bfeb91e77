//! The warm pool, agent side: keep `pool` idle data connections open to a gateway so a new
//! client is spliced without a notification round trip (see `gateway::pool`).
//!
//! One maintainer per control session. Each member dials with the `SessionPool` role (the
//! control session's secret proves it belongs to that session; `Pool` to a v1 gateway, which
//! then needs it over TLS, see `gateway::binding`) and waits; when the gateway hands it a client
//! (`PoolAssign`), the member admits it, connects its backend (within
//! `data::pooled::BACKEND_LIMIT`, half the gateway's wait for the answer), answers
//! `PoolAccepted` (on protocol v2), then the client is served like an announced one (PROXY
//! header, pipe) as an agent task of its own, with that backend, and the maintainer opens a
//! replacement at once. A client it cannot admit, or whose backend does not take it, is
//! declined with an orderly close before the answer: the gateway offers it to another agent
//! (`pool_declined`). A member whose answer cannot be written (the gateway gave up on it and
//! reset the connection) drops the client and closes its backend connection unused.
//!
//! On protocol v3 over TLS ([`Feature::DataReuse`]) a member outlives its client: it waits
//! while the client is served, and when the client ended cleanly both ways (and the gateway did
//! not say `04`, last) it is idle again, ready for the gateway's next `PoolAssign`. Replacements
//! are opened while fewer members than the target are idle, so a burst still finds the pool
//! full. An agent with an application (`Backend::Local`) offers at most v2 on pool
//! connections: its clients' streams are the data connections themselves.
//!
//! The target follows the gateway's traffic ([`Demand`]): as many idle members as the most
//! clients that arrived from this gateway (over pooled connections or announced on the control
//! channel) in any one second of the last `pool.window`, never fewer than `pool.min` nor more
//! than `pool.max`. A burst raises it at once (the next burst of that size finds the pool
//! ready); once the busiest second is older than the window it falls back, and members that
//! have been idle for a whole window while more than the target are idle close themselves
//! properly (TLS close_notify). Members that come back from a client (reuse) on top of the
//! target stay until then: steady traffic needs them next. `pool = n` is a fixed pool: min and
//! max `n`, window one minute.
//!
//! A member the gateway closes (it recycles idle ones after a minute) is replaced too; a member
//! that cannot connect is replaced after a pause, so a gateway that refuses pool connections is
//! not hammered. When the gateway says its pool for the site is full (several agents together
//! want more than it holds), the maintainer keeps what it has and tries for more after a pause
//! that doubles up to [`FULL_PAUSE_MAX`]. Stopping the maintainer (the control session ended,
//! or the agent stops) closes the idle members properly (TLS close_notify); assigned ones
//! carry on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::data::{Gateway, PoolClient};
use super::dial::{dial_up_to, Target};
use super::AgentCtx;
use crate::config::PoolConfig;
use crate::protocol::{
    self, ClientArrived, Connection, ErrorCode, Feature, Message, PoolAccepted, PoolAssign,
    PoolHello, Role, Token,
};
use crate::transport::Stream;

mod member;

use member::member;

/// How a member left the idle state.
enum Left {
    Assigned,
    Closed,
    Failed,
    /// The gateway's pool for this site is full.
    Full,
    /// Declined its client (the backend did not take it): replaced at once, like an assigned
    /// one (the gateway is fine; the backend is this client's listener's).
    Declined,
    /// Closed as one too many for the target.
    Shed,
}

/// Clients that arrived from one gateway, per second, over the pool's window: the target is
/// the busiest second. Shared by the control session (announced clients) and the pool's
/// maintainer (pooled ones); it outlives neither.
pub(crate) struct Demand {
    /// (second since `start`, clients that arrived in it), oldest first; at most one entry per
    /// second of the window (3,600 at most).
    seconds: parking_lot::Mutex<VecDeque<(u64, usize)>>,
    start: Instant,
    /// The target last computed: an arrival beyond it wakes the maintainer.
    target: AtomicUsize,
    grew: Notify,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Demand {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Demand {
            seconds: parking_lot::Mutex::new(VecDeque::new()),
            start: Instant::now(),
            target: AtomicUsize::new(0),
            grew: Notify::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// A client arrived: over a pooled connection (`pooled`) or announced (a pool miss).
    pub(crate) fn arrived(&self, pooled: bool) {
        let counter = if pooled { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = self.start.elapsed().as_secs();
        let in_this_second = {
            let mut seconds = self.seconds.lock();
            match seconds.back_mut() {
                Some((second, n)) if *second == now => {
                    *n += 1;
                    *n
                }
                _ => {
                    seconds.push_back((now, 1));
                    1
                }
            }
        };
        if in_this_second > self.target.load(Ordering::Relaxed) {
            self.grew.notify_one();
        }
    }

    /// The idle members wanted now, within `pool`'s bounds.
    fn target(&self, pool: &PoolConfig) -> usize {
        let now = self.start.elapsed().as_secs();
        let span = pool.window.as_secs().max(1);
        let peak = {
            let mut seconds = self.seconds.lock();
            while seconds
                .front()
                .is_some_and(|(second, _)| now.saturating_sub(*second) >= span)
            {
                seconds.pop_front();
            }
            seconds.iter().map(|(_, n)| *n).max().unwrap_or(0)
        };
        let target = pool.target(peak);
        self.target.store(target, Ordering::Relaxed);
        target
    }
}

/// Idle members to close (the target fell): each idle member that sees a ticket takes one and
/// closes.
#[derive(Default)]
struct Shed {
    tickets: AtomicUsize,
    posted: Notify,
}

impl Shed {
    fn post(&self, n: usize) {
        self.tickets.store(n, Ordering::Relaxed);
        if n > 0 {
            self.posted.notify_waiters();
        }
    }

    fn take(&self) -> bool {
        self.tickets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// One idle pool connection in the agent's status, for as long as it lives.
struct Idle {
    status: std::sync::Arc<tokio::sync::watch::Sender<super::AgentStatus>>,
    gateway: String,
}

impl Idle {
    fn start(ctx: &AgentCtx, gateway: &str) -> Self {
        ctx.status.send_modify(|s| {
            s.gateways.entry(gateway.to_string()).or_default().pool_idle += 1;
        });
        Idle {
            status: ctx.status.clone(),
            gateway: gateway.to_string(),
        }
    }
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.status.send_modify(|s| {
            let g = s.gateways.entry(self.gateway.clone()).or_default();
            g.pool_idle = g.pool_idle.saturating_sub(1);
        });
    }
}

/// Pause after a member could not connect, before the next try.
const RETRY: Duration = Duration::from_secs(1);
/// The longest pause before asking a full pool for room again.
const FULL_PAUSE_MAX: Duration = Duration::from_secs(60);

/// How often the maintainer looks at the target when nothing else happens.
const TICK: Duration = Duration::from_secs(1);

/// How long stopping members get to close their connections properly (TLS close_notify).
const CLOSE_LIMIT: Duration = Duration::from_secs(1);

pub(crate) async fn maintain(
    ctx: AgentCtx,
    gateway: Gateway,
    control: mpsc::Sender<Message>,
    demand: Arc<Demand>,
    stop: CancellationToken,
) {
    // Members stop when the session ends or the agent stops, and close their idle connections
    // themselves: an aborted task would drop a TLS stream without a close_notify.
    let quit = stop.child_token();
    let mut members: JoinSet<Left> = JoinSet::new();
    let shared = Members {
        busy: Arc::new(Busy::default()),
        shed: Arc::new(Shed::default()),
        demand,
    };
    // While the gateway's pool is full: when to ask again, and the next pause.
    let mut full_until: Option<Instant> = None;
    let mut full_pause = RETRY;
    loop {
        let wanted = shared.demand.target(&ctx.config().pool);
        publish(&ctx, &gateway.name, wanted, &shared.demand);
        // Members serving a client (reuse-framed ones come back) do not count as idle.
        let idle = |members: &JoinSet<Left>| members.len().saturating_sub(shared.busy.count());
        shared.shed.post(idle(&members).saturating_sub(wanted));
        if full_until.is_none() {
            while idle(&members) < wanted {
                members.spawn(member(
                    ctx.clone(),
                    gateway.clone(),
                    control.clone(),
                    quit.clone(),
                    shared.clone(),
                ));
            }
        }
        let retry_at = full_until.unwrap_or_else(Instant::now);
        let stopped = tokio::select! {
            _ = stop.cancelled() => true,
            _ = ctx.shutdown.cancelled() => true,
            left = members.join_next(), if !members.is_empty() => match left {
                Some(Ok(Left::Failed)) => {
                    tokio::select! {
                        _ = stop.cancelled() => true,
                        _ = ctx.shutdown.cancelled() => true,
                        _ = tokio::time::sleep(RETRY) => false,
                    }
                }
                Some(Ok(Left::Full)) if full_until.is_none() => {
                    tracing::info!(
                        gateway = %gateway.name,
                        "the gateway's pool for this site is full: keeping {} pooled connection(s), asking for more in {}",
                        members.len(), humantime::format_duration(full_pause)
                    );
                    full_until = Some(Instant::now() + full_pause);
                    full_pause = (full_pause * 2).min(FULL_PAUSE_MAX);
                    false
                }
                // A client took a member: the gateway's pool has room again.
                Some(Ok(Left::Assigned)) => {
                    full_pause = RETRY;
                    false
                }
                _ => false,
            },
            // A reuse-framed member took a client: replace it while it serves.
            () = shared.busy.changed.notified() => {
                full_pause = RETRY;
                false
            }
            // More clients in this second than the target: raise it now.
            () = shared.demand.grew.notified() => false,
            () = tokio::time::sleep_until(retry_at), if full_until.is_some() => {
                full_until = None;
                false
            }
            // The window moves on (the target may fall) and a reload may change `pool`.
            _ = tokio::time::sleep(TICK) => false,
        };
        if stopped {
            quit.cancel();
            // Members still dialing or closing after the limit are dropped with the set.
            let _ = tokio::time::timeout(CLOSE_LIMIT, async {
                while members.join_next().await.is_some() {}
            })
            .await;
            return;
        }
    }
}

/// What a maintainer's members share with it.
#[derive(Clone)]
struct Members {
    busy: Arc<Busy>,
    shed: Arc<Shed>,
    demand: Arc<Demand>,
}

/// The target and the hit/miss counts in the agent's status (API, metrics, dashboard).
fn publish(ctx: &AgentCtx, gateway: &str, target: usize, demand: &Demand) {
    let hits = demand.hits.load(Ordering::Relaxed);
    let misses = demand.misses.load(Ordering::Relaxed);
    ctx.status.send_if_modified(|s| {
        let g = s.gateways.entry(gateway.to_string()).or_default();
        let changed = (g.pool_target, g.pool_hits, g.pool_misses) != (target, hits, misses);
        (g.pool_target, g.pool_hits, g.pool_misses) = (target, hits, misses);
        changed
    });
}

/// Members of one maintainer that are serving a client, and a signal when one starts.
#[derive(Default)]
struct Busy {
    count: AtomicUsize,
    changed: Notify,
}

impl Busy {
    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

/// One member serving a client, for as long as it does.
struct Serving(Arc<Busy>);

impl Serving {
    fn start(busy: &Arc<Busy>) -> Self {
        busy.count.fetch_add(1, Ordering::Relaxed);
        busy.changed.notify_one();
        Serving(busy.clone())
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::Relaxed);
    }
}
