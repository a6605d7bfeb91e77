//! Public listeners and the life of one client: accept, check, announce to an agent, wait for
//! the data connection (or the deadline), then pipe.
//!
//! A client's task is owned by the gateway's task tracker, not by its listener: closing a
//! listener stops new clients only and never touches established connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use std::future::Future;

use bytes::BytesMut;

use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::pending::{Claim, DataConn};
use super::pool::{self, Answer, Held, ACCEPT_LIMIT};
use super::site::Site;
use super::stats::{ConnEntry, ListenerStats};
use super::{RunState, Shared};
use crate::access::{canonical, AccessRules};
use crate::audit::{ConnectionEnd, Daemon};
use crate::config::check_name;
use crate::limits::{ConnPermit, GaugePermits};
use crate::net;
use crate::pipe::{pipe_tcp_throttled, PipeCounters};
use crate::protocol::{
    datagram, hostnames, ClientArrived, ListenerSpec, Message, PoolAssign, Token,
};
use crate::ratelimit::PipeThrottle;
use crate::reuse;
use crate::transport::Stream;

/// A public client as the offer and the pipe see it: a TCP connection, or a UDP flow
/// ([`super::udp`]). Reading it gives the bytes that go to the agent (a flow's datagrams
/// already framed), so the warm-pool path can hold and forward them alike.
pub(crate) trait PublicClient: AsyncRead + Unpin + Send + Sized + 'static {
    /// Readies the client for serving and returns the gateway address it reached.
    fn start(&self) -> std::io::Result<SocketAddr>;
    /// Resolves when the client is gone while it waits for its data connection; `sent_bytes`:
    /// bytes of it are held already (see [`client_left`]).
    fn left(&self, sent_bytes: bool) -> impl Future<Output = ()> + Send + '_;
    /// Refused after acceptance (a limit): a TCP client is reset.
    fn refuse(self);
    /// The agent could not serve it: an orderly close.
    fn close(&mut self) -> impl Future<Output = ()> + Send + '_;
    /// Moves bytes both ways between the client and its data connection until either ends.
    fn pipe<'a>(
        self,
        unsent: &'a [u8],
        data: Stream,
        leftover: &'a [u8],
        counters: &'a PipeCounters,
        throttle: &'a PipeThrottle,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a;
    /// Whether it can be piped through a reuse-framed data connection ([`crate::reuse`]): a
    /// TCP client can; a UDP flow's pooled connection carries it unframed and closes after it.
    const REUSABLE: bool = false;
    /// The TCP connection of a [`Self::REUSABLE`] client; any other is given back.
    fn into_reusable(self) -> Result<TcpStream, Self> {
        Err(self)
    }
}

impl PublicClient for TcpStream {
    fn start(&self) -> std::io::Result<SocketAddr> {
        net::tune(self);
        self.local_addr()
    }

    fn left(&self, sent_bytes: bool) -> impl Future<Output = ()> + Send + '_ {
        client_left(self, sent_bytes)
    }

    fn refuse(self) {
        net::reset(self)
    }

    fn close(&mut self) -> impl Future<Output = ()> + Send + '_ {
        // An orderly close (the client's first bytes may be unread): not a reset.
        net::close_gently(self, std::time::Duration::from_secs(1))
    }

    fn pipe<'a>(
        self,
        unsent: &'a [u8],
        data: Stream,
        leftover: &'a [u8],
        counters: &'a PipeCounters,
        throttle: &'a PipeThrottle,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a {
        pipe_tcp_throttled(self, unsent, data, leftover, counters, throttle)
    }

    const REUSABLE: bool = true;

    fn into_reusable(self) -> Result<TcpStream, Self> {
        Ok(self)
    }
}

/// What the accept loops and client tasks of one listener share.
pub(crate) struct ListenerInfo {
    pub spec: ListenerSpec,
    pub rules: AccessRules,
    /// Counters of this listener (kept across its restarts).
    pub stats: Arc<ListenerStats>,
}

