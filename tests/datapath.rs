//! The data path in small socket buffers: bytes never sit in a user-space buffer while the
//! sender is quiet, and a reset crosses the tunnel as a reset (never as a clean end).
//!
//! Each test runs gateway, agent, backend and client in a network namespace of its own whose
//! TCP buffers are small (`tcp_wmem`/`tcp_rmem` max 48 KiB), so a socket would-blocks after a
//! few dozen KiB and what a pump leaves unflushed shows at once (loopback's default buffers,
//! up to 4 MiB, hide it). See docs/reliability.md, "The data path in small buffers".
//!
//! Run time: the SFTP test moves 50 x 20 MiB through TLS in these small buffers, about 1 s per
//! upload (75 s in all on 2 busy cores at a load average of 15; the same uploads straight to
//! sshd take as long): the longest test here but still inside the CI budget. The others take
//! under a second each.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::netns::{connect_in, in_ns, listen_in, sh_in, Namespaces};
use support::sshd::{Sshd, TEST_USER};
use support::*;

/// A burst: far more than the namespace's socket buffers hold.
const BURST: usize = 4 * 1024 * 1024;
/// How long a receiver may take to get a whole burst once the sender has written it.
const ARRIVAL: Duration = Duration::from_secs(5);

/// Gateway and agent (and whatever the test starts) in one namespace with small TCP buffers.
/// Fields drop in order: the processes before the namespace.
struct Tunnel {
    gateway: Gateway,
    _agent: Proc,
    /// The gateway's public address for the backend.
    public: SocketAddr,
    ns: String,
    dir: Workdir,
    _net: Namespaces,
}

/// A namespace whose TCP sockets get at most 48 KiB of send and receive buffer.
fn small_buffer_namespace() -> (Namespaces, String) {
    let mut net = Namespaces::new();
    let ns = net.add("dp");
    sh_in(
        &ns,
        "sysctl -qw net.ipv4.tcp_wmem='4096 16384 49152' net.ipv4.tcp_rmem='4096 16384 49152'",
    );
    (net, ns)
}

/// Starts a gateway (mutual TLS on the control port; `data_tls` for data connections) and an
/// agent with `pool` warm connections, serving `backend`, all inside a small-buffer namespace.
fn tunnel(
    net: Namespaces,
    ns: String,
    dir: Workdir,
    backend: SocketAddr,
    data_tls: bool,
    pool: usize,
) -> Tunnel {
    let certs = make_certs(&dir, "certs", &[]);
    let public = local(free_port());
    let gateway = in_ns(&ns, || {
        start_gateway_with(
            &dir,
            "gateway",
            &format!(
                "listen = \"127.0.0.1:0\"\n{}\ndata_tls = {data_tls}",
                gateway_tls(&certs)
            ),
            "",
        )
    });
    let agent = in_ns(&ns, || {
        start_agent(
            &dir,
            "agent",
            &[gateway.control],
            &[listener("data", public.port(), backend)],
            &format!("{}\npool = {pool}", agent_tls(&certs, &certs, "agent")),
            "",
        )
    });
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    if pool > 0 {
        // Clients take pooled connections only once the pool has filled.
        let filled = wait_until(Duration::from_secs(10), || {
            in_ns(&ns, || gateway.api("/api/stats"))["pooled"].as_u64() == Some(pool as u64)
        });
        assert!(filled, "the warm pool never filled");
    }
    Tunnel {
        gateway,
        _agent: agent,
        public,
        ns,
        dir,
        _net: net,
    }
}

impl Tunnel {
    /// A client connection to the public port, from inside the namespace.
    fn client(&self) -> TcpStream {
        let c = connect_in(&self.ns, None, self.public, Duration::from_secs(5))
            .expect("connect to the public port");
        c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        c
    }
}

/// The backend's next connection, or a panic after `timeout`.
fn accept_within(backend: &TcpListener, timeout: Duration) -> TcpStream {
    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match backend.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("the backend got no connection within {timeout:?}: {e}"),
        }
    }
}

/// Reads exactly `len` bytes within `within`; on a short count says how many arrived.
fn read_exactly(s: &mut TcpStream, len: usize, within: Duration) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{} of {len} bytes within {within:?}", got.len()));
        }
        s.set_read_timeout(Some(left)).unwrap();
        let want = (len - got.len()).min(buf.len());
        match s.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("end of stream after {} of {len} bytes", got.len())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("{} of {len} bytes within {within:?}", got.len()))
            }
            Err(e) => return Err(format!("{e} after {} of {len} bytes", got.len())),
        }
    }
    Ok(got)
}

