//! Binding pool and outbound connections to a live control session (issue 12, items 1 and 2).
//!
//! A data connection proves itself with a single-use claim token. Pool and outbound connections
//! have none, so they must show they belong to a control session that is up right now, of their
//! site (and, for a pool connection, of the agent it names):
//!
//! - a v2 hello (`SessionPool`, `SessionOutbound`) carries the session's secret, which only that
//!   session received, inside its control channel (TLS when configured). It is compared in
//!   constant time and never logged. Over TLS the connection's certificate must also be the
//!   one the session presented.
//! - a v1 hello (`Pool`, `Outbound`) carries no proof. Over TLS its certificate must be the one
//!   a v1 session of the site presented (not merely any certificate of the CA). In plaintext it
//!   is refused by the TLS policy when the gateway has TLS (`data_tls = false`; see
//!   `control::open`); on a gateway without TLS, where nothing is authenticated anyway, it keeps
//!   v1's rule: a v1 session of the site from the same IP address.
//!
//! This module only decides; the callers count, log and answer.

use std::net::SocketAddr;
use std::sync::Arc;

use super::site::{AgentHandle, Site};
use super::Shared;
use crate::protocol::Token;
use crate::transport::Stream;

/// What a pool or outbound hello claims to be.
pub(crate) struct Claim<'a> {
    pub site: &'a str,
    /// The agent a pool connection names; `None` for outbound (any agent of the site).
    pub agent: Option<&'a str>,
    /// The session secret of a v2 hello.
    pub secret: Option<&'a Token>,
}

/// The live control session `claim` belongs to, or why there is none (one line, no secret).
pub(crate) fn session_of(
    shared: &Shared,
    claim: &Claim<'_>,
    stream: &Stream,
    peer: SocketAddr,
) -> Result<(Arc<Site>, AgentHandle), String> {
    let whose = || match claim.agent {
        Some(agent) => format!("agent \"{agent}\" of site \"{}\"", claim.site),
        None => format!("site \"{}\"", claim.site),
    };
    let site = shared
        .sites
        .get(claim.site)
        .ok_or_else(|| format!("{} has no control channel on this gateway", whose()))?;
    let agents: Vec<AgentHandle> = site
        .agents()
        .into_iter()
        .filter(|a| claim.agent.map_or(true, |name| a.name == name))
        .collect();
    if agents.is_empty() {
        return Err(format!(
            "{} has no control channel on this gateway",
            whose()
        ));
    }
    let cert = stream.peer_cert_digest();
    let found = match claim.secret {
        // Every candidate is compared (in constant time), so timing says nothing about which.
        Some(secret) => agents
            .iter()
            .fold(None, |hit, a| match a.secret {
                Some(s) if s == *secret => Some(a),
                _ => hit,
            })
            .ok_or_else(|| format!("no control session of {} has this session secret", whose()))
            .and_then(|a| match (cert, a.cert) {
                (Some(theirs), Some(session)) if theirs != session => Err(format!(
                    "its TLS certificate is not the one the control session of {} presented",
                    whose()
                )),
                _ => Ok(a),
            })?,
        None => match cert {
            // The newest matching session: an agent that reconnected before the gateway noticed
            // its old session die files its new connections under the new one.
            Some(theirs) => agents
                .iter()
                .filter(|a| a.secret.is_none() && a.cert == Some(theirs))
                .max_by_key(|a| a.id)
                .ok_or_else(|| {
                    format!(
                        "its TLS certificate is not the one a control session of {} presented",
                        whose()
                    )
                })?,
            None => agents
                .iter()
                .filter(|a| a.secret.is_none() && a.addr.ip() == peer.ip())
                .max_by_key(|a| a.id)
                .ok_or_else(|| {
                    format!(
                        "{} has no protocol v1 control channel from {} on this gateway",
                        whose(),
                        peer.ip()
                    )
                })?,
        },
    };
    Ok((site.clone(), found.clone()))
}