/// An open listener: one accept task per port of its range, all stopped together; or, for a
/// listener with host names, its routes on a shared port ([`super::route`]).
pub(crate) struct RunningListener {
    pub spec: ListenerSpec,
    pub addrs: Vec<SocketAddr>,
    /// The IP it bound: the spec's, or the gateway's `[clients] bind` at the time.
    pub bind_ip: std::net::IpAddr,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// The shared port it routes on (the listener's own name and site): left on close.
    routed: Option<(Arc<Shared>, String)>,
    /// Its ports' places in the site's and the gateway's port budgets, given back on close.
    _ports: (GaugePermits, GaugePermits),
}

impl RunningListener {
    /// Validates the pushed spec and binds every port of its range, or none: a range opens and
    /// closes as a whole. The error is one line for the agent's log.
    pub async fn open(
        shared: &Arc<Shared>,
        site: &Arc<Site>,
        spec: ListenerSpec,
    ) -> Result<Self, String> {
        check_name(&spec.name).map_err(|e| format!("invalid listener name {e}"))?;
        // Binding port 0 would open a random port no client knows of.
        if spec.public.ports.first() == 0 {
            return Err(format!(
                "port 0 is not a public port (pushed {}): push the port clients connect to",
                spec.public.ports
            ));
        }
        shared.config().check_public(&spec.public)?;
        let (hostnames, except) = hostnames::split(datagram::rules_of(&spec.clients.except));
        if !hostnames.is_empty() && spec.public.ports.len() != 1 {
            return Err("a listener with host names has one public port, not a range".into());
        }
        if !hostnames.is_empty() && datagram::is_udp(&spec.clients.except) {
            return Err("a UDP listener has no host names: they route TCP clients".into());
        }
        let ports = port_budget(shared, site, spec.public.ports.len())?;
        let rules = AccessRules::parse(spec.clients.default, except)
            .map_err(|e| format!("invalid client rules: {e}"))?;
        let bind_ip = spec.public.ip.unwrap_or(shared.config().client_bind);
        let info = Arc::new(ListenerInfo {
            stats: shared.traffic.listener(&site.name, &spec.name),
            spec: spec.clone(),
            rules,
        });
        let mut running = RunningListener {
            spec,
            addrs: Vec::new(),
            bind_ip,
            cancel: CancellationToken::new(),
            tasks: Vec::new(),
            routed: None,
            _ports: ports,
        };
        if !hostnames.is_empty() {
            let addr = SocketAddr::new(bind_ip, running.spec.public.ports.first());
            shared
                .routes
                .join(shared, addr, site, &info, &hostnames)
                .await?;
            running.addrs = vec![addr];
            running.routed = Some((shared.clone(), site.name.clone()));
            return Ok(running);
        }
        for addr in running.spec.public.socket_addrs(bind_ip) {
            if let Some(holder) = shared.routes.holder(addr).await {
                return Err(format!(
                    "{addr}: the port is shared by host name ({holder}): a listener on it needs hostnames too"
                ));
            }
        }
        // Dropping `bound` on error closes the ports opened so far.
        let bound = Bound::bind(&running.spec, bind_ip)?;
        running.addrs = bound.addrs();
        running.tasks = bound.serve(shared, site, &info, &running.cancel);
        Ok(running)
    }

    /// Closes every port (or leaves the shared one) and waits until the sockets are gone, so
    /// the ports can be reused at once.
    pub async fn stop(self) {
        self.cancel.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some((shared, site)) = self.routed {
            let addr = self.addrs[0];
            shared.routes.leave(addr, &site, &self.spec.name).await;
        }
    }
}

/// The sockets of a listener's ports, before they serve.
enum Bound {
    Tcp(Vec<TcpListener>),
    Udp(Vec<tokio::net::UdpSocket>),
}

impl Bound {
    /// Binds every port of the spec's range with its protocol, or none.
    fn bind(spec: &ListenerSpec, ip: std::net::IpAddr) -> Result<Bound, String> {
        let addrs = spec.public.socket_addrs(ip);
        let failed =
            |addr: SocketAddr, e: std::io::Error| format!("{addr}: {}", describe_bind_error(&e));
        if datagram::is_udp(&spec.clients.except) {
            let bound = addrs.map(|a| super::udp::bind(a).map_err(|e| failed(a, e)));
            return Ok(Bound::Udp(bound.collect::<Result<_, _>>()?));
        }
        let bound = addrs.map(|a| net::bind_listener(a).map_err(|e| failed(a, e)));
        Ok(Bound::Tcp(bound.collect::<Result<_, _>>()?))
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        let addr = |a: std::io::Result<SocketAddr>| a.expect("a bound socket has an address");
        match self {
            Bound::Tcp(l) => l.iter().map(|l| addr(l.local_addr())).collect(),
            Bound::Udp(s) => s.iter().map(|s| addr(s.local_addr())).collect(),
        }
    }

