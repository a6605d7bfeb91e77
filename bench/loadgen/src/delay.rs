//! `loadgen delay`: a user-space TCP relay that adds a one-way latency to every byte, both
//! directions, for link-delay tests (bench/run's slow agent link, bench/soak's link faults; this
//! kernel has no netem). The latency is fixed (`--ms`) or read from a file the caller rewrites at
//! any time (`--delay-file`: milliseconds, one number; missing or empty = 0), so one relay can be
//! switched between a clean and a slow link without reconnecting anything. With `--handshake 1`
//! a new connection also pays the TCP handshake's round trip, as on a real link: the relay
//! connects to the far side 3·D after accepting (when the handshake's third segment would arrive
//! there) and holds the first bytes until then, so a client's first byte arrives after 3·D and
//! its answer is back after 4·D.
//! It never changes, drops or reorders bytes: a half-close is passed on after the bytes before
//! it, and a reset (a read error) becomes a reset on the other side (SO_LINGER 0), never a clean
//! end. It holds at most `QUEUE` chunks per direction, so a slow reader backs up to the sender
//! as it would without the relay.
//!
//! Chunks are released by a timer thread of its own (`PreciseTimer`), not the tokio timer,
//! which only fires on whole milliseconds and would turn a 1 ms link into 1-2 ms.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// Chunks in flight per direction (each up to `CHUNK` bytes): bounds the relay's memory and
/// keeps backpressure.
const QUEUE: usize = 64;
const CHUNK: usize = 64 * 1024;

pub struct Link {
    pub listen: String,
    pub to: SocketAddr,
    /// A fixed one-way delay in ms; else `delay_file`'s number, else none.
    pub fixed_ms: Option<f64>,
    pub delay_file: Option<PathBuf>,
    /// A new connection pays the TCP handshake's round trip before its first bytes move.
    pub handshake: bool,
}

/// What a reader hands its writer: bytes stamped with the moment they were read, or the end.
enum Item {
    Bytes(Instant, Vec<u8>),
    /// The peer half-closed (read returned 0): shut the other side's write half.
    End,
    /// The read failed (reset): reset the other side too.
    Reset,
}

/// The current one-way delay, in microseconds (fixed, or following the delay file).
type Delay = Arc<AtomicU64>;

fn current(delay: &Delay) -> Duration {
    Duration::from_micros(delay.load(Ordering::Relaxed))
}

fn micros(ms: f64) -> u64 {
    (ms.max(0.0) * 1e3).round() as u64
}

