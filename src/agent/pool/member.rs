//! One warm-pool member: dial a data connection, wait idle for the gateway to assign it a
//! client (`PoolAssign`), accept, and hand the client to the data handler; the maintainer in
//! [`super`] decides how many members there are.

use super::*;

pub(super) async fn member(
    ctx: AgentCtx,
    gateway: Gateway,
    control: mpsc::Sender<Message>,
    quit: CancellationToken,
    shared: Members,
) -> Left {
    let (mut conn, version) = match dial_member(&ctx, &gateway, &quit).await {
        Ok(dialed) => dialed,
        Err(left) => return left,
    };
    let reuse = crate::reuse::negotiated(version, conn.get_ref());
    loop {
        let assign = match wait_for_client(&ctx, &gateway, &mut conn, &quit, &shared.shed).await {
            Ok(assign) => assign,
            Err(left) => return left,
        };
        let client =
            match accept_assignment(&ctx, &gateway, &mut conn, version, assign, &control).await {
                Ok(client) => client,
                Err(left) => return left,
            };
        // Counted once accepted: a declined client comes back announced (a miss) or goes to
        // another agent, and must not count twice.
        shared.demand.arrived(true);
        let serving = Serving::start(&shared.busy);
        let (stream, leftover) = conn.into_parts();
        let (tx, rx) = oneshot::channel();
        let served = client.serve(stream, leftover, reuse.then_some(tx));
        // A task of the agent, not of this member: it carries on when the pool stops.
        ctx.tasks.spawn(served);
        if !reuse {
            return Left::Assigned;
        }
        let back = tokio::select! {
            back = rx => back,
            _ = quit.cancelled() => return Left::Assigned,
        };
        drop(serving);
        match back {
            Ok((stream, leftover)) => {
                conn = Connection::with_prefix(stream, ctx.config().max_frame, &leftover);
            }
            // Not reusable: ended uncleanly, or the last client of this connection.
            Err(_) => return Left::Assigned,
        }
    }
}

/// Opens one pool connection: the connection and the protocol version it negotiated.
async fn dial_member(
    ctx: &AgentCtx,
    gateway: &Gateway,
    quit: &CancellationToken,
) -> Result<(Connection<Stream>, u16), Left> {
    let config = ctx.config();
    let hello = PoolHello {
        site: config.site.clone(),
        agent: config.name.clone(),
    };
    // v2 proves the connection with the session's secret (required in plaintext); a v1 gateway
    // gets the v1 hello.
    let role = match gateway.session {
        Some(secret) => Role::SessionPool(hello, secret),
        None => Role::Pool(hello),
    };
    let target = Target {
        gateway: &gateway.name,
        resolved: Some(gateway.addr),
    };
    // An application takes its clients' data connections as they are: no reuse framing.
    let max_version = match ctx.local {
        Some(_) => protocol::max_version().min(Feature::DataReuse.since() - 1),
        None => protocol::max_version(),
    };
    let dialed = tokio::select! {
        _ = quit.cancelled() => return Err(Left::Closed),
        dialed = dial_up_to(&config, target, role, gateway.tls, max_version) => dialed,
    };
    match dialed {
        Ok((conn, ack)) => Ok((conn, ack.version)),
        // A full pool is refused before the ack (SPRT + LIMIT); older gateways send LIMIT after
        // it (below). Either way: back off, do not redial every second.
        Err(crate::agent::dial::DialError::Refused(e)) if e.code == ErrorCode::LIMIT => {
            Err(Left::Full)
        }
        Err(e) => {
            tracing::debug!(gateway = %gateway.name, "pool connection failed: {e}");
            Err(Left::Failed)
        }
    }
}

