//! Sites: the agents that serve one site and the public listeners they pushed.
//!
//! A site's listeners live exactly as long as at least one of its agents is connected. Listener
//! changes (a push, the last agent leaving) are serialized by the site's async listener lock, so
//! a departing agent closing ports and an arriving one opening them never interleave.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::listener::RunningListener;
use super::pool::Pool;
use super::{RunState, Shared};
use crate::addr::{display_addrs, summarize_ports};
use crate::config::check_name;
use crate::protocol::{
    ConfigResult, ListenerResult, ListenerSpec, ListenerStatus, Message, PushConfig,
};

mod registry;

pub(crate) use registry::SiteRegistry;

/// One connected agent, as the rest of the gateway sees it.
#[derive(Clone, Debug)]
pub(crate) struct AgentHandle {
    pub id: u64,
    pub name: String,
    pub addr: SocketAddr,
    pub connected_since: SystemTime,
    /// Messages for the agent's control channel.
    pub tx: mpsc::Sender<Message>,
    /// Clients offered to this agent and not yet claimed: the "busy" measure for picking.
    pub inflight: Arc<AtomicUsize>,
    /// The digest of the configuration it pushed last (agents of a site must agree on it).
    pub digest: Arc<Mutex<String>>,
    /// Cancelled once the agent has left its site: clients offered to it are offered again.
    pub gone: CancellationToken,
    /// The secret this session was given (protocol v2), which its pool and outbound
    /// connections must present; `None` on a v1 session.
    pub secret: Option<crate::protocol::Token>,
    /// SHA-256 of the certificate the agent presented on its control channel (TLS only): its
    /// pool and outbound connections over TLS must present the same one.
    pub cert: Option<[u8; 32]>,
    /// The certificate chain it presented (TLS only, leaf first): a reload re-checks it
    /// against the new CA and CRL, and the status shows when it expires.
    pub chain: Option<Arc<[rustls::pki_types::CertificateDer<'static>]>>,
    /// Cancelled by a reload whose CA or CRL no longer accepts `chain`: the session ends
    /// with REVOKED.
    pub cert_revoked: CancellationToken,
    /// Set when one of its pooled connections left a client unanswered (it may be hung);
    /// cleared by the next message on its control channel. Suspects are picked last.
    pub suspect: Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(test)]
impl AgentHandle {
    /// An agent `agent-ID` with no session behind it, for unit tests of the site and the pool.
    pub(crate) fn for_test(id: u64) -> AgentHandle {
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
}

pub(crate) struct Site {
    pub name: String,
    agents: Mutex<Vec<AgentHandle>>,
    listeners: tokio::sync::Mutex<SiteListeners>,
    /// The listeners' states as of the last change, readable without awaiting (admin API).
    view: Mutex<Vec<ListenerView>>,
    next_pick: AtomicU64,
    /// Woken whenever an agent joins (clients waiting for any agent retry).
    pub joined: Notify,
    /// Idle data connections agents opened ahead of time.
    pub pool: Pool,
    /// Public ports this site has open (`[limits] max_listen_ports_per_site`).
    pub ports: crate::limits::Gauge,
    /// The bans its agents pushed, merged (checked at every accept).
    pub bans: super::bans::SiteBans,
    /// The rate limits its agents pushed (checked at every accept, applied to every pipe).
    pub limits: super::edge::SiteLimits,
    /// The automatic-ban settings its agents pushed, and what each listener counted.
    pub autobans: super::autoban::SiteAutoBans,
    /// Listeners of the last push, kept when the last agent leaves: a site whose agents are
    /// all gone still "has listeners" for `/api/health`.
    last_pushed: AtomicUsize,
}

/// Desired (what agents pushed) and actual (what is open) listeners of a site.
#[derive(Default)]
struct SiteListeners {
    /// The last pushed listener set, in push order, duplicates removed.
    specs: Vec<ListenerSpec>,
    open: BTreeMap<String, RunningListener>,
    /// Why a pushed listener is not open.
    failed: BTreeMap<String, String>,
}

/// What a listener is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerState {
    Listening,
    /// The gateway is paused: the port is closed until resume.
    Paused,
    /// The gateway could not open it (see `error`).
    Failed,
}

/// One listener as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerView {
    pub site: String,
    pub name: String,
    pub public: String,
    pub state: ListenerState,
    pub addrs: Vec<SocketAddr>,
    pub error: Option<String>,
    /// The host names it serves on a shared port (empty: the port is its own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

impl Site {
    fn new(name: &str) -> Self {
        Site {
            name: name.to_string(),
            agents: Mutex::new(Vec::new()),
            listeners: tokio::sync::Mutex::new(SiteListeners::default()),
            view: Mutex::new(Vec::new()),
            next_pick: AtomicU64::new(0),
            joined: Notify::new(),
            pool: Pool::default(),
            ports: crate::limits::Gauge::default(),
            last_pushed: AtomicUsize::new(0),
            bans: Default::default(),
            limits: Default::default(),
            autobans: Default::default(),
        }
    }

