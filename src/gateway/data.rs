//! Data connections: a connection whose hello claims one pending client with its id and token.
//!
//! Rules:
//! - The claim is acknowledged, then the connection is handed to that client's task, which
//!   pipes it: nothing here pipes, and a data connection never depends on a control session.
//! - A failed claim is answered with the same words whatever the cause ([`UNKNOWN_CLIENT_TEXT`]),
//!   so a peer learns nothing about which ids wait; only a claim with the right token for a
//!   site the certificate does not serve is told why (WRONG_SITE).
//! - A late claim (the client just left) or the loser of a client offered to two agents is not
//!   an attack: logged at debug level, not counted. `sallyport check`'s probe id is logged as
//!   an operator at work.

use std::net::SocketAddr;
use std::sync::Arc;

use super::binding::cert_serves;
use super::control::{data_ack, warn_event};
use super::pending::{Claim, ClaimError, DataConn};
use super::Shared;
use crate::protocol::{self, Connection, DataHello, ErrorCode};
use crate::transport::Stream;

/// The refusal text for every failed claim.
const UNKNOWN_CLIENT_TEXT: &str = "unknown, expired or already claimed client id, or wrong token";

/// Claims the pending client a data hello names and hands the connection to its task.
pub(super) async fn claim_data(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    data: DataHello,
    version: u16,
) {
    if data.id == protocol::PROBE_ID {
        // `sallyport check` proving that TLS, the peer rules and the version check pass: the
        // same answer as for any unknown client, but an operator at work, not a knock.
        let occ = shared.stats.check_probes.hit();
        if occ.log {
            tracing::info!(peer = %peer, "control port: `sallyport check` probe from {}{}", peer.ip(), occ.tally());
        }
        conn.send_error(ErrorCode::UNKNOWN_CLIENT, UNKNOWN_CLIENT_TEXT)
            .await;
        return;
    }
    let config = shared.config();
    let serves = |site: &str| cert_serves(&config, conn.get_ref(), site);
    let tx = match shared.pending.claim_for(data.id, &data.token, serves) {
        Ok(tx) => tx,
        Err(e) => {
            // A late data connection for a client that just left, or the loser of a client
            // offered to two agents, is not an attack: not counted.
            if matches!(e, ClaimError::Gone(_) | ClaimError::Lost(_)) {
                tracing::debug!(peer = %peer, "data connection refused: {e}");
            } else if let ClaimError::WrongSite(_, why) = e {
                // It held the right token: it may learn why.
                warn_event(
                    &shared.stats.wrong_site,
                    peer,
                    format_args!("data connection refused: {why}"),
                );
                conn.send_error(ErrorCode::WRONG_SITE, why).await;
                return;
            } else {
                warn_event(
                    &shared.stats.data_refused,
                    peer,
                    format_args!("data connection refused: {e}"),
                );
            }
            // The same words whatever the cause: the peer learns nothing about which ids wait.
            conn.send_error(ErrorCode::UNKNOWN_CLIENT, UNKNOWN_CLIENT_TEXT)
                .await;
            return;
        }
    };
    let ack = data_ack(&shared, version);
    if let Err(e) = conn.write_message(&ack).await {
        // Dropping `tx` wakes the client task, which closes the client.
        tracing::warn!(peer = %peer, id = data.id, "data connection failed during hello: {e}");
        return;
    }
    let (stream, leftover) = conn.into_parts();
    let claim = Claim::Data(DataConn {
        stream,
        leftover,
        agent_addr: peer,
        agent: None,
        reuse: None,
    });
    if tx.send(claim).is_err() {
        tracing::debug!(peer = %peer, id = data.id, "client gave up just before its data connection arrived");
    }
}