/// Admits an assigned client like an announced one, connects its backend
/// ([`PoolClient::prepare`]) and answers `PoolAccepted` (v2). A client this agent cannot admit,
/// or whose backend does not take it, is declined with an orderly close (TLS close_notify, FIN;
/// then what the gateway still sends is drained, so no reset overtakes them): the gateway
/// offers it to another agent without taking this one for hung (`pool_declined`). A member
/// that could not admit pauses before it is replaced; one whose client's backend failed is
/// replaced at once.
async fn accept_assignment(
    ctx: &AgentCtx,
    gateway: &Gateway,
    conn: &mut Connection<Stream>,
    version: u16,
    assign: PoolAssign,
    control: &mpsc::Sender<Message>,
) -> Result<PoolClient, Left> {
    let config = ctx.config();
    let admitted = gateway
        .limits
        .admit(&config, &ctx.stats, &assign.listener, assign.port_offset);
    let Ok(admission) = admitted else {
        crate::net::close_gently(conn.get_mut(), CLOSE_LIMIT).await;
        return Err(Left::Failed);
    };
    let (id, client_addr) = (assign.id, assign.client_addr);
    let (ctx, gateway2, control) = (ctx.clone(), gateway.clone(), control.clone());
    let prepared = PoolClient::prepare(ctx, gateway2, arrived(assign), control, admission).await;
    let Some(client) = prepared else {
        crate::net::close_gently(conn.get_mut(), CLOSE_LIMIT).await;
        return Err(Left::Declined);
    };
    if Feature::PoolAccepted.on(version) {
        // Before anything else: the gateway offers the client elsewhere without this answer.
        // If it already gave up, the connection is reset and the write fails: drop the client.
        let answer = Message::PoolAccepted(PoolAccepted { id });
        if let Err(e) = conn.write_message(&answer).await {
            tracing::info!(
                gateway = %gateway.name, client = %client_addr, id,
                "pooled client dropped: the gateway gave up on this connection before it was answered ({e})"
            );
            return Err(Left::Closed);
        }
    }
    Ok(client)
}

/// Waits, idle, for the gateway to hand this member a client; how it left otherwise.
async fn wait_for_client(
    ctx: &AgentCtx,
    gateway: &Gateway,
    conn: &mut Connection<Stream>,
    quit: &CancellationToken,
    shed: &Shed,
) -> Result<PoolAssign, Left> {
    // Counted as idle (in the admin API) until the gateway hands it a client or it closes,
    // however that happens.
    let _idle = Idle::start(ctx, &gateway.name);
    // Only a member idle for a whole window is surplus: one that came back a moment ago
    // (reuse) is what steady traffic needs next, and closing it would cost a handshake soon.
    let old_enough = Instant::now() + ctx.config().pool.window;
    let first = loop {
        // Registered before the ticket check, so a post between the two is not missed.
        let posted = shed.posted.notified();
        if Instant::now() >= old_enough && shed.take() {
            // One too many for the target: an orderly close (TLS close_notify, then FIN). The
            // gateway drops it from its pool at its next tick, or, if it was handing it a client
            // at this moment, offers the client to the next one (protocol.md 7.11).
            let _ = conn.get_mut().shutdown().await;
            return Err(Left::Shed);
        }
        tokio::select! {
            _ = quit.cancelled() => {
                // An orderly close: TLS close_notify, then FIN.
                let _ = conn.get_mut().shutdown().await;
                return Err(Left::Closed);
            }
            () = posted => continue,
            () = tokio::time::sleep_until(old_enough), if Instant::now() < old_enough => continue,
            first = conn.read_message() => break first,
        }
    };
    match first {
        Ok(Some(Message::PoolAssign(a))) => Ok(a),
        Ok(Some(Message::Error(e))) if e.code == ErrorCode::LIMIT => Err(Left::Full),
        Ok(Some(Message::Error(e))) => {
            tracing::debug!(gateway = %gateway.name, "pool connection refused: {e}");
            Err(Left::Failed)
        }
        Ok(None) => Err(Left::Closed),
        Ok(Some(other)) => {
            tracing::warn!(gateway = %gateway.name, "unexpected {} on a pool connection", other.name());
            Err(Left::Failed)
        }
        Err(e) => {
            tracing::debug!(gateway = %gateway.name, "pool connection lost: {e}");
            Err(Left::Closed)
        }
    }
}

/// The client of an assignment, as an announcement would have named it.
fn arrived(assign: PoolAssign) -> ClientArrived {
    ClientArrived {
        id: assign.id,
        // Not used: the connection is already the client's.
        token: Token::from_bytes([0; 16]),
        listener: assign.listener,
        port_offset: assign.port_offset,
        client_addr: assign.client_addr,
        gateway_addr: assign.gateway_addr,
    }
}
