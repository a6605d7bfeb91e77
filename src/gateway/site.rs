//! Sites: the agents that serve one site and the public listeners they pushed.
//!
//! A site's listeners live exactly as long as at least one of its agents is connected. Listener
//! changes (a push, the last agent leaving) are serialized by the site's async listener lock, so
//! a departing agent closing ports and an arriving one opening them never interleave.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::mpsc;

use super::listener::RunningListener;
use super::Shared;
use crate::addr::display_addrs;
use crate::protocol::{
    ConfigResult, ListenerResult, ListenerSpec, ListenerStatus, Message, PushConfig,
};

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
}

pub(crate) struct Site {
    pub name: String,
    agents: Mutex<Vec<AgentHandle>>,
    listeners: tokio::sync::Mutex<BTreeMap<String, RunningListener>>,
    next_pick: AtomicU64,
}

impl Site {
    fn new(name: &str) -> Self {
        Site {
            name: name.to_string(),
            agents: Mutex::new(Vec::new()),
            listeners: tokio::sync::Mutex::new(BTreeMap::new()),
            next_pick: AtomicU64::new(0),
        }
    }

    /// The least busy connected agent; ties rotate so equal agents share the load.
    pub fn pick_agent(&self) -> Option<AgentHandle> {
        let agents = self.agents.lock().unwrap();
        if agents.is_empty() {
            return None;
        }
        let start = self.next_pick.fetch_add(1, Ordering::Relaxed) as usize % agents.len();
        (0..agents.len())
            .map(|i| &agents[(start + i) % agents.len()])
            .min_by_key(|a| a.inflight.load(Ordering::Relaxed))
            .cloned()
    }

    pub fn agent_count(&self) -> usize {
        self.agents.lock().unwrap().len()
    }

    /// Makes the open listeners match `push`: listeners whose spec is unchanged stay open with
    /// their connections untouched; removed or changed ones close; new ones open.
    pub async fn apply_config(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        push: &PushConfig,
    ) -> ConfigResult {
        let mut open = self.listeners.lock().await;
        // The first spec of a name counts; later duplicates are reported as failed below.
        let mut wanted: HashMap<&str, &ListenerSpec> = HashMap::new();
        for l in &push.listeners {
            wanted.entry(l.name.as_str()).or_insert(l);
        }

        let stale: Vec<String> = open
            .iter()
            .filter(|(name, running)| wanted.get(name.as_str()) != Some(&&running.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let running = open.remove(&name).expect("name taken from the map");
            let reason = if wanted.contains_key(name.as_str()) {
                "its configuration changed"
            } else {
                "the agent no longer pushes it"
            };
            tracing::info!(site = %self.name, listener = %name, "closing listener: {reason}");
            running.stop().await;
        }

        let mut results = Vec::with_capacity(push.listeners.len());
        let mut seen = std::collections::HashSet::new();
        for spec in &push.listeners {
            let status = if !seen.insert(spec.name.as_str()) {
                ListenerStatus::Failed {
                    error: "duplicate listener name in the pushed config".to_string(),
                }
            } else if let Some(running) = open.get(&spec.name) {
                ListenerStatus::Bound {
                    addrs: running.addrs.clone(),
                    kept: true,
                }
            } else {
                match RunningListener::open(shared, self, spec.clone()) {
                    Ok(running) => {
                        tracing::info!(
                            site = %self.name, listener = %spec.name,
                            "listening on {}", display_addrs(&running.addrs)
                        );
                        let addrs = running.addrs.clone();
                        open.insert(spec.name.clone(), running);
                        ListenerStatus::Bound { addrs, kept: false }
                    }
                    Err(error) => {
                        tracing::warn!(site = %self.name, listener = %spec.name, "cannot listen: {error}");
                        ListenerStatus::Failed { error }
                    }
                }
            };
            results.push(ListenerResult {
                name: spec.name.clone(),
                status,
            });
        }
        ConfigResult {
            generation: push.generation,
            listeners: results,
        }
    }

    /// Closes every listener if no agent is left. Established connections are separate tasks
    /// and keep piping.
    async fn close_listeners_if_orphaned(&self) {
        let mut open = self.listeners.lock().await;
        // Re-check under the listener lock: an agent may have joined (and pushed) meanwhile.
        if self.agent_count() > 0 || open.is_empty() {
            return;
        }
        let count = open.len();
        for (_, running) in std::mem::take(&mut *open) {
            running.stop().await;
        }
        tracing::warn!(
            site = %self.name,
            "last agent gone: closed {count} listener(s); established connections continue"
        );
    }
}

/// All sites known to this gateway process. Sites are never removed: an empty one costs a map
/// entry, and keeping it avoids racing a departing and an arriving agent over two objects.
#[derive(Default)]
pub(crate) struct SiteRegistry {
    sites: Mutex<HashMap<String, Arc<Site>>>,
}

impl SiteRegistry {
    /// Registers a connected agent with its site.
    pub fn join(&self, site: &str, agent: AgentHandle) -> Arc<Site> {
        let site = self
            .sites
            .lock()
            .unwrap()
            .entry(site.to_string())
            .or_insert_with(|| Arc::new(Site::new(site)))
            .clone();
        site.agents.lock().unwrap().push(agent);
        site
    }

    /// Unregisters an agent; the site's listeners close if it was the last one.
    pub async fn leave(&self, site: &Arc<Site>, agent_id: u64) {
        let now_empty = {
            let mut agents = site.agents.lock().unwrap();
            agents.retain(|a| a.id != agent_id);
            agents.is_empty()
        };
        if now_empty {
            site.close_listeners_if_orphaned().await;
        }
    }
}
