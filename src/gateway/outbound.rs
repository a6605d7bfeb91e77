//! Outbound connections: an internal host asked an agent's SOCKS5 / HTTP CONNECT proxy for a
//! destination; the agent opened a data connection with [`OutboundHello`]. The gateway dials
//! the destination only if its own `[egress] allow` list permits it, then pipes.
//!
//! Checks, in order: the destination host is a host name or an IP literal; the connection
//! belongs to a live control session of its site (`binding`: the session secret, and over TLS
//! the session's certificate; an outbound connection is an agent's, not anyone's who passes
//! `[peers]`); the destination is allowed (a name rule, or
//! an address rule for an IP literal or for the addresses a name resolves to: only allowed
//! addresses are dialed); the gateway is not paused; the dial succeeds within 10 s. Each refusal is told to the agent
//! (which answers its client with the SOCKS / HTTP code), logged (rate limited) and counted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;

use super::binding::{refuse_wrong_site, session_of, Claim};
use super::stats::{ConnEntry, ListenerStats};
use super::{RunState, Shared};
use crate::egress::check_destination;
use crate::net;
use crate::pipe::{pipe_tcp, tracked, PipeCounters};
use crate::protocol::{Connection, ErrorCode, OutboundHello, Token};
use crate::transport::Stream;

/// The name outbound connections are counted under, per site (not a valid listener name, so it
/// cannot clash with one).
pub const OUTBOUND_LISTENER: &str = "(outbound)";

/// How long the gateway tries to reach a destination.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// `host:port` for logs, with brackets for IPv6 literals.
fn display(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a destination cannot be served.
enum Refusal {
    Denied(String),
    Unreachable(String),
}

/// The addresses of `host:port` the egress rules allow (all of them when a name rule matched).
async fn allowed_addrs(shared: &Shared, host: &str, port: u16) -> Result<Vec<SocketAddr>, Refusal> {
    let rules = &shared.config().egress;
    let denied = || {
        Refusal::Denied(format!(
            "{} is not in the gateway's [egress] allow list",
            display(host, port)
        ))
    };
    if rules.is_empty() {
        return Err(denied());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return if rules.allows_addr(ip, port) {
            Ok(vec![SocketAddr::new(ip, port)])
        } else {
            Err(denied())
        };
    }
    let by_name = rules.allows_name(host, port);
    // Resolve only names some rule could allow: a name matching no name rule is resolved only
    // when address rules exist.
    if !by_name && !rules.has_addr_rules() {
        return Err(denied());
    }
    let resolved: Vec<SocketAddr> =
        match tokio::time::timeout(DIAL_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => {
                return Err(if by_name {
                    Refusal::Unreachable(format!("cannot resolve {host}: {e}"))
                } else {
                    denied()
                })
            }
            Err(_) => return Err(Refusal::Unreachable(format!("resolving {host} timed out"))),
        };
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|a| by_name || rules.allows_addr(a.ip(), port))
        .collect();
    if allowed.is_empty() {
        return Err(if by_name {
            Refusal::Unreachable(format!("{host} has no address"))
        } else {
            denied()
        });
    }
    Ok(allowed)
}