/// How a stream ended, read to its end: `Ok(bytes)` at a clean end of stream, `Err(error)`
/// otherwise (a reset, or no end within `within`).
fn read_to_end_within(s: &mut TcpStream, within: Duration) -> Result<usize, std::io::Error> {
    let deadline = Instant::now() + within;
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(e),
        }
    }
}

/// Closes with a reset (SO_LINGER 0): what an aborted transfer looks like on the wire.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

// ------------------------------------------------------------------- a burst, then silence

/// `rounds` uploads and downloads of a 4 MiB burst after which the sender goes quiet but stays
/// open: the receiver must have every byte within a few seconds, in both directions.
fn bursts_then_silence(data_tls: bool, pool: usize, rounds: usize) {
    let dir = Workdir::new();
    let (net, ns) = small_buffer_namespace();
    let backend = listen_in(&ns, local(0));
    let t = tunnel(net, ns, dir, backend.local_addr().unwrap(), data_tls, pool);
    let burst = pseudo_random(BURST, 0xb0257);
    let mut failures = Vec::new();
    for round in 0..rounds {
        // Upload: the client sends a burst, then waits for a reply without closing.
        let mut client = t.client();
        let mut server = accept_within(&backend, Duration::from_secs(10));
        let sender = {
            let mut c = client.try_clone().unwrap();
            let burst = burst.clone();
            std::thread::spawn(move || c.write_all(&burst))
        };
        match read_exactly(&mut server, BURST, ARRIVAL) {
            Ok(got) => {
                assert!(got == burst, "upload {round}: the bytes changed");
                sender.join().unwrap().expect("the client wrote its burst");
                server.write_all(b"ok").unwrap();
                match read_exactly(&mut client, 2, ARRIVAL) {
                    Ok(reply) => assert_eq!(reply, b"ok"),
                    Err(e) => failures.push(format!("upload {round}: the reply: {e}")),
                }
            }
            Err(e) => failures.push(format!("upload {round}: the backend got {e}")),
        }
        drop((client, server));

        // Download: the backend sends a burst, then stays quiet and open.
        let mut client = t.client();
        let server = accept_within(&backend, Duration::from_secs(10));
        let sender = {
            let mut s = server.try_clone().unwrap();
            let burst = burst.clone();
            std::thread::spawn(move || s.write_all(&burst))
        };
        match read_exactly(&mut client, BURST, ARRIVAL) {
            Ok(got) => {
                assert!(got == burst, "download {round}: the bytes changed");
                sender.join().unwrap().expect("the backend wrote its burst");
            }
            Err(e) => failures.push(format!("download {round}: the client got {e}")),
        }
        drop((client, server));
    }
    assert!(
        failures.is_empty(),
        "a burst followed by silence did not arrive whole (data_tls = {data_tls}, pool = {pool}):\n{}",
        failures.join("\n")
    );
    drop(t);
}

#[test]
fn a_burst_then_silence_arrives_whole_over_tls_data_connections_without_the_pool() {
    bursts_then_silence(true, 0, 4);
}

#[test]
fn a_burst_then_silence_arrives_whole_over_tls_data_connections_from_the_pool() {
    bursts_then_silence(true, 4, 4);
}

/// Plaintext data connections (splice) never had the problem; kept as the reference.
#[test]
fn a_burst_then_silence_arrives_whole_over_plain_data_connections() {
    bursts_then_silence(false, 4, 2);
}

// --------------------------------------------------------------------------------- resets

/// A thread writing `data` into a clone of a socket until told to stop (then it drops the
/// clone, so the test's own handle is the socket's last one).
struct Sender {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

fn send_until_stopped(s: &TcpStream, data: Vec<u8>) -> Sender {
    let mut s = s.try_clone().unwrap();
    s.set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut at = 0;
        while at < data.len() && !stopped.load(Ordering::SeqCst) {
            match s.write(&data[at..]) {
                Ok(n) => at += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    });
    Sender { stop, thread }
}

impl Sender {
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap();
    }
}

