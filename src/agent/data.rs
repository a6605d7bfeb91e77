//! Serving one announced client: dial the gateway's control port as a data connection and the
//! backend at the same time, then pipe the two.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use tokio::sync::mpsc;

use super::dial::{dial, DialError, Target};
use super::embedded::{Accepted, GatewayStream};
use super::{proxy_header, AgentCtx};
use crate::config::{AgentConfig, Backend, Impersonation};
use crate::net;
use crate::pipe::{pipe_tcp, PipeCounters};
use crate::protocol::{ClientArrived, ClientFailed, DataHello, Message, Role};
use crate::transport::Stream;

/// The gateway that announced a client, where its data connection goes.
pub(crate) struct Gateway {
    /// As configured (`host:port`): the TLS name.
    pub name: String,
    /// The address the control channel reached: data goes to the same gateway instance.
    pub addr: SocketAddr,
    pub tls: bool,
}

/// Serves one client announced by `gateway`. Reports failures on the control channel through
/// `control` when it is still there; never depends on it otherwise.
/// `pooled` is a warm-pool data connection the gateway already handed this client (no dial).
pub(crate) async fn serve_client(
    ctx: AgentCtx,
    gateway: Gateway,
    arrived: ClientArrived,
    control: mpsc::Sender<Message>,
    pooled: Option<(Stream, BytesMut)>,
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
    let Some(listener) = config.listener(listener_name) else {
        tracing::warn!(listener = listener_name, client = %client, "offer for an unknown listener");
        return fail(format!("agent has no listener \"{listener_name}\""));
    };
    if listener.backend == Backend::Local {
        return hand_to_application(&ctx, &config, &gateway, &arrived, control, pooled).await;
    }
    let Some(target) = listener.backend_target(arrived.port_offset) else {
        return fail(format!(
            "no backend port for offset {}",
            arrived.port_offset
        ));
    };

    // Both dials at once: the client's wait is the slower of the two, not their sum.
    let (data, backend) = tokio::join!(
        async {
            match pooled {
                Some(p) => Ok(p),
                None => open_data_connection(&config, &gateway, &arrived).await,
            }
        },
        connect_backend(
            listener.impersonation,
            client,
            &target,
            config.connect_timeout
        ),
    );
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(
                listener = listener_name, client = %client,
                "backend {target} unreachable: {e}; closing the client"
            );
            // The gateway closes the client on this report, or when the data connection (if any)
            // closes without a byte.
            fail(format!("backend {target} unreachable: {e}"));
            // Close the data connection cleanly (the client's request may be unread in it),
            // so the client sees an orderly close, not a reset.
            if let Ok((mut data, _)) = data {
                net::close_gently(&mut data, std::time::Duration::from_secs(1)).await;
            }
            return;
        }
    };
    let (data, leftover) = match data {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(
                listener = listener_name, client = %client, gateway = %gateway.name,
                "data connection failed: {e}"
            );
            // Without this the client would wait for its deadline.
            return fail(format!("agent's data connection failed: {e}"));
        }
    };
    // The info line comes when the connection ends, with bytes and duration.
    tracing::debug!(
        listener = listener_name, client = %client, backend = %target,
        "client connected in {} ms", started.elapsed().as_millis()
    );

    // The PROXY header and any client bytes that came with the ack go to the backend in one
    // write, ahead of everything else.
    let header = proxy_header::header(listener.proxy_protocol, client, arrived.gateway_addr);
    let mut first = header.clone();
    first.extend_from_slice(&leftover);
    let counters = PipeCounters::default();
    let result = pipe_tcp(backend, b"", data, &first, &counters).await;
    // a = backend, b = the data connection (the client's side).
    let bytes = counters.snapshot();
    let (to_client, from_client) = (
        bytes.b_written,
        bytes.a_written.saturating_sub(header.len() as u64),
    );
    let how = match result {
        Ok(()) => "closed".to_string(),
        Err(e) => format!("ended by error ({e})"),
    };
    tracing::info!(
        listener = listener_name, client = %client, backend = %target,
        from_client, to_client,
        "connection {how} after {:.1} s", started.elapsed().as_secs_f64()
    );
}

/// Connects to the backend, from the client's own address in transparent mode.
async fn connect_backend(
    mode: Impersonation,
    client: SocketAddr,
    target: &str,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    match mode {
        Impersonation::None => net::connect(target, timeout).await,
        Impersonation::Transparent => net::connect_transparent(client, target, timeout).await,
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
            let accepted = Accepted {
                stream: GatewayStream::new(stream, leftover, arrived.client_addr),
                client_addr: arrived.client_addr,
                gateway_addr: arrived.gateway_addr,
            };
            if local.send(accepted).await.is_err() {
                tracing::debug!(client = %arrived.client_addr, "the application stopped accepting");
            }
        }
        Err(e) => {
            tracing::warn!(client = %arrived.client_addr, "data connection failed: {e}");
            fail(format!("agent's data connection failed: {e}"));
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
