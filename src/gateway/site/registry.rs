//! [`SiteRegistry`]: every site this gateway process knows, by name. An agent joins its site
//! here, atomically with the check that its config digest matches the site's other agents; a
//! site is never removed (an empty one costs a map entry).

use super::*;

/// All sites known to this gateway process. Sites are never removed: an empty one costs a map
/// entry, and keeping it avoids racing a departing and an arriving agent over two objects.
#[derive(Default)]
pub(crate) struct SiteRegistry {
    sites: Mutex<HashMap<String, Arc<Site>>>,
}

impl SiteRegistry {
    /// Registers a connected agent with its site, if its config digest matches the other
    /// agents' (checked and joined atomically, so two agents with different configs cannot
    /// both get in). The error names both digests.
    pub fn join(&self, site: &str, agent: AgentHandle) -> Result<Arc<Site>, String> {
        let site = self
            .sites
            .lock()
            .entry(site.to_string())
            .or_insert_with(|| Arc::new(Site::new(site)))
            .clone();
        {
            let mut agents = site.agents.lock();
            let digest = agent.digest.lock().clone();
            digest_conflict(&site.name, &agents, agent.id, &digest)?;
            agents.push(agent);
        }
        site.joined.notify_waiters();
        Ok(site)
    }

    /// Unregisters an agent; the site's listeners close if it was the last one.
    pub async fn leave(&self, shared: &Arc<Shared>, site: &Arc<Site>, agent_id: u64) {
        let now_empty = {
            let mut agents = site.agents.lock();
            agents.retain(|a| a.id != agent_id);
            agents.is_empty()
        };
        if now_empty {
            site.close_listeners_if_orphaned(shared).await;
        }
    }

    /// Sites with at least one connected agent.
    pub fn active(&self) -> usize {
        self.sites
            .lock()
            .values()
            .filter(|s| s.agent_count() > 0)
            .count()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Site>> {
        self.sites.lock().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Site>> {
        let mut sites: Vec<_> = self.sites.lock().values().cloned().collect();
        sites.sort_by(|a, b| a.name.cmp(&b.name));
        sites
    }
}
