//! The byte pump: moves bytes between two connected streams, both ways, unchanged.
//!
//! Each direction copies until its reader reaches end of stream, then shuts down the writer's
//! send side, so a half-close (FIN, or TLS close_notify) travels through and the other direction
//! keeps flowing until it ends too. Whenever a reader has nothing to give, the writer is flushed
//! first: a TLS writer accepts bytes into user space even when its socket is full, and without
//! the flush the tail of a burst would wait there until the sender sends again.
//!
//! A failure ends both directions and resets both sides: a reset read on one side, a TLS stream
//! that ends without close_notify (a truncation), a failed write, a shutdown that finds the
//! peer gone (ENOTCONN), or the pipe being cancelled. Both sockets then close with SO_LINGER 0,
//! so the other end sees a reset, never a clean end of stream that would make a cut transfer
//! look complete (docs/protocol.md, "Half-close and reset").
//!
//! Counters are plain atomics bumped once per chunk, readable live by statistics without
//! touching the pump. This module never looks at the bytes.
//!
//! Two pumps do this: [`pipe`], a portable copy loop through a buffer for any pair of streams
//! (TLS included), and on Linux a zero-copy pump for two plain TCP sockets that moves the bytes
//! with splice(2) through a kernel pipe, so they never enter user space. [`pipe_tcp`] picks the
//! right one for a socket and an agent/gateway [`Stream`]. `SALLYPORT_SPLICE=off` in the
//! environment forces the copy loop (to compare the two, or to rule splice out).
//!
//! Rate limits ([`PipeThrottle`], the gateway's `client_rate` / `listener_rate`) work the same
//! in both pumps: a direction reads at most its throttle's read cap at once, then passes the
//! bytes it read through the token buckets and sleeps off any debt before it reads again.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::net;
use crate::ratelimit::{PipeThrottle, Throttle};
use crate::transport::Stream;

/// Size of each direction's copy buffer.
pub(crate) const CHUNK: usize = 32 * 1024;
/// The copy loop's first buffer per direction, before any full read.
pub(crate) const IDLE_CHUNK: usize = 4 * 1024;

/// Live byte counts of one pipe, per side and direction. Reads and writes are counted apart:
/// they differ by what is in flight (and by a prefix read before the pipe started).
#[derive(Debug, Default)]
pub struct PipeCounters {
    /// Bytes read from `a` (including `a_prefix`).
    pub a_read: AtomicU64,
    /// Bytes written to `a`.
    pub a_written: AtomicU64,
    /// Bytes read from `b` (including `b_prefix`).
    pub b_read: AtomicU64,
    /// Bytes written to `b`.
    pub b_written: AtomicU64,
}

/// A copy of [`PipeCounters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PipeSnapshot {
    pub a_read: u64,
    pub a_written: u64,
    pub b_read: u64,
    pub b_written: u64,
}

impl PipeCounters {
    pub fn snapshot(&self) -> PipeSnapshot {
        PipeSnapshot {
            a_read: self.a_read.load(Ordering::Relaxed),
            a_written: self.a_written.load(Ordering::Relaxed),
            b_read: self.b_read.load(Ordering::Relaxed),
            b_written: self.b_written.load(Ordering::Relaxed),
        }
    }
}

/// Bytes already read from one side before the pipe started (e.g. what followed a handshake
/// frame in the same read); they are delivered first.
pub type Prefix<'a> = &'a [u8];

/// A stream with a TCP socket under it, whose close the pipe can turn into a reset.
pub trait Resettable {
    /// Makes closing this stream send a TCP reset (SO_LINGER 0) instead of a FIN.
    fn reset_on_close(&self);
}

impl Resettable for TcpStream {
    fn reset_on_close(&self) {
        net::reset_on_close(self);
    }
}

impl Resettable for Stream {
    fn reset_on_close(&self) {
        Stream::reset_on_close(self);
    }
}

/// The two ends of a pipe. Unless marked clean (both directions ended with an end of stream
/// passed on), dropping them resets both: an error or a cancellation on one side reaches the
/// other as a reset.
struct Ends<A: Resettable, B: Resettable> {
    a: A,
    b: B,
    clean: bool,
}

impl<A: Resettable, B: Resettable> Ends<A, B> {
    fn new(a: A, b: B) -> Self {
        Ends { a, b, clean: false }
    }