    /// One accept (TCP) or receive (UDP) task per port.
    fn serve(
        self,
        shared: &Arc<Shared>,
        site: &Arc<Site>,
        info: &Arc<ListenerInfo>,
        cancel: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        let (shared, site, info, cancel) = (shared.clone(), site.clone(), info.clone(), cancel);
        match self {
            Bound::Tcp(listeners) => listeners
                .into_iter()
                .map(|l| {
                    let task = accept_loop(
                        shared.clone(),
                        site.clone(),
                        info.clone(),
                        l,
                        cancel.clone(),
                    );
                    tokio::spawn(task)
                })
                .collect(),
            Bound::Udp(sockets) => {
                info.stats.udp.is_udp.store(true, Ordering::Relaxed);
                sockets
                    .into_iter()
                    .map(|s| {
                        let task = super::udp::receive_loop(
                            shared.clone(),
                            site.clone(),
                            info.clone(),
                            s,
                            cancel.clone(),
                        );
                        tokio::spawn(task)
                    })
                    .collect()
            }
        }
    }
}

/// Takes `n` ports from the site's and the gateway's budgets, and checks the descriptors: a push
/// beyond them fails for that listener only, with the limit named.
fn port_budget(
    shared: &Shared,
    site: &Site,
    n: usize,
) -> Result<(GaugePermits, GaugePermits), String> {
    let (total, per_site) = shared.config().limits.listen_ports(shared.fds.limit());
    let Some(here) = site.ports.try_acquire_many(n, per_site) else {
        return Err(format!(
            "{n} more public port(s) would exceed this site's limit of {per_site} ({} open; [limits] max_listen_ports_per_site on the gateway)",
            site.ports.get()
        ));
    };
    let Some(all) = shared.listen_ports.try_acquire_many(n, total) else {
        return Err(format!(
            "{n} more public port(s) would exceed the gateway's limit of {total} ({} open; [limits] max_listen_ports)",
            shared.listen_ports.get()
        ));
    };
    if !shared.fds.admit(n * crate::fds::PER_LISTEN_PORT, true) {
        return Err(format!(
            "the gateway is short of file descriptors ({} of {} in use, {} kept in reserve)",
            shared.fds.in_use(),
            shared.fds.limit(),
            shared.fds.reserve()
        ));
    }
    Ok((here, all))
}

pub(super) fn describe_bind_error(e: &std::io::Error) -> String {
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
    let label = info.spec.name.clone();
    while let Some((stream, client_addr)) = next_client(&listener, &cancel, &label).await {
        if shared.state() != RunState::Running {
            // Pausing closes this socket; a client accepted in between is refused too.
            info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            shared.stats.clients_paused.hit();
            net::reset(stream);
            continue;
        }
        if super::front::trusted(&shared, client_addr) {
            let (site, info) = (site.clone(), info.clone());
            let task = super::front::serve_fronted(shared.clone(), site, info, stream, client_addr);
            shared.tasks.spawn(task);
            continue;
        }
        if !admit_to_listener(&shared, &site, &info, client_addr) {
            net::reset(stream);
            continue;
        }
        let Some(permit) = take_permit(&shared, Some(&info), &label, client_addr) else {
            net::reset(stream);
            continue;
        };
        shared.tasks.spawn(serve_client(
            shared.clone(),
            site.clone(),
            info.clone(),
            stream,
            client_addr,
            permit,
            BytesMut::new(),
        ));
    }
}

/// The next client of a public socket, with its address in canonical form; `None` once
/// `cancel` fires. Accept errors are logged under `label` (a listener, or a shared port).
pub(super) async fn next_client(
    listener: &TcpListener,
    cancel: &CancellationToken,
    label: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            // Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; rules and logs use a.b.c.d.
            Ok((stream, addr)) => {
                return Some((stream, SocketAddr::new(canonical(addr.ip()), addr.port())))
            }
            Err(e) if net::is_resource_exhaustion(&e) => {
                tracing::warn!(listener = %label, "accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!(listener = %label, "accept failed: {e}"),
        }
    }
}

