//! The byte pump: moves bytes between two connected streams, both ways, unchanged.
//!
//! Each direction copies until its reader reaches end of stream, then shuts down the writer's
//! send side, so a half-close (FIN) travels through and the other direction keeps flowing until
//! it ends too. An error in either direction ends both: a reset on one side resets the pipe.
//!
//! Counters are plain atomics bumped once per chunk, readable live by statistics without
//! touching the pump. This module never looks at the bytes.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of each direction's copy buffer.
const CHUNK: usize = 32 * 1024;

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

/// Pipes `a` and `b` together until both directions have ended. `a_prefix` was read from `a`
/// and goes to `b` first; `b_prefix` likewise the other way.
pub async fn pipe<A, B>(
    a: A,
    a_prefix: Prefix<'_>,
    b: B,
    b_prefix: Prefix<'_>,
    counters: &PipeCounters,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let forward = copy_direction(
        &mut ar,
        a_prefix,
        &mut bw,
        &counters.a_read,
        &counters.b_written,
    );
    let backward = copy_direction(
        &mut br,
        b_prefix,
        &mut aw,
        &counters.b_read,
        &counters.a_written,
    );
    tokio::try_join!(forward, backward)?;
    Ok(())
}

/// Copies until end of stream, then half-closes the writer.
async fn copy_direction<R, W>(
    reader: &mut R,
    prefix: &[u8],
    writer: &mut W,
    read: &AtomicU64,
    written: &AtomicU64,
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
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        read.fetch_add(n as u64, Ordering::Relaxed);
        writer.write_all(&buf[..n]).await?;
        written.fetch_add(n as u64, Ordering::Relaxed);
    }
    // Flush, then send FIN. A peer that already closed entirely makes shutdown fail with
    // ENOTCONN; the data has been delivered, so that is not an error of the pipe.
    writer.flush().await?;
    match writer.shutdown().await {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn half_close_travels_and_the_reply_still_arrives() {
        // client <-> (p1 | pipe | p2) <-> server
        let (mut client, p1) = tcp_pair().await;
        let (p2, mut server) = tcp_pair().await;
        let counters = std::sync::Arc::new(PipeCounters::default());
        let c2 = counters.clone();
        let pump = tokio::spawn(async move { pipe(p1, b"pre", p2, b"", &c2).await });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"prerequest");

        let reply = vec![7u8; 300_000];
        server.write_all(&reply).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, reply);
        pump.await.unwrap().unwrap();
        let s = counters.snapshot();
        // "pre" was read from p1 before the pipe started: counted as read from a and written to b.
        assert_eq!(
            (s.a_read, s.b_written, s.b_read, s.a_written),
            (10, 10, 300_000, 300_000)
        );
    }
}