    /// Marks the pipe clean when `result` is; passes `result` on.
    fn settle(&mut self, result: io::Result<()>) -> io::Result<()> {
        self.clean = result.is_ok();
        result
    }
}

impl<A: Resettable, B: Resettable> Drop for Ends<A, B> {
    fn drop(&mut self) {
        if !self.clean {
            self.a.reset_on_close();
            self.b.reset_on_close();
        }
    }
}

/// Pipes `a` and `b` together until both directions have ended. `a_prefix` was read from `a`
/// and goes to `b` first; `b_prefix` likewise the other way. On an error (or if this future is
/// dropped before the end) both sides are reset.
pub async fn pipe<A, B>(
    a: A,
    a_prefix: Prefix<'_>,
    b: B,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Resettable + Unpin,
    B: AsyncRead + AsyncWrite + Resettable + Unpin,
{
    pipe_throttled(a, a_prefix, b, b_prefix, counters, &PipeThrottle::default()).await
}

/// [`pipe`] under rate limits.
pub async fn pipe_throttled<A, B>(
    a: A,
    a_prefix: Prefix<'_>,
    b: B,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
    throttle: &PipeThrottle,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Resettable + Unpin,
    B: AsyncRead + AsyncWrite + Resettable + Unpin,
{
    let mut ends = Ends::new(a, b);
    let result = {
        let (mut ar, mut aw) = tokio::io::split(&mut ends.a);
        let (mut br, mut bw) = tokio::io::split(&mut ends.b);
        let forward = copy_direction(
            &mut ar,
            a_prefix,
            &mut bw,
            (&counters.a_read, &counters.b_written),
            &throttle.a_to_b,
        );
        let backward = copy_direction(
            &mut br,
            b_prefix,
            &mut aw,
            (&counters.b_read, &counters.a_written),
            &throttle.b_to_a,
        );
        tokio::try_join!(forward, backward).map(|_| ())
    };
    ends.settle(result)
}

/// How a pipe ended: its result, and the bytes its counters saw once it had ended.
#[derive(Debug)]
pub struct PipeEnd<T = ()> {
    pub result: io::Result<T>,
    pub bytes: PipeSnapshot,
}

impl<T> PipeEnd<T> {
    /// How it ended in the words both halves log: `closed`, or `ended by error (why)`.
    pub fn outcome(&self) -> String {
        match &self.result {
            Ok(_) => "closed".to_string(),
            Err(e) => format!("ended by error ({e})"),
        }
    }
}

/// The one shape of every place that pipes a connection and then logs how it ended: runs
/// `pipe` while `live` is held (what shows the connection as live: a connection-table entry, a
/// gauge), drops `live` the moment the pipe ends, so no table shows an ended pipe while it is
/// being logged, then reads `counters`.
///
/// A combinator, not an `async fn`: an async fn keeps its future argument in its state beside
/// the copy it awaits, so every wrapper written that way doubles the size of what it wraps (and
/// every client's task carries it for its whole life). `map` polls `pipe` where it lies.
pub fn tracked<'a, L: 'a, T: 'a>(
    live: L,
    counters: &'a PipeCounters,
    pipe: impl std::future::Future<Output = io::Result<T>> + 'a,
) -> impl std::future::Future<Output = PipeEnd<T>> + 'a {
    use futures::FutureExt;
    pipe.map(move |result| {
        drop(live);
        PipeEnd {
            result,
            bytes: counters.snapshot(),
        }
    })
}

/// Pipes a plain TCP socket `a` (a client, a backend) and an agent/gateway connection `b`:
/// zero copy when `b` is plain TCP too (on Linux), the copy loop otherwise (TLS).
pub async fn pipe_tcp(
    a: TcpStream,
    a_prefix: Prefix<'_>,
    b: Stream,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
) -> io::Result<()> {
    let unlimited = PipeThrottle::default();
    pipe_tcp_throttled(a, a_prefix, b, b_prefix, counters, &unlimited).await
}

/// [`pipe_tcp`] under rate limits (both pumps honour them).
pub async fn pipe_tcp_throttled(
    a: TcpStream,
    a_prefix: Prefix<'_>,
    b: Stream,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
    throttle: &PipeThrottle,
) -> io::Result<()> {
    match b {
        Stream::Plain(b) => {
            pipe_plain_throttled(a, a_prefix, b, b_prefix, counters, throttle).await
        }
        b => pipe_throttled(a, a_prefix, b, b_prefix, counters, throttle).await,
    }
}