/// The listener's own checks of a new client: its site's bans, its rate limit and automatic
/// bans, its client rules. Counts and logs a refusal.
pub(super) fn admit_to_listener(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client_addr: SocketAddr,
) -> bool {
    // A banned address: refused before anything else (no agent hears of it).
    if is_banned(shared, site, info, client_addr) {
        return false;
    }
    if !within_rate(shared, site, info, client_addr)
        || auto_banned_now(shared, site, info, client_addr)
    {
        return false;
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
        return false;
    }
    true
}

/// The gateway-wide places a client takes: descriptors first (at the limit new clients are
/// refused, so the admin API, agents and established connections keep theirs), then its place
/// among the client connections (in total and per address). `info`: the listener that counts
/// a refusal, when it is known yet.
pub(super) fn take_permit(
    shared: &Shared,
    info: Option<&ListenerInfo>,
    label: &str,
    client_addr: SocketAddr,
) -> Option<ConnPermit> {
    if !shared.fds.admit(crate::fds::PER_CLIENT, false) {
        over_limit(
            shared,
            label,
            client_addr,
            format_args!(
                "the gateway's open files are near their limit of {} ({} kept in reserve)",
                shared.fds.limit(),
                shared.fds.reserve()
            ),
        );
        return None;
    }
    match shared.clients.try_acquire(client_addr.ip()) {
        Ok(p) => Some(p),
        Err(limit) => {
            if let Some(info) = info {
                info.stats.rejected.fetch_add(1, Ordering::Relaxed);
            }
            let what = format_args!("client connections reached {limit}");
            over_limit(shared, label, client_addr, what);
            None
        }
    }
}

/// Whether the site bans the client's address; counts it, and logs it at most once per 10 s
/// per ban.
pub(crate) fn is_banned(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client: SocketAddr,
) -> bool {
    let Some(ban) = site.bans.check(client.ip()) else {
        return false;
    };
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    shared.stats.clients_banned.hit();
    if ban.should_log() {
        tracing::info!(
            listener = %info.spec.name, client = %client,
            "client refused: banned ({})", ban.describe()
        );
    }
    true
}

/// Whether the client is within its listener's `new_connections_per_ip`; counts and logs (at
/// most once per 10 s) a refusal.
pub(crate) fn within_rate(
    shared: &Shared,
    site: &Site,
    info: &ListenerInfo,
    client: SocketAddr,
) -> bool {
    let Some(limits) = site.limits.get(&info.spec.name) else {
        return true;
    };
    if limits.admit(client.ip()) {
        return true;
    }
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    let occ = shared.stats.clients_rate_limited.hit();
    if occ.log {
        tracing::info!(
            listener = %info.spec.name, client = %client,
            "client refused: over the listener's new_connections_per_ip{}", occ.tally()
        );
    }
    false
}

/// Whether this connection is one too many for the listener's `auto_ban`: the address is then
/// banned on this gateway, and this connection refused as banned.
fn auto_banned_now(shared: &Shared, site: &Site, info: &ListenerInfo, client: SocketAddr) -> bool {
    let banner = site.autobans.get(&info.spec.name);
    let Some(verdict) = banner.and_then(|b| b.on_connect(client.ip())) else {
        return false;
    };
    auto_ban(site, info, client, verdict);
    info.stats.rejected.fetch_add(1, Ordering::Relaxed);
    shared.stats.clients_banned.hit();
    true
}

/// Puts an automatic ban in force (and logs it, at most 20 lines per 10 s).
fn auto_ban(site: &Site, info: &ListenerInfo, client: SocketAddr, v: super::autoban::Verdict) {
    static BANNED: crate::limits::Event = crate::limits::Event::some_per_10s();
    let occ = BANNED.hit();
    if occ.log {
        tracing::warn!(
            listener = %info.spec.name, client = %client,
            "banned {} for {}: {}{}",
            v.net, humantime::format_duration(v.lasts), v.reason, occ.tally()
        );
    }
    site.bans.add(AUTOMATIC, v.net, v.lasts, v.reason);
}

