//! The outbound proxy: internal hosts reach the outside world through the gateway.
//!
//! The agent listens on `[outbound] listen` for SOCKS5 (RFC 1928, CONNECT only, with the
//! no-authentication method or RFC 1929 username/password when `users` are configured) and
//! HTTP CONNECT (Basic proxy authentication when `users` are configured), told apart by the
//! first byte. Each request becomes one data connection to a connected gateway carrying
//! [`OutboundHello`]; the gateway decides with its own `[egress]` list and dials. Its answer
//! becomes the SOCKS reply code or HTTP status:
//!
//! | gateway answer     | SOCKS5 reply                      | HTTP  |
//! |--------------------|-----------------------------------|-------|
//! | connected          | 0x00 succeeded                    | 200   |
//! | EGRESS_DENIED      | 0x02 not allowed by ruleset       | 403   |
//! | DEST_UNREACHABLE   | 0x05 refused / 0x04 unreachable   | 502 (504 on a timeout) |
//! | no gateway / other | 0x01 general failure              | 503 / 502 |
//!
//! SOCKS5 is parsed here rather than with a SOCKS crate: the reply must wait for the gateway's
//! decision, which the SOCKS server crates we looked at (fast-socks5 0.10) do not let a caller
//! defer; the CONNECT subset is a few dozen lines. HTTP heads are parsed with `httparse`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::BytesMut;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::dial::{dial, DialError, Target};
use super::stats::OutboundOutcome;
use super::AgentCtx;
use crate::config::{OutboundConfig, OUTBOUND_MAX_CLIENTS, OUTBOUND_MAX_CLIENTS_PER_IP};
use crate::egress::check_destination;
use crate::escape::escape;
use crate::limits::{ConnLimiter, Event};
use crate::net;
use crate::pipe::{pipe_tcp, tracked, PipeCounters};
use crate::protocol::{ErrorCode, OutboundHello, ProtocolError, Role, Token};
use crate::transport::Stream;

mod http;
mod socks;

use http::{http_reply, http_request};
use socks::{socks_reply, socks_request};

/// The largest HTTP request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Binds the proxy's port (errors are for the operator: a port conflict stops the agent).
pub(crate) async fn bind(config: &OutboundConfig) -> anyhow::Result<TcpListener> {
    // The io::Error stays in the chain: a taken port is a configuration error (exit 78).
    let listener = anyhow::Context::with_context(net::bind_listener(config.listen), || {
        format!("[outbound] cannot listen on {}", config.listen)
    })?;
    tracing::info!(
        "outbound proxy (SOCKS5 and HTTP CONNECT) listening on {}{}",
        listener.local_addr()?,
        if config.users.is_empty() {
            ""
        } else {
            ", authentication required"
        }
    );
    Ok(listener)
}

/// Accepts proxy clients until shutdown. Each holds a place in `limiter` (in total and per
/// address) from accept to close; over a cap a client is reset at once, counted in one log
/// line per 10 s.
pub(crate) async fn serve(ctx: AgentCtx, listener: TcpListener) {
    let next_gateway = Arc::new(AtomicUsize::new(0));
    let limiter = ConnLimiter::new(OUTBOUND_MAX_CLIENTS, OUTBOUND_MAX_CLIENTS_PER_IP);
    let over_limit = Event::once_per_10s();
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!("outbound proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(config) = ctx.config().outbound.clone() else {
            // Removed by a reload: the port closes with this task's next restart.
            continue;
        };
        if !config.clients.allows(client.ip()) {
            ctx.stats.outbound.count(OutboundOutcome::Refused);
            tracing::info!(client = %client, "outbound proxy: client refused by [outbound] clients rules");
            net::reset(stream);
            continue;
        }
        limiter.set_limits(config.max_clients, config.max_clients_per_ip);
        let permit = match limiter.try_acquire(client.ip()) {
            Ok(p) => p,
            Err(limit) => {
                ctx.stats.outbound.count(OutboundOutcome::Refused);
                let occ = over_limit.hit();
                if occ.log {
                    tracing::warn!(client = %client, "outbound proxy: client refused: proxy clients reached {limit}{}", occ.tally());
                }
                net::reset(stream);
                continue;
            }
        };
        let ctx2 = ctx.clone();
        let next = next_gateway.clone();
        ctx.tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_client(&ctx2, &config, stream, client, &next).await {
                ctx2.stats.outbound.count(if e.is::<AuthFailed>() {
                    OutboundOutcome::AuthFailed
                } else {
                    OutboundOutcome::BadRequest
                });
                tracing::info!(client = %client, "outbound proxy: {e}");
            }
        });
    }
}

