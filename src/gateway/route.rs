//! Public ports shared by host name: one TCP socket per shared port, whatever the number of
//! listeners (of one site or several) that declared it with `hostnames`.
//!
//! Rules:
//! - A shared port is open while at least one listener holds a route on it; the last route
//!   leaving closes it. Opening, joining and leaving are serialized by one lock, so a port
//!   closing and another site's listener opening on it never race for the socket.
//! - A name is held by one listener of one site per port. A second claim (another site, or
//!   another listener) fails for that listener alone, with the holder named, and the names it
//!   already has stay theirs.
//! - At accept, gateway-wide checks (pause, open files, connection limits) come first; then the
//!   client's first bytes are read ([`crate::peek`]: at most 16 KiB, within
//!   [`ROUTE_PEEK_TIMEOUT`]) and its name picks the route: the exact name, then the longest
//!   wildcard (`*.example.org` matches any name under it), then `"*"`. Only then are the
//!   listener's own checks made (bans, rates, client rules), since they belong to the listener.
//! - The bytes read go on unchanged: they are the client's held bytes, which the offer path
//!   forwards (warm pool) or the pipe writes first, after the agent's PROXY header.
//! - A client silent until the deadline (`route_timeout`), sending neither TLS nor HTTP/1
//!   (`route_garbage`), or naming a host no listener serves on a port without a `"*"`
//!   (`route_unknown`) is closed and counted; no agent hears of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::admit::{admit_to_listener, take_permit};
use super::listener::{next_client, ListenerInfo};
use super::site::Site;
use super::{RunState, Shared};
use crate::limits::ConnPermit;
use crate::net;
use crate::peek::{classify, Peeked, PEEK_LIMIT};

/// How long a client on a shared port has to send its ClientHello or request head.
pub const ROUTE_PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where clients naming a host go.
#[derive(Clone)]
struct Route {
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
}

/// What a table needs of a route: whose it is (site, listener).
trait Owned: Clone {
    fn owner(&self) -> (&str, &str);

    fn is(&self, site: &str, listener: &str) -> bool {
        self.owner() == (site, listener)
    }
}

impl Owned for Route {
    fn owner(&self) -> (&str, &str) {
        (&self.site.name, &self.info.spec.name)
    }
}

/// The routes of one port: exact names, wildcard suffixes (`*.example.org` is kept as
/// `example.org`) and the default.
struct Table<R = Route> {
    exact: HashMap<String, R>,
    wildcard: HashMap<String, R>,
    default: Option<R>,
}

impl<R> Default for Table<R> {
    fn default() -> Self {
        Table {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: None,
        }
    }
}

impl<R: Owned> Table<R> {
    /// The route for a client naming `name` (`None`: no name).
    fn find(&self, name: Option<&str>) -> Option<&R> {
        let named = name.and_then(|name| {
            self.exact.get(name).or_else(|| {
                // "a.b.example.org": *.b.example.org, then *.example.org, then *.org.
                let mut rest = name;
                while let Some((_, parent)) = rest.split_once('.') {
                    if let Some(r) = self.wildcard.get(parent) {
                        return Some(r);
                    }
                    rest = parent;
                }
                None
            })
        });
        named.or(self.default.as_ref())
    }

    fn holder(&self, pattern: &str) -> Option<&R> {
        match pattern {
            "*" => self.default.as_ref(),
            p => match p.strip_prefix("*.") {
                Some(suffix) => self.wildcard.get(suffix),
                None => self.exact.get(p),
            },
        }
    }

    fn insert(&mut self, pattern: &str, route: R) {
        match pattern {
            "*" => self.default = Some(route),
            p => match p.strip_prefix("*.") {
                Some(suffix) => drop(self.wildcard.insert(suffix.to_string(), route)),
                None => drop(self.exact.insert(p.to_string(), route)),
            },
        }
    }

    /// Removes every route of one listener.
    fn remove(&mut self, site: &str, listener: &str) {
        self.exact.retain(|_, r| !r.is(site, listener));
        self.wildcard.retain(|_, r| !r.is(site, listener));
        if self.default.as_ref().is_some_and(|r| r.is(site, listener)) {
            self.default = None;
        }
    }

    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }

    fn views(&self, addr: SocketAddr) -> Vec<RouteView> {
        let view = |name: String, r: &R| RouteView {
            addr,
            port: addr.port(),
            hostname: name,
            site: r.owner().0.to_string(),
            listener: r.owner().1.to_string(),
        };
        let mut all: Vec<RouteView> = self.exact.iter().map(|(n, r)| view(n.clone(), r)).collect();
        all.extend(self.wildcard.iter().map(|(n, r)| view(format!("*.{n}"), r)));
        all.extend(self.default.iter().map(|r| view("*".to_string(), r)));
        all
    }
}

