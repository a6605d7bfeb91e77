//! A public client as the gateway serves it: a TCP connection, or a UDP flow
//! ([`super::udp`]), behind one trait ([`PublicClient`]) so that the warm-pool path, the offer
//! and the pipe treat both alike; [`pipe_data`] pipes either with its data connection (a TCP
//! client's reuse-framed connection goes back to its site's pool after a clean end).

use std::future::Future;
use std::net::SocketAddr;

use tokio::io::AsyncRead;
use tokio::net::TcpStream;

use super::pending::DataConn;
use super::pool;
use super::site::Site;
use super::Shared;
use crate::net;
use crate::pipe::{pipe_tcp_throttled, PipeCounters};
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

/// Pipes the client and its data connection; a reuse-framed one ([`crate::reuse`]) goes back to
/// the site's pool when the client ended cleanly both ways.
pub(super) async fn pipe_data<C: PublicClient>(
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
    // Boxed on its own: the framed pump is larger than the plain one (splice), and an unboxed
    // branch would make every client's pipe as large as the larger of the two.
    let piped = Box::pin(reuse::pipe_framed(
        client,
        unsent,
        data.stream,
        data.leftover,
        b"",
        last,
        counters,
        throttle,
    ));
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
        version: ticket.version,
        reuse: pool::Reuse {
            clients: ticket.served.clients + 1,
            bytes: ticket.served.bytes + moved.a_read + moved.b_read,
        },
    };
    pool::park_again(site, limits.max_frame, back).await;
    Ok(())
}
