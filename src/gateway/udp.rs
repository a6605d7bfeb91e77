//! UDP listeners: one socket per public port, and a flow per client address and port.
//!
//! The receive loop of a port owns nothing but its socket and its flow table. A datagram from
//! a known client goes to its flow's queue; one from a new client opens a flow if the site's
//! bans, the listener's client rules, the gateway's connection limits (a flow holds a data connection
//! like a TCP client: `max_connections`, `max_connections_per_ip`) and `[limits]
//! max_udp_flows_per_listener` allow it. A flow is then served exactly like a TCP client
//! ([`super::client::serve`]: warm pool or offer, claim, TLS as configured), its
//! datagrams framed on the data connection ([`crate::protocol::datagram`]).
//!
//! Datagrams are never split: one over `[limits] max_datagram` is dropped and counted, as is
//! one that finds its flow's queue full. Over the listener's `client_rate` or `listener_rate`
//! (either direction) a datagram is dropped whole and counted (`rate`), never delayed
//! ([`crate::ratelimit::Throttle::try_pass`]). A flow ends when its data connection ends (the agent
//! closes it after the listener's `idle_timeout`), when its listener closes (the port is the
//! listener, so a closed listener ends its flows and the agent's next push can bind the port
//! again), or when no datagram went either way for the idle timeout plus
//! [`datagram::GATEWAY_IDLE_MARGIN`]: a hung or hostile agent cannot keep a flow, and its
//! place in `max_udp_flows_per_listener`, for ever. A write to the agent that does not finish
//! within that time ends the flow the same way. Such ends are counted (`flows_idle_ended`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::admit::{is_banned, within_rate};
use super::listener::ListenerInfo;
use super::public::PublicClient;
use super::site::Site;
use super::stats::UdpDrop;
use super::{RunState, Shared};
use crate::access::canonical;
use crate::limits::GaugePermit;
use crate::pipe::PipeCounters;
use crate::protocol::datagram;
use crate::ratelimit::PipeThrottle;
use crate::transport::Stream;

/// Datagrams a flow may have queued while its data connection is slow or not there yet.
const FLOW_QUEUE: usize = 256;

/// The flows of one public port, by client address.
#[derive(Default)]
struct Flows {
    map: Mutex<HashMap<SocketAddr, FlowSlot>>,
    next: AtomicU64,
}

struct FlowSlot {
    id: u64,
    tx: mpsc::Sender<Bytes>,
}

/// Binds a UDP socket on `addr` (dual-stack on `[::]`, as the TCP listeners are).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Receives the datagrams of one port until the listener closes.
pub(crate) async fn receive_loop(
    shared: Arc<Shared>,
    site: Arc<Site>,
    info: Arc<ListenerInfo>,
    socket: UdpSocket,
    cancel: CancellationToken,
) {
    let socket = Arc::new(socket);
    let flows = Arc::new(Flows::default());
    // Checked when the listener opened.
    let idle = datagram::idle_of(&info.spec.clients.except).unwrap_or(datagram::DEFAULT_IDLE)
        + datagram::GATEWAY_IDLE_MARGIN;
    // One byte more than any datagram may carry: a larger one shows as oversize, never cut.
    let mut buf = vec![0u8; datagram::MAX_PAYLOAD + 1];
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // An ICMP error for an earlier reply; the socket itself is fine.
                Err(e) => { tracing::debug!(listener = %info.spec.name, "UDP receive: {e}"); continue }
            },
        };
        let client = SocketAddr::new(canonical(from.ip()), from.port());
        let udp = &info.stats.udp;
        if n > shared.config().limits.max_datagram {
            udp.dropped(UdpDrop::Oversize);
            continue;
        }
        let datagram = Bytes::copy_from_slice(&buf[..n]);
        let known = {
            let map = flows.map.lock();
            map.get(&client).map(|f| f.tx.clone())
        };
        let tx = match known {
            Some(tx) => tx,
            None => match open_flow(
                &shared,
                &site,
                &info,
                (&socket, &flows, idle),
                client,
                &cancel,
            ) {
                Some(tx) => tx,
                None => continue,
            },
        };
        if tx.try_send(datagram).is_ok() {
            udp.from_clients.fetch_add(1, Ordering::Relaxed);
        } else {
            udp.dropped(UdpDrop::QueueFull);
        }
    }
}

