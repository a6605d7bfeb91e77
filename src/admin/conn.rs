//! The admin servers' connections: at most [`MAX_CONNECTIONS`] at a time, and each closed after
//! [`IDLE_TIMEOUT`] without a byte either way.
//!
//! hyper, as `axum::serve` runs it, has no read timeout: a client that connects and sends
//! nothing (or half a request) would hold a task and a descriptor for as long as it likes, and
//! a few thousand of them would take every descriptor of the process, whose budget the gateway
//! keeps for clients and agents. The dashboards poll every couple of seconds, so a live page's
//! keep-alive connection is never idle that long; a browser whose idle connection was closed
//! simply opens another. A flood beyond the cap waits in the listen backlog, not in memory.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections an admin server serves at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long a connection may stay silent both ways before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// A listener that hands `axum::serve` [`Guarded`] connections.
pub struct Bounded {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

impl Bounded {
    pub fn new(listener: TcpListener) -> Self {
        Bounded {
            listener,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the admin connection semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => return (Guarded::new(stream, permit), addr),
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning (as axum does).
                    tracing::debug!("admin server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// One admin connection: its place under the cap, and a deadline that every byte read or
/// written moves [`IDLE_TIMEOUT`] ahead. When the deadline passes while hyper waits to read,
/// the read fails with `TimedOut` and hyper closes the connection.
pub struct Guarded {
    stream: TcpStream,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        Guarded {
            stream,
            deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            _permit: permit,
        }
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.active();
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "admin connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(_))) {
            this.active();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(_))) {
            this.active();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
