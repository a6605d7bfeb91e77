//! Serving one announced client, as one value ([`Handler`], mini-redis's idea, mirroring the
//! gateway's `client.rs`): find its listener and backend, dial the gateway's control port as a
//! data connection and the backend at the same time, write the PROXY header, then pipe the two.
//! An announced client of a listener without health checks is the exception: its backend is
//! dialled first, so an unreachable one is reported while the client is unclaimed and the
//! gateway offers it to another agent. A client handed on a warm-pool connection has its
//! backend connected before the agent answers the gateway, within a bound ([`PoolClient`]): one
//! whose backend does not take it is declined, and the gateway offers it to another agent.
//!
//! Every way a client goes unserved is one [`Unserved`] variant, logged, counted, recorded,
//! reported to the gateway (`ClientFailed`) and its data connection closed in one place
//! ([`Handler::unserved`]). Every offered client ends with one audit record, except one another
//! agent already took (the gateway knows its fate) and one handed to the embedding application.
//!
//! A reuse-framed warm-pool connection ([`crate::reuse`]) is piped with the framing and, when
//! its client ended cleanly both ways, handed back to its pool member ([`Pooled::back`]); a
//! client whose backend is unreachable ends it with `04` and `02` (last, end of stream), so the
//! gateway closes its client in order and neither side keeps the connection.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::dial::DialError;
use super::stats::ListenerStats;
use super::{proxy_header, AgentCtx};
use crate::audit::{ConnectionEnd, Daemon};
use crate::config::{AgentConfig, Backend, ListenerConfig, Protocol, ProxyProtocol};
use crate::pipe::{pipe_tcp, tracked, PipeCounters};
use crate::protocol::{ClientArrived, ClientFailed, ErrorCode, Message};
use crate::transport::Stream;

mod conn;
mod pooled;
mod unserved;

use super::backends::Connected;
pub(crate) use conn::Gateway;
use conn::{decline, give_back, open_data_connection, Pooled};
pub(crate) use pooled::PoolClient;
use unserved::Unserved;

/// Serves one client announced by `gateway`. Reports failures on the control channel through
/// `control` when it is still there; never depends on it otherwise. (A client handed on a
/// warm-pool connection is served by [`PoolClient`].) Counts the client in its listener's statistics and ends with its audit record
/// ([`crate::audit`]), whatever happens. `admission` holds the client's places in its
/// gateway's limits (`super::limits`) until it ends.
pub(crate) async fn serve_client(
    ctx: AgentCtx,
    gateway: Gateway,
    arrived: ClientArrived,
    control: mpsc::Sender<Message>,
    admission: super::limits::Admission,
) {
    let handler = Handler::new(ctx, gateway, arrived, control, admission);
    handler.run(None).await
}

/// One announced client, from its offer to the end of its pipe.
struct Handler {
    ctx: AgentCtx,
    /// The configuration when the offer came (a reload meanwhile does not change its course).
    config: Arc<AgentConfig>,
    gateway: Gateway,
    arrived: ClientArrived,
    /// Where the failure report goes ([`Handler::fail`]).
    control: mpsc::Sender<Message>,
    started: Instant,
    _admission: super::limits::Admission,
}

/// A client's listener and backend, once they are known.
struct Route {
    stats: Arc<ListenerStats>,
    /// The configured backend for the client's port, `host:port` (with several, the first:
    /// [`super::backends`] picks the one that serves it).
    target: String,
    /// A UDP flow ([`super::udp`]): its failures are not logged (the audit record and the
    /// gateway's report say them), and its data connection is closed before they are reported.
    flow: bool,
}

/// A data connection that is dialled, or the warm-pool one the client came on.
type DataParts = (Stream, BytesMut);

impl Handler {
    fn new(
        ctx: AgentCtx,
        gateway: Gateway,
        arrived: ClientArrived,
        control: mpsc::Sender<Message>,
        admission: super::limits::Admission,
    ) -> Self {
        Handler {
            started: Instant::now(),
            config: ctx.config(),
            ctx,
            gateway,
            arrived,
            control,
            _admission: admission,
        }
    }