/// One route as the admin API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteView {
    pub port: u16,
    pub hostname: String,
    pub site: String,
    pub listener: String,
    pub addr: SocketAddr,
}

/// An open shared port.
struct Port {
    table: Arc<RwLock<Table>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Every shared port of the gateway.
#[derive(Default)]
pub(crate) struct SharedPorts {
    ports: tokio::sync::Mutex<HashMap<SocketAddr, Port>>,
    /// The routes as of the last change, readable without awaiting (admin API).
    view: Mutex<Vec<RouteView>>,
}

impl SharedPorts {
    /// Routes `names` on `addr` to a listener, opening the port if it is not open yet. Fails
    /// (one line for the agent's log) if another listener holds one of the names there, or the
    /// port cannot be bound; nothing is routed then.
    pub async fn join(
        &self,
        shared: &Arc<Shared>,
        addr: SocketAddr,
        site: &Arc<Site>,
        info: &Arc<ListenerInfo>,
        names: &[String],
    ) -> Result<(), String> {
        let mut ports = self.ports.lock().await;
        if let Some(port) = ports.get(&addr) {
            let mut table = port.table.write();
            claim(&mut table, addr, route(site, info), names)?;
            drop(table);
            self.refresh(&ports);
            return Ok(());
        }
        let listener = net::bind_listener(addr).map_err(|e| {
            format!(
                "{addr}: {} (a port shared by host name needs hostnames on every listener using it)",
                super::listener::describe_bind_error(&e)
            )
        })?;
        let mut table = Table::default();
        claim(&mut table, addr, route(site, info), names)?;
        let table = Arc::new(RwLock::new(table));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            shared.clone(),
            table.clone(),
            listener,
            cancel.clone(),
        ));
        ports.insert(
            addr,
            Port {
                table,
                cancel,
                task,
            },
        );
        self.refresh(&ports);
        Ok(())
    }

    /// Removes a listener's routes from `addr`; the port closes (and is gone when this returns)
    /// if none are left.
    pub async fn leave(&self, addr: SocketAddr, site: &str, listener: &str) {
        let mut ports = self.ports.lock().await;
        let Some(port) = ports.get(&addr) else {
            return;
        };
        let empty = {
            let mut table = port.table.write();
            table.remove(site, listener);
            table.is_empty()
        };
        if empty {
            let port = ports.remove(&addr).expect("looked up above");
            port.cancel.cancel();
            let _ = port.task.await;
        }
        self.refresh(&ports);
    }

    /// Whether `addr` is a shared port (a listener without host names cannot use it), and
    /// which listener holds routes there, for the error.
    pub async fn holder(&self, addr: SocketAddr) -> Option<String> {
        let ports = self.ports.lock().await;
        let port = ports.get(&addr)?;
        let views = port.table.read().views(addr);
        views
            .first()
            .map(|v| format!("listener \"{}\" of site \"{}\"", v.listener, v.site))
    }

    /// Every route, by port and name.
    pub fn views(&self) -> Vec<RouteView> {
        self.view.lock().clone()
    }

    fn refresh(&self, ports: &HashMap<SocketAddr, Port>) {
        let mut all: Vec<RouteView> = ports
            .iter()
            .flat_map(|(addr, p)| p.table.read().views(*addr))
            .collect();
        all.sort();
        *self.view.lock() = all;
    }
}

/// Adds a listener's names to a port's table, all or none.
fn claim<R: Owned>(
    table: &mut Table<R>,
    addr: SocketAddr,
    route: R,
    names: &[String],
) -> Result<(), String> {
    let (site, listener) = route.owner();
    for name in names {
        if let Some(other) = table.holder(name) {
            if !other.is(site, listener) {
                let (their_site, theirs) = other.owner();
                return Err(format!(
                    "host name \"{name}\" on port {} is already served by listener \"{theirs}\" of site \"{their_site}\": \
                     each name of a shared port belongs to one listener",
                    addr.port(),
                ));
            }
        }
    }
    for name in names {
        table.insert(name, route.clone());
    }
    Ok(())
}

fn route(site: &Arc<Site>, info: &Arc<ListenerInfo>) -> Route {
    Route {
        site: site.clone(),
        info: info.clone(),
    }
}