/// The name automatic bans are listed under (no agent can have it).
const AUTOMATIC: &str = "(automatic)";

/// Reports the end of a served client to its listener's `auto_ban` (short connections).
struct EndWatch {
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    client: SocketAddr,
    started: Instant,
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        let Some(banner) = self.site.autobans.get(&self.info.spec.name) else {
            return;
        };
        if let Some(v) = banner.on_end(self.client.ip(), self.started.elapsed()) {
            auto_ban(&self.site, &self.info, self.client, v);
        }
    }
}

/// Counts a client refused by a limit; logs at most once per interval.
fn over_limit(shared: &Shared, label: &str, client: SocketAddr, what: std::fmt::Arguments<'_>) {
    let occ = shared.stats.clients_over_limit.hit();
    if occ.log {
        tracing::warn!(listener = %label, client = %client, "client refused: {what}{}", occ.tally());
    }
}

/// Resolves when the client has closed or reset its connection; never resolves while it is
/// merely sending (its early bytes stay queued for the backend). A client that half-closes
/// before sending a single byte looks the same as one that left; no real protocol does that
/// and then waits for an answer. With `sent_bytes` (bytes of it are held already) an end of
/// stream is that half-close after its request, not a departure: only a reset counts then.
async fn client_left(client: &TcpStream, sent_bytes: bool) {
    let mut probe = [0u8; 1];
    loop {
        if client.readable().await.is_err() {
            return;
        }
        match client.peek(&mut probe).await {
            Ok(0) if sent_bytes => std::future::pending::<()>().await,
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

pub(crate) async fn serve_client<C: PublicClient>(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    mut client: C,
    client_addr: SocketAddr,
    _permit: ConnPermit,
    first: BytesMut,
) {
    let started = Instant::now();
    let _end = EndWatch {
        site: site.clone(),
        info: info.clone(),
        client: client_addr,
        started,
    };
    let listener = info.spec.name.as_str();
    let Ok(gateway_addr) = client.start() else {
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
        info.stats.rejected.fetch_add(1, Ordering::Relaxed);
        over_limit(&shared, &info.spec.name, client_addr, what);
        client.refuse();
        return;
    };
    info.stats.accepted.fetch_add(1, Ordering::Relaxed);
    // Every accepted client ends up closed: counted here unless it reaches the pipe, whose end
    // the connection table counts.
    let mut closed = ClosedOnDrop(Some(info.stats.clone()));
    let id = shared.next_client_id();
    // Every accepted client ends with one audit record, however it ends.
    let record = |outcome,
                  error: Option<&str>,
                  agent: Option<&str>,
                  agent_addr: Option<SocketAddr>,
                  bytes: (u64, u64)| {
        ConnectionEnd {
            conn: id,
            site: &site.name,
            listener,
            client: client_addr,
            gateway: gateway_addr,
            agent,
            agent_addr,
            backend: None,
            bytes_from_client: bytes.0,
            bytes_to_client: bytes.1,
            duration: started.elapsed(),
            outcome,
            error,
        }
        .log(Daemon::Gateway)
    };
    let offer = Offer {
        id,
        listener: listener.to_string(),
        port_offset,
        client_addr,
        gateway_addr,
    };
    // A warm pool connection, when an agent keeps some: no notification round trip. Otherwise,
    // or when the pooled connections handed this client did not answer, announce it.
    // Bytes read to route the client (a shared port) are its first held bytes: they reach the
    // agent first, on whichever path, unchanged.
    let mut held = Held {
        bytes: first,
        eof: false,
    };
    let mut shunned = Vec::new();
    let (data, forwarded, via) =
        match from_pool(&shared, &site, &offer, &mut client, &mut held, &mut shunned).await {
            FromPool::Taken(data, forwarded) => (data, forwarded, " (warm pool)"),
            FromPool::ClientGone => {
                record("left", None, None, None, (held.bytes.len() as u64, 0));
                return;
            }
            FromPool::Empty => {
                let announced =
                    announce(&shared, &site, &offer, &mut client, &held, &shunned).await;
                match announced {
                    Ok(data) => (data, 0, ""),
                    Err(end) => {
                        let bytes = (held.bytes.len() as u64, 0);
                        let (error, agent) = (end.error.as_deref(), end.agent.as_deref());
                        record(end.outcome, error, agent, None, bytes);
                        return;
                    }
                }
            }
        };
    drop((pending_total, pending_here));

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
        failure: Default::default(),
    });
    // Client bytes that already reached the agent while it had not answered yet.
    entry
        .counters
        .a_read
        .fetch_add(forwarded as u64, Ordering::Relaxed);
    entry
        .counters
        .b_written
        .fetch_add(forwarded as u64, Ordering::Relaxed);
    closed.0 = None;
    let data_agent = data.agent.clone();
    shared.traffic.start(entry.clone());
    let unsent = &held.bytes[forwarded..];
    let throttle = site
        .limits
        .get(listener)
        .map(|l| l.throttle())
        .unwrap_or_default();
    // The agent's certificate, for a reload that revokes it to cut this connection.
    let chain = data.stream.peer_chain();
    let agent_ip = data.agent_addr.ip();
    let result = tokio::select! {
        r = pipe_data(&shared, &site, client, unsent, data, &entry.counters, &throttle) => r,
        _ = shared.kill.cancelled() => Err(std::io::Error::other("the gateway is restarting or ran out of drain time")),
        why = shared.cut(agent_ip, chain.as_deref(), true) => Err(std::io::Error::other(why)),
        () = site.bans.until_banned(client_addr.ip()) => Err(std::io::Error::other("cut: the client's address was banned")),
    };
    shared.traffic.finish(id);
    let bytes = entry.bytes();
    let moved = (bytes.client_read, bytes.client_written);
    let (agent, agent_addr) = (data_agent.as_deref(), Some(entry.agent_addr));
    match result {
        _ if entry.failure.get().is_some() => record(
            "agent_failed",
            entry.failure.get().map(String::as_str),
            agent,
            agent_addr,
            moved,
        ),
        Ok(()) => record("closed", None, agent, agent_addr, moved),
        Err(e) if shared.kill.is_cancelled() => {
            record("killed", Some(&e.to_string()), agent, agent_addr, moved)
        }
        Err(e) => record("error", Some(&e.to_string()), agent, agent_addr, moved),
    }
}

/// Pipes the client and its data connection; a reuse-framed one ([`crate::reuse`]) goes back to
/// the site's pool when the client ended cleanly both ways.
async fn pipe_data<C: PublicClient>(
    shared: &Shared,
    site: &Site,
    client: C,
    unsent: &[u8],
    data: DataConn,
    counters: &PipeCounters,
    throttle: &PipeThrottle,
) -> std::io::Result<()> {
    let client = match client.into_reusable() {
        Ok(tcp) => tcp,
        Err(flow) => {
            return flow
                .pipe(unsent, data.stream, &data.leftover, counters, throttle)
                .await
        }
    };
    let Some(ticket) = data.reuse else {
        return client
            .pipe(unsent, data.stream, &data.leftover, counters, throttle)
            .await;
    };
    let (limits, agent_addr) = (shared.config().limits.clone(), data.agent_addr);
    let last = pool::is_last(&ticket.served, &limits);
    let piped = reuse::pipe_framed(
        client,
        unsent,
        data.stream,
        data.leftover,
        b"",
        last,
        counters,
        throttle,
    );
    let Some((stream, leftover)) = piped.await? else {
        return Ok(());
    };
    let moved = counters.snapshot();
    let back = pool::Returned {
        stream,
        leftover,
        agent_id: ticket.agent_id,
        agent_addr,
        agent: data.agent.unwrap_or_default(),
        reuse: pool::Reuse {
            clients: ticket.served.clients + 1,
            bytes: ticket.served.bytes + moved.a_read + moved.b_read,
        },
    };
    pool::park_again(site, limits.max_frame, back).await;
    Ok(())
}

/// What a client's offer says, on whichever path it goes (pool or announcement).
struct Offer {
    id: u64,
    listener: String,
    port_offset: u16,
    client_addr: SocketAddr,
    gateway_addr: SocketAddr,
}

enum FromPool {
    /// A pooled connection took the client; that many held bytes already went to it.
    Taken(DataConn, usize),
    /// No agent's pooled connection could take it (none idle, or none answered).
    Empty,
    ClientGone,
}

/// Hands the client to pooled connections until one takes it. An agent whose pooled connection
/// does not answer (a hung agent, on protocol v2) is shunned for this client: its idle
/// connections are closed, and the client's bytes are held for the next try.
async fn from_pool<C: PublicClient>(
    shared: &Shared,
    site: &Site,
    offer: &Offer,
    client: &mut C,
    held: &mut Held,
    shunned: &mut Vec<u64>,
) -> FromPool {
    let assign = PoolAssign {
        id: offer.id,
        listener: offer.listener.clone(),
        port_offset: offer.port_offset,
        client_addr: offer.client_addr,
        gateway_addr: offer.gateway_addr,
    };
    while let Some(mut handed) = site.pool.assign(&assign, shunned).await {
        if !C::REUSABLE {
            // Carried unframed, and closed after the flow on both sides (protocol.md 7.16).
            handed.reuse = None;
        }
        let (agent_id, agent_addr) = (handed.agent_id, handed.agent_addr);
        match handed.answer(offer.id, client, held).await {
            Answer::Accepted { data, forwarded } => return FromPool::Taken(data, forwarded),
            Answer::ClientGone => return FromPool::ClientGone,
            Answer::Unanswered => {
                shunned.push(agent_id);
                site.pool.remove_agent(agent_id);
                // Other clients avoid it too until it is heard from again.
                site.mark_suspect(agent_id);
                let occ = shared.stats.pool_unanswered.hit();
                if occ.log {
                    tracing::warn!(
                        listener = %offer.listener, client = %offer.client_addr, id = offer.id,
                        "the agent at {agent_addr} did not answer on its pooled connection within {}; \
                         its idle pooled connections are closed and the client is offered again{}",
                        humantime::format_duration(ACCEPT_LIMIT), occ.tally()
                    );
                }
            }
        }
    }
    FromPool::Empty
}

/// How a client that never reached a data connection ended, for its audit record.
struct NotServed {
    outcome: &'static str,
    error: Option<String>,
    /// The agent that said it could not serve the client.
    agent: Option<String>,
}

impl NotServed {
    fn new(outcome: &'static str, error: Option<String>) -> Self {
        NotServed {
            outcome,
            error,
            agent: None,
        }
    }
}

/// The slow path: records the client as pending, offers it (`ClientArrived`) to the least busy
/// agent (not a `shunned` one while another is there) and waits for the data connection that
/// claims it. If that agent leaves first, the client is offered again, until its deadline. Logs
/// and counts every way this can fail.
async fn announce<C: PublicClient>(
    shared: &Shared,
    site: &Site,
    offer: &Offer,
    client: &mut C,
    held: &Held,
    shunned: &[u64],
) -> Result<DataConn, NotServed> {
    let (id, listener, client_addr) = (offer.id, offer.listener.as_str(), offer.client_addr);
    let limits = &shared.config().limits;
    let token = Token::random();
    let deadline = tokio::time::Instant::now() + limits.pending_timeout;
    let mut claim = shared.pending.insert(id, token, &site.name);
    let mut arrived = ClientArrived {
        id,
        token,
        listener: offer.listener.clone(),
        port_offset: offer.port_offset,
        client_addr,
        gateway_addr: offer.gateway_addr,
    };
    // With no agent left, wait for one to (re)connect. An agent that reports it cannot serve
    // the client (its backend refused, its limits, its data connection could not reach this
    // gateway) is not asked again; the client is offered to the site's next agent, and fails
    // with the last reason when every connected agent has failed it.
    let mut offered_to: Option<String> = None;
    let (mut failed_by, mut last_failure) = (Vec::<u64>::new(), None::<String>);
    let wait = async {
        loop {
            let joined = site.joined.notified();
            let Some(agent) = site.pick_agent(shunned, &failed_by) else {
                if let Some(reason) = last_failure.take() {
                    return Ok(Claim::Failed(reason));
                }
                tokio::select! {
                    c = &mut claim => return c.map_err(|_| "the offer was withdrawn".to_string()),
                    () = joined => continue,
                }
            };
            if let Some(previous) = offered_to.replace(agent.name.clone()) {
                match &last_failure {
                    Some(reason) if shared.stats.clients_reoffered.hit().log => tracing::info!(
                        listener, client = %client_addr, id,
                        "agent {previous} could not serve client ({reason}); offered again, to agent {}",
                        agent.name
                    ),
                    Some(_) => {}
                    None => tracing::info!(
                        listener, client = %client_addr, id,
                        "agent {previous} is gone; client offered again, to agent {}", agent.name
                    ),
                }
            }
            shared.pending.offered_to(id, agent.id);
            agent.inflight.fetch_add(1, Ordering::Relaxed);
            let _inflight = Inflight(agent.inflight.clone());
            // The queue may be full while the agent's writer waits for a hung agent: the
            // session ends within three heartbeats, and `gone` says so.
            let queued = tokio::select! {
                sent = agent.tx.send(Message::ClientArrived(arrived.clone())) => sent.is_ok(),
                () = agent.gone.cancelled() => false,
            };
            if !queued {
                // Its control channel just closed: it leaves the site; pick again.
                agent.gone.cancelled().await;
                continue;
            }
            let claimed = tokio::select! {
                c = &mut claim => c,
                () = agent.gone.cancelled() => continue,
            };
            match claimed {
                Ok(Claim::Failed(reason)) => {
                    // Offer it again under a fresh token: the failed offer's token is spent.
                    failed_by.push(agent.id);
                    last_failure = Some(reason);
                    arrived.token = Token::random();
                    claim = shared.pending.insert(id, arrived.token, &site.name);
                }
                other => return other.map_err(|_| "the offer was withdrawn".to_string()),
            }
        }
    };
    // A client that leaves while waiting gives its pending place back at once instead of at
    // its deadline (otherwise connect-and-close loops could hold every pending place). One
    // that half-closed after its first bytes (already held) has not left, whether the hold
    // read its end of stream or stopped at its limit just before it (a 64 KiB request).
    let left = async {
        if held.eof {
            std::future::pending::<()>().await
        }
        client.left(!held.bytes.is_empty()).await
    };
    let outcome = tokio::select! {
        outcome = tokio::time::timeout_at(deadline, wait) => outcome,
        () = left => {
            shared.pending.remove(id);
            tracing::debug!(listener, client = %client_addr, "client left before its data connection arrived");
            return Err(NotServed::new("left", None));
        }
        // The control port is closed: no data connection can claim it any more. (The stop
        // is logged once, not once per waiting client.)
        () = shared.shutdown.cancelled() => {
            shared.pending.remove(id);
            tracing::debug!(listener, client = %client_addr, "gateway stopping: closing a client still waiting for its data connection");
            return Err(NotServed::new("stopping", None));
        }
    };
    let agent_name = offered_to.unwrap_or_else(|| "-".to_string());
    let reason = match outcome {
        Ok(Ok(Claim::Data(mut data))) => {
            data.agent.get_or_insert(agent_name);
            return Ok(data);
        }
        Ok(Ok(Claim::Failed(reason))) => reason,
        Ok(Err(reason)) => {
            shared.pending.remove(id);
            tracing::warn!(listener, client = %client_addr, "closing client: {reason}");
            return Err(NotServed::new("withdrawn", Some(reason)));
        }
        Err(_) => {
            shared.pending.remove(id);
            let occ = shared.stats.clients_unclaimed.hit();
            let why = format!(
                "no data connection within {}",
                humantime::format_duration(limits.pending_timeout)
            );
            if occ.log {
                tracing::warn!(
                    listener, client = %client_addr, agent = %agent_name,
                    "{why}; closing client{}", occ.tally()
                );
            }
            return Err(NotServed::new("unclaimed", Some(why)));
        }
    };
    shared.pending.remove(id);
    client.close().await;
    let occ = shared.stats.clients_failed.hit();
    if occ.log {
        tracing::warn!(
            listener, client = %client_addr, agent = %agent_name,
            "agent could not serve client: {reason}{}", occ.tally()
        );
    }
    Err(NotServed {
        outcome: "agent_failed",
        error: Some(reason),
        agent: Some(agent_name),
    })
}