/// A reset on either end reaches the other end as a reset, while a clean half-close still
/// travels as an end of stream with the reply flowing back.
fn resets_cross(data_tls: bool) {
    let dir = Workdir::new();
    let (net, ns) = small_buffer_namespace();
    let backend = listen_in(&ns, local(0));
    let t = tunnel(net, ns, dir, backend.local_addr().unwrap(), data_tls, 2);
    let chunk = pseudo_random(256 * 1024, 7);

    // An aborted upload: the client sends part of a stream, then resets.
    let client = t.client();
    let mut server = accept_within(&backend, Duration::from_secs(10));
    let uploading = send_until_stopped(&client, chunk.clone());
    read_exactly(&mut server, 64 * 1024, ARRIVAL).expect("the upload's first bytes arrive");
    uploading.stop();
    reset(client);
    let end = read_to_end_within(&mut server, ARRIVAL);
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "data_tls = {data_tls}: an aborted upload must reach the backend as a reset, got {end:?}"
    );
    drop(server);

    // A backend that resets mid-download.
    let mut client = t.client();
    let server = accept_within(&backend, Duration::from_secs(10));
    let downloading = send_until_stopped(&server, chunk.clone());
    read_exactly(&mut client, 64 * 1024, ARRIVAL).expect("the download's first bytes arrive");
    downloading.stop();
    reset(server);
    let end = read_to_end_within(&mut client, ARRIVAL);
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "data_tls = {data_tls}: a backend's reset must reach the client as a reset, got {end:?}"
    );
    drop(client);

    // A clean end stays a clean end: the client half-closes, the backend sees end of stream,
    // answers and closes; the client gets the whole answer, then end of stream.
    let mut client = t.client();
    let mut server = accept_within(&backend, Duration::from_secs(10));
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut request = Vec::new();
    server
        .set_read_timeout(Some(ARRIVAL))
        .and_then(|()| server.read_to_end(&mut request))
        .expect("the backend sees a clean end of stream");
    assert_eq!(request, b"request");
    // From another thread while the client reads: 256 KiB need not fit in the path's buffers
    // (48 KiB socket buffers here), and a test that writes it all before reading deadlocks
    // whenever it does not (seen under load: write_all timed out after 20 s).
    let reply = chunk.clone();
    let answering = std::thread::spawn(move || {
        server.write_all(&reply)?;
        server.shutdown(Shutdown::Write)
    });
    let end = read_to_end_within(&mut client, ARRIVAL);
    answering
        .join()
        .unwrap()
        .expect("the backend writes its reply and closes");
    assert_eq!(
        end.ok(),
        Some(chunk.len()),
        "data_tls = {data_tls}: the reply and a clean end of stream"
    );
    drop(t);
}

#[test]
fn resets_cross_tls_data_connections_as_resets() {
    resets_cross(true);
}

#[test]
fn resets_cross_plain_data_connections_as_resets() {
    resets_cross(false);
}

// ------------------------------------------------------------------------------------ SFTP

const SFTP_FILE: usize = 20 * 1024 * 1024;
const SFTP_UPLOADS: usize = 50;
/// Far more than one upload takes (well under a second here): a stalled upload fails the test
/// instead of hanging it.
const SFTP_TIMEOUT_S: u32 = 20;

/// Real OpenSSH: 50 uploads of 20 MiB with `sftp put` through TLS data connections (the default
/// deployment: mutual TLS, the warm pool on), each in a session of its own; none may stall, and
/// every file arrives unchanged.
#[test]
fn fifty_sftp_uploads_of_20_mib_over_tls_data_connections_never_stall() {
    let dir = Workdir::new();
    let (net, ns) = small_buffer_namespace();
    let sshd_dir = Workdir::new();
    let sshd = Sshd::start_at(&sshd_dir, Some(&ns), "127.0.0.1", free_port());
    let t = tunnel(net, ns, dir, local(sshd.port), true, 4);
    let source = t.dir.path().join("source.bin");
    std::fs::write(&source, pseudo_random(SFTP_FILE, 0x5f7b)).unwrap();
    let source_sha = sha256_file(&source);
    let started = Instant::now();
    for i in 0..SFTP_UPLOADS {
        let remote = sshd.data_dir.join(format!("upload-{i}.bin"));
        let batch = t.dir.write(
            "batch",
            &format!("put {} {}\n", source.display(), remote.display()),
        );
        let began = Instant::now();
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.ns,
                "timeout",
                &SFTP_TIMEOUT_S.to_string(),
            ])
            .arg("sftp")
            .arg("-b")
            .arg(&batch)
            .arg("-i")
            .arg(&sshd.key)
            .arg("-P")
            .arg(t.public.port().to_string())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
            .args(["-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes"])
            .arg(format!("{TEST_USER}@127.0.0.1"))
            .output()
            .expect("run sftp");
        assert!(
            out.status.success(),
            "upload {i} of {SFTP_UPLOADS} failed or stalled (exit {:?} after {:.1} s, timeout {SFTP_TIMEOUT_S} s; {} of {SFTP_FILE} bytes arrived): {}",
            out.status.code(),
            began.elapsed().as_secs_f64(),
            std::fs::metadata(&remote).map(|m| m.len()).unwrap_or(0),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            sha256_file(&remote),
            source_sha,
            "upload {i} changed the bytes"
        );
        std::fs::remove_file(&remote).unwrap();
    }
    eprintln!(
        "{SFTP_UPLOADS} sftp uploads of {} MiB in small buffers over TLS data connections: {:.1} s",
        SFTP_FILE >> 20,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        // The connections' audit records (`outcome="error"`: a reset or I/O error mid-stream).
        t.gateway.proc.count_log("outcome=\"error\""),
        0,
        "no upload may end by error"
    );
    drop(sshd);
    drop(t);
}

