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

/// Serves one outbound data connection to its end: admitted (a known destination form, the
/// agent's live session, not paused, a place), the destination reached (allowed, dialled), then
/// acknowledged and piped. Every refusal is told to the agent, logged (rate limited) and counted.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut conn: Connection<Stream>,
    peer: SocketAddr,
    hello: OutboundHello,
    secret: Option<Token>,
    version: u16,
) {
    let request = Request {
        started: Instant::now(),
        dest: display(&hello.host, hello.port),
        shared,
        peer,
        hello,
    };
    let Some((site, _slot)) = request.admit(&mut conn, secret.as_ref()).await else {
        return;
    };
    let stats: Arc<ListenerStats> = request
        .shared
        .traffic
        .listener(&site.name, OUTBOUND_LISTENER);
    let Some(dest_stream) = request.reach(&mut conn, &site.name, &stats).await else {
        return;
    };
    request
        .pipe(conn, version, &site.name, stats, dest_stream)
        .await;
}

/// One outbound data connection: who asked for which destination.
struct Request {
    shared: Arc<Shared>,
    /// The agent's address.
    peer: SocketAddr,
    hello: OutboundHello,
    /// The destination as logs show it (`host:port`).
    dest: String,
    started: Instant,
}

impl Request {
    /// The checks before the destination: its form, the agent's live session of its site, a
    /// running gateway, a place among the outbound connections and descriptors. Returns the
    /// site and the place (held until the connection ends).
    async fn admit(
        &self,
        conn: &mut Connection<Stream>,
        secret: Option<&Token>,
    ) -> Option<(Arc<super::site::Site>, crate::limits::GaugePermit)> {
        let (shared, peer, dest) = (&self.shared, self.peer, &self.dest);
        if let Err(why) = check_destination(&self.hello.host) {
            tracing::warn!(peer = %peer, "outbound connection refused: {why}");
            super::control::refuse_role(conn, ErrorCode::EGRESS_DENIED, why).await;
            return None;
        }
        let claim = Claim {
            site: &self.hello.site,
            agent: None,
            secret,
        };
        if refuse_wrong_site(shared, conn, peer, claim.site, "outbound connection").await {
            return None;
        }
        let site = match session_of(shared, &claim, conn.get_ref(), peer) {
            Ok((site, _agent)) => site,
            Err(why) => {
                let occ = shared.stats.session_unproven.hit();
                if occ.log {
                    tracing::warn!(peer = %peer, "outbound connection to {dest} refused: {why}{}", occ.tally());
                }
                super::control::refuse_role(conn, ErrorCode::EGRESS_DENIED, why).await;
                return None;
            }
        };
        if !self.running(conn, &site.name).await {
            return None;
        }
        let slot = self.place(conn, &site.name).await?;
        Some((site, slot))
    }

    /// A paused gateway takes no new clients, outbound ones included (pausing takes a gateway
    /// out of service both ways); the agent asks its next gateway. Established ones go on.
    async fn running(&self, conn: &mut Connection<Stream>, site: &str) -> bool {
        let shared = &self.shared;
        if shared.state() == RunState::Running {
            return true;
        }
        let stats = shared.traffic.listener(site, OUTBOUND_LISTENER);
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        shared.stats.clients_paused.hit();
        tracing::debug!(site = %site, peer = %self.peer, "outbound connection to {} refused: the gateway is paused", self.dest);
        super::control::refuse_role(
            conn,
            ErrorCode::SHUTTING_DOWN,
            "the gateway is paused: it takes no new connections",
        )
        .await;
        false
    }