/// Accepts the clients of a shared port: gateway-wide checks, then each client's own task reads
/// its first bytes and routes it.
async fn accept_loop(
    shared: Arc<Shared>,
    table: Arc<RwLock<Table>>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let label = format!("port {port} (shared)");
    while let Some((stream, client_addr)) = next_client(&listener, &cancel, &label).await {
        if shared.state() != RunState::Running {
            shared.stats.clients_paused.hit();
            net::reset(stream);
            continue;
        }
        if super::front::trusted(&shared, client_addr) {
            let task = route_fronted(
                shared.clone(),
                table.clone(),
                stream,
                client_addr,
                label.clone(),
            );
            shared.tasks.spawn(task);
            continue;
        }
        let Some(permit) = take_permit(&shared, None, &label, client_addr) else {
            net::reset(stream);
            continue;
        };
        shared.tasks.spawn(route_client(
            shared.clone(),
            table.clone(),
            stream,
            client_addr,
            permit,
            BytesMut::with_capacity(2048),
        ));
    }
}

/// A connection from a trusted front balancer ([`super::front`]): its PROXY header first,
/// then the connection limits with the client's address, then routing as any client.
async fn route_fronted(
    shared: Arc<Shared>,
    table: Arc<RwLock<Table>>,
    mut client: TcpStream,
    peer: SocketAddr,
    label: String,
) {
    let read = super::front::read_client(&shared, &mut client, peer, &label).await;
    let Some((client_addr, first)) = read else {
        return;
    };
    let Some(permit) = take_permit(&shared, None, &label, client_addr) else {
        net::reset(client);
        return;
    };
    route_client(shared, table, client, client_addr, permit, first).await;
}

/// Reads a client's first bytes, finds its route, and serves it there.
async fn route_client(
    shared: Arc<Shared>,
    table: Arc<RwLock<Table>>,
    mut client: TcpStream,
    client_addr: SocketAddr,
    permit: ConnPermit,
    mut first: BytesMut,
) {
    net::tune(&client);
    let port = client.local_addr().map(|a| a.port()).unwrap_or(0);
    let peeked = tokio::time::timeout(ROUTE_PEEK_TIMEOUT, read_name(&mut client, &mut first));
    let refuse = |event: &crate::limits::Event, why: &dyn std::fmt::Display| {
        let occ = event.hit();
        if occ.log {
            tracing::info!(port, client = %client_addr, "client closed: {why}{}", occ.tally());
        }
    };
    let name = match peeked.await {
        Err(_) => {
            let why = format!(
                "no TLS ClientHello or HTTP request head within {} ({} bytes)",
                humantime::format_duration(ROUTE_PEEK_TIMEOUT),
                first.len()
            );
            refuse(&shared.stats.route_timeout, &why);
            return;
        }
        // It left, or reset: nothing to count.
        Ok(Err(_)) => return,
        Ok(Ok(Peeked::Garbage(why))) => {
            refuse(&shared.stats.route_garbage, &why);
            net::reset(client);
            return;
        }
        Ok(Ok(Peeked::Named(name))) => Some(name),
        Ok(Ok(_)) => None,
    };
    let route = table.read().find(name.as_deref()).cloned();
    let Some(Route { site, info }) = route else {
        let shown = name.as_deref().unwrap_or("(none)");
        let why = format!("no listener serves host name \"{shown}\" on this port, and none is its default (\"*\")");
        refuse(&shared.stats.route_unknown, &why);
        net::reset(client);
        return;
    };
    if !admit_to_listener(&shared, &site, &info, client_addr) {
        net::reset(client);
        return;
    }
    super::client::serve(shared, site, info, client, client_addr, permit, first).await;
}

/// Reads until the first bytes name a host, or cannot. An end of stream before that is
/// garbage if bytes came, a departure if none did.
async fn read_name(client: &mut TcpStream, first: &mut BytesMut) -> std::io::Result<Peeked> {
    // Bytes that came after a front balancer's PROXY header may hold the whole name already.
    match classify(first) {
        Peeked::NeedMore => {}
        decided => return Ok(decided),
    }
    loop {
        let mut chunk = [0u8; 4096];
        let room = (PEEK_LIMIT - first.len()).min(chunk.len());
        let n = client.read(&mut chunk[..room]).await?;
        if n == 0 {
            if first.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(Peeked::Garbage(
                "the client closed before its ClientHello or request head was complete",
            ));
        }
        first.extend_from_slice(&chunk[..n]);
        match classify(first) {
            Peeked::NeedMore => continue,
            decided => return Ok(decided),
        }
    }
}

#[cfg(test)]
mod tests;
