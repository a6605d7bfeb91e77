//! A `watch` of the gateway's status, for code that waits on the gateway's state instead of
//! its log lines (the in-process test harness in `tests/support/harness.rs`, an application
//! that embeds a gateway): [`super::GatewayHandle::watch`].
//!
//! What it holds ([`GatewayStatus`]) is what `/api/status` and `/api/stats` report that a
//! waiter cares about: the run state, each site's agents, listeners (open, closed, failed) and
//! idle pooled connections, the client counters, and the refusal counters. Not uptimes, bytes
//! or rates: they change all the time and nobody waits for them.
//!
//! The rule for when it changes:
//! - A publisher task (`publish`) recomputes the status after every event marked with
//!   [`Changes::mark`] (a client starts or stops piping: [`super::stats::Traffic`]; the gateway
//!   is paused, resumed or stops), and every [`POLL`] otherwise, which picks up what is not
//!   marked (agents joining and leaving, listeners opening and closing, the pool, refusals).
//! - It sends only a status that differs from the last one sent: a receiver is woken once
//!   per change, sees every state that lasted at least [`POLL`], and may miss shorter ones.
//! - It recomputes nothing while nobody holds a receiver. On the client path a mark costs one
//!   `watch::Sender::send_modify` (a short write lock and a notify) where the connection table
//!   is already locked: once when a client starts piping and once when it ends, never per byte.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{ListenerState, RunState, Shared};

/// How often the publisher looks for changes no event marked.
pub const POLL: Duration = Duration::from_millis(25);

/// The least time between two looks, so a flood of marks costs a bounded amount of work.
const GAP: Duration = Duration::from_millis(2);

/// Events that may change the status; the publisher wakes on each.
#[derive(Debug)]
pub struct Changes(watch::Sender<u64>);

impl Default for Changes {
    fn default() -> Self {
        Changes(watch::channel(0).0)
    }
}

impl Changes {
    /// Something the status shows may have changed.
    pub fn mark(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The gateway's state, as [`super::GatewayHandle::watch`] publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayStatus {
    pub state: RunState,
    /// By site name.
    pub sites: BTreeMap<String, SiteStatus>,
    /// Refused connections by reason (the names of `/api/stats` `refusals`), only those
    /// counted at least once: [`GatewayStatus::refusal`] says 0 for the others.
    pub refusals: BTreeMap<&'static str, u64>,
    /// `sallyport check` probes received.
    pub check_probes: u64,
    /// Clients accepted, piping now, closed, and waiting for a data connection: all listeners.
    pub accepted: u64,
    pub active: u64,
    pub closed: u64,
    pub pending: u64,
}

/// One site: its agents, its listeners and its idle pooled connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteStatus {
    /// Agent names, in the order they joined.
    pub agents: Vec<String>,
    /// By listener name.
    pub listeners: BTreeMap<String, ListenerStatus>,
    pub pooled: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatus {
    pub state: ListenerState,
    pub addrs: Vec<SocketAddr>,
    pub error: Option<String>,
}

impl GatewayStatus {
    /// Before the first look.
    pub(crate) fn empty() -> Self {
        GatewayStatus {
            state: RunState::Running,
            sites: BTreeMap::new(),
            refusals: BTreeMap::new(),
            check_probes: 0,
            accepted: 0,
            active: 0,
            closed: 0,
            pending: 0,
        }
    }

    /// Agents connected, all sites.
    pub fn agents(&self) -> usize {
        self.sites.values().map(|s| s.agents.len()).sum()
    }

    /// Idle pooled connections, all sites.
    pub fn pooled(&self) -> usize {
        self.sites.values().map(|s| s.pooled).sum()
    }

    /// A refusal counter by its `/api/stats` name (0 for a name never counted).
    pub fn refusal(&self, reason: &str) -> u64 {
        self.refusals.get(reason).copied().unwrap_or(0)
    }

    /// The listener `name` of any site.
    pub fn listener(&self, name: &str) -> Option<&ListenerStatus> {
        self.sites.values().find_map(|s| s.listeners.get(name))
    }

    /// Whether a listener `name` (of any site) is listening.
    pub fn is_listening(&self, name: &str) -> bool {
        self.listener(name)
            .is_some_and(|l| l.state == ListenerState::Listening)
    }
}

/// The status now.
pub(crate) fn current(shared: &Shared) -> GatewayStatus {
    let sites = shared.sites.all();
    let sites = sites.iter().map(|site| {
        let listeners = site.listener_views().into_iter().map(|l| {
            let status = ListenerStatus {
                state: l.state,
                addrs: l.addrs,
                error: l.error,
            };
            (l.name, status)
        });
        let status = SiteStatus {
            agents: site.agents().iter().map(|a| a.name.clone()).collect(),
            listeners: listeners.collect(),
            pooled: site.pool.len(),
        };
        (site.name.clone(), status)
    });
    let (_, totals) = shared.traffic.snapshot();
    GatewayStatus {
        state: shared.state(),
        sites: sites.collect(),
        refusals: (shared.stats.refusals().into_iter())
            .filter(|(_, n)| *n > 0)
            .collect(),
        check_probes: shared.stats.check_probes.count(),
        accepted: totals.accepted,
        active: totals.active,
        closed: totals.closed,
        pending: totals.pending,
    }
}

/// Publishes the status now, if anybody watches and it changed.
pub(crate) fn refresh(shared: &Shared) {
    let sender = &shared.status;
    if sender.receiver_count() == 0 {
        return;
    }
    let now = current(shared);
    sender.send_if_modified(|last| {
        let changed = *last != now;
        if changed {
            *last = now;
        }
        changed
    });
}

/// Keeps [`Shared::status`] current, by the rule in the module doc, until aborted.
pub(crate) async fn publish(shared: Arc<Shared>) {
    let mut marks = shared.traffic.changes.0.subscribe();
    loop {
        if shared.status.receiver_count() == 0 {
            // Nobody watches: no wake per mark, only a look now and then for a first receiver.
            tokio::time::sleep(POLL).await;
            marks.mark_unchanged();
            continue;
        }
        refresh(&shared);
        // Marked or not, look again within POLL; a burst of marks costs one look per GAP.
        let _ = tokio::time::timeout(POLL, marks.changed()).await;
        tokio::time::sleep(GAP).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::gateway::Gateway;

    /// The watch follows the state without anybody asking: a pause and a resume each reach a
    /// receiver, and a stop is its last word.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watch_follows_pause_resume_and_stop() {
        let text = "[control]\nlisten = \"127.0.0.1:0\"\n[peers]\ndefault = \"allow\"\n";
        let config = GatewayConfig::parse(std::path::Path::new("<test>"), text).unwrap();
        let gateway = Gateway::bind(config).await.unwrap();
        let handle = gateway.handle();
        let stop = tokio_util::sync::CancellationToken::new();
        let run = tokio::spawn(gateway.run(stop.clone()));
        let mut status = handle.watch();
        assert_eq!(status.borrow_and_update().state, RunState::Running);
        let within = |state| {
            let mut status = status.clone();
            async move {
                let seen = status.wait_for(|s| s.state == state);
                tokio::time::timeout(Duration::from_secs(5), seen)
                    .await
                    .is_ok()
            }
        };
        handle.pause().await;
        assert!(within(RunState::Paused).await);
        handle.resume().await;
        assert!(within(RunState::Running).await);
        stop.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(status.borrow_and_update().state, RunState::Stopping);
        assert!(status.borrow().sites.is_empty());
    }
}
