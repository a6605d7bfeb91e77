//! Zero-copy piping between two TCP sockets: socket -> pipe -> socket with splice(2).
//!
//! Memory: a connection holds no pipe and no buffer while it is idle. A direction takes a pipe
//! from a small process-wide pool when its socket becomes readable, moves bytes while there are
//! some, and gives the (then empty) pipe back when the socket has nothing more to read. So the
//! number of pipes (two descriptors each) follows the transfers in flight, not the open
//! connections: 8,000 idle clients cost no pipe at all. A pipe that still holds bytes (the pump
//! was cancelled or failed mid-way) is closed, never pooled, so no byte can leak into another
//! connection.
//!
//! Readiness: each splice runs inside `TcpStream::try_io`, which clears tokio's readiness only
//! when the syscall says EAGAIN. The pipe is always empty when we splice into it, and holds
//! bytes when we splice out of it, so an EAGAIN always comes from the socket, never from the
//! pipe: clearing the socket's readiness on it is right, and no wake-up is lost.

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
