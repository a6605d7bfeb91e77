//! Unit tests of `pipe`: both ends' bytes, half-closes, resets, counters and throttling over
//! loopback sockets.

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
