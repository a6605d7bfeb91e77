//! Small loopback backends for tests: an echo server and a "read all, then answer" server.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

/// Echoes every byte back; on end of stream, half-closes its side too.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    /// Connections that brought at least one byte.
    pub carried: Arc<AtomicUsize>,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let carried = Arc::new(AtomicUsize::new(0));
        let (count, with_bytes) = (accepted.clone(), carried.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let with_bytes = with_bytes.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut first = true;
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if std::mem::take(&mut first) {
                                    with_bytes.fetch_add(1, Ordering::SeqCst);
                                }
                                if stream.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        EchoServer {
            addr,
            accepted,
            carried,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that brought at least one byte (a client served), as opposed to
    /// connections opened and closed empty.
    pub fn carried(&self) -> usize {
        self.carried.load(Ordering::SeqCst)
    }
}

/// Reads each connection to its end, reports what it received, then sends `reply` and closes:
/// only works if the client's half-close reached it and its answer can still travel back.
pub struct ReplyAfterEofServer {
    pub addr: SocketAddr,
    pub received: mpsc::Receiver<Vec<u8>>,
}

impl ReplyAfterEofServer {
    pub fn start(reply: Vec<u8>) -> ReplyAfterEofServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = mpsc::channel();
        let reply = Arc::new(reply);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (tx, reply) = (tx.clone(), reply.clone());
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    if stream.read_to_end(&mut got).is_err() {
                        return;
                    }
                    let _ = tx.send(got);
                    let _ = stream.write_all(&reply);
                    let _ = stream.shutdown(Shutdown::Write);
                });
            }
        });
        ReplyAfterEofServer { addr, received }
    }
}

/// Writes `data` on one thread while reading everything back on this one; returns what came
/// back. `chunk_delay` paces the writer (for transfers that must span an event).
pub fn echo_transfer(
    stream: TcpStream,
    data: Arc<Vec<u8>>,
    chunk: usize,
    chunk_delay: std::time::Duration,
) -> std::io::Result<Vec<u8>> {
    let mut writer = stream.try_clone()?;
    let send = std::thread::spawn(move || -> std::io::Result<()> {
        for part in data.chunks(chunk) {
            writer.write_all(part)?;
            if !chunk_delay.is_zero() {
                std::thread::sleep(chunk_delay);
            }
        }
        writer.shutdown(Shutdown::Write)
    });
    let mut reader = stream;
    let mut back = Vec::new();
    reader.read_to_end(&mut back)?;
    send.join().expect("writer thread panicked")?;
    Ok(back)
}

/// Sends `banner` as soon as a client connects (like SSH, FTP or SMTP servers), then echoes.
pub fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                if stream.write_all(banner).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A UDP backend that answers each datagram with `echo:` + the datagram, from one socket, and
/// hands every datagram it got (as received) to the test.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub received: std::sync::mpsc::Receiver<(SocketAddr, Vec<u8>)>,
}

impl UdpEcho {
    pub fn start() -> UdpEcho {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let (tx, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 70_000];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = tx.send((from, buf[..n].to_vec()));
                let mut reply = b"echo:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from);
            }
        });
        UdpEcho { addr, received }
    }
}
