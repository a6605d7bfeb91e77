//! A listener's several backends on the agent (issue 18 item 2): which one a new client goes
//! to, which are healthy, and the next one when the chosen one refuses.
//!
//! Rules:
//! - Each listener with a [`BackendGroup`] has one [`BackendSet`] in the [`Registry`], kept
//!   across reloads while its group is unchanged (health and counts carry over); a changed group
//!   starts afresh, healthy. Listeners with one plain `backend` have none and connect as always.
//! - A client's candidates are the healthy backends in the order `balance` gives
//!   ([`BackendSet::order`]); with none healthy, every backend in list order (a check may be
//!   wrong; refusing everyone surely is). But when health checks say every backend is down,
//!   the agent refuses the gateway's offer before dialing anything ([`Registry::all_down`],
//!   `no_healthy_backend`), so the gateway offers the client to another agent of the site, and
//!   closes it at once when none can serve it. They are tried one after the other until one accepts
//!   the TCP connection: nothing has been sent to a refused one, so the PROXY header and the
//!   client's first bytes go to the one that accepts, and transparent mode binds the client's
//!   address afresh for each try.
//! - Passive ejection: [`EJECT_AFTER`] connect failures in a row take a backend out. With
//!   `health` only a passed check puts it back; without, it is tried again after [`RETRY_AFTER`]
//!   (one more failure ejects it again). A connection it accepts clears its failures.
//! - Active checks (`health`): every backend each interval, all at once, each within the
//!   timeout: a TCP connect, or a plaintext `GET path` answered 2xx (after a PROXY `LOCAL`/
//!   `UNKNOWN` header when the listener sends PROXY headers). A failed check takes the backend
//!   out at once; a passed one puts it back. Changes of state are logged (WARN out, INFO back).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::addr::BackendAddr;
use crate::config::{
    AgentConfig, BackendGroup, Balance, HealthCheck, Impersonation, ListenerConfig, ProxyProtocol,
};
use crate::net;

mod health;

use health::run_checks;

