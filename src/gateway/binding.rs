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
//! Every connection is also bound to a site by its certificate ([`cert_serves`], issue 20
//! item 4): an agent certificate issued with `--site SITE` (a `sallyport:site:SITE` URI) serves
//! that site only, on control, data, pool and outbound connections alike; one bound to no site
//! serves any site only while `[control] tls.site_binding = "optional"`. A refusal is
//! `WRONG_SITE`, so an owned agent of one site can neither open, claim nor fail anything of
//! another.
//!
//! This module only decides; the callers count, log and answer.

use std::net::SocketAddr;
use std::sync::Arc;

use super::site::{AgentHandle, Site};
use super::Shared;
use crate::certinfo::CertInfo;
use crate::config::{GatewayConfig, SiteBinding};
use crate::protocol::{Connection, ErrorCode, Token};
use crate::transport::Stream;

/// Refuses `conn` (before its HelloAck) with `WRONG_SITE` when its certificate may not serve
/// `site`: counted, logged as a `what` connection (rate limited). Returns whether it refused.
pub(crate) async fn refuse_wrong_site(
    shared: &Shared,
    conn: &mut Connection<Stream>,
    peer: SocketAddr,
    site: &str,
    what: &str,
) -> bool {
    let Err(why) = cert_serves(&shared.config(), conn.get_ref(), site) else {
        return false;
    };
    let occ = shared.stats.wrong_site.hit();
    if occ.log {
        tracing::warn!(peer = %peer, site = %site, "{what} refused: {why}{}", occ.tally());
    }
    super::control::refuse_role(conn, ErrorCode::WRONG_SITE, why).await;
    true
}

/// Whether the agent certificate on `stream` may serve `site`; `Err` is the refusal's text.
/// A plaintext connection has no certificate to check (the TLS policy decides whether it may
/// exist at all).
pub(crate) fn cert_serves(
    config: &GatewayConfig,
    stream: &Stream,
    site: &str,
) -> Result<(), String> {
    let (Some(tls), Some(der)) = (&config.tls, stream.peer_certificate()) else {
        return Ok(());
    };
    let info = CertInfo::parse(der.as_ref()).map_err(|e| format!("agent certificate: {e}"))?;
    let whose = match &info.common_name {
        Some(cn) => format!("agent certificate \"{cn}\""),
        None => "agent certificate".to_string(),
    };
    match info.serves(site) {
        Some(true) => Ok(()),
        Some(false) => Err(format!(
            "the {whose} is bound to site \"{}\", not to site \"{site}\"",
            info.sites.join("\", \"")
        )),
        None if tls.site_binding == SiteBinding::Required => Err(format!(
            "the {whose} is bound to no site and this gateway requires one ([control] \
             tls.site_binding = \"required\"): issue it with `sallyport cert issue --agent NAME \
             --site {site}`"
        )),
        None => Ok(()),
    }
}

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