/// Admits a new flow and starts serving it; `None` (counted) when it is refused.
fn open_flow(
    shared: &Arc<Shared>,
    site: &Arc<Site>,
    info: &Arc<ListenerInfo>,
    (socket, flows, idle): (&Arc<UdpSocket>, &Arc<Flows>, Duration),
    client: SocketAddr,
    cancel: &CancellationToken,
) -> Option<mpsc::Sender<Bytes>> {
    let refused = |why: &str| {
        info.stats.rejected.fetch_add(1, Ordering::Relaxed);
        info.stats.udp.dropped(UdpDrop::Refused);
        let occ = shared.stats.clients_rejected.hit();
        if occ.log {
            tracing::info!(listener = %info.spec.name, client = %client, "UDP flow refused: {why}{}", occ.tally());
        }
    };
    if shared.state() != RunState::Running {
        refused("the gateway is paused");
        return None;
    }
    // Counted and logged (rate limited) as for TCP; a banned address opens no flow.
    if is_banned(shared, site, info, client) {
        info.stats.udp.dropped(UdpDrop::Refused);
        return None;
    }
    // `new_connections_per_ip`: a new flow counts as a new connection (counted and logged
    // there as for TCP).
    if !within_rate(shared, site, info, client) {
        info.stats.udp.dropped(UdpDrop::Refused);
        return None;
    }
    if !info.rules.allows(client.ip()) {
        refused("client rules");
        return None;
    }
    let max_flows = shared.config().limits.max_udp_flows_per_listener;
    let Some(flow_place) = info.stats.udp.flows.try_acquire(max_flows) else {
        refused(&format!("flows of this listener reached {max_flows}"));
        return None;
    };
    let permit = match shared.clients.try_acquire(client.ip()) {
        Ok(p) => p,
        Err(limit) => {
            refused(&format!("client connections reached {limit}"));
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(FLOW_QUEUE);
    let id = flows.next.fetch_add(1, Ordering::Relaxed);
    flows
        .map
        .lock()
        .insert(client, FlowSlot { id, tx: tx.clone() });
    let flow = FlowClient {
        rx,
        partial: BytesMut::new(),
        socket: socket.clone(),
        client,
        cancel: cancel.clone(),
        idle,
        stats: info.stats.clone(),
        _entry: FlowEntry {
            flows: flows.clone(),
            client,
            id,
            _place: flow_place,
        },
    };
    shared.tasks.spawn(super::client::serve(
        shared.clone(),
        site.clone(),
        info.clone(),
        flow,
        client,
        permit,
        bytes::BytesMut::new(),
    ));
    Some(tx)
}

/// One flow as a public client: reading it gives its datagrams framed for the data connection.
pub(crate) struct FlowClient {
    rx: mpsc::Receiver<Bytes>,
    /// The rest of a framed datagram that did not fit the last read.
    partial: BytesMut,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    /// The listener's: a closed listener ends its flows.
    cancel: CancellationToken,
    /// The gateway's bound on silence: the idle timeout plus its margin.
    idle: Duration,
    stats: Arc<super::stats::ListenerStats>,
    _entry: FlowEntry,
}

/// A flow's entry in its port's table and its place in the listener's flow count, both given
/// back when the flow ends.
struct FlowEntry {
    flows: Arc<Flows>,
    client: SocketAddr,
    id: u64,
    _place: GaugePermit,
}

impl Drop for FlowEntry {
    fn drop(&mut self) {
        let mut map = self.flows.map.lock();
        // A later flow of the same client may have taken the slot already.
        if map.get(&self.client).is_some_and(|f| f.id == self.id) {
            map.remove(&self.client);
        }
    }
}

impl AsyncRead for FlowClient {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.partial.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(d)) => datagram::encode(&d, &mut self.partial),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.partial.len().min(buf.remaining());
        buf.put_slice(&self.partial[..n]);
        self.partial.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl PublicClient for FlowClient {
    fn start(&self) -> std::io::Result<SocketAddr> {
        // The port's address: on a wildcard bind, the wildcard (no IP_PKTINFO here).
        self.socket.local_addr()
    }

    fn left(&self, _sent_bytes: bool) -> impl std::future::Future<Output = ()> + Send + '_ {
        let cancel = self.cancel.clone();
        async move { cancel.cancelled().await }
    }

    fn refuse(self) {}

    async fn close(&mut self) {}

    async fn pipe<'a>(
        self,
        unsent: &'a [u8],
        data: Stream,
        leftover: &'a [u8],
        counters: &'a PipeCounters,
        throttle: &'a PipeThrottle,
    ) -> std::io::Result<()> {
        let FlowClient {
            rx,
            partial,
            socket,
            client,
            cancel,
            idle,
            stats,
            _entry,
        } = self;
        let (from_agent, mut to_agent) = tokio::io::split(data);
        to_agent.write_all(unsent).await?;
        to_agent.write_all(&partial).await?;
        to_agent.flush().await?;
        let relay = Relay {
            rx,
            from_agent,
            to_agent,
            framed: BytesMut::from(leftover),
            reply: Reply {
                socket,
                client,
                stats,
            },
            idle,
        };
        relay.run(&cancel, counters, throttle).await
    }
}

