//! Serving one announced client: dial the gateway's control port as a data connection and the
//! backend at the same time, then pipe the two.
//!
//! A reuse-framed warm-pool connection ([`crate::reuse`]) is piped with the framing and, when
//! its client ended cleanly both ways, handed back to its pool member ([`Pooled::back`]); a
//! client whose backend is unreachable ends it with `04` and `02` (last, end of stream), so the
//! gateway closes its client in order and neither side keeps the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::dial::{dial, DialError, Target};
use super::embedded::{Accepted, GatewayStream};
use super::{proxy_header, AgentCtx};
use crate::audit::{ConnectionEnd, Daemon};
use crate::config::{AgentConfig, Backend, Protocol, ProxyProtocol};
use crate::net;
use crate::pipe::{pipe_tcp, PipeCounters};
use crate::protocol::{ClientArrived, ClientFailed, DataHello, ErrorCode, Message, Role, Token};
use crate::transport::Stream;

/// The gateway that announced a client, where its data connection goes.
#[derive(Clone)]
pub(crate) struct Gateway {
    /// As configured (`host:port`): the TLS name.
    pub name: String,
    /// The address the control channel reached: data goes to the same gateway instance.
    pub addr: SocketAddr,
    pub tls: bool,
    /// The secret the gateway gave this control session (protocol v2): pool connections prove
    /// they belong to the session with it.
    pub session: Option<Token>,
    /// This gateway's share of the agent: offers are admitted against it.
    pub limits: Arc<super::limits::GatewayLimits>,
}

/// A warm-pool connection the gateway already handed a client.
pub(crate) struct Pooled {
    pub stream: Stream,
    /// Bytes read past the `PoolAssign`.
    pub leftover: BytesMut,
    /// Reuse-framed: where the connection goes back when its client ended cleanly both ways.
    pub back: Option<oneshot::Sender<crate::reuse::Reusable>>,
}