    /// A client's turn in the rotation: taken once per client, so offering it again (after
    /// an agent failed it or left) does not move the rotation on and skip an agent's turn.
    pub fn next_turn(&self) -> u64 {
        self.next_pick.fetch_add(1, Ordering::Relaxed)
    }

    /// The least busy connected agent; ties rotate by the client's `turn` ([`Self::next_turn`])
    /// so equal agents share the load. Agents that are `shunned` (they just failed this client
    /// on the pool path) or suspect (one of their pooled connections did not answer) are picked
    /// only when no other agent is there; agents in `excluded` (they reported they cannot serve
    /// this client) never: `None` when no other agent is connected.
    pub fn pick_agent(&self, turn: u64, shunned: &[u64], excluded: &[u64]) -> Option<AgentHandle> {
        let agents = self.agents.lock();
        if agents.is_empty() {
            return None;
        }
        let start = (turn % agents.len() as u64) as usize;
        (0..agents.len())
            .map(|i| &agents[(start + i) % agents.len()])
            // A session that is ending is still listed until it has left.
            .filter(|a| !a.gone.is_cancelled() && !excluded.contains(&a.id))
            .min_by_key(|a| {
                let avoided = shunned.contains(&a.id) || a.suspect.load(Ordering::Relaxed);
                (avoided, a.inflight.load(Ordering::Relaxed))
            })
            .cloned()
    }

    /// Marks an agent session suspect (see [`AgentHandle::suspect`]).
    pub fn mark_suspect(&self, agent_id: u64) {
        let agents = self.agents.lock();
        if let Some(a) = agents.iter().find(|a| a.id == agent_id) {
            a.suspect.store(true, Ordering::Relaxed);
        }
    }

    /// Checks that `digest` matches what every other agent of the site pushed, and records it
    /// as `agent_id`'s. The error names both digests.
    pub fn check_digest(&self, agent_id: u64, digest: &str) -> Result<(), String> {
        let agents = self.agents.lock();
        digest_conflict(&self.name, &agents, agent_id, digest)?;
        if let Some(a) = agents.iter().find(|a| a.id == agent_id) {
            *a.digest.lock() = digest.to_string();
        }
        Ok(())
    }

    /// How many listeners the site's agents pushed last (also after they all left).
    pub fn last_pushed(&self) -> usize {
        self.last_pushed.load(Ordering::Relaxed)
    }

    pub fn agent_count(&self) -> usize {
        self.agents.lock().len()
    }

    pub fn agents(&self) -> Vec<AgentHandle> {
        self.agents.lock().clone()
    }

    pub fn listener_views(&self) -> Vec<ListenerView> {
        self.view.lock().clone()
    }

