//! Public listeners and the life of one client: accept, check, announce to an agent, wait for
//! the data connection (or the deadline), then pipe.
//!
//! A client's task is owned by the gateway's task tracker, not by its listener: closing a
//! listener stops new clients only and never touches established connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pending::Claim;
use super::site::Site;
use super::stats::{ConnEntry, ListenerStats};
use super::{RunState, Shared};
use crate::access::{canonical, AccessRules};
use crate::config::check_name;
use crate::limits::ConnPermit;
use crate::net;
use crate::pipe::{pipe_tcp, PipeCounters};
use crate::protocol::{ClientArrived, ListenerSpec, Message, PoolAssign, Token};

/// What the accept loops and client tasks of one listener share.
pub(crate) struct ListenerInfo {
    pub spec: ListenerSpec,
    pub rules: AccessRules,
    /// Counters of this listener (kept across its restarts).
    pub stats: Arc<ListenerStats>,
}

/// An open listener: one accept task per port of its range, all stopped together.
pub(crate) struct RunningListener {
    pub spec: ListenerSpec,
    pub addrs: Vec<SocketAddr>,
    /// The IP it bound: the spec's, or the gateway's `[clients] bind` at the time.
    pub bind_ip: std::net::IpAddr,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningListener {
    /// Validates the pushed spec and binds every port of its range, or none: a range opens and
    /// closes as a whole. The error is one line for the agent's log.
    pub fn open(
        shared: &Arc<Shared>,
        site: &Arc<Site>,
        spec: ListenerSpec,
    ) -> Result<Self, String> {
        check_name(&spec.name).map_err(|e| format!("invalid listener name {e}"))?;
        let rules = AccessRules::parse(spec.clients.default, &spec.clients.except)
            .map_err(|e| format!("invalid client rules: {e}"))?;
        let mut bound = Vec::with_capacity(spec.public.ports.len());
        let bind_ip = spec.public.ip.unwrap_or(shared.config().client_bind);
        for addr in spec.public.socket_addrs(bind_ip) {
            // Dropping `bound` on error closes the ports opened so far.
            let listener = net::bind_listener(addr)
                .map_err(|e| format!("{addr}: {}", describe_bind_error(&e)))?;
            bound.push(listener);
        }
        let addrs = bound
            .iter()
            .map(|l| l.local_addr().expect("a bound socket has an address"))
            .collect();
        let info = Arc::new(ListenerInfo {
            stats: shared.traffic.listener(&site.name, &spec.name),
            spec: spec.clone(),
            rules,
        });
        let cancel = CancellationToken::new();
        let tasks = bound
            .into_iter()
            .map(|listener| {
                tokio::spawn(accept_loop(
                    shared.clone(),
                    site.clone(),
                    info.clone(),
                    listener,
                    cancel.clone(),
                ))
            })
            .collect();
        Ok(RunningListener {
            spec,
            addrs,
            bind_ip,
            cancel,
            tasks,
        })
    }

    /// Closes every port and waits until the sockets are gone, so the ports can be reused at once.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn describe_bind_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "address in use".to_string(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)".to_string()
        }
        std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_string(),
        _ => e.to_string(),
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, client_addr) = match accepted {
            // Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; rules and logs use a.b.c.d.
            Ok((stream, addr)) => (stream, SocketAddr::new(canonical(addr.ip()), addr.port())),
            Err(e) if net::is_resource_exhaustion(&e) => {
                tracing::warn!(listener = %info.spec.name, "accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!(listener = %info.spec.name, "accept failed: {e}");
                continue;
            }
        };
        if shared.state() != RunState::Running {
            // Pausing closes this socket; a client accepted in between is refused too.
            info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            shared.stats.clients_paused.hit();
            net::reset(stream);
            continue;
        }
        if !info.rules.allows(client_addr.ip()) {
            info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            let occ = shared.stats.clients_rejected.hit();
            if occ.log {
                tracing::info!(
                    listener = %info.spec.name, client = %client_addr,
                    "client rejected by the listener's rules{}", occ.tally()
                );
            }
            net::reset(stream);
            continue;
        }
        let permit = match shared.clients.try_acquire(client_addr.ip()) {
            Ok(p) => p,
            Err(limit) => {
                over_limit(
                    &shared,
                    &info,
                    client_addr,
                    format_args!("client connections reached {limit}"),
                );
                net::reset(stream);
                continue;
            }
        };
        shared.tasks.spawn(serve_client(
            shared.clone(),
            site.clone(),
            info.clone(),
            stream,
            client_addr,
            permit,
        ));
    }
}