/// Serves one client announced by `gateway`. Reports failures on the control channel through
/// `control` when it is still there; never depends on it otherwise.
/// `pooled` is a warm-pool data connection the gateway already handed this client (no dial).
/// Counts the client in its listener's statistics and ends with its audit record
/// ([`crate::audit`]), whatever happens. `_admission` holds the client's places in its
/// gateway's limits (`super::limits`) until it ends.
pub(crate) async fn serve_client(
    ctx: AgentCtx,
    gateway: Gateway,
    arrived: ClientArrived,
    control: mpsc::Sender<Message>,
    pooled: Option<Pooled>,
    _admission: super::limits::Admission,
) {
    let started = Instant::now();
    let config = ctx.config();
    let client = arrived.client_addr;
    let listener_name = arrived.listener.as_str();
    let fail = |reason: String| {
        let _ = control.try_send(Message::ClientFailed(ClientFailed {
            id: arrived.id,
            reason,
        }));
    };
    let record = |outcome, error: Option<&str>, backend: Option<&str>, bytes: (u64, u64)| {
        ConnectionEnd {
            conn: arrived.id,
            site: &config.site,
            listener: listener_name,
            client,
            gateway: arrived.gateway_addr,
            agent: Some(&config.name),
            agent_addr: None,
            backend,
            bytes_from_client: bytes.0,
            bytes_to_client: bytes.1,
            duration: started.elapsed(),
            outcome,
            error,
        }
        .log(Daemon::Agent)
    };
    let Some(listener) = config.listener(listener_name) else {
        // Not counted: statistics exist only for configured listeners, whatever a gateway names.
        tracing::warn!(listener = listener_name, client = %client, "offer for an unknown listener");
        let why = format!("agent has no listener \"{listener_name}\"");
        record("refused", Some(&why), None, (0, 0));
        fail(why);
        let framed = pooled.as_ref().is_some_and(|p| p.back.is_some());
        return decline(pooled.map(|p| p.stream), framed).await;
    };
    let stats = ctx.stats.listener(&listener.name);
    stats.offered();
    // Reuse-framed: the connection's way back to its pool member.
    let (pooled, back) = match pooled {
        Some(p) => (Some((p.stream, p.leftover)), p.back),
        None => (None, None),
    };
    if listener.backend == Backend::Local {
        // The application owns the stream from here, and its logging. (Pool connections of an
        // agent with an application never negotiate reuse: see `pool::member`.)
        return hand_to_application(&ctx, &config, &gateway, &arrived, control, pooled).await;
    }
    let Some(target) = listener.backend_target(arrived.port_offset) else {
        let why = format!("no backend port for offset {}", arrived.port_offset);
        record("refused", Some(&why), None, (0, 0));
        fail(why);
        return decline(pooled.map(|p| p.0), back.is_some()).await;
    };
    if let Protocol::Udp { idle_timeout } = listener.protocol {
        // A flow is carried unframed; its connection closes after it (protocol.md 7.16).
        drop(back);
        let flow = Flow {
            config: &config,
            gateway: &gateway,
            arrived: &arrived,
            target: &target,
            proxy: listener.proxy_protocol,
            idle_timeout,
            stats: &stats,
        };
        return match serve_flow(flow, pooled).await {
            Ok((outcome, moved)) => record(outcome, None, Some(&target), moved),
            Err(Unserved { outcome, why }) => {
                record(outcome, Some(&why), Some(&target), (0, 0));
                fail(why)
            }
        };
    }

    // Both dials at once: the client's wait is the slower of the two, not their sum.
    let (data, backend) = tokio::join!(
        async {
            match pooled {
                Some(p) => Ok(p),
                None => open_data_connection(&config, &gateway, &arrived).await,
            }
        },
        super::backends::connect(
            &ctx.stats.backends,
            listener,
            arrived.port_offset,
            client,
            config.connect_timeout
        ),
    );
    // With several backends, the one that accepted (`_on_backend` counts the client on it).
    let (backend, target, _on_backend) = match backend {
        Ok(b) => (b.stream, b.target, b._active),
        Err((target, e)) => {
            tracing::warn!(
                listener = listener_name, client = %client,
                "backend {target} unreachable: {e}; closing the client"
            );
            let why = format!("backend {target} unreachable: {e}");
            stats.backend_failed(&why);
            record("backend_unreachable", Some(&why), Some(&target), (0, 0));
            // The gateway closes the client on this report, or when the data connection (if any)
            // closes without a byte.
            fail(why);
            // Close the data connection cleanly (the client's request may be unread in it),
            // so the client sees an orderly close, not a reset.
            return decline(data.ok().map(|d| d.0), back.is_some()).await;
        }
    };
    let (data, leftover) = match data {
        Ok(d) => d,
        Err(DialError::Refused(e)) if e.code == ErrorCode::UNKNOWN_CLIENT => {
            // Claimed by another agent it was offered to as well (this one was slow), or gone:
            // the gateway knows the client's fate; a failure report would only add noise.
            tracing::info!(
                listener = listener_name, client = %client, id = arrived.id,
                "client already taken by another agent or gone; not serving it"
            );
            return;
        }
        Err(e) => {
            // Rate-limited: a gateway that answers every data hello with garbage gets a few
            // lines and a tally, not one line per offer.
            let hit = gateway.limits.data_failures.hit();
            if hit.log {
                tracing::warn!(
                    listener = listener_name, client = %client, gateway = %gateway.name,
                    "data connection failed: {e}{}", hit.tally()
                );
            }
            let why = format!("agent's data connection failed: {e}");
            stats.data_failed(&why);
            record("data_failed", Some(&why), Some(&target), (0, 0));
            // Without this the client would wait for its deadline.
            return fail(why);
        }
    };
    // The audit record comes when the connection ends, with bytes and duration.
    tracing::debug!(
        listener = listener_name, client = %client, backend = %target,
        "client connected in {} ms", started.elapsed().as_millis()
    );

    // The PROXY header and any client bytes that came with the ack go to the backend in one
    // write, ahead of everything else.
    let header = proxy_header::header(listener.proxy_protocol, client, arrived.gateway_addr);
    let mut first = header.clone();
    first.extend_from_slice(&leftover);
    let counters = Arc::new(PipeCounters::default());
    let serving = stats.serving(counters.clone(), header.len() as u64);
    // The agent does not pace its side: rates are the gateway's (docs/security.md).
    let unthrottled = crate::ratelimit::PipeThrottle::default();
    let result = match back {
        None => pipe_tcp(backend, b"", data, &first, &counters).await,
        Some(back) => {
            let piped = crate::reuse::pipe_framed(
                backend,
                b"",
                data,
                leftover,
                &header,
                false,
                &counters,
                &unthrottled,
            );
            piped.await.map(|reusable| give_back(reusable, back))
        }
    };
    drop(serving);
    // a = backend, b = the data connection (the client's side).
    let bytes = counters.snapshot();
    let moved = (
        bytes.a_written.saturating_sub(header.len() as u64),
        bytes.b_written,
    );
    match result {
        Ok(()) => record("closed", None, Some(&target), moved),
        Err(e) => record("error", Some(&e.to_string()), Some(&target), moved),
    }
}

/// What serving one UDP flow needs to know.
struct Flow<'a> {
    config: &'a AgentConfig,
    gateway: &'a Gateway,
    arrived: &'a ClientArrived,
    target: &'a str,
    proxy: ProxyProtocol,
    idle_timeout: std::time::Duration,
    stats: &'a Arc<super::stats::ListenerStats>,
}

/// Why a flow was not served: its audit outcome and the reason for the gateway.
struct Unserved {
    outcome: &'static str,
    why: String,
}