/// A client that gave no or wrong proxy credentials (counted apart from malformed requests).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AuthFailed(String);

/// A destination as the client asked for it.
struct Dest {
    host: String,
    port: u16,
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How the gateway (or the way to it) answered.
enum Outcome {
    Open(Stream, BytesMut),
    Denied(String),
    Unreachable(String),
    Timeout(String),
    NoGateway,
    Failed(String),
}

#[derive(Clone, Copy)]
enum Kind {
    Socks,
    Http,
}

async fn serve_client(
    ctx: &AgentCtx,
    config: &OutboundConfig,
    mut stream: TcpStream,
    client: SocketAddr,
    next: &AtomicUsize,
) -> anyhow::Result<()> {
    net::tune(&stream);
    let started = Instant::now();
    let limit = config.handshake_timeout;
    // The whole handshake, from the first byte on, is bounded: a silent client holds its
    // descriptor and its place for `handshake_timeout` at most.
    let request = tokio::time::timeout(limit, async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Ok((Kind::Http, None));
        }
        let kind = if first[0] == 5 {
            Kind::Socks
        } else {
            Kind::Http
        };
        let request = match kind {
            Kind::Socks => socks_request(&mut stream, config).await?,
            Kind::Http => http_request(&mut stream, config).await?,
        };
        anyhow::Ok((kind, request))
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "{client}: no complete request within {}; closed",
            humantime::format_duration(limit)
        )
    })??;
    let (kind, Some((dest, early))) = request else {
        return Ok(()); // closed before a byte, or refused during the handshake (it was told)
    };
    let outcome = open(ctx, &dest, client, next).await;
    ctx.stats.outbound.count(match &outcome {
        Outcome::Open(..) => OutboundOutcome::Connected,
        Outcome::Denied(_) => OutboundOutcome::Denied,
        Outcome::Unreachable(_) => OutboundOutcome::Unreachable,
        Outcome::Timeout(_) => OutboundOutcome::Timeout,
        Outcome::NoGateway => OutboundOutcome::NoGateway,
        Outcome::Failed(_) => OutboundOutcome::Failed,
    });
    let (gw_stream, gw_leftover) = match outcome {
        Outcome::Open(s, l) => (s, l),
        other => {
            let (socks, status, why) = match &other {
                Outcome::Denied(w) => (0x02, "403 Forbidden", w.clone()),
                Outcome::Unreachable(w) if w.contains("refused") => {
                    (0x05, "502 Bad Gateway", w.clone())
                }
                Outcome::Unreachable(w) => (0x04, "502 Bad Gateway", w.clone()),
                Outcome::Timeout(w) => (0x04, "504 Gateway Timeout", w.clone()),
                Outcome::NoGateway => (
                    0x01,
                    "503 Service Unavailable",
                    "no gateway is connected".to_string(),
                ),
                Outcome::Failed(w) => (0x01, "502 Bad Gateway", w.clone()),
                Outcome::Open(..) => unreachable!(),
            };
            tracing::warn!(client = %client, "outbound connection to {dest} refused: {why}");
            match kind {
                Kind::Socks => socks_reply(&mut stream, socks).await,
                Kind::Http => http_reply(&mut stream, status, &[], &why).await,
            }
            return Ok(());
        }
    };
    match kind {
        Kind::Socks => socks_reply(&mut stream, 0x00).await,
        Kind::Http => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await;
        }
    }
    tracing::info!(client = %client, "outbound connection to {dest} open after {} ms", started.elapsed().as_millis());
    let counters = PipeCounters::default();
    let pipe = pipe_tcp(stream, &early, gw_stream, &gw_leftover, &counters);
    let end = tracked(ctx.stats.outbound.piping(), &counters, pipe).await;
    tracing::info!(
        client = %client, sent = end.bytes.b_written, received = end.bytes.a_written,
        "outbound connection to {dest} {} after {:.1} s",
        end.outcome(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Asks a connected gateway (round robin) to open `dest`; tries the next one if a gateway
/// cannot be reached at all, is paused (SHUTTING_DOWN), or its `[egress]` list denies the
/// destination (gateways of one site may allow different destinations: each decides for
/// itself). Only a denial by every gateway is a denial; a gateway that allowed the destination and could not reach it answers
/// for all (trying others would multiply the wait).
async fn open(ctx: &AgentCtx, dest: &Dest, client: SocketAddr, next: &AtomicUsize) -> Outcome {
    let config = ctx.config();
    let gateways: Vec<(String, SocketAddr, bool, Option<Token>)> = ctx
        .status
        .borrow()
        .gateways
        .iter()
        .filter_map(|(name, g)| {
            g.connected_to
                .map(|a| (name.clone(), a, g.data_tls, g.session))
        })
        .collect();
    if gateways.is_empty() {
        return Outcome::NoGateway;
    }
    let start = next.fetch_add(1, Ordering::Relaxed);
    let mut last = Outcome::NoGateway;
    let mut denials: Vec<String> = Vec::new();
    // The gateway may take up to 10 s to dial; allow for it on top of our own timeout.
    let mut cfg = (*config).clone();
    cfg.connect_timeout = config.connect_timeout + Duration::from_secs(12);
    for i in 0..gateways.len() {
        let (name, addr, tls, session) = &gateways[(start + i) % gateways.len()];
        let hello = OutboundHello {
            site: config.site.clone(),
            host: dest.host.clone(),
            port: dest.port,
            client_addr: client,
        };
        // v2 proves the connection with the control session's secret.
        let role = match session {
            Some(secret) => Role::SessionOutbound(hello, *secret),
            None => Role::Outbound(hello),
        };
        let target = Target {
            gateway: name,
            resolved: Some(*addr),
        };
        match dial(&cfg, target, role, *tls).await {
            Ok((conn, _ack)) => {
                let (s, l) = conn.into_parts();
                return Outcome::Open(s, l);
            }
            // Its [egress] list is its own: another gateway may allow the destination.
            Err(DialError::Refused(e) | DialError::Protocol(ProtocolError::Peer(e)))
                if e.code == ErrorCode::EGRESS_DENIED =>
            {
                tracing::debug!(gateway = %name, "outbound: {dest} denied by this gateway: {}", e.message);
                denials.push(format!("gateway {name}: {}", e.message));
            }
            // Paused or stopping: it serves nobody new, the next one may.
            Err(DialError::Refused(e) | DialError::Protocol(ProtocolError::Peer(e)))
                if e.code == ErrorCode::SHUTTING_DOWN =>
            {
                tracing::debug!(gateway = %name, "outbound: {dest} not served by this gateway: {}", e.message);
                last = Outcome::Failed(format!("gateway {name}: {}", e.message));
            }
            // Any other answer of the gateway (before or after it accepted the hello) is final.
            Err(DialError::Refused(e) | DialError::Protocol(ProtocolError::Peer(e))) => {
                return match e.code {
                    ErrorCode::DEST_UNREACHABLE if e.message.contains("timed out") => {
                        Outcome::Timeout(e.message)
                    }
                    ErrorCode::DEST_UNREACHABLE => Outcome::Unreachable(e.message),
                    _ => Outcome::Failed(e.to_string()),
                };
            }
            Err(e) => {
                tracing::warn!(gateway = %name, "outbound: cannot reach the gateway: {e}");
                last = Outcome::Failed(format!("gateway {name}: {e}"));
            }
        }
    }
    // A denial is the answer of a gateway that was asked; one that could not be reached said
    // nothing about the destination.
    if denials.is_empty() {
        last
    } else {
        Outcome::Denied(denials.join("; "))
    }
}

fn credentials_ok(config: &OutboundConfig, user: &[u8], password: &[u8]) -> bool {
    // Every entry is compared, in constant time, so timing tells nothing about which matched;
    // digests are compared, since `ct_eq` on raw bytes returns at once when the lengths differ.
    use sha2::{Digest, Sha256};
    let (user, password) = (Sha256::digest(user), Sha256::digest(password));
    config.users.iter().fold(false, |ok, (u, p)| {
        let m = Sha256::digest(u.as_bytes()).ct_eq(&user)
            & Sha256::digest(p.as_bytes()).ct_eq(&password);
        ok | bool::from(m)
    })
}