/// Counts a client refused by a limit; logs at most once per interval.
fn over_limit(
    shared: &Shared,
    info: &ListenerInfo,
    client: SocketAddr,
    what: std::fmt::Arguments<'_>,
) {
    let occ = shared.stats.clients_over_limit.hit();
    if occ.log {
        tracing::warn!(listener = %info.spec.name, client = %client, "client refused: {what}{}", occ.tally());
    }
}

/// Resolves when the client has closed or reset its connection; never resolves while it is
/// merely sending (its early bytes stay queued for the backend). A client that half-closes
/// before sending a single byte looks the same as one that left; no real protocol does that
/// and then waits for an answer.
async fn client_left(client: &TcpStream) {
    let mut probe = [0u8; 1];
    loop {
        if client.readable().await.is_err() {
            return;
        }
        match client.peek(&mut probe).await {
            Ok(0) | Err(_) => return,
            // Data is waiting: nothing more to learn until the pipe reads it.
            Ok(_) => std::future::pending::<()>().await,
        }
    }
}

/// Counts an accepted client as closed when its task ends before piping.
struct ClosedOnDrop(Option<Arc<ListenerStats>>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        if let Some(stats) = &self.0 {
            stats.closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Decrements an agent's in-flight count when the offer ends, however it ends.
struct Inflight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_client(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    client: TcpStream,
    client_addr: SocketAddr,
    _permit: ConnPermit,
) {
    let started = Instant::now();
    let listener = info.spec.name.as_str();
    net::tune(&client);
    let Ok(gateway_addr) = client.local_addr() else {
        return;
    };
    let port_offset = gateway_addr
        .port()
        .saturating_sub(info.spec.public.ports.first());

    if site.agent_count() == 0 {
        // The last agent left between accept and now.
        tracing::info!(listener, client = %client_addr, "no agent connected; closing client");
        return;
    }
    let config = shared.config();
    let limits = &config.limits;
    let (Some(pending_total), Some(pending_here)) = (
        shared.pending_total.try_acquire(limits.max_pending),
        info.stats
            .pending
            .try_acquire(limits.max_pending_per_listener),
    ) else {
        let what = format_args!(
            "clients waiting for the agent reached the limit ({} in total, {} per listener)",
            limits.max_pending, limits.max_pending_per_listener
        );
        over_limit(&shared, &info, client_addr, what);
        net::reset(client);
        return;
    };
    info.stats.accepted.fetch_add(1, Ordering::Relaxed);
    // Every accepted client ends up closed: counted here unless it reaches the pipe, whose end
    // the connection table counts.
    let mut closed = ClosedOnDrop(Some(info.stats.clone()));
    let id = shared.next_client_id();
    // A warm pool connection, when the agent keeps some: no notification round trip.
    let assign = PoolAssign {
        id,
        listener: listener.to_string(),
        port_offset,
        client_addr,
        gateway_addr,
    };
    let pooled = site.pool.assign(&assign).await;
    let via = if pooled.is_some() { " (warm pool)" } else { "" };
    let data = if let Some(data) = pooled {
        drop((pending_total, pending_here));
        data
    } else {
        let token = Token::random();
        let deadline = tokio::time::Instant::now() + limits.pending_timeout;
        let mut claim = shared.pending.insert(id, token, &site.name);
        let arrived = ClientArrived {
            id,
            token,
            listener: listener.to_string(),
            port_offset,
            client_addr,
            gateway_addr,
        };
        // Offer the client to the least busy agent; if that agent goes away before a data
        // connection claims the client, offer it (same id and token) to another, until the
        // deadline. With no agent left, wait for one to (re)connect.
        let mut offered_to: Option<String> = None;
        let wait = async {
            loop {
                let joined = site.joined.notified();
                let Some(agent) = site.pick_agent() else {
                    tokio::select! {
                        c = &mut claim => return c.map_err(|_| "the offer was withdrawn".to_string()),
                        () = joined => continue,
                    }
                };
                if let Some(previous) = offered_to.replace(agent.name.clone()) {
                    tracing::info!(
                        listener, client = %client_addr, id,
                        "agent {previous} is gone; client offered again, to agent {}", agent.name
                    );
                }
                agent.inflight.fetch_add(1, Ordering::Relaxed);
                let _inflight = Inflight(agent.inflight.clone());
                if agent
                    .tx
                    .send(Message::ClientArrived(arrived.clone()))
                    .await
                    .is_err()
                {
                    // Its control channel just closed: it leaves the site; pick again.
                    agent.gone.cancelled().await;
                    continue;
                }
                tokio::select! {
                    c = &mut claim => return c.map_err(|_| "the offer was withdrawn".to_string()),
                    () = agent.gone.cancelled() => continue,
                }
            }
        };
        // A client that leaves while waiting gives its pending place back at once instead of at
        // its deadline (otherwise connect-and-close loops could hold every pending place).
        let outcome = tokio::select! {
            outcome = tokio::time::timeout_at(deadline, wait) => outcome,
            () = client_left(&client) => {
                shared.pending.remove(id);
                tracing::debug!(listener, client = %client_addr, "client left before its data connection arrived");
                return;
            }
        };
        drop((pending_total, pending_here));
        let agent_name = offered_to.unwrap_or_else(|| "-".to_string());

        match outcome {
            Ok(Ok(Claim::Data(data))) => data,
            Ok(Ok(Claim::Failed(reason))) => {
                shared.pending.remove(id);
                // An orderly close (the client's first bytes may be unread): not a reset.
                let mut client = client;
                net::close_gently(&mut client, std::time::Duration::from_secs(1)).await;
                let occ = shared.stats.clients_failed.hit();
                if occ.log {
                    tracing::warn!(
                        listener, client = %client_addr, agent = %agent_name,
                        "agent could not serve client: {reason}{}", occ.tally()
                    );
                }
                return;
            }
            Ok(Err(reason)) => {
                shared.pending.remove(id);
                tracing::warn!(listener, client = %client_addr, "closing client: {reason}");
                return;
            }
            Err(_) => {
                shared.pending.remove(id);
                let occ = shared.stats.clients_unclaimed.hit();
                if occ.log {
                    tracing::warn!(
                        listener, client = %client_addr, agent = %agent_name,
                        "no data connection within {}; closing client{}",
                        humantime::format_duration(limits.pending_timeout),
                        occ.tally()
                    );
                }
                return;
            }
        }
    };

    // One info line per connection, when it ends (with bytes and duration): logging costs
    // CPU on the connection path, and a second line per connection halves the new-connection
    // rate's headroom.
    tracing::debug!(
        listener, client = %client_addr, agent = %data.agent_addr, id,
        "client connected after {} ms{via}", started.elapsed().as_millis()
    );
    let entry = Arc::new(ConnEntry {
        id,
        listener: info.stats.clone(),
        client_addr,
        gateway_addr,
        agent_addr: data.agent_addr,
        started: SystemTime::now(),
        started_at: Instant::now(),
        counters: PipeCounters::default(),
    });
    closed.0 = None;
    shared.traffic.start(entry.clone());
    let result = tokio::select! {
        r = pipe_tcp(client, b"", data.stream, &data.leftover, &entry.counters) => r,
        _ = shared.kill.cancelled() => Err(std::io::Error::other("the gateway is restarting or ran out of drain time")),
    };
    shared.traffic.finish(id);
    let bytes = entry.bytes();
    let how = match result {
        Ok(()) => "closed".to_string(),
        Err(e) => format!("ended by error ({e})"),
    };
    tracing::info!(
        listener, client = %client_addr, id,
        from_client = bytes.client_read, to_client = bytes.client_written,
        "client {how} after {:.1} s", started.elapsed().as_secs_f64()
    );
}
