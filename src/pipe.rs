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
pub async fn tracked<L, T>(
    live: L,
    counters: &PipeCounters,
    pipe: impl std::future::Future<Output = io::Result<T>>,
) -> PipeEnd<T> {
    let result = pipe.await;
    drop(live);
    PipeEnd {
        result,
        bytes: counters.snapshot(),
    }
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

/// Zero-copy piping between two TCP sockets: socket -> pipe -> socket with splice(2).
///
/// Memory: a connection holds no pipe and no buffer while it is idle. A direction takes a pipe
/// from a small process-wide pool when its socket becomes readable, moves bytes while there are
/// some, and gives the (then empty) pipe back when the socket has nothing more to read. So the
/// number of pipes (two descriptors each) follows the transfers in flight, not the open
/// connections: 8,000 idle clients cost no pipe at all. A pipe that still holds bytes (the pump
/// was cancelled or failed mid-way) is closed, never pooled, so no byte can leak into another
/// connection.
///
/// Readiness: each splice runs inside `TcpStream::try_io`, which clears tokio's readiness only
/// when the syscall says EAGAIN. The pipe is always empty when we splice into it, and holds
/// bytes when we splice out of it, so an EAGAIN always comes from the socket, never from the
/// pipe: clearing the socket's readiness on it is right, and no wake-up is lost.
#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io;
    use std::net::Shutdown;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use parking_lot::Mutex;
    use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use crate::ratelimit::Throttle;

    /// Capacity asked of each pipe: 64 KiB (16 slots), set explicitly so it does not depend on
    /// the system default. Measured on loopback (docs/performance.md): 256 KiB and 1 MiB pipes
    /// moved no more bytes per second and cost 5-10 % more CPU per GB at a fixed rate, and an
    /// empty pipe costs about 2.5 KiB of kernel memory at 64 KiB, 5 KiB at 256 KiB and 17 KiB at
    /// 1 MiB (slot array, inode, two files; the pages in flight belong to the socket buffers).
    /// Small pipes also stay clear of `fs.pipe-user-pages-soft` (16,384 pages per user), past
    /// which an unprivileged gateway's new pipes would shrink to two pages.
    pub(super) const PIPE_SIZE: usize = 64 * 1024;
    /// Empty pipes kept for reuse; beyond this a returned pipe is closed.
    const POOL_MAX: usize = 64;
    /// Buffer of the fallback copy when no pipe can be had (out of descriptors).
    const FALLBACK_CHUNK: usize = 16 * 1024;

    /// parking_lot's lock does not poison: a panic elsewhere while holding it cannot leave the
    /// Vec inconsistent (push and pop only), so the pool stays usable.
    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    #[cfg(test)]
    thread_local! {
        /// Makes `Pipe::take` fail on this thread, as when out of descriptors (tests only).
        pub(super) static NO_PIPES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Whether to splice: yes unless `SALLYPORT_SPLICE=off` (or `0`, `false`, `no`).
    pub(super) fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            !matches!(
                std::env::var("SALLYPORT_SPLICE").as_deref(),
                Ok("off" | "0" | "false" | "no")
            )
        })
    }

    /// A kernel pipe, both ends non-blocking. Dropping it closes both ends.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// What the kernel granted (it may refuse to grow a pipe for an unprivileged user).
        capacity: usize,
    }

    impl Pipe {
        /// An empty pipe from the pool, or a new one.
        pub(super) fn take() -> io::Result<Pipe> {
            #[cfg(test)]
            if NO_PIPES.with(|no| no.get()) {
                return Err(io::Error::other("no pipes in this test"));
            }
            if let Some(pipe) = POOL.lock().pop() {
                return Ok(pipe);
            }
            let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
            // Over /proc/sys/fs/pipe-max-size or the user's pipe quota the kernel says EPERM:
            // then the pipe keeps its current size, which splice copes with just as well.
            let capacity = fcntl_setpipe_size(&write, PIPE_SIZE)
                .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))?;
            Ok(Pipe {
                read,
                write,
                capacity,
            })
        }

        /// Returns an empty pipe to the pool. Only call this when every byte spliced in has been
        /// spliced out.
        fn give_back(self) {
            let mut pool = POOL.lock();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }
    }

    /// What one burst of reading ended with.
    enum Burst {
        /// The source has nothing more for now.
        Drained,
        /// The source reached end of stream.
        Eof,
    }

    /// One direction: `from` to `to` until `from` ends, then FIN on `to`. `prefix` goes first.
    pub(super) async fn direction(
        from: &TcpStream,
        prefix: &[u8],
        to: &TcpStream,
        (read, written): (&AtomicU64, &AtomicU64),
        throttle: &Throttle,
    ) -> io::Result<()> {
        if !prefix.is_empty() {
            read.fetch_add(prefix.len() as u64, Ordering::Relaxed);
            write_all(to, prefix).await?;
            written.fetch_add(prefix.len() as u64, Ordering::Relaxed);
        }
        loop {
            from.readable().await?;
            let burst = match Pipe::take() {
                Ok(pipe) => splice_burst(from, to, pipe, (read, written), throttle).await?,
                // No descriptor for a pipe: move this burst through a buffer instead.
                Err(_) => copy_burst(from, to, (read, written), throttle).await?,
            };
            if let Burst::Eof = burst {
                break;
            }
        }
        // Same rule as the copy loop: a peer found gone (ENOTCONN) reset, so this is an error.
        socket2::SockRef::from(to).shutdown(Shutdown::Write)
    }

    /// Splices while `from` has bytes: fill the empty pipe from `from`, empty it into `to`,
    /// repeat. The pipe goes back to the pool only when empty; on an error or cancellation it is
    /// dropped (closed) with whatever it held.
    async fn splice_burst(
        from: &TcpStream,
        to: &TcpStream,
        pipe: Pipe,
        (read, written): (&AtomicU64, &AtomicU64),
        throttle: &Throttle,
    ) -> io::Result<Burst> {
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        let cap = throttle.read_cap(pipe.capacity);
        loop {
            // The pipe is empty here: an EAGAIN is the socket's.
            let filled = from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, cap, flags)?)
            });
            let mut in_pipe = match filled {
                Ok(0) => {
                    pipe.give_back();
                    return Ok(Burst::Eof);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pipe.give_back();
                    return Ok(Burst::Drained);
                }
                Err(e) => return Err(e),
            };
            read.fetch_add(in_pipe as u64, Ordering::Relaxed);
            let moved = in_pipe;
            while in_pipe > 0 {
                // The pipe holds bytes here: an EAGAIN is the socket's (send buffer full).
                let sent = to.try_io(Interest::WRITABLE, || {
                    Ok(splice(&pipe.read, None, to, None, in_pipe, flags)?)
                });
                match sent {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        in_pipe -= n;
                        written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                    Err(e) => return Err(e),
                }
            }
            if !throttle.is_unlimited() {
                // The pipe is empty: back to the pool while this direction sleeps off its debt.
                pipe.give_back();
                throttle.pass(moved).await;
                return Ok(Burst::Drained);
            }
            // A socket that always has data would otherwise never let this task yield.
            tokio::task::coop::consume_budget().await;
        }
    }

    /// The fallback for one burst: read what `from` has into a buffer, write it to `to`.
    async fn copy_burst(
        from: &TcpStream,
        to: &TcpStream,
        (read, written): (&AtomicU64, &AtomicU64),
        throttle: &Throttle,
    ) -> io::Result<Burst> {
        let mut buf = vec![0u8; throttle.read_cap(FALLBACK_CHUNK)];
        loop {
            let n = match from.try_read(&mut buf) {
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
                Err(e) => return Err(e),
            };
            read.fetch_add(n as u64, Ordering::Relaxed);
            write_all(to, &buf[..n]).await?;
            written.fetch_add(n as u64, Ordering::Relaxed);
            throttle.pass(n).await;
            tokio::task::coop::consume_budget().await;
        }
    }

    async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match to.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Which pump a test drives.
    #[derive(Clone, Copy, Debug)]
    enum Pump {
        Copy,
        /// `pipe_plain`: splice on Linux.
        Plain,
        /// `pipe_tcp` with a plain `Stream`: the call the gateway and the agent make.
        Tcp,
        /// `pipe_plain` when no pipe can be had (out of descriptors): the buffered fallback.
        /// Only on a current-thread runtime, where the flag's thread runs every task.
        #[cfg(target_os = "linux")]
        NoPipes,
    }

    const PUMPS: [Pump; 3] = [Pump::Copy, Pump::Plain, Pump::Tcp];

    /// `tracked` lets go of what shows the pipe as live before anyone reads how it ended, and
    /// reports the bytes of the whole pipe and its end in the words both halves log.
    #[tokio::test]
    async fn tracked_releases_the_live_entry_when_the_pipe_ends() {
        struct Live(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Live {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let counters = PipeCounters::default();
        let end = tracked(Live(alive.clone()), &counters, async {
            assert!(alive.load(Ordering::SeqCst), "live while piping");
            counters.a_read.fetch_add(5, Ordering::Relaxed);
            counters.b_written.fetch_add(5, Ordering::Relaxed);
            Ok(())
        })
        .await;
        assert!(
            !alive.load(Ordering::SeqCst),
            "released once the pipe ended"
        );
        assert_eq!((end.bytes.a_read, end.bytes.b_written), (5, 5));
        assert_eq!(end.outcome(), "closed");
        let end = tracked((), &counters, async {
            Err::<(), _>(io::Error::other("reset"))
        })
        .await;
        assert_eq!(end.outcome(), "ended by error (reset)");
    }

    /// For current-thread tests: also the fallback without pipes.
    fn all_pumps() -> Vec<Pump> {
        #[allow(unused_mut)]
        let mut pumps = PUMPS.to_vec();
        #[cfg(target_os = "linux")]
        pumps.push(Pump::NoPipes);
        pumps
    }

    fn start(
        pump: Pump,
        a: TcpStream,
        a_prefix: &'static [u8],
        b: TcpStream,
        b_prefix: &'static [u8],
    ) -> (Arc<PipeCounters>, tokio::task::JoinHandle<io::Result<()>>) {
        let counters = Arc::new(PipeCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            match pump {
                Pump::Copy => pipe(a, a_prefix, b, b_prefix, &c).await,
                Pump::Plain => pipe_plain(a, a_prefix, b, b_prefix, &c).await,
                Pump::Tcp => pipe_tcp(a, a_prefix, Stream::Plain(b), b_prefix, &c).await,
                #[cfg(target_os = "linux")]
                Pump::NoPipes => {
                    zero_copy::NO_PIPES.with(|no| no.set(true));
                    let r = pipe_plain(a, a_prefix, b, b_prefix, &c).await;
                    zero_copy::NO_PIPES.with(|no| no.set(false));
                    r
                }
            }
        });
        (counters, task)
    }

    #[tokio::test]
    async fn half_close_travels_and_the_reply_still_arrives() {
        for pump in all_pumps() {
            // client <-> (p1 | pipe | p2) <-> server
            let (mut client, p1) = tcp_pair().await;
            let (p2, mut server) = tcp_pair().await;
            let (counters, task) = start(pump, p1, b"pre", p2, b"");

            client.write_all(b"request").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"prerequest", "{pump:?}");

            let reply = vec![7u8; 300_000];
            server.write_all(&reply).await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, reply, "{pump:?}");
            task.await.unwrap().unwrap();
            let s = counters.snapshot();
            // "pre" was read from p1 before the pipe started: counted as read from a and written to b.
            assert_eq!(
                (s.a_read, s.b_written, s.b_read, s.a_written),
                (10, 10, 300_000, 300_000),
                "{pump:?}"
            );
        }
    }

    /// Both directions at once, more than a pipe holds, with a slow reader on one side so the
    /// writer sees EAGAIN; every byte arrives in order and the counters are exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_directions_at_once_with_back_pressure() {
        const LEN: usize = 8 * 1024 * 1024 + 12_345;
        for pump in PUMPS {
            let (client, p1) = tcp_pair().await;
            let (p2, server) = tcp_pair().await;
            let (counters, task) = start(pump, p1, b"", p2, b"hello");
            let up: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            let down: Vec<u8> = (0..LEN).map(|i| (i % 241) as u8).collect();

            let side = |mut s: TcpStream, out: Vec<u8>, slow: bool| {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let send = async {
                        w.write_all(&out).await.unwrap();
                        w.shutdown().await.unwrap();
                    };
                    let recv = async {
                        let mut got = Vec::new();
                        let mut buf = vec![0u8; 7000];
                        loop {
                            let n = r.read(&mut buf).await.unwrap();
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                            if slow && got.len() < 2_000_000 {
                                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                            }
                        }
                        got
                    };
                    tokio::join!(send, recv).1
                })
            };
            let at_client = side(client, up.clone(), true);
            let at_server = side(server, down.clone(), false);
            let got_at_client = at_client.await.unwrap();
            let got_at_server = at_server.await.unwrap();
            task.await.unwrap().unwrap();

            let mut expected_at_client = b"hello".to_vec();
            expected_at_client.extend_from_slice(&down);
            assert!(
                got_at_client == expected_at_client,
                "{pump:?}: client got wrong bytes"
            );
            assert!(got_at_server == up, "{pump:?}: server got wrong bytes");
            let s = counters.snapshot();
            let (l, h) = (LEN as u64, LEN as u64 + 5);
            assert_eq!(
                (s.a_read, s.b_written, s.b_read, s.a_written),
                (l, l, h, h),
                "{pump:?}"
            );
        }
    }

    /// Reads to the end of the stream; the error it ends with, if any.
    async fn end_of(mut s: TcpStream) -> io::Result<usize> {
        let mut rest = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the stream ended")
    }

    fn reset(s: TcpStream) {
        socket2::SockRef::from(&s)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(s);
    }

    /// A reset on either side ends the pump with an error and reaches the other side as a
    /// reset, not as an end of stream.
    #[tokio::test]
    async fn a_reset_crosses_as_a_reset() {
        for pump in all_pumps() {
            for client_resets in [true, false] {
                let (mut client, p1) = tcp_pair().await;
                let (p2, mut server) = tcp_pair().await;
                let (_counters, task) = start(pump, p1, b"", p2, b"");
                // Bytes in flight first, so the pump is in its loop.
                client.write_all(b"partial upload").await.unwrap();
                server.write_all(b"partial download").await.unwrap();
                let mut buf = [0u8; 16];
                server.read_exact(&mut buf[..14]).await.unwrap();
                client.read_exact(&mut buf).await.unwrap();
                let other = if client_resets {
                    reset(client);
                    server
                } else {
                    reset(server);
                    client
                };
                let result = tokio::time::timeout(std::time::Duration::from_secs(5), task)
                    .await
                    .expect("the pump ended")
                    .unwrap();
                assert!(result.is_err(), "{pump:?}: {result:?}");
                let end = end_of(other).await;
                assert!(
                    matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                    "{pump:?}, client resets: {client_resets}: {end:?}"
                );
            }
        }
    }

    /// A pump dropped before the end (the gateway out of drain time) resets both sides: a cut
    /// transfer must not look complete.
    #[tokio::test]
    async fn a_cancelled_pipe_resets_both_sides() {
        for pump in all_pumps() {
            let (mut client, p1) = tcp_pair().await;
            let (p2, mut server) = tcp_pair().await;
            let (_counters, task) = start(pump, p1, b"", p2, b"");
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut [0u8; 1]).await.unwrap();
            task.abort();
            let _ = task.await;
            for side in [client, server] {
                let end = end_of(side).await;
                assert!(
                    matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                    "{pump:?}: {end:?}"
                );
            }
        }
    }
}
