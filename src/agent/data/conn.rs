//! A data connection on the agent: where it goes ([`Gateway`]), the warm-pool one a client
//! came on ([`Pooled`]); its two ends: opened (dialled to the gateway that announced
//! the client, claiming it with its id and token), and closed in order when its client is not
//! served, or handed back to its pool member when it may serve another client.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::agent::dial::{dial, DialError, Target};
use crate::config::AgentConfig;
use crate::net;
use crate::protocol::{ClientArrived, DataHello, Role, Token};
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
    pub limits: Arc<crate::agent::limits::GatewayLimits>,
}

/// A warm-pool connection the gateway already handed a client.
pub(crate) struct Pooled {
    pub stream: Stream,
    /// Bytes read past the `PoolAssign`.
    pub leftover: BytesMut,
    /// Reuse-framed: where the connection goes back when its client ended cleanly both ways.
    pub back: Option<oneshot::Sender<crate::reuse::Reusable>>,
    /// The client's backend, connected before the agent answered the gateway
    /// ([`super::PoolClient`]); `None` where nothing was connected first (the embedded
    /// application, a UDP flow, a listener or port this agent does not have).
    pub backend: Option<crate::agent::backends::Connected>,
}

/// Ends a data connection whose client this agent does not serve (no such listener now, no
/// backend port, the backend unreachable) in order, so the gateway closes its client with an
/// end of stream, not a reset: a reuse-framed one says `04` (last) and `02` (end of stream)
/// first, and neither side keeps it. The report goes on the control channel.
pub(super) async fn decline(data: Option<Stream>, framed: bool) {
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
pub(super) fn give_back(
    reusable: Option<crate::reuse::Reusable>,
    back: oneshot::Sender<crate::reuse::Reusable>,
) {
    if let Some(reusable) = reusable {
        if let Err((mut stream, _)) = back.send(reusable) {
            stream.try_close_notify();
        }
    }
}

/// Dials the gateway, claims the client with its id and token, and waits for the ack. Returns
/// the stream and any client bytes that arrived with the ack.
pub(super) async fn open_data_connection(
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
