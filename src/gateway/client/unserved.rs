//! Every way a public client admitted to wait fails to obtain its data connection, as one
//! [`Unserved`] variant handled in one place ([`Handler::unserved`]): its pending entry
//! removed, logged (rate limited where it is counted), counted, closed and recorded. And
//! [`Offer::record`]: the one audit record every accepted client ends with, served or not.

use super::*;

/// Every way a client admitted to wait for an agent fails to obtain a data connection.
/// [`Handler::unserved`] logs, counts and records each.
pub(super) enum Unserved {
    /// It left while a warm pool connection was handed it (the fast path: not logged).
    LeftPooled,
    /// It left while its offer waited for a data connection.
    Left,
    /// The gateway stopped (its control port closed) while the client waited.
    Stopping,
    /// Its pending entry was dropped before a data connection claimed it.
    Withdrawn(String),
    /// No data connection claimed it within `waited`; `agent`: the last one it was offered to.
    Unclaimed { agent: String, waited: Duration },
    /// Every agent it was offered to reported it cannot serve it; the last one and its reason.
    AgentFailed { agent: String, reason: String },
}

impl<C: PublicClient> Handler<C> {
    /// The one place a client that obtained no data connection is logged, counted, closed and
    /// recorded. Its pending entry (if an offer made one) is removed first.
    pub(super) async fn unserved(mut self, unserved: Unserved) {
        let (listener, client) = (self.offer.listener.as_str(), self.offer.client_addr);
        if !matches!(unserved, Unserved::LeftPooled) {
            self.shared.pending.remove(self.offer.id);
        }
        let (outcome, error, agent) = match unserved {
            Unserved::LeftPooled => ("left", None, None),
            Unserved::Left => {
                tracing::debug!(listener, client = %client, "client left before its data connection arrived");
                ("left", None, None)
            }
            Unserved::Stopping => {
                // The stop is logged once, not once per waiting client.
                tracing::debug!(listener, client = %client, "gateway stopping: closing a client still waiting for its data connection");
                ("stopping", None, None)
            }
            Unserved::Withdrawn(reason) => {
                tracing::warn!(listener, client = %client, "closing client: {reason}");
                ("withdrawn", Some(reason), None)
            }
            Unserved::Unclaimed { agent, waited } => {
                let occ = self.shared.stats.clients_unclaimed.hit();
                let why = format!(
                    "no data connection within {}",
                    humantime::format_duration(waited)
                );
                if occ.log {
                    tracing::warn!(
                        listener, client = %client, agent = %agent,
                        "{why}; closing client{}", occ.tally()
                    );
                }
                ("unclaimed", Some(why), None)
            }
            Unserved::AgentFailed { agent, reason } => {
                self.client.close().await;
                let occ = self.shared.stats.clients_failed.hit();
                if occ.log {
                    tracing::warn!(
                        listener, client = %client, agent = %agent,
                        "agent could not serve client: {reason}{}", occ.tally()
                    );
                }
                ("agent_failed", Some(reason), Some(agent))
            }
        };
        let bytes = (self.held.bytes.len() as u64, 0);
        self.offer.record(
            &self.site.name,
            outcome,
            error.as_deref(),
            agent.as_deref(),
            None,
            bytes,
        );
    }
}

impl Offer {
    /// The client's one audit record (`site`: its site's name).
    pub(super) fn record(
        &self,
        site: &str,
        outcome: &'static str,
        error: Option<&str>,
        agent: Option<&str>,
        agent_addr: Option<SocketAddr>,
        bytes: (u64, u64),
    ) {
        ConnectionEnd {
            conn: self.id,
            site,
            listener: &self.listener,
            client: self.client_addr,
            gateway: self.gateway_addr,
            agent,
            agent_addr,
            backend: None,
            bytes_from_client: bytes.0,
            bytes_to_client: bytes.1,
            duration: self.started.elapsed(),
            outcome,
            error,
        }
        .log(Daemon::Gateway)
    }
}