/// Serves one UDP flow ([`super::udp`]): the backend socket and the data connection at once,
/// then the relay until the flow ends. Returns the audit outcome and the payload bytes moved
/// (from the client, to the client).
async fn serve_flow(
    flow: Flow<'_>,
    pooled: Option<(Stream, BytesMut)>,
) -> Result<(&'static str, (u64, u64)), Unserved> {
    let (data, backend) = tokio::join!(
        async {
            match pooled {
                Some(p) => Ok(p),
                None => open_data_connection(flow.config, flow.gateway, flow.arrived).await,
            }
        },
        super::udp::connect_backend(flow.target),
    );
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            let why = format!("backend {} unreachable: {e}", flow.target);
            flow.stats.backend_failed(&why);
            // A flow's connection is never framed (protocol.md 7.16).
            decline(data.ok().map(|d| d.0), false).await;
            return Err(Unserved {
                outcome: "backend_unreachable",
                why,
            });
        }
    };
    let (data, leftover) = data.map_err(|e| {
        let why = format!("agent's data connection failed: {e}");
        flow.stats.data_failed(&why);
        Unserved {
            outcome: "data_failed",
            why,
        }
    })?;
    let (client, gateway_addr) = (flow.arrived.client_addr, flow.arrived.gateway_addr);
    let header = proxy_header::header_dgram(flow.proxy, client, gateway_addr);
    let counters = Arc::new(PipeCounters::default());
    // `a_written` counts payload only: no header to take off.
    let serving = flow.stats.serving(counters.clone(), 0);
    let ended = super::udp::relay(
        data,
        leftover,
        backend,
        header,
        flow.idle_timeout,
        &counters,
    )
    .await;
    drop(serving);
    let bytes = counters.snapshot();
    let moved = (bytes.a_written, bytes.a_read);
    match ended {
        Ok(super::udp::FlowEnd::Idle) => Ok(("idle", moved)),
        Ok(super::udp::FlowEnd::Closed) => Ok(("closed", moved)),
        Err(e) => {
            tracing::debug!(client = %client, "flow ended: {e}");
            Ok(("error", moved))
        }
    }
}

/// Ends a data connection whose client this agent does not serve (no such listener now, no
/// backend port, the backend unreachable) in order, so the gateway closes its client with an
/// end of stream, not a reset: a reuse-framed one says `04` (last) and `02` (end of stream)
/// first, and neither side keeps it. The report goes on the control channel.
async fn decline(data: Option<Stream>, framed: bool) {
    let Some(mut data) = data else {
        return;
    };
    if framed {
        let _ = data
            .write_all(&[crate::reuse::LAST, crate::reuse::END])
            .await;
    }
    net::close_gently(&mut data, std::time::Duration::from_secs(1)).await;
}

/// Hands a connection that may serve another client back to its pool member; closes it when
/// the member is gone (the agent is stopping).
fn give_back(
    reusable: Option<crate::reuse::Reusable>,
    back: oneshot::Sender<crate::reuse::Reusable>,
) {
    if let Some(reusable) = reusable {
        if let Err((mut stream, _)) = back.send(reusable) {
            stream.try_close_notify();
        }
    }
}

/// For the embedded listener: the data connection itself is the application's stream.
async fn hand_to_application(
    ctx: &AgentCtx,
    config: &AgentConfig,
    gateway: &Gateway,
    arrived: &ClientArrived,
    control: mpsc::Sender<Message>,
    pooled: Option<(Stream, BytesMut)>,
) {
    let fail = |reason: String| {
        let _ = control.try_send(Message::ClientFailed(ClientFailed {
            id: arrived.id,
            reason,
        }));
    };
    let Some(local) = &ctx.local else {
        return fail("no application accepts this listener's clients".into());
    };
    let data = match pooled {
        Some(p) => Ok(p),
        None => open_data_connection(config, gateway, arrived).await,
    };
    match data {
        Ok((stream, leftover)) => {
            ctx.stats.listener(&arrived.listener).served_locally();
            let accepted = Accepted {
                stream: GatewayStream::new(stream, leftover, arrived.client_addr),
                client_addr: arrived.client_addr,
                gateway_addr: arrived.gateway_addr,
            };
            if local.send(accepted).await.is_err() {
                tracing::debug!(client = %arrived.client_addr, "the application stopped accepting");
            }
        }
        Err(DialError::Refused(e)) if e.code == ErrorCode::UNKNOWN_CLIENT => {
            tracing::info!(client = %arrived.client_addr, id = arrived.id, "client already taken by another agent or gone; not serving it");
        }
        Err(e) => {
            tracing::warn!(client = %arrived.client_addr, "data connection failed: {e}");
            let why = format!("agent's data connection failed: {e}");
            ctx.stats.listener(&arrived.listener).data_failed(&why);
            fail(why);
        }
    }
}

/// Dials the gateway, claims the client with its id and token, and waits for the ack. Returns
/// the stream and any client bytes that arrived with the ack.
async fn open_data_connection(
    config: &AgentConfig,
    gateway: &Gateway,
    arrived: &ClientArrived,
) -> Result<(Stream, BytesMut), DialError> {
    let role = Role::Data(DataHello {
        id: arrived.id,
        token: arrived.token,
    });
    let target = Target {
        gateway: &gateway.name,
        resolved: Some(gateway.addr),
    };
    let (conn, _ack) = dial(config, target, role, gateway.tls).await?;
    Ok(conn.into_parts())
}