    /// Records a push and makes the open listeners match it: listeners whose spec is unchanged
    /// stay open with their connections untouched; removed or changed ones close; new ones
    /// open (or wait, while the gateway is paused).
    pub async fn apply_config(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        push: &PushConfig,
    ) -> ConfigResult {
        let mut listeners = self.listeners.lock().await;
        self.last_pushed
            .store(push.listeners.len(), Ordering::Relaxed);
        let mut seen = HashSet::new();
        let mut duplicates = HashSet::new();
        listeners.specs.clear();
        for spec in &push.listeners {
            // A listener with an invalid name is refused here, never stored or shown.
            if check_name(&spec.name).is_err() {
                continue;
            }
            if seen.insert(spec.name.as_str()) {
                listeners.specs.push(spec.clone());
            } else {
                duplicates.insert(spec.name.as_str());
            }
        }
        let before: HashMap<String, ListenerSpec> = listeners
            .open
            .iter()
            .map(|(n, r)| (n.clone(), r.spec.clone()))
            .collect();
        self.reconcile(shared, &mut listeners).await;

        // The first listener of each name gets its status; later ones are duplicates (a set,
        // not a search of the push for each: 16,000 listeners stay linear).
        let mut answered = HashSet::new();
        let results = push
            .listeners
            .iter()
            .map(|spec| {
                let first = answered.insert(spec.name.as_str());
                let status = if let Err(e) = check_name(&spec.name) {
                    ListenerStatus::Failed {
                        error: format!("invalid listener name {e}"),
                    }
                } else if !first && duplicates.contains(spec.name.as_str()) {
                    ListenerStatus::Failed {
                        error: "duplicate listener name in the pushed config".to_string(),
                    }
                } else if let Some(running) = listeners.open.get(&spec.name) {
                    ListenerStatus::Bound {
                        addrs: running.addrs.clone(),
                        kept: before.get(&spec.name) == Some(spec),
                    }
                } else if let Some(error) = listeners.failed.get(&spec.name) {
                    ListenerStatus::Failed {
                        error: error.clone(),
                    }
                } else {
                    ListenerStatus::Paused
                };
                ListenerResult {
                    name: spec.name.clone(),
                    status,
                }
            })
            .collect();
        ConfigResult {
            generation: push.generation,
            listeners: results,
        }
    }

    /// Brings the open listeners in line with the specs, the agents and the gateway's state.
    pub async fn reconcile_now(self: &Arc<Self>, shared: &Arc<Shared>) {
        let mut listeners = self.listeners.lock().await;
        self.reconcile(shared, &mut listeners).await;
    }

    async fn reconcile(self: &Arc<Self>, shared: &Arc<Shared>, listeners: &mut SiteListeners) {
        let should_listen = self.agent_count() > 0 && shared.state() == RunState::Running;
        let config = shared.config();
        let bind_ip = config.client_bind;
        let wanted: HashMap<&str, &ListenerSpec> = listeners
            .specs
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();

        let stale: Vec<String> = listeners
            .open
            .iter()
            .filter(|(name, running)| {
                !should_listen
                    || wanted.get(name.as_str()) != Some(&&running.spec)
                    || (running.spec.public.ip.is_none() && running.bind_ip != bind_ip)
                    // A reload may have narrowed where agents may bind.
                    || config.check_public(&running.spec.public).is_err()
            })
            .map(|(name, _)| name.clone())
            .collect();
        let mut closed = Tally::default();
        for name in stale {
            let running = listeners
                .open
                .remove(&name)
                .expect("name taken from the map");
            let reason = if !should_listen {
                if self.agent_count() == 0 {
                    "no agent of the site is connected"
                } else {
                    "the gateway is paused"
                }
            } else if config.check_public(&running.spec.public).is_err() {
                "the gateway's [clients] rules no longer allow it"
            } else if wanted.contains_key(name.as_str()) {
                "its configuration changed"
            } else {
                "the agent no longer pushes it"
            };
            tracing::debug!(site = %self.name, listener = %name, "closing listener: {reason}");
            closed.add(reason, &running.spec);
            running.stop().await;
        }
        closed.log(&self.name, "closed");
        let mut opened = Tally::default();
        listeners.failed.clear();
        if should_listen {
            for spec in &listeners.specs {
                if listeners.open.contains_key(&spec.name) {
                    continue;
                }
                match RunningListener::open(shared, self, spec.clone()).await {
                    Ok(running) => {
                        tracing::debug!(
                            site = %self.name, listener = %spec.name,
                            "listening on {}", display_addrs(&running.addrs)
                        );
                        opened.add("", spec);
                        listeners.open.insert(spec.name.clone(), running);
                    }
                    Err(error) => {
                        tracing::warn!(site = %self.name, listener = %spec.name, "cannot listen: {error}");
                        listeners.failed.insert(spec.name.clone(), error);
                    }
                }
            }
        }
        opened.log(&self.name, "opened");
        let view = listeners
            .specs
            .iter()
            .map(|spec| {
                let (state, addrs, error) = match (
                    listeners.open.get(&spec.name),
                    listeners.failed.get(&spec.name),
                ) {
                    (Some(r), _) => (ListenerState::Listening, r.addrs.clone(), None),
                    (None, Some(e)) => (ListenerState::Failed, Vec::new(), Some(e.clone())),
                    (None, None) => (ListenerState::Paused, Vec::new(), None),
                };
                ListenerView {
                    site: self.name.clone(),
                    name: spec.name.clone(),
                    // "53/udp" for a UDP listener, as services(5) writes it.
                    public: if crate::protocol::datagram::is_udp(&spec.clients.except) {
                        format!("{}/udp", spec.public)
                    } else {
                        spec.public.to_string()
                    },
                    state,
                    addrs,
                    error,
                    hostnames: crate::protocol::hostnames::split(&spec.clients.except).0,
                }
            })
            .collect();
        *self.view.lock() = view;
    }