/// Pipes two plain TCP sockets, like [`pipe`] (same half-close, resets and counters), with
/// splice(2) on Linux unless `SALLYPORT_SPLICE=off`.
pub async fn pipe_plain(
    a: TcpStream,
    a_prefix: Prefix<'_>,
    b: TcpStream,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
) -> io::Result<()> {
    let unlimited = PipeThrottle::default();
    pipe_plain_throttled(a, a_prefix, b, b_prefix, counters, &unlimited).await
}

/// [`pipe_plain`] under rate limits.
pub async fn pipe_plain_throttled(
    a: TcpStream,
    a_prefix: Prefix<'_>,
    b: TcpStream,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
    throttle: &PipeThrottle,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if zero_copy::enabled() {
        let mut ends = Ends::new(a, b);
        let (a, b) = (&ends.a, &ends.b);
        let (fwd, back) = (&throttle.a_to_b, &throttle.b_to_a);
        let forward =
            zero_copy::direction(a, a_prefix, b, (&counters.a_read, &counters.b_written), fwd);
        let backward = zero_copy::direction(
            b,
            b_prefix,
            a,
            (&counters.b_read, &counters.a_written),
            back,
        );
        let result = tokio::try_join!(forward, backward).map(|_| ());
        return ends.settle(result);
    }
    pipe_throttled(a, a_prefix, b, b_prefix, counters, throttle).await
}

/// Copies until end of stream, then half-closes the writer. Any error is the pipe's end (the
/// caller resets both sides).
async fn copy_direction<R, W>(
    reader: &mut R,
    prefix: &[u8],
    writer: &mut W,
    (read, written): (&AtomicU64, &AtomicU64),
    throttle: &Throttle,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !prefix.is_empty() {
        read.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        writer.write_all(prefix).await?;
        written.fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    // Whether bytes were written since the last flush (a TLS writer may still hold them).
    let mut unflushed = !prefix.is_empty();
    // Start small and grow on the first full read: an idle connection (most of them, under
    // load) then holds 4 KiB per direction instead of CHUNK (measured by tests/load.rs with
    // TLS data connections: the two CHUNK buffers were most of the ~80 KB per idle connection).
    let mut buf = vec![0u8; IDLE_CHUNK.min(CHUNK)];
    loop {
        let cap = throttle.read_cap(buf.len());
        let n = read_or_flush(reader, &mut buf[..cap], writer, &mut unflushed).await?;
        if n == 0 {
            break;
        }
        if n == buf.len() && buf.len() < CHUNK {
            buf.resize(CHUNK, 0);
        }
        read.fetch_add(n as u64, Ordering::Relaxed);
        writer.write_all(&buf[..n]).await?;
        unflushed = true;
        written.fetch_add(n as u64, Ordering::Relaxed);
        if !throttle.is_unlimited() {
            // The writer may hold bytes (TLS) while this direction sleeps off its debt.
            writer.flush().await?;
            unflushed = false;
            throttle.pass(n).await;
        }
    }
    // Flush, then send FIN (TLS: close_notify, then FIN). A shutdown that finds the peer gone
    // (ENOTCONN) means it reset: an error, so the side we read from is reset too.
    writer.flush().await?;
    writer.shutdown().await
}

/// Reads into `buf`. While the reader has nothing, flushes the writer if bytes were written
/// since the last flush, as tokio's own `copy` does: otherwise the tail of a burst can sit in a
/// TLS writer's buffer for as long as the source stays quiet (an SFTP upload waiting for its
/// acknowledgement, a reply waiting for the next request).
pub(crate) async fn read_or_flush<R, W>(
    reader: &mut R,
    buf: &mut [u8],
    writer: &mut W,
    unflushed: &mut bool,
) -> io::Result<usize>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    std::future::poll_fn(|cx| {
        let mut read_buf = ReadBuf::new(buf);
        match Pin::new(&mut *reader).poll_read(cx, &mut read_buf) {
            Poll::Ready(result) => return Poll::Ready(result.map(|()| read_buf.filled().len())),
            Poll::Pending => {}
        }
        if *unflushed {
            // Pending: woken by the writer's socket (or by the reader); either way we come back.
            if let Poll::Ready(result) = Pin::new(&mut *writer).poll_flush(cx) {
                result?;
                *unflushed = false;
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(target_os = "linux")]
mod zero_copy;

#[cfg(test)]
mod tests;