    /// A place among the gateway's outbound connections, and descriptors for both ends.
    async fn place(
        &self,
        conn: &mut Connection<Stream>,
        site: &str,
    ) -> Option<crate::limits::GaugePermit> {
        let shared = &self.shared;
        let max = shared.config().limits.max_outbound;
        let slot = shared.outbound.try_acquire(max);
        if slot.is_some() && shared.fds.admit(2, true) {
            return slot;
        }
        let why = format!(
            "the gateway's outbound connections or open files are at their limit ({max} outbound connections: [limits] max_outbound)"
        );
        let occ = shared.stats.egress_denied.hit();
        if occ.log {
            tracing::warn!(site = %site, peer = %self.peer, "outbound connection to {} refused: {why}{}", self.dest, occ.tally());
        }
        super::control::refuse_role(conn, ErrorCode::LIMIT, why).await;
        None
    }

    /// The destination, if the egress rules allow it and it answers; a reload that revokes the
    /// agent meanwhile ends this at once.
    async fn reach(
        &self,
        conn: &mut Connection<Stream>,
        site: &str,
        stats: &ListenerStats,
    ) -> Option<TcpStream> {
        let (shared, peer, dest) = (&self.shared, self.peer, &self.dest);
        let (host, port) = (&self.hello.host, self.hello.port);
        let decide = async {
            match allowed_addrs(shared, host, port).await {
                Ok(addrs) => dial(&addrs).await,
                Err(r) => Err(r),
            }
        };
        let outcome = tokio::select! {
            outcome = decide => outcome,
            // Not piping yet: a reload that revokes the agent ends this at once.
            () = shared.denied(peer.ip(), false) => {
                let why = format!("{} is no longer allowed by the gateway's [peers] rules", peer.ip());
                tracing::warn!(site = %site, agent = %peer, "outbound connection to {dest} closed: {why}");
                conn.send_error(ErrorCode::PEER_DENIED, why).await;
                return None;
            }
        };
        let refusal = match outcome {
            Ok(s) => return Some(s),
            Err(refusal) => refusal,
        };
        let client = self.hello.client_addr;
        let (code, why) = match refusal {
            Refusal::Denied(why) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                let occ = shared.stats.egress_denied.hit();
                if occ.log {
                    tracing::warn!(
                        site = %site, agent = %peer, client = %client,
                        "outbound connection refused: {why}{}", occ.tally()
                    );
                }
                (ErrorCode::EGRESS_DENIED, why)
            }
            Refusal::Unreachable(why) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                stats.closed.fetch_add(1, Ordering::Relaxed);
                let occ = shared.stats.egress_unreachable.hit();
                if occ.log {
                    tracing::warn!(
                        site = %site, agent = %peer, client = %client,
                        "outbound connection to {dest} failed: {why}{}", occ.tally()
                    );
                }
                (ErrorCode::DEST_UNREACHABLE, why)
            }
        };
        super::control::refuse_role(conn, code, why).await;
        None
    }

    /// Acknowledges the data connection and pipes it with the destination until either ends,
    /// the gateway kills what is left, or a reload revokes the agent; logs how it ended.
    async fn pipe(
        &self,
        mut conn: Connection<Stream>,
        version: u16,
        site: &str,
        stats: Arc<ListenerStats>,
        dest_stream: TcpStream,
    ) {
        let (shared, peer, dest) = (&self.shared, self.peer, &self.dest);
        let client = self.hello.client_addr;
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let ack = super::control::data_ack(shared, version);
        if let Err(e) = conn.write_message(&ack).await {
            stats.closed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %peer, "outbound connection to {dest} failed during hello: {e}");
            return;
        }
        let (stream, leftover) = conn.into_parts();
        let id = shared.next_client_id();
        let dest_addr = dest_stream.peer_addr().unwrap_or(([0, 0, 0, 0], 0).into());
        tracing::info!(
            site = %site, agent = %peer, client = %client, id,
            "outbound connection to {dest} ({dest_addr}) open after {} ms", self.started.elapsed().as_millis()
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
            site = %site, client = %client, id,
            to_dest = bytes.client_written, from_dest = bytes.client_read,
            "outbound connection to {dest} {} after {:.1} s",
            end.outcome(),
            self.started.elapsed().as_secs_f64()
        );
    }
}