    /// Finds the client's listener and backend, then serves it as the listener says: the
    /// embedded application's, a UDP flow, or a TCP stream. `pooled`: the warm-pool connection
    /// the gateway handed the client on (no dial), with its backend when connected already.
    async fn run(self, pooled: Option<Pooled>) {
        let name = self.arrived.listener.as_str();
        let Some(listener) = self.config.listener(name) else {
            let framed = pooled.as_ref().is_some_and(|p| p.back.is_some());
            let data = pooled.map(|p| p.stream);
            return self
                .unserved(Unserved::UnknownListener { data, framed }, None)
                .await;
        };
        let stats = self.ctx.stats.listener(&listener.name);
        stats.offered();
        // Reuse-framed: the connection's way back to its pool member.
        let (pooled, back, ready) = match pooled {
            Some(p) => (Some((p.stream, p.leftover)), p.back, p.backend),
            None => (None, None, None),
        };
        if listener.backend == Backend::Local {
            // The application owns the stream from here, and its logging. (Pool connections of
            // an agent with an application never negotiate reuse: see `pool::member`.)
            return self.hand_to_application(pooled).await;
        }
        let Some(target) = listener.backend_target(self.arrived.port_offset) else {
            let (data, framed) = (pooled.map(|p| p.0), back.is_some());
            return self
                .unserved(Unserved::NoBackendPort { data, framed }, None)
                .await;
        };
        let flow = matches!(listener.protocol, Protocol::Udp { .. });
        let route = Route {
            stats,
            target,
            flow,
        };
        let served = match listener.protocol {
            Protocol::Udp { idle_timeout } => {
                // A flow is carried unframed; its connection closes after it (protocol.md 7.16).
                drop(back);
                let proxy = listener.proxy_protocol;
                self.serve_flow(&route, proxy, idle_timeout, pooled).await
            }
            _ => {
                self.serve_stream(&route, listener, (pooled, ready), back)
                    .await
            }
        };
        match served {
            Ok(s) => self.record(s.outcome, s.error.as_deref(), Some(&s.backend), s.moved),
            Err(unserved) => self.unserved(unserved, Some(&route)).await,
        }
    }

    /// Dials the data connection and the backend at once (the client's wait is the slower of
    /// the two, not their sum), or the backend first (see the module doc), then pipes them.
    /// `ready`: the backend a pooled client's member connected already ([`PoolClient`]).
    /// Returns the audit outcome, its error and the bytes moved (from the client, to the client).
    async fn serve_stream(
        &self,
        route: &Route,
        listener: &ListenerConfig,
        (pooled, ready): (Option<DataParts>, Option<Connected>),
        back: Option<oneshot::Sender<crate::reuse::Reusable>>,
    ) -> Result<Served, Unserved> {
        let client = self.arrived.client_addr;
        let backend = async {
            match ready {
                Some(connected) => Ok(connected),
                None => Box::pin(self.connect_backend(listener, None)).await,
            }
        };
        let (data, backend) = if pooled.is_none() && !health_checked(listener) {
            // Nothing tells in advance whether its backend takes the client: the backend first,
            // so one that does not is reported (ClientFailed) while the client is unclaimed and
            // the gateway offers it to another agent (protocol.md 7.3).
            match backend.await {
                Ok(b) => (self.data_connection(None).await.map_err(Some), Ok(b)),
                Err(e) => (Err(None), Err(e)),
            }
        } else {
            let (data, backend) = tokio::join!(self.data_connection(pooled), backend);
            (data.map_err(Some), backend)
        };
        // With several backends, the one that accepted (`_on_backend` counts the client on it).
        let (backend, target, _on_backend) = match backend {
            Ok(b) => (b.stream, b.target, b._active),
            Err((backend, error)) => {
                // Closed in order (the client's request may be unread in it): the client sees
                // an orderly close, not a reset.
                let data = data.ok().map(|d| d.0);
                let framed = back.is_some();
                return Err(Unserved::BackendUnreachable {
                    backend,
                    error,
                    data,
                    framed,
                });
            }
        };
        let (data, leftover) = match data {
            Ok(parts) => parts,
            Err(None) => unreachable!("the data connection is skipped only without a backend"),
            Err(Some(error)) => {
                return Err(Unserved::DataFailed {
                    backend: target,
                    error,
                })
            }
        };
        // The audit record comes when the connection ends, with bytes and duration.
        tracing::debug!(
            listener = self.arrived.listener.as_str(), client = %client, backend = %target,
            "client connected in {} ms", self.started.elapsed().as_millis()
        );
        let proxy = listener.proxy_protocol;
        let (outcome, error, moved) = self
            .pipe(&route.stats, proxy, backend, (data, leftover), back)
            .await;
        Ok(Served {
            outcome,
            error,
            backend: target,
            moved,
        })
    }

    /// Connects the client's backend (several: the next healthy one while one refuses), each
    /// try within `connect_timeout`, all of them within `within` when set.
    async fn connect_backend(
        &self,
        listener: &ListenerConfig,
        within: Option<std::time::Duration>,
    ) -> Result<Connected, (String, std::io::Error)> {
        let (timeout, client) = (self.config.connect_timeout, self.arrived.client_addr);
        let (backends, offset) = (&self.ctx.stats.backends, self.arrived.port_offset);
        super::backends::connect(backends, listener, offset, client, timeout, within).await
    }