    /// Closes every listener and forgets the pushed config if no agent is left. Established
    /// connections are separate tasks and keep piping.
    async fn close_listeners_if_orphaned(self: &Arc<Self>, shared: &Arc<Shared>) {
        let mut listeners = self.listeners.lock().await;
        // Re-check under the listener lock: an agent may have joined (and pushed) meanwhile.
        if self.agent_count() > 0 {
            return;
        }
        let count = listeners.open.len();
        self.reconcile(shared, &mut listeners).await;
        listeners.specs.clear();
        *self.view.lock() = Vec::new();
        if count > 0 {
            tracing::warn!(
                site = %self.name,
                "last agent gone: closed {count} listener(s); established connections continue"
            );
        }
    }
}

/// The listeners one change of a site opened or closed, by reason: one INFO line each (a control
/// channel drop at 5,000 listeners was 10,000 INFO lines). Each listener's own line is at DEBUG;
/// one that fails to open keeps its own warning.
#[derive(Default)]
struct Tally(BTreeMap<&'static str, Counted>);

/// How many listeners, and their port ranges (first, last).
type Counted = (usize, Vec<(u16, u16)>);

impl Tally {
    fn add(&mut self, reason: &'static str, spec: &ListenerSpec) {
        let (count, ports) = self.0.entry(reason).or_default();
        *count += 1;
        ports.push((spec.public.ports.first(), spec.public.ports.last()));
    }

    /// `verb`: "opened" or "closed".
    fn log(self, site: &str, verb: &str) {
        for (reason, (count, ports)) in self.0 {
            let s = if count == 1 { "" } else { "s" };
            let ports = summarize_ports(ports);
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            };
            tracing::info!(site = %site, "{verb} {count} listener{s} ({ports}) for site {site}{why}");
        }
    }
}

/// The refusal for an agent whose config differs from another agent's of the same site.
fn digest_conflict(
    site: &str,
    agents: &[AgentHandle],
    agent_id: u64,
    digest: &str,
) -> Result<(), String> {
    let short = |d: &str| d.chars().take(16).collect::<String>();
    for other in agents.iter().filter(|a| a.id != agent_id) {
        let theirs = other.digest.lock().clone();
        if theirs != digest {
            return Err(format!(
                "site \"{site}\": this agent's configuration (digest {}) differs from agent \
                 \"{}\" at {} (digest {}); all agents of a site must push identical listeners \
                 and backends",
                short(digest),
                other.name,
                other.addr,
                short(&theirs)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
