//! Public listeners: a pushed spec validated and bound (a port range opens and closes as a
//! whole, within the site's and the gateway's port budgets), one accept task per port, each
//! new client admitted ([`super::admit`]) and handed to its own task ([`super::client`]).
//!
//! A client's task is owned by the gateway's task tracker, not by its listener: closing a
//! listener stops new clients only and never touches established connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::admit::{admit_to_listener, take_permit};
use super::site::Site;
use super::stats::ListenerStats;
use super::{RunState, Shared};
use crate::access::{canonical, AccessRules};
use crate::config::check_name;
use crate::limits::GaugePermits;
use crate::net;
use crate::protocol::{datagram, hostnames, ListenerSpec};

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
        if datagram::is_udp(&spec.clients.except) {
            datagram::idle_of(&spec.clients.except)?;
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
        shared.tasks.spawn(super::client::serve(
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
