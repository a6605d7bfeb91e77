//! The warm pool, agent side: keep `pool` idle data connections open to a gateway so a new
//! client is spliced without a notification round trip (see `gateway::pool`).
//!
//! One maintainer per control session. Each member dials with the `Pool` role and waits; when
//! the gateway hands it a client (`PoolAssign`), the member is served like an announced client
//! (backend, PROXY header, pipe) as an agent task of its own, and the maintainer opens a
//! replacement at once. A member the gateway closes (it recycles idle ones after a minute) is
//! replaced too; a member that cannot connect is replaced after a pause, so a gateway that
//! refuses pool connections is not hammered. Stopping the maintainer (the control session
//! ended) closes the idle members; assigned ones carry on.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::data::{self, Gateway};
use super::dial::{dial, Target};
use super::AgentCtx;
use crate::protocol::{ClientArrived, Message, PoolHello, Role, Token};

/// How a member left the idle state.
enum Left {
    Assigned,
    Closed,
    Failed,
}

/// Pause after a member could not connect, before the next try.
const RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn maintain(
    ctx: AgentCtx,
    gateway: Gateway,
    control: mpsc::Sender<Message>,
    stop: CancellationToken,
) {
    let mut members: JoinSet<Left> = JoinSet::new();
    loop {
        let wanted = ctx.config().pool;
        while members.len() < wanted {
            members.spawn(member(
                ctx.clone(),
                clone_gateway(&gateway),
                control.clone(),
            ));
        }
        tokio::select! {
            _ = stop.cancelled() => return, // dropping the set closes the idle members
            _ = ctx.shutdown.cancelled() => return,
            left = members.join_next(), if !members.is_empty() => {
                if let Some(Ok(Left::Failed)) = left {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
            // A reload may raise `pool` while no member changes state.
            _ = tokio::time::sleep(Duration::from_secs(5)), if members.len() >= wanted => {}
        }
    }
}

fn clone_gateway(g: &Gateway) -> Gateway {
    Gateway {
        name: g.name.clone(),
        addr: g.addr,
        tls: g.tls,
    }
}

async fn member(ctx: AgentCtx, gateway: Gateway, control: mpsc::Sender<Message>) -> Left {
    let config = ctx.config();
    let role = Role::Pool(PoolHello {
        site: config.site.clone(),
        agent: config.name.clone(),
    });
    let target = Target {
        gateway: &gateway.name,
        resolved: Some(gateway.addr),
    };
    let mut conn = match dial(&config, target, role, gateway.tls).await {
        Ok((conn, _ack)) => conn,
        Err(e) => {
            tracing::debug!(gateway = %gateway.name, "pool connection failed: {e}");
            return Left::Failed;
        }
    };
    let assign = match conn.read_message().await {
        Ok(Some(Message::PoolAssign(a))) => a,
        Ok(Some(Message::Error(e))) => {
            tracing::debug!(gateway = %gateway.name, "pool connection refused: {e}");
            return Left::Failed;
        }
        Ok(None) => return Left::Closed,
        Ok(Some(other)) => {
            tracing::warn!(gateway = %gateway.name, "unexpected {} on a pool connection", other.name());
            return Left::Failed;
        }
        Err(e) => {
            tracing::debug!(gateway = %gateway.name, "pool connection lost: {e}");
            return Left::Closed;
        }
    };
    let arrived = ClientArrived {
        id: assign.id,
        // Not used: the connection is already the client's.
        token: Token::from_bytes([0; 16]),
        listener: assign.listener,
        port_offset: assign.port_offset,
        client_addr: assign.client_addr,
        gateway_addr: assign.gateway_addr,
    };
    let pooled = conn.into_parts();
    ctx.tasks.spawn(data::serve_client(
        ctx.clone(),
        gateway,
        arrived,
        control,
        Some(pooled),
    ));
    Left::Assigned
}
