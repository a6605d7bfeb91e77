//! One client's announcement to its site's agents: a `ClientArrived` offer to the least busy
//! agent, offered again (under a fresh token) when that agent leaves or reports it cannot serve
//! the client, until a data connection claims it ([`super::data`]) or every connected agent has
//! failed it. With no agent connected, it waits for one to (re)connect.
//!
//! The deadline, the client's departure and the gateway's stop are its caller's
//! ([`super::client`]); so are the log lines and the audit record of a client it could not place.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::client::Offer;
use super::pending::Claim;
use super::site::{AgentHandle, Site};
use super::Shared;
use crate::protocol::{ClientArrived, Message, Token};

/// One client's announcement: offered (`ClientArrived`) to the least busy agent (not a
/// `shunned` one while another is there), and offered again when that agent leaves or reports
/// it cannot serve the client; with no agent left, it waits for one to (re)connect.
pub(super) struct Offering<'a> {
    shared: &'a Shared,
    site: &'a Site,
    arrived: ClientArrived,
    /// Resolves with the data connection that claims the client, or the agent's failure.
    claim: oneshot::Receiver<Claim>,
    /// The agent it is offered to now.
    pub offered_to: Option<String>,
    /// Agents that reported they cannot serve it (not asked again), and the last reason.
    failed_by: Vec<u64>,
    last_failure: Option<String>,
    /// Its turn in the site's rotation, taken once: offering it again keeps it.
    turn: u64,
}

impl<'a> Offering<'a> {
    pub fn new(shared: &'a Shared, site: &'a Site, offer: &Offer) -> Self {
        let token = Token::random();
        Offering {
            shared,
            site,
            claim: shared.pending.insert(offer.id, token, &site.name),
            arrived: ClientArrived {
                id: offer.id,
                token,
                listener: offer.listener.clone(),
                port_offset: offer.port_offset,
                client_addr: offer.client_addr,
                gateway_addr: offer.gateway_addr,
            },
            offered_to: None,
            failed_by: Vec::new(),
            last_failure: None,
            turn: site.next_turn(),
        }
    }

    /// Offers the client until a data connection claims it, or every connected agent has
    /// failed it (the last reason); `Err`: the offer was withdrawn.
    pub async fn until_claimed(&mut self, shunned: &[u64]) -> Result<Claim, String> {
        let withdrawn = |_| "the offer was withdrawn".to_string();
        loop {
            let joined = self.site.joined.notified();
            let Some(agent) = self.site.pick_agent(self.turn, shunned, &self.failed_by) else {
                if let Some(reason) = self.last_failure.take() {
                    return Ok(Claim::Failed(reason));
                }
                tokio::select! {
                    c = &mut self.claim => return c.map_err(withdrawn),
                    () = joined => continue,
                }
            };
            self.log_reoffer(&agent);
            let Some(claimed) = self.offer_to(&agent).await else {
                continue;
            };
            match claimed {
                Ok(Claim::Failed(reason)) => {
                    // Offer it again under a fresh token: the failed offer's token is spent.
                    self.failed_by.push(agent.id);
                    self.last_failure = Some(reason);
                    self.arrived.token = Token::random();
                    let (id, site) = (self.arrived.id, &self.site.name);
                    self.claim = self.shared.pending.insert(id, self.arrived.token, site);
                }
                other => return other.map_err(withdrawn),
            }
        }
    }

    /// Sends the offer to `agent` and waits for its answer; `None`: the agent left first.
    async fn offer_to(
        &mut self,
        agent: &AgentHandle,
    ) -> Option<Result<Claim, oneshot::error::RecvError>> {
        self.shared.pending.offered_to(self.arrived.id, agent.id);
        agent.inflight.fetch_add(1, Ordering::Relaxed);
        let _inflight = Inflight(agent.inflight.clone());
        // The queue may be full while the agent's writer waits for a hung agent: the session
        // ends within three heartbeats, and `gone` says so.
        let queued = tokio::select! {
            sent = agent.tx.send(Message::ClientArrived(self.arrived.clone())) => sent.is_ok(),
            () = agent.gone.cancelled() => false,
        };
        if !queued {
            // Its control channel just closed: it leaves the site; pick again.
            agent.gone.cancelled().await;
            return None;
        }
        tokio::select! {
            c = &mut self.claim => Some(c),
            () = agent.gone.cancelled() => None,
        }
    }

    /// Says why a client is offered to `agent` after another one.
    fn log_reoffer(&mut self, agent: &AgentHandle) {
        let Some(previous) = self.offered_to.replace(agent.name.clone()) else {
            return;
        };
        let (listener, client, id) = (
            &self.arrived.listener,
            self.arrived.client_addr,
            self.arrived.id,
        );
        match &self.last_failure {
            Some(reason) if self.shared.stats.clients_reoffered.hit().log => tracing::info!(
                listener = listener.as_str(), client = %client, id,
                "agent {previous} could not serve client ({reason}); offered again, to agent {}",
                agent.name
            ),
            Some(_) => {}
            None => tracing::info!(
                listener = listener.as_str(), client = %client, id,
                "agent {previous} is gone; client offered again, to agent {}", agent.name
            ),
        }
    }
}

/// Decrements an agent's in-flight count when the offer ends, however it ends.
struct Inflight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
