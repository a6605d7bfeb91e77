//! Serving one UDP flow (a client address and port on a UDP listener): its data connection
//! carries the flow's datagrams framed as [`crate::protocol::datagram`] says, and a UDP
//! socket connected to the backend, one per flow, sends them on, so the backend's replies map
//! back to this client alone.
//!
//! With `proxy_protocol = "v2"` the first datagram to the backend starts with a PROXY v2
//! header of the DGRAM kind (transport byte 0x12 or 0x22). The flow ends after the listener's
//! `idle_timeout` without a datagram either way, or when the data connection ends; the agent
//! then closes the data connection cleanly, which ends the flow on the gateway too.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

use crate::pipe::PipeCounters;
use crate::protocol::datagram;
use crate::transport::Stream;

/// A UDP socket connected to `target` (`host:port`, the first address it resolves to), bound
/// to an ephemeral port of the same family.
pub(crate) async fn connect_backend(target: &str) -> std::io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{target} resolves to no address")))?;
    let local: std::net::SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// How a flow ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FlowEnd {
    /// No datagram either way for the idle timeout.
    Idle,
    /// The gateway ended the data connection (its client flow ended, or it stopped).
    Closed,
}

/// Relays datagrams between the data connection (`leftover`: bytes that came with its ack)
/// and the backend until the flow ends. Counters: `a` = the backend (payload bytes), `b` = the
/// data connection (framed bytes). `header` prefixes the first datagram to the backend.
pub(crate) async fn relay(
    data: Stream,
    leftover: BytesMut,
    backend: UdpSocket,
    mut header: Vec<u8>,
    idle: Duration,
    counters: &PipeCounters,
) -> std::io::Result<FlowEnd> {
    let (mut from_gateway, mut to_gateway) = tokio::io::split(data);
    let mut framed = leftover;
    counters
        .b_read
        .fetch_add(framed.len() as u64, Ordering::Relaxed);
    let mut reply = vec![0u8; datagram::MAX_PAYLOAD];
    let end = loop {
        let before = framed.len();
        tokio::select! {
            d = datagram::read(&mut from_gateway, &mut framed) => {
                let Some(d) = d? else { break FlowEnd::Closed };
                counters.b_read.fetch_add((2 + d.len() + framed.len()).saturating_sub(before) as u64, Ordering::Relaxed);
                send_to_backend(&backend, &mut header, &d, counters).await;
            }
            r = backend.recv(&mut reply) => match r {
                Ok(n) => {
                    datagram::write(&mut to_gateway, &reply[..n]).await?;
                    counters.a_read.fetch_add(n as u64, Ordering::Relaxed);
                    counters.b_written.fetch_add(2 + n as u64, Ordering::Relaxed);
                }
                // An ICMP error for an earlier datagram (the backend is not listening): the
                // flow stays; the client's retry may find it up.
                Err(e) => tracing::debug!("backend datagram error: {e}"),
            },
            () = tokio::time::sleep(idle) => break FlowEnd::Idle,
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), to_gateway.shutdown()).await;
    Ok(end)
}

/// Sends one datagram to the backend, after the PROXY header on the first. A failed send
/// drops that datagram only, as a network would.
async fn send_to_backend(
    backend: &UdpSocket,
    header: &mut Vec<u8>,
    payload: &[u8],
    counters: &PipeCounters,
) {
    let sent = if header.is_empty() {
        backend.send(payload).await
    } else {
        let mut first = std::mem::take(header);
        first.extend_from_slice(payload);
        backend.send(&first).await
    };
    match sent {
        Ok(_) => {
            counters
                .a_written
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!("datagram to the backend not sent: {e}"),
    }
}