// ------------------------------------------------------------------- the embedded listener

/// The embedded listener over TLS data connections in small buffers: a burst the application
/// writes and flushes arrives whole while it stays silent; a stream it drops without
/// `shutdown()` still ends cleanly after its last bytes; `abort()` reaches the client as a reset.
#[test]
fn the_embedded_listener_delivers_bursts_clean_ends_and_resets() {
    use sallyport::agent::GatewayListener;
    use tokio::io::AsyncWriteExt;

    let dir = Workdir::new();
    let (_net, ns) = small_buffer_namespace();
    let certs = make_certs(&dir, "certs", &[]);
    let gateway = in_ns(&ns, || {
        start_gateway_with(
            &dir,
            "gateway",
            &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
            "",
        )
    });
    let public = local(free_port());
    let rt = support::netns::runtime_in(&ns, 2);
    let (control, c) = (gateway.control.to_string(), certs.clone());
    let listener = rt
        .block_on(rt.spawn(async move {
            GatewayListener::builder(&control, "embedded", &public.to_string())?
                .tls(c.join("ca.crt"), c.join("agent.crt"), c.join("agent.key"))?
                .bind()
                .await
        }))
        .unwrap()
        .expect("the embedded listener binds");
    let burst = pseudo_random(BURST, 0xe3b);
    let (quiet_tx, quiet_rx) = tokio::sync::oneshot::channel::<()>();
    let app = {
        let burst = burst.clone();
        rt.spawn(async move {
            // 1: a burst, flushed, then silence until the test has checked it.
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&burst).await.unwrap();
            s.flush().await.unwrap();
            let _ = quiet_rx.await;
            s.shutdown().await.unwrap();
            // 2: dropped without shutdown.
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"bye").await.unwrap();
            drop(s);
            // 3: aborted mid-reply.
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"partial").await.unwrap();
            s.flush().await.unwrap();
            s.abort();
            listener
        })
    };

    let mut client = connect_in(&ns, None, public, Duration::from_secs(5)).unwrap();
    let got = read_exactly(&mut client, BURST, ARRIVAL)
        .unwrap_or_else(|e| panic!("a flushed burst from the application: the client got {e}"));
    assert!(got == burst, "the burst changed");
    quiet_tx.send(()).unwrap();
    assert_eq!(read_to_end_within(&mut client, ARRIVAL).ok(), Some(0));

    let mut client = connect_in(&ns, None, public, Duration::from_secs(5)).unwrap();
    let end = read_to_end_within(&mut client, ARRIVAL);
    assert_eq!(
        end.ok(),
        Some(3),
        "a dropped stream: its bytes, then a clean end"
    );

    // The reset can come so soon (a warm-pool connection, an application that aborts at once)
    // that the client's connect() itself reports it: that is the reset reaching the client too.
    let end = connect_in(&ns, None, public, Duration::from_secs(5))
        .and_then(|mut client| read_to_end_within(&mut client, ARRIVAL));
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "an aborted stream must reach the client as a reset, got {end:?}"
    );
    drop(rt.block_on(app).unwrap());
    drop(rt);
    drop(gateway);
}
