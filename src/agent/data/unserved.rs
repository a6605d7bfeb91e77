//! Every way an announced client goes unserved ([`Unserved`]), handled in one place
//! ([`Handler::unserved`]): logged, counted, recorded, reported to the gateway
//! (`ClientFailed`) and its data connection closed.

use super::*;

/// Every way an announced client goes unserved. [`Handler::unserved`] logs, counts, records,
/// reports it to the gateway and closes its data connection, in one place. `data`: the data
/// connection to close in order (`framed`: reuse-framed, it says `04 02` first).
pub(super) enum Unserved {
    /// The gateway named a listener this agent does not have (any more).
    UnknownListener { data: Option<Stream>, framed: bool },
    /// The listener has no backend port for the client's port offset.
    NoBackendPort { data: Option<Stream>, framed: bool },
    /// The backend did not take the connection (`backend`: the one(s) tried).
    BackendUnreachable {
        backend: String,
        error: std::io::Error,
        data: Option<Stream>,
        framed: bool,
    },
    /// The data connection to the gateway failed (or the gateway says another agent took the
    /// client, or it is gone); `backend`: the one that took the client meanwhile.
    DataFailed { backend: String, error: DialError },
}

impl Handler {
    /// The one place an unserved client is logged, counted, recorded, reported to the gateway
    /// (which closes the client on the report, or when its data connection closes without a
    /// byte) and its data connection closed. `route`: once the backend is known.
    pub(super) async fn unserved(&self, unserved: Unserved, route: Option<&Route>) {
        let (listener, client) = (self.arrived.listener.as_str(), self.arrived.client_addr);
        let flow = route.is_some_and(|r| r.flow);
        // The audit record's backend: the one(s) tried, once known.
        let mut target = None;
        let (outcome, why, data) = match unserved {
            Unserved::UnknownListener { data, framed } => {
                // Not counted: statistics exist only for configured listeners.
                tracing::warn!(listener, client = %client, "offer for an unknown listener");
                let why = format!("agent has no listener \"{listener}\"");
                ("refused", why, Some((data, framed)))
            }
            Unserved::NoBackendPort { data, framed } => {
                let why = format!("no backend port for offset {}", self.arrived.port_offset);
                ("refused", why, Some((data, framed)))
            }
            Unserved::BackendUnreachable {
                backend,
                error,
                data,
                framed,
            } => {
                let why = self.backend_unreachable(&backend, &error, route);
                target = Some(backend);
                if flow {
                    // A flow's connection closes before the report, as it always did.
                    decline(data, framed).await;
                    ("backend_unreachable", why, None)
                } else {
                    ("backend_unreachable", why, Some((data, framed)))
                }
            }
            Unserved::DataFailed {
                error: DialError::Refused(e),
                ..
            } if !flow && e.code == ErrorCode::UNKNOWN_CLIENT => {
                // Claimed by another agent it was offered to as well (this one was slow), or
                // gone: the gateway knows the client's fate; a report would only add noise.
                tracing::info!(
                    listener, client = %client, id = self.arrived.id,
                    "client already taken by another agent or gone; not serving it"
                );
                return;
            }
            Unserved::DataFailed { backend, error: e } => {
                if !flow {
                    self.log_data_failure(&e);
                }
                target = Some(backend);
                let why = format!("agent's data connection failed: {e}");
                // Without the report the client would wait for its deadline.
                if let Some(r) = route {
                    r.stats.data_failed(&why);
                }
                ("data_failed", why, None)
            }
        };
        self.record(outcome, Some(&why), target.as_deref(), (0, 0));
        self.fail(why);
        if let Some((data, framed)) = data {
            decline(data, framed).await;
        }
    }

    /// Logs (a TCP client's) and counts an unreachable backend; returns the reason.
    pub(super) fn backend_unreachable(
        &self,
        target: &str,
        error: &std::io::Error,
        route: Option<&Route>,
    ) -> String {
        if !route.is_some_and(|r| r.flow) {
            tracing::warn!(
                listener = self.arrived.listener.as_str(), client = %self.arrived.client_addr,
                "backend {target} unreachable: {error}; closing the client"
            );
        }
        let why = format!("backend {target} unreachable: {error}");
        if let Some(r) = route {
            r.stats.backend_failed(&why);
        }
        why
    }

    /// Rate-limited: a gateway that answers every data hello with garbage gets a few lines
    /// and a tally, not one line per offer.
    pub(super) fn log_data_failure(&self, e: &DialError) {
        let hit = self.gateway.limits.data_failures.hit();
        if hit.log {
            tracing::warn!(
                listener = self.arrived.listener.as_str(), client = %self.arrived.client_addr,
                gateway = %self.gateway.name,
                "data connection failed: {e}{}", hit.tally()
            );
        }
    }

    /// Reports to the gateway that this agent cannot serve the client (it offers it to another
    /// agent, or closes it), while the control channel is there.
    pub(super) fn fail(&self, reason: String) {
        let _ = self.control.try_send(Message::ClientFailed(ClientFailed {
            id: self.arrived.id,
            reason,
        }));
    }

    /// The client's one audit record on this agent.
    pub(super) fn record(
        &self,
        outcome: &'static str,
        error: Option<&str>,
        backend: Option<&str>,
        bytes: (u64, u64),
    ) {
        ConnectionEnd {
            conn: self.arrived.id,
            site: &self.config.site,
            listener: &self.arrived.listener,
            client: self.arrived.client_addr,
            gateway: self.arrived.gateway_addr,
            agent: Some(&self.config.name),
            agent_addr: None,
            backend,
            bytes_from_client: bytes.0,
            bytes_to_client: bytes.1,
            duration: self.started.elapsed(),
            outcome,
            error,
        }
        .log(Daemon::Agent)
    }
}