/// A flow's datagrams both ways once its data connection is there.
struct Relay {
    rx: mpsc::Receiver<Bytes>,
    from_agent: tokio::io::ReadHalf<Stream>,
    to_agent: tokio::io::WriteHalf<Stream>,
    /// Bytes from the agent not yet a whole datagram.
    framed: BytesMut,
    reply: Reply,
    idle: Duration,
}

impl Relay {
    /// Relays until the client side or the agent ends the flow, the listener closes, or the
    /// flow is silent (or a write to the agent stuck) for `idle`.
    async fn run(
        mut self,
        cancel: &CancellationToken,
        counters: &PipeCounters,
        throttle: &PipeThrottle,
    ) -> std::io::Result<()> {
        let silence = tokio::time::sleep(self.idle);
        tokio::pin!(silence);
        let stats = self.reply.stats.clone();
        let idle_end = loop {
            tokio::select! {
                d = self.rx.recv() => {
                    let Some(d) = d else { break false };
                    // Over client_rate or listener_rate: dropped whole, never delayed.
                    if !throttle.a_to_b.try_pass(d.len()) {
                        stats.udp.dropped(UdpDrop::Rate);
                        continue;
                    }
                    let write = datagram::write(&mut self.to_agent, &d);
                    let Ok(written) = tokio::time::timeout(self.idle, write).await else { break true };
                    written?;
                    counters.a_read.fetch_add(d.len() as u64, Ordering::Relaxed);
                    counters.b_written.fetch_add(2 + d.len() as u64, Ordering::Relaxed);
                }
                d = datagram::read(&mut self.from_agent, &mut self.framed) => {
                    let Some(d) = d? else { break false };
                    counters.b_read.fetch_add(2 + d.len() as u64, Ordering::Relaxed);
                    if throttle.b_to_a.try_pass(d.len()) {
                        self.reply.send(&d, counters).await;
                    } else {
                        stats.udp.dropped(UdpDrop::Rate);
                    }
                }
                () = &mut silence => break true,
                () = cancel.cancelled() => break false,
            }
            silence
                .as_mut()
                .reset(tokio::time::Instant::now() + self.idle);
        };
        if idle_end {
            stats.udp.idle_ended.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                site = %stats.site,
                listener = %stats.name,
                client = %self.reply.client,
                "UDP flow ended by the gateway: no datagram either way for {:?} (the agent did not end it)",
                self.idle
            );
        }
        let shutdown = self.to_agent.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), shutdown).await;
        Ok(())
    }
}

/// Where a flow's replies go.
struct Reply {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    stats: Arc<super::stats::ListenerStats>,
}

impl Reply {
    async fn send(&self, payload: &[u8], counters: &PipeCounters) {
        match self.socket.send_to(payload, self.client).await {
            Ok(n) => {
                counters.a_written.fetch_add(n as u64, Ordering::Relaxed);
                self.stats.udp.to_clients.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(client = %self.client, "datagram to the client not sent: {e}");
                self.stats.udp.dropped(UdpDrop::SendFailed);
            }
        }
    }
}
