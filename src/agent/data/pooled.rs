//! A client the gateway handed on a warm-pool connection, before the agent answers it
//! (`PoolAccepted`): its backend is connected first, so a client whose backend does not take it
//! is declined while the gateway still holds it, and the gateway offers it to another agent of
//! the site (protocol.md 7.3) instead of closing it after the answer.
//!
//! Rules:
//! - Only a TCP listener with a TCP backend is connected first. The embedded application's
//!   clients, UDP flows, and a listener or port this agent does not have are answered and then
//!   served or reported by the data handler, as before.
//! - All tries together take at most [`BACKEND_LIMIT`] (each one also within
//!   `connect_timeout`), well below the gateway's one second wait for the answer
//!   (`gateway::pool::ACCEPT_LIMIT`): a backend that never answers a SYN makes the agent decline
//!   in time instead of looking hung. A try cut short counts as a connect failure of that
//!   backend (passive ejection), like a refused one.
//! - A declined client is only logged here (its backend's failed connect counts for passive
//!   ejection): the gateway offers it again, and the agent that then serves it, or reports it,
//!   counts it and writes its audit record, so one client never has two records on one agent
//!   (tests/audit_log.rs) nor two counts in one listener's stats (tests/agent_admin.rs). No
//!   `ClientFailed` goes to the gateway: the orderly close says it already
//!   (`refusals.pool_declined`), and a late report could fail the same client's next offer,
//!   which may come to this very agent on the announced path.
//! - The connected backend goes to the data handler: no second dial. Nothing has been written
//!   to it yet: the PROXY header and the client's bytes follow once the gateway is answered.
//!   If the answer cannot be written (the gateway gave up), the backend sees a connection
//!   closed without a byte.

use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};

use super::{Connected, Gateway, Handler, Pooled};
use crate::agent::AgentCtx;
use crate::config::{AgentConfig, Backend, ListenerConfig, Protocol};
use crate::protocol::{ClientArrived, Message};
use crate::transport::Stream;

/// The longest a pooled client's backend connect may take before the agent answers the
/// gateway: half the gateway's `ACCEPT_LIMIT` (1 s), so the answer (or the decline) is on time
/// even on a loaded agent. On a LAN a backend accepts in well under a millisecond; one that
/// has not within this is declined for this client (the announced path, if the gateway falls
/// back to it, tries it again with the full `connect_timeout`).
pub const BACKEND_LIMIT: Duration = Duration::from_millis(500);

/// A pooled client whose backend is connected (or that has nothing to connect first), ready to
/// be served once the gateway is answered.
pub(crate) struct PoolClient {
    handler: Handler,
    backend: Option<Connected>,
}

impl PoolClient {
    /// Connects the backend of a client handed on a pooled connection, within
    /// [`BACKEND_LIMIT`]. `None`: the backend did not take it; the client is logged, counted
    /// and recorded, and the caller declines it with an orderly close.
    pub(crate) async fn prepare(
        ctx: AgentCtx,
        gateway: Gateway,
        arrived: ClientArrived,
        control: mpsc::Sender<Message>,
        admission: crate::agent::limits::Admission,
    ) -> Option<PoolClient> {
        let handler = Handler::new(ctx, gateway, arrived, control, admission);
        let config = handler.config.clone();
        let Some(listener) = connected_first(&config, &handler.arrived) else {
            return Some(PoolClient {
                handler,
                backend: None,
            });
        };
        match handler.connect_backend(listener, Some(BACKEND_LIMIT)).await {
            Ok(backend) => Some(PoolClient {
                handler,
                backend: Some(backend),
            }),
            Err((backend, error)) => {
                handler.declined(&listener.name, &backend, &error);
                None
            }
        }
    }

    /// Serves the client on the pooled connection it came on (answered already): `leftover`,
    /// bytes read past the assignment; `back`, the way back to its member when reuse-framed.
    pub(crate) async fn serve(
        self,
        stream: Stream,
        leftover: BytesMut,
        back: Option<oneshot::Sender<crate::reuse::Reusable>>,
    ) {
        let pooled = Pooled {
            stream,
            leftover,
            back,
            backend: self.backend,
        };
        self.handler.run(Some(pooled)).await
    }
}

/// The client's listener when its backend is connected before the answer: a TCP listener with
/// a TCP backend port for the client's port.
fn connected_first<'a>(
    config: &'a AgentConfig,
    arrived: &ClientArrived,
) -> Option<&'a ListenerConfig> {
    let listener = config.listener(&arrived.listener)?;
    let stream = !matches!(listener.protocol, Protocol::Udp { .. });
    let tcp = matches!(listener.backend, Backend::Tcp(_));
    let port = listener.backend_target(arrived.port_offset).is_some();
    (stream && tcp && port).then_some(listener)
}

impl Handler {
    /// A pooled client declined because its backend did not take it: logged only. The client
    /// is not over: the gateway offers it again (to another agent, or announces it to this one),
    /// and the agent that finally serves it or cannot serve it counts it and writes its one
    /// audit record, so a client is never counted or recorded twice on one agent. The failed
    /// connect itself counts for the backend's passive ejection (`connect_backend`).
    fn declined(&self, listener: &str, backend: &str, error: &std::io::Error) {
        tracing::warn!(
            listener, client = %self.arrived.client_addr, gateway = %self.gateway.name,
            "backend {backend} unreachable: {error}; pooled client declined: the gateway offers it again"
        );
    }
}