/// Connect failures in a row after which a backend is taken out of rotation.
pub const EJECT_AFTER: u32 = 3;
/// Without health checks, how long an ejected backend stays out before it is tried again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// One backend of a set and what the agent knows of it.
#[derive(Debug)]
struct Member {
    addr: BackendAddr,
    up: AtomicBool,
    /// Connect failures (client connections or checks) in a row.
    failures: AtomicU32,
    /// Clients piping to it now.
    active: AtomicUsize,
    /// Connect failures of client connections, in total.
    connect_failures: AtomicU64,
    /// Times it was taken out of rotation.
    ejections: AtomicU64,
    /// When it was taken out (for [`RETRY_AFTER`]).
    down_since: Mutex<Option<Instant>>,
    /// Taken out by a failed health check (`down`), not by connect failures (`ejected`).
    out_by_check: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Member {
    fn new(addr: BackendAddr) -> Self {
        Member {
            addr,
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            active: AtomicUsize::new(0),
            connect_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            down_since: Mutex::new(None),
            out_by_check: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }
}

/// The backends of one listener.
#[derive(Debug)]
pub struct BackendSet {
    listener: String,
    group: BackendGroup,
    members: Vec<Member>,
    /// The round-robin turn.
    turn: AtomicUsize,
    /// Stops the health checks when the set is dropped (replaced by a reload).
    checks: Mutex<Option<DropGuard>>,
}

impl BackendSet {
    fn new(listener: &str, group: BackendGroup) -> Self {
        BackendSet {
            listener: listener.to_string(),
            members: group.backends.iter().cloned().map(Member::new).collect(),
            group,
            turn: AtomicUsize::new(0),
            checks: Mutex::new(None),
        }
    }

    /// The indexes of the backends to try for a new client, best first.
    pub fn order(&self) -> Vec<usize> {
        let no_health = self.group.health.is_none();
        let healthy: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.is_up(i, no_health))
            .collect();
        if healthy.is_empty() {
            return (0..self.members.len()).collect();
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let mut rotated = healthy.clone();
        rotated.rotate_left(turn % healthy.len());
        match self.group.balance {
            Balance::Failover => healthy,
            Balance::RoundRobin => rotated,
            Balance::LeastConnections => {
                // Stable: among equals, the round-robin turn decides.
                rotated.sort_by_key(|&i| self.members[i].active.load(Ordering::Relaxed));
                rotated
            }
        }
    }

    /// Whether backend `i` is in rotation; without checks an ejected one comes back on trial
    /// after [`RETRY_AFTER`].
    fn is_up(&self, i: usize, retry: bool) -> bool {
        let m = &self.members[i];
        if m.up.load(Ordering::Relaxed) {
            return true;
        }
        let due = retry
            && m.down_since
                .lock()
                .is_some_and(|t| t.elapsed() >= RETRY_AFTER);
        if due {
            *m.down_since.lock() = None;
            m.failures.store(EJECT_AFTER - 1, Ordering::Relaxed);
            m.up.store(true, Ordering::Relaxed);
            tracing::info!(
                listener = %self.listener, backend = %m.addr,
                "backend back in rotation on trial after {}", humantime::format_duration(RETRY_AFTER)
            );
        }
        due
    }

    /// A client connection to backend `i` failed.
    pub fn connect_failed(&self, i: usize, why: &str) {
        let m = &self.members[i];
        m.connect_failures.fetch_add(1, Ordering::Relaxed);
        *m.last_error.lock() = Some(why.to_string());
        let n = m.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            self.take_out(
                i,
                &format!("{n} connect failures in a row, the last: {why}"),
                false,
            );
        }
    }

    /// Backend `i` accepted a client connection.
    pub fn connected(&self, i: usize) {
        let m = &self.members[i];
        m.failures.store(0, Ordering::Relaxed);
        if self.group.health.is_none() {
            // Back on trial and it answered.
            *m.down_since.lock() = None;
        }
    }

    /// Takes backend `i` out of rotation: `by_check`, a failed health check (else connect
    /// failures in a row).
    fn take_out(&self, i: usize, why: &str, by_check: bool) {
        let m = &self.members[i];
        if m.up.swap(false, Ordering::Relaxed) {
            m.out_by_check.store(by_check, Ordering::Relaxed);
            m.ejections.fetch_add(1, Ordering::Relaxed);
            *m.down_since.lock() = Some(Instant::now());
            tracing::warn!(
                listener = %self.listener, backend = %m.addr,
                "backend taken out of rotation: {why}"
            );
        }
    }

    fn check_passed(&self, i: usize) {
        let m = &self.members[i];
        m.failures.store(0, Ordering::Relaxed);
        if !m.up.swap(true, Ordering::Relaxed) {
            *m.down_since.lock() = None;
            tracing::info!(
                listener = %self.listener, backend = %m.addr,
                "backend back in rotation: its health check passed"
            );
        }
    }

    fn check_failed(&self, i: usize, why: String) {
        self.take_out(i, &format!("health check failed: {why}"), true);
        *self.members[i].last_error.lock() = Some(why);
    }

    /// What the status shows of each backend.
    pub fn report(&self) -> Vec<BackendReport> {
        self.members
            .iter()
            .map(|m| BackendReport {
                backend: m.addr.to_string(),
                up: m.up.load(Ordering::Relaxed),
                state: match (
                    m.up.load(Ordering::Relaxed),
                    m.out_by_check.load(Ordering::Relaxed),
                ) {
                    (true, _) => BackendState::Up,
                    (false, true) => BackendState::Down,
                    (false, false) => BackendState::Ejected,
                },
                active: m.active.load(Ordering::Relaxed),
                connect_failures: m.connect_failures.load(Ordering::Relaxed),
                ejections: m.ejections.load(Ordering::Relaxed),
                last_error: m.last_error.lock().clone(),
            })
            .collect()
    }
}

/// One backend in `/api/status` (under its listener) and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendReport {
    /// As configured (`host:port`).
    pub backend: String,
    /// In rotation.
    pub up: bool,
    /// Why it is in rotation or not (absent from an older agent: read `up`).
    #[serde(default)]
    pub state: BackendState,
    /// Clients piping to it now.
    pub active: usize,
    /// Client connections it refused or did not accept in time, in total.
    pub connect_failures: u64,
    /// Times it was taken out of rotation.
    pub ejections: u64,
    /// The last connect failure or failed check.
    pub last_error: Option<String>,
}

/// A backend's health in the agent's status and on its page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In rotation.
    #[default]
    Up,
    /// Out of rotation: its health check failed.
    Down,
    /// Out of rotation: connect failures in a row (passive ejection); without `health`, back
    /// on trial after [`RETRY_AFTER`].
    Ejected,
}

/// Every listener's backend set.
#[derive(Debug, Default)]
pub struct Registry {
    sets: Mutex<HashMap<String, Arc<BackendSet>>>,
}

impl Registry {
    /// The set of `listener` when its group is `group` (a client of a configuration a reload
    /// just replaced finds none and connects without one).
    pub fn get(&self, listener: &str, group: &BackendGroup) -> Option<Arc<BackendSet>> {
        let sets = self.sets.lock();
        sets.get(listener).filter(|s| s.group == *group).cloned()
    }

    /// Whether every backend of `listener` is out of rotation while health checks watch them
    /// (the agent then refuses its offers: `agent::limits`). Without checks, never: ejected
    /// backends come back on trial, and a client tries them all.
    pub fn all_down(&self, listener: &str) -> bool {
        let sets = self.sets.lock();
        sets.get(listener).is_some_and(|s| {
            s.group.health.is_some() && s.members.iter().all(|m| !m.up.load(Ordering::Relaxed))
        })
    }

    /// Each listener's backends, for the status.
    pub fn reports(&self) -> HashMap<String, Vec<BackendReport>> {
        let sets = self.sets.lock();
        sets.iter().map(|(k, s)| (k.clone(), s.report())).collect()
    }