pub async fn run(link: Link) {
    let listener = TcpListener::bind(&link.listen)
        .await
        .unwrap_or_else(|e| crate::die(&format!("bind {}: {e}", link.listen)));
    let delay: Delay = Arc::new(AtomicU64::new(micros(link.fixed_ms.unwrap_or(0.0))));
    if let (None, Some(path)) = (link.fixed_ms, link.delay_file) {
        let delay = delay.clone();
        tokio::spawn(async move {
            loop {
                let ms = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                delay.store(micros(ms), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    println!("listening {}", listener.local_addr().unwrap());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        let Ok((down, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(relay(down, link.to, delay.clone(), link.handshake));
    }
}

/// One relayed connection: both directions until both ended cleanly, or until either end
/// resets, which resets both (linger 0 before the last handle drops).
async fn relay(down: TcpStream, to: SocketAddr, delay: Delay, handshake: bool) {
    let accepted = Instant::now();
    let down = Arc::new(down);
    let _ = down.set_nodelay(true);
    // The client's first bytes are read (and stamped) while the far side is still being
    // reached, as they would be on their way over a real link.
    let (there_tx, there_rx) = mpsc::channel::<Item>(QUEUE);
    let there_reader = AbortOnDrop(tokio::spawn(read_side(down.clone(), there_tx)));
    // The far side accepts when SYN, SYN-ACK and ACK have crossed the link.
    let far_accepts = if handshake {
        accepted + current(&delay) * 3
    } else {
        accepted
    };
    sleep_until(far_accepts).await;
    let Ok(up) = TcpStream::connect(to).await else {
        let _ = SockRef::from(&*down).set_linger(Some(Duration::ZERO));
        return;
    };
    let up = Arc::new(up);
    let _ = up.set_nodelay(true);
    let (back_tx, back_rx) = mpsc::channel::<Item>(QUEUE);
    let back_reader = AbortOnDrop(tokio::spawn(read_side(up.clone(), back_tx)));
    let there = direction(there_rx, up.clone(), delay.clone(), far_accepts);
    let back = direction(back_rx, down.clone(), delay, far_accepts);
    tokio::pin!(there, back);
    let (mut there_done, mut back_done) = (false, false);
    while !(there_done && back_done) {
        let clean = tokio::select! {
            clean = &mut there, if !there_done => { there_done = true; clean }
            clean = &mut back, if !back_done => { back_done = true; clean }
        };
        if !clean {
            for s in [&down, &up] {
                let _ = SockRef::from(&**s).set_linger(Some(Duration::ZERO));
            }
            break;
        }
    }
    drop((there_reader, back_reader));
}

/// One direction: writes each chunk `delay` after it was read (never before `not_before`).
/// Returns whether it ended cleanly (end of stream passed on) rather than by a reset.
async fn direction(
    mut rx: mpsc::Receiver<Item>,
    to: Arc<TcpStream>,
    delay: Delay,
    not_before: Instant,
) -> bool {
    while let Some(item) = rx.recv().await {
        match item {
            Item::Bytes(at, bytes) => {
                sleep_until((at + current(&delay)).max(not_before)).await;
                if write_all(&to, &bytes).await.is_err() {
                    return false;
                }
            }
            Item::End => {
                return SockRef::from(&*to)
                    .shutdown(std::net::Shutdown::Write)
                    .is_ok()
            }
            Item::Reset => return false,
        }
    }
    false
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_side(from: Arc<TcpStream>, tx: mpsc::Sender<Item>) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let item = loop {
            if from.readable().await.is_err() {
                break Item::Reset;
            }
            match from.try_read(&mut buf) {
                Ok(0) => break Item::End,
                Ok(n) => {
                    buf.truncate(n);
                    break Item::Bytes(Instant::now(), buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break Item::Reset,
            }
        };
        let last = !matches!(item, Item::Bytes(..));
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `t` with about 0.1 ms precision (a thread sleeping in the kernel), where
/// `tokio::time` would round up to the next millisecond.
async fn sleep_until(t: Instant) {
    if t <= Instant::now() {
        return;
    }
    let (tx, rx) = oneshot::channel();
    PreciseTimer::global().send((Reverse(t), Wake(tx))).ok();
    let _ = rx.await;
}

/// A thread that keeps the pending wake-up times in a heap and sleeps until the earliest one
/// (or a new request), then wakes the waiting tasks through their oneshot channels.
struct PreciseTimer;

struct Wake(oneshot::Sender<()>);

// Only the time orders the heap; equal times wake in any order.
impl PartialEq for Wake {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Wake {}
impl PartialOrd for Wake {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wake {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl PreciseTimer {
    fn global() -> &'static Sender<(Reverse<Instant>, Wake)> {
        static TIMER: OnceLock<Sender<(Reverse<Instant>, Wake)>> = OnceLock::new();
        TIMER.get_or_init(|| {
            let (tx, rx) = channel::<(Reverse<Instant>, Wake)>();
            std::thread::spawn(move || {
                let mut heap: BinaryHeap<(Reverse<Instant>, Wake)> = BinaryHeap::new();
                loop {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|(Reverse(t), _)| *t <= now) {
                        let (_, Wake(tx)) = heap.pop().unwrap();
                        let _ = tx.send(());
                    }
                    let next = match heap.peek() {
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                        Some((Reverse(t), _)) => rx.recv_timeout(t.saturating_duration_since(now)),
                    };
                    match next {
                        Ok(entry) => heap.push(entry),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
            tx
        })
    }
}