    /// Pipes the backend and the data connection: the PROXY header and any client bytes that
    /// came with the ack go to the backend in one write, ahead of everything else; a
    /// reuse-framed connection goes back to its pool member when its client ended cleanly.
    async fn pipe(
        &self,
        stats: &Arc<ListenerStats>,
        proxy: ProxyProtocol,
        backend: TcpStream,
        (data, leftover): DataParts,
        back: Option<oneshot::Sender<crate::reuse::Reusable>>,
    ) -> (&'static str, Option<String>, (u64, u64)) {
        let (client, gateway_addr) = (self.arrived.client_addr, self.arrived.gateway_addr);
        let header = proxy_header::header(proxy, client, gateway_addr);
        let counters = Arc::new(PipeCounters::default());
        let serving = stats.serving(counters.clone(), header.len() as u64);
        // The agent does not pace its side: rates are the gateway's (docs/security.md).
        let unthrottled = crate::ratelimit::PipeThrottle::default();
        let pipe = async {
            let Some(back) = back else {
                let mut first = header.clone();
                first.extend_from_slice(&leftover);
                return pipe_tcp(backend, b"", data, &first, &counters).await;
            };
            // Boxed on its own, as on the gateway (the framed pump is the larger one).
            let piped = Box::pin(crate::reuse::pipe_framed(
                backend,
                b"",
                data,
                leftover,
                &header,
                false,
                &counters,
                &unthrottled,
            ));
            piped.await.map(|reusable| give_back(reusable, back))
        };
        let end = tracked(serving, &counters, pipe).await;
        // a = backend, b = the data connection (the client's side).
        let moved = (
            end.bytes.a_written.saturating_sub(header.len() as u64),
            end.bytes.b_written,
        );
        match end.result {
            Ok(()) => ("closed", None, moved),
            Err(e) => ("error", Some(e.to_string()), moved),
        }
    }

    /// Serves one UDP flow ([`super::udp`]): the backend socket and the data connection at
    /// once, then the relay until the flow ends.
    async fn serve_flow(
        &self,
        route: &Route,
        proxy: ProxyProtocol,
        idle_timeout: std::time::Duration,
        pooled: Option<DataParts>,
    ) -> Result<Served, Unserved> {
        let (data, backend) = tokio::join!(
            self.data_connection(pooled),
            super::udp::connect_backend(&route.target),
        );
        let backend = match backend {
            Ok(b) => b,
            Err(error) => {
                // A flow's connection is never framed (protocol.md 7.16).
                let data = data.ok().map(|d| d.0);
                return Err(Unserved::BackendUnreachable {
                    backend: route.target.clone(),
                    error,
                    data,
                    framed: false,
                });
            }
        };
        let (data, leftover) = data.map_err(|error| Unserved::DataFailed {
            backend: route.target.clone(),
            error,
        })?;
        let (client, gateway_addr) = (self.arrived.client_addr, self.arrived.gateway_addr);
        let header = proxy_header::header_dgram(proxy, client, gateway_addr);
        let counters = Arc::new(PipeCounters::default());
        // `a_written` counts payload only: no header to take off.
        let serving = route.stats.serving(counters.clone(), 0);
        let relay = super::udp::relay(data, leftover, backend, header, idle_timeout, &counters);
        let end = tracked(serving, &counters, relay).await;
        let moved = (end.bytes.a_written, end.bytes.a_read);
        let outcome = match end.result {
            Ok(super::udp::FlowEnd::Idle) => "idle",
            Ok(super::udp::FlowEnd::Closed) => "closed",
            Err(e) => {
                tracing::debug!(client = %client, "flow ended: {e}");
                "error"
            }
        };
        let backend = route.target.clone();
        Ok(Served {
            outcome,
            error: None,
            backend,
            moved,
        })
    }

    /// For the embedded listener: the data connection itself is the application's stream.
    async fn hand_to_application(&self, pooled: Option<DataParts>) {
        let Some(local) = &self.ctx.local else {
            return self.fail("no application accepts this listener's clients".into());
        };
        let data = self.data_connection(pooled).await;
        if let Err(why) = super::embedded::hand_over(&self.ctx, local, &self.arrived, data).await {
            self.fail(why);
        }
    }

    /// The warm-pool connection the client came on, or a new data connection.
    async fn data_connection(&self, pooled: Option<DataParts>) -> Result<DataParts, DialError> {
        match pooled {
            Some(p) => Ok(p),
            // Boxed: a dial (TCP, TLS handshake, hello) is the largest state of a client's
            // task, and inline it would stay in the task for the whole pipe.
            None => {
                Box::pin(open_data_connection(
                    &self.config,
                    &self.gateway,
                    &self.arrived,
                ))
                .await
            }
        }
    }
}

/// How a served client ended, for its audit record.
struct Served {
    outcome: &'static str,
    /// The pipe's error (a TCP client's; a flow's end is its outcome).
    error: Option<String>,
    /// The backend that served it.
    backend: String,
    /// Bytes moved: from the client, to the client.
    moved: (u64, u64),
}

/// Whether the listener's backends are health-checked (`health`): then a client whose
/// backends are all down is refused before anything is dialled (`super::backends`).
fn health_checked(listener: &ListenerConfig) -> bool {
    listener.group.as_ref().is_some_and(|g| g.health.is_some())
}