    /// Makes the sets match `config`: unchanged groups keep their set, changed or new ones get
    /// a fresh set (and its checks, started on the current runtime), removed ones stop.
    pub fn sync(&self, config: &AgentConfig) {
        let mut sets = self.sets.lock();
        let mut next = HashMap::new();
        for l in &config.listeners {
            let Some(group) = &l.group else { continue };
            let kept = sets.remove(&l.name).filter(|s| s.group == *group);
            let set = kept.unwrap_or_else(|| start(l, group.clone()));
            next.insert(l.name.clone(), set);
        }
        *sets = next;
    }
}

/// A new set for listener `l`, its checks running.
fn start(l: &ListenerConfig, group: BackendGroup) -> Arc<BackendSet> {
    let set = Arc::new(BackendSet::new(&l.name, group));
    if let Some(health) = set.group.health.clone() {
        let cancel = CancellationToken::new();
        *set.checks.lock() = Some(cancel.clone().drop_guard());
        let checks = run_checks(Arc::downgrade(&set), health, l.proxy_protocol, cancel);
        tokio::spawn(checks);
    }
    set
}

/// Keeps the registry in step with the configuration until `shutdown`.
pub(crate) async fn supervise(
    registry: Arc<Registry>,
    mut config: tokio::sync::watch::Receiver<Arc<AgentConfig>>,
    shutdown: CancellationToken,
) {
    loop {
        let current = config.borrow_and_update().clone();
        registry.sync(&current);
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    registry.sets.lock().clear();
}

/// A client's backend connection, and the backend it reached.
pub(crate) struct Connected {
    pub stream: TcpStream,
    pub target: String,
    /// Counts the client as active on its backend until dropped.
    pub _active: Option<Active>,
}

/// A client counted on its backend (least-connections); uncounted when dropped.
pub(crate) struct Active(Arc<BackendSet>, usize);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.members[self.1]
            .active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects a client of `listener` to a backend: its only one, or the healthy ones of its
/// group in balance order until one accepts. Each try gets `timeout`; with `within`, all of
/// them together get no more than that (a try is cut to what is left, and none starts once it
/// is spent): a try cut short counts as that backend's connect failure, like any other. The
/// error names the backend(s) tried.
pub(crate) async fn connect(
    registry: &Registry,
    listener: &ListenerConfig,
    offset: u16,
    client: SocketAddr,
    timeout: Duration,
    within: Option<Duration>,
) -> Result<Connected, (String, std::io::Error)> {
    let deadline = within.map(|w| Instant::now() + w);
    // This try's timeout: `timeout`, or what is left of `within` if less (zero: spent),
    // rounded to a millisecond (the error says it).
    let budget = || match deadline {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now()).as_micros();
            timeout.min(Duration::from_millis(((left + 500) / 1000) as u64))
        }
        None => timeout,
    };
    let Some(group) = &listener.group else {
        let target = listener.backend_target(offset).unwrap_or_default();
        return match connect_one(listener.impersonation, client, &target, budget()).await {
            Ok(stream) => Ok(Connected {
                stream,
                target,
                _active: None,
            }),
            Err(e) => Err((target, e)),
        };
    };
    let set = registry.get(&listener.name, group);
    let order = match &set {
        Some(set) => set.order(),
        None => (0..group.backends.len()).collect(),
    };
    let mut failed: Vec<String> = Vec::new();
    let mut last = None;
    for i in order {
        let timeout = budget();
        if timeout.is_zero() && last.is_some() {
            break;
        }
        let target = backend_target(&group.backends[i], offset);
        match connect_one(listener.impersonation, client, &target, timeout).await {
            Ok(stream) => {
                if !failed.is_empty() {
                    tracing::info!(
                        listener = %listener.name, client = %client,
                        "backend(s) {} refused; client served by {target}", failed.join(", ")
                    );
                }
                let active = set.map(|set| {
                    set.connected(i);
                    set.members[i].active.fetch_add(1, Ordering::Relaxed);
                    Active(set, i)
                });
                return Ok(Connected {
                    stream,
                    target,
                    _active: active,
                });
            }
            Err(e) => {
                if let Some(set) = &set {
                    set.connect_failed(i, &e.to_string());
                }
                failed.push(target.clone());
                last = Some((target, e));
            }
        }
    }
    let (target, e) = last.expect("a group has at least one backend");
    let tried = failed.join(", ");
    Err((
        target,
        std::io::Error::new(e.kind(), format!("{e} (tried {tried})")),
    ))
}

/// The target of one backend of a group for a client at `offset`: port for port when it is a
/// range, like the listener's single `backend`.
fn backend_target(b: &BackendAddr, offset: u16) -> String {
    let offset = if b.ports.len() == 1 { 0 } else { offset };
    b.target(offset).unwrap_or_default()
}

/// Connects to one backend, from the client's own address in transparent mode.
async fn connect_one(
    mode: Impersonation,
    client: SocketAddr,
    target: &str,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    match mode {
        Impersonation::None => net::connect(target, timeout).await,
        Impersonation::Transparent => net::connect_transparent(client, target, timeout).await,
    }
}

#[cfg(test)]
mod tests;