async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, Refusal> {
    let mut last = String::from("no address");
    for addr in addrs {
        match net::connect_addr(*addr, DIAL_TIMEOUT).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(Refusal::Unreachable(last))
}

/// Serves one outbound data connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    hello: OutboundHello,
    secret: Option<Token>,
    version: u16,
) {
    let started = Instant::now();
    if let Err(why) = check_destination(&hello.host) {
        tracing::warn!(peer = %peer, "outbound connection refused: {why}");
        super::control::refuse_role(&mut conn, ErrorCode::EGRESS_DENIED, why).await;
        return;
    }
    let dest = display(&hello.host, hello.port);
    let claim = Claim {
        site: &hello.site,
        agent: None,
        secret: secret.as_ref(),
    };
    if refuse_wrong_site(&shared, &mut conn, peer, claim.site, "outbound connection").await {
        return;
    }
    let site = match session_of(&shared, &claim, conn.get_ref(), peer) {
        Ok((site, _agent)) => site,
        Err(why) => {
            let occ = shared.stats.session_unproven.hit();
            if occ.log {
                tracing::warn!(peer = %peer, "outbound connection to {dest} refused: {why}{}", occ.tally());
            }
            super::control::refuse_role(&mut conn, ErrorCode::EGRESS_DENIED, why).await;
            return;
        }
    };
    // A paused gateway takes no new clients, outbound ones included (pausing takes a gateway
    // out of service both ways); the agent asks its next gateway. Established ones go on.
    if shared.state() != RunState::Running {
        shared
            .traffic
            .listener(&site.name, OUTBOUND_LISTENER)
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        shared.stats.clients_paused.hit();
        tracing::debug!(site = %site.name, peer = %peer, "outbound connection to {dest} refused: the gateway is paused");
        super::control::refuse_role(
            &mut conn,
            ErrorCode::SHUTTING_DOWN,
            "the gateway is paused: it takes no new connections",
        )
        .await;
        return;
    }
    let max = shared.config().limits.max_outbound;
    let slot = shared.outbound.try_acquire(max);
    if slot.is_none() || !shared.fds.admit(2, true) {
        let why = format!(
            "the gateway's outbound connections or open files are at their limit ({max} outbound connections: [limits] max_outbound)"
        );
        let occ = shared.stats.egress_denied.hit();
        if occ.log {
            tracing::warn!(site = %site.name, peer = %peer, "outbound connection to {dest} refused: {why}{}", occ.tally());
        }
        super::control::refuse_role(&mut conn, ErrorCode::LIMIT, why).await;
        return;
    }
    let _slot = slot;
    let stats: Arc<ListenerStats> = shared.traffic.listener(&site.name, OUTBOUND_LISTENER);
    let decide = async {
        match allowed_addrs(&shared, &hello.host, hello.port).await {
            Ok(addrs) => dial(&addrs).await,
            Err(r) => Err(r),
        }
    };
    let outcome = tokio::select! {
        outcome = decide => outcome,
        // Not piping yet: a reload that revokes the agent ends this at once.
        () = shared.denied(peer.ip(), false) => {
            let why = format!("{} is no longer allowed by the gateway's [peers] rules", peer.ip());
            tracing::warn!(site = %site.name, agent = %peer, "outbound connection to {dest} closed: {why}");
            conn.send_error(ErrorCode::PEER_DENIED, why).await;
            return;
        }
    };
    let dest_stream = match outcome {
        Ok(s) => s,
        Err(Refusal::Denied(why)) => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            let occ = shared.stats.egress_denied.hit();
            if occ.log {
                tracing::warn!(
                    site = %site.name, agent = %peer, client = %hello.client_addr,
                    "outbound connection refused: {why}{}", occ.tally()
                );
            }
            super::control::refuse_role(&mut conn, ErrorCode::EGRESS_DENIED, why).await;
            return;
        }
        Err(Refusal::Unreachable(why)) => {
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            stats.closed.fetch_add(1, Ordering::Relaxed);
            let occ = shared.stats.egress_unreachable.hit();
            if occ.log {
                tracing::warn!(
                    site = %site.name, agent = %peer, client = %hello.client_addr,
                    "outbound connection to {dest} failed: {why}{}", occ.tally()
                );
            }
            super::control::refuse_role(&mut conn, ErrorCode::DEST_UNREACHABLE, why).await;
            return;
        }
    };
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let ack = super::control::data_ack(&shared, version);
    if let Err(e) = conn.write_message(&ack).await {
        stats.closed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %peer, "outbound connection to {dest} failed during hello: {e}");
        return;
    }
    let (stream, leftover) = conn.into_parts();
    let id = shared.next_client_id();
    let dest_addr = dest_stream.peer_addr().unwrap_or(([0, 0, 0, 0], 0).into());
    tracing::info!(
        site = %site.name, agent = %peer, client = %hello.client_addr, id,
        "outbound connection to {dest} ({dest_addr}) open after {} ms", started.elapsed().as_millis()
    );
    // In the connection table the destination takes the client's place: a = the destination.
    let entry = Arc::new(ConnEntry {
        id,
        listener: stats,
        client_addr: dest_addr,
        gateway_addr: dest_stream.local_addr().unwrap_or(dest_addr),
        agent_addr: peer,
        started: SystemTime::now(),
        started_at: Instant::now(),
        counters: PipeCounters::default(),
        failure: Default::default(),
    });
    let chain = stream.peer_chain();
    let pipe = pipe_tcp(dest_stream, b"", stream, &leftover, &entry.counters);
    let pipe = shared.pipe_unless_cut(peer.ip(), chain.as_deref(), pipe);
    let end = tracked(shared.traffic.track(entry.clone()), &entry.counters, pipe).await;
    let bytes = entry.bytes();
    tracing::info!(
        site = %site.name, client = %hello.client_addr, id,
        to_dest = bytes.client_written, from_dest = bytes.client_read,
        "outbound connection to {dest} {} after {:.1} s",
        end.outcome(),
        started.elapsed().as_secs_f64()
    );
}
