//! Reusable TLS data connections (protocol v3, issue 15): a warm-pool connection over TLS serves
//! client after client, with half-close and reset keeping their meaning through it; a connection
//! whose client failed is never reused; an agent or gateway of protocol v2 falls back to one
//! client per connection.
//!
//! Which data connection served a client is read from the gateway's audit records
//! (`agent_addr`: the data connection's address as the gateway saw it).

mod support;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

/// A TLS gateway (mutual TLS, TLS data connections) and an agent with `pool` warm connections
/// serving `backend` on `public`; `gateway_env`/`agent_env` go to the daemons' environment.
struct Tls {
    gateway: Gateway,
    agent: Proc,
    public: SocketAddr,
    _dir: Workdir,
}

fn tls_tunnel(
    backend: SocketAddr,
    pool: usize,
    gateway_env: &[(&str, &str)],
    agent_env: &[(&str, &str)],
) -> Tls {
    let public = local(free_port());
    let listeners = [listener("data", public.port(), backend)];
    tls_tunnel_with(public, &listeners, pool, "", gateway_env, agent_env)
}

/// [`tls_tunnel`] with plaintext data connections (the control channel keeps mutual TLS), and
/// the gateway reusing them (`data_reuse = true`, protocol v4) or not (the default).
fn plain_tunnel(backend: SocketAddr, pool: usize, reuse: bool) -> Tls {
    let public = local(free_port());
    let listeners = [listener("data", public.port(), backend)];
    let control = format!("data_tls = false\ndata_reuse = {reuse}\n");
    tls_tunnel_with(public, &listeners, pool, &control, &[], &[])
}

/// [`tls_tunnel`] with these listeners and these extra `[control]` lines; `public` is the
/// first listener's address.
fn tls_tunnel_with(
    public: SocketAddr,
    listeners: &[ListenerDef],
    pool: usize,
    control: &str,
    gateway_env: &[(&str, &str)],
    agent_env: &[(&str, &str)],
) -> Tls {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let config = format!(
        "[control]\nlisten = \"127.0.0.1:0\"\n{}\n{control}\n[clients]\nbind = \"127.0.0.1\"\n\n\
         [peers]\ndefault = \"allow\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        gateway_tls(&certs)
    );
    let path = dir.write("gateway.toml", &config);
    let gateway = spawn_gateway_env("gateway", &path, gateway_env);
    let mut agent = agent_config(
        &[gateway.control],
        listeners,
        &format!("{}\npool = {pool}", agent_tls(&certs, &certs, "agent")),
    );
    agent.push_str("\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
    dir.write("agent.toml", &agent);
    let agent = spawn_agent_env(&dir, "agent", agent_env);
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    let filled = wait_until(Duration::from_secs(10), || {
        gateway.api("/api/stats")["pooled"].as_u64() >= Some(pool as u64)
    });
    assert!(filled, "the warm pool never filled");
    Tls {
        gateway,
        agent,
        public,
        _dir: dir,
    }
}

impl Tls {
    /// The gateway's audit records so far: (outcome, the data connection's address).
    fn records(&self) -> Vec<(String, String)> {
        self.gateway
            .proc
            .log_lines()
            .iter()
            .filter(|l| l.contains("connection_end"))
            .map(|l| (field(l, "outcome="), field(l, "agent_addr=")))
            .collect()
    }

    /// Waits until the gateway has `n` audit records; returns them.
    fn wait_records(&self, n: usize) -> Vec<(String, String)> {
        let ok = wait_until(Duration::from_secs(10), || self.records().len() >= n);
        let records = self.records();
        assert!(ok, "{} of {n} audit records", records.len());
        records
    }
}

/// The value after `key` in a text log line (up to the next space, quotes trimmed).
fn field(line: &str, key: &str) -> String {
    let Some(at) = line.find(key) else {
        return String::new();
    };
    let rest = &line[at + key.len()..];
    rest.split(' ')
        .next()
        .unwrap_or("")
        .trim_matches('"')
        .to_string()
}

/// One client: sends `payload`, half-closes, reads the echo to its end and checks every byte.
fn echo_client(public: SocketAddr, payload: &[u8]) {
    let mut c = TcpStream::connect_timeout(&public, Duration::from_secs(5)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(payload).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::with_capacity(payload.len());
    c.read_to_end(&mut got).unwrap();
    assert!(got == payload, "the echo differs ({} bytes)", got.len());
}

fn distinct_connections(records: &[(String, String)]) -> usize {
    records.iter().map(|r| &r.1).collect::<HashSet<_>>().len()
}

#[test]
fn ten_thousand_sequential_clients_share_a_few_tls_data_connections() {
    const CLIENTS: usize = 10_000;
    let echo = EchoServer::start();
    let t = tls_tunnel(echo.addr, 2, &[], &[]);
    for i in 0..CLIENTS {
        let payload = pseudo_random(1 + i % 3000, i as u64);
        echo_client(t.public, &payload);
    }
    let records = t.wait_records(CLIENTS);
    assert!(
        records.iter().all(|r| r.0 == "closed"),
        "a client did not end cleanly"
    );
    let used = distinct_connections(&records);
    // The pool's two, a replacement opened while each was busy, and one more now and then when
    // a client came before the gateway had parked its predecessor's connection again: a few
    // dozen at most, not 10,000.
    assert!(
        used <= 50,
        "{CLIENTS} sequential clients used {used} data connections"
    );
    assert_eq!(echo.accepted(), CLIENTS);
}

#[test]
fn with_reuse_off_every_client_gets_a_new_data_connection() {
    const CLIENTS: usize = 300;
    let echo = EchoServer::start();
    let off = [("SALLYPORT_DATA_REUSE", "off")];
    let t = tls_tunnel(echo.addr, 2, &off, &off);
    for i in 0..CLIENTS {
        echo_client(t.public, &pseudo_random(100, i as u64));
    }
    let records = t.wait_records(CLIENTS);
    assert_eq!(distinct_connections(&records), CLIENTS);
}

/// An agent or a gateway that speaks at most protocol v2 gets one client per connection, and
/// everything still works.
#[test]
fn an_old_protocol_peer_falls_back_to_one_client_per_connection() {
    const CLIENTS: usize = 50;
    let old = [("SALLYPORT_MAX_PROTOCOL", "2")];
    for (gateway_env, agent_env) in [(&old[..], &[][..]), (&[][..], &old[..])] {
        let echo = EchoServer::start();
        let t = tls_tunnel(echo.addr, 2, gateway_env, agent_env);
        for i in 0..CLIENTS {
            echo_client(t.public, &pseudo_random(2000, i as u64));
        }
        let records = t.wait_records(CLIENTS);
        assert!(records.iter().all(|r| r.0 == "closed"));
        assert_eq!(
            distinct_connections(&records),
            CLIENTS,
            "old gateway: {}",
            gateway_env.len()
        );
        drop(t.agent);
    }
}

/// The backend's next connection.
fn accept(backend: &TcpListener) -> TcpStream {
    let (s, _) = backend.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// A clean exchange: the client's request, the backend's reply, both close.
fn clean_client(public: SocketAddr, backend: &TcpListener, n: usize) {
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(format!("request {n}").as_bytes()).unwrap();
    let mut s = accept(backend);
    let mut buf = [0u8; 64];
    let got = s.read(&mut buf).unwrap();
    assert_eq!(&buf[..got], format!("request {n}").as_bytes());
    s.write_all(b"reply").unwrap();
    drop(s);
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"reply");
}

/// The client half-closes after its request: the backend sees end of stream and still answers.
fn half_closing_client(public: SocketAddr, backend: &TcpListener) {
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"all of it").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut s = accept(backend);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(
        got, b"all of it",
        "the backend saw the client's end of stream"
    );
    s.write_all(b"answer after the end").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"answer after the end");
}

/// How a stream ends when read to its end.
fn ending(mut s: TcpStream) -> std::io::Result<usize> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
}

impl Tls {
    /// Waits until the gateway holds `n` idle pooled connections.
    fn wait_pooled(&self, n: u64) {
        let ok = wait_until(Duration::from_secs(10), || {
            self.gateway.api("/api/stats")["pooled"].as_u64() == Some(n)
        });
        assert!(ok, "the gateway never held {n} pooled connections");
    }
}

/// The client resets mid-upload: the backend must see a reset.
fn client_resets(public: SocketAddr, backend: &TcpListener) {
    let mut c = TcpStream::connect(public).unwrap();
    c.write_all(b"partial upload").unwrap();
    let mut s = accept(backend);
    let mut buf = [0u8; 14];
    s.read_exact(&mut buf).unwrap();
    reset(c);
    let end = ending(s);
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the client's reset reached the backend as {end:?}"
    );
}

/// The backend resets mid-download: the client must see a reset.
fn backend_resets(public: SocketAddr, backend: &TcpListener) {
    let mut c = TcpStream::connect(public).unwrap();
    c.write_all(b"download please").unwrap();
    let mut s = accept(backend);
    let mut buf = [0u8; 15];
    s.read_exact(&mut buf).unwrap();
    s.write_all(b"partial download").unwrap();
    let mut got = [0u8; 16];
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.read_exact(&mut got).unwrap();
    reset(s);
    let end = ending(c);
    assert!(
        matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the backend's reset reached the client as {end:?}"
    );
}

/// With `pool = 1` and the gateway's pool settled at two idle connections before each client
/// (the member and the one that came back), a client takes the connection the previous client
/// used (the newest), and no replacement is opened meanwhile.
#[test]
fn half_close_and_reset_keep_their_meaning_through_a_reused_connection() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = tls_tunnel(backend.local_addr().unwrap(), 1, &[], &[]);
    half_close_and_reset_through(&t, &backend);
}

/// The same through a reused plaintext connection (`data_reuse = true`, protocol v4).
#[test]
fn half_close_and_reset_keep_their_meaning_through_a_reused_plaintext_connection() {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = plain_tunnel(backend.local_addr().unwrap(), 1, true);
    half_close_and_reset_through(&t, &backend);
}

/// Plaintext data connections keep splice(2) and one client each unless the gateway's owner
/// chose reuse (`[control] data_reuse = true`); with it, sequential clients share a few.
#[test]
fn plaintext_data_connections_are_reused_only_when_the_gateway_chooses_it() {
    for (reuse, clients) in [(false, 200), (true, 2_000)] {
        let echo = EchoServer::start();
        let t = plain_tunnel(echo.addr, 2, reuse);
        for i in 0..clients {
            echo_client(t.public, &pseudo_random(1 + i % 3000, i as u64));
        }
        let records = t.wait_records(clients);
        assert!(records.iter().all(|r| r.0 == "closed"), "reuse {reuse}");
        let used = distinct_connections(&records);
        if reuse {
            assert!(
                used <= 50,
                "{clients} clients used {used} plaintext connections"
            );
        } else {
            assert_eq!(
                used, clients,
                "plaintext connections were reused without data_reuse"
            );
        }
        assert_eq!(echo.accepted(), clients);
    }
}

fn half_close_and_reset_through(t: &Tls, backend: &TcpListener) {
    let settle = || t.wait_pooled(2);

    clean_client(t.public, backend, 1);
    settle();
    clean_client(t.public, backend, 2);
    settle();
    // 3: half-close through client 2's connection (its 2nd client at least); 4: clean again.
    half_closing_client(t.public, backend);
    settle();
    clean_client(t.public, backend, 4);
    let records = t.wait_records(4);
    let first = records[1].1.clone();
    assert!(
        records[1..].iter().all(|r| r.1 == first && r.0 == "closed"),
        "clients 3 and 4 were not served by client 2's connection: {records:?}"
    );
    settle();
    // 5: the client resets mid-upload, on that connection's 4th client or later.
    client_resets(t.public, backend);
    let records = t.wait_records(5);
    assert_eq!(records[4].1, first);

    // 6 to 8: clean clients; 8 on 7's connection. 9: the backend resets mid-download on it.
    for n in 6..9 {
        t.wait_pooled(if n == 6 { 1 } else { 2 });
        clean_client(t.public, backend, n);
    }
    settle();
    backend_resets(t.public, backend);
    let records = t.wait_records(9);
    let second = records[7].1.clone();
    assert_eq!(
        records[8].1, second,
        "client 9 did not reuse client 8's connection"
    );
    assert_eq!(
        records[7].1, records[6].1,
        "client 8 did not reuse client 7's connection"
    );
    assert_ne!(second, first);

    // Neither connection whose client failed serves anyone again.
    for n in 10..14 {
        clean_client(t.public, backend, n);
        t.wait_records(n);
    }
    let records = t.wait_records(13);
    for (n, r) in records.iter().enumerate().skip(9) {
        assert!(
            r.1 != first && r.1 != second,
            "client {}: a connection whose client failed was reused ({r:?})",
            n + 1
        );
        assert_eq!(r.0, "closed");
    }
}

/// A backend that closes first, like an HTTP/1.0 server: reads one request line (`<size>\n`),
/// answers with `size` pattern bytes and closes. The client then closes too, so the last record
/// of each client is the gateway's end of stream, and the next client's `PoolAssign` can follow
/// it at once on the same connection.
fn closing_first_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while s.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                let Some(size) = String::from_utf8_lossy(&line).parse::<usize>().ok() else {
                    return;
                };
                let _ = s.write_all(&pseudo_random(size, size as u64));
            });
        }
    });
    addr
}

/// One client of [`closing_first_backend`]: asks for `size` bytes, reads to the end, checks
/// every byte, then closes.
fn request_reply(public: SocketAddr, size: usize) -> Result<(), String> {
    let mut c = TcpStream::connect_timeout(&public, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(format!("{size}\n").as_bytes())
        .map_err(|e| format!("request: {e}"))?;
    let mut got = Vec::with_capacity(size);
    let end = c.read_to_end(&mut got);
    check_echo(&got, &pseudo_random(size, size as u64), end)
}

/// One echo client: sends `payload`, half-closes, reads the echo to its end.
fn echo_checked(public: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut c = TcpStream::connect_timeout(&public, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let writer = c.try_clone().unwrap();
    let body = payload.to_vec();
    let sender = std::thread::spawn(move || {
        let mut w = writer;
        w.write_all(&body)?;
        w.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(payload.len());
    let end = c.read_to_end(&mut got);
    let sent = sender.join().unwrap();
    check_echo(&got, payload, end)?;
    sent.map_err(|e| format!("send: {e}"))
}

/// Every byte, in order, and a clean end of stream.
fn check_echo(got: &[u8], want: &[u8], end: std::io::Result<usize>) -> Result<(), String> {
    if let Err(e) = end {
        return Err(format!("{} of {} B, then {e}", got.len(), want.len()));
    }
    if got != want {
        return Err(format!(
            "{} of {} B, then end of stream{}",
            got.len(),
            want.len(),
            if want.starts_with(got) {
                ""
            } else {
                " (corrupted)"
            }
        ));
    }
    Ok(())
}

/// The gateway's count of pooled connections handed a client that did not answer.
fn pool_unanswered(gateway: &Gateway) -> u64 {
    let stats = gateway.api("/api/stats");
    stats["refusals"]["pool_unanswered"].as_u64().unwrap_or(0)
}

/// Regression (bench/soak, sighup fault): the gateway parks a connection again as soon as both
/// directions ended and may hand it the next client at once, so the agent can read that
/// `PoolAssign` together with the previous client's end-of-stream record. The agent used to take
/// those bytes for garbage and close the connection: the gateway saw its pooled connection die
/// unanswered, dropped the agent's whole pool, and a client of exactly 64 KiB that had already
/// half-closed was then taken for gone and closed with 0 bytes. Clients that follow each other
/// at once (4 at a time) must never find their connection dead, and each gets every byte.
#[test]
fn a_connection_handed_its_next_client_at_once_takes_it() {
    const PER_THREAD: usize = 400;
    let backend = closing_first_backend();
    let t = tls_tunnel(backend, 2, &[], &[]);
    let public = t.public;
    let threads: Vec<_> = (0..4)
        .map(|k| {
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                for i in 0..PER_THREAD {
                    let size = [1, 200, 4096, 65536][(i + k) % 4];
                    if let Err(e) = request_reply(public, size) {
                        failed.push(format!("client {k}/{i} ({size} B): {e}"));
                    }
                }
                failed
            })
        })
        .collect();
    let failed: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        failed.is_empty(),
        "{} clients failed: {failed:?}",
        failed.len()
    );
    let records = t.wait_records(4 * PER_THREAD);
    assert!(records.iter().all(|r| r.0 == "closed"), "{records:?}");
    assert_eq!(
        pool_unanswered(&t.gateway),
        0,
        "a pooled connection handed a client was found dead"
    );
    let used = distinct_connections(&records);
    assert!(
        used < 200,
        "{} clients used {used} data connections",
        records.len()
    );
}

/// Two agents of one site with reused TLS pool connections, reloaded one after the other to add
/// or remove a listener (docs/protocol.md 7.9: the first is refused until the second has the
/// same config, so its session ends and starts again, with clients running on its
/// connections). Every client of the listener that stays gets every byte: none is closed with
/// 0 bytes or reset because its pooled connection belonged to a session or config that ended.
#[test]
fn clients_through_reused_connections_survive_reloads_that_add_and_remove_a_listener() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &["--agent-name", "a2"]);
    let config = format!(
        "[control]\nlisten = \"127.0.0.1:0\"\n{}\n\n[clients]\nbind = \"127.0.0.1\"\n\n\
         [peers]\ndefault = \"allow\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        gateway_tls(&certs)
    );
    let gateway = spawn_gateway_env("gateway", &dir.write("gateway.toml", &config), &[]);
    let (echo, closing) = (EchoServer::start(), closing_first_backend());
    let (stays, closes_first, dynamic) = (free_port(), free_port(), local(free_port()));
    let write_configs = |with_dyn: bool| {
        for (name, cert) in [("a1", "agent"), ("a2", "a2")] {
            let mut listeners = vec![
                listener("stays", stays, echo.addr),
                listener("closing", closes_first, closing),
            ];
            if with_dyn {
                listeners.push(listener("dyn", dynamic.port(), echo.addr));
            }
            let top = format!(
                "name = \"{name}\"\npool = 2\n{}",
                agent_tls(&certs, &certs, cert)
            );
            let mut text = agent_config(&[gateway.control], &listeners, &top);
            text.push_str("\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
            dir.write(&format!("{name}.toml"), &text);
        }
    };
    write_configs(false);
    let agents = [
        spawn_agent_env(&dir, "a1", &[]),
        spawn_agent_env(&dir, "a2", &[]),
    ];
    let filled = wait_until(Duration::from_secs(15), || {
        gateway.api("/api/stats")["pooled"].as_u64() >= Some(4)
    });
    assert!(filled, "the warm pools never filled");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let stop = stop.clone();
            let (stays, closes_first) = (local(stays), local(closes_first));
            std::thread::spawn(move || {
                let (mut done, mut failed) = (0, Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let size = [1, 1000, 65536, 200_000][(i + k) % 4];
                    let result = if k % 2 == 0 {
                        echo_checked(stays, &pseudo_random(size, i as u64))
                    } else {
                        request_reply(closes_first, size)
                    };
                    match result {
                        Ok(()) => done += 1,
                        Err(e) => failed.push(format!("client {k}/{i} ({size} B): {e}")),
                    }
                    i += 1;
                }
                (done, failed)
            })
        })
        .collect();
    for with_dyn in [true, false, true, false] {
        write_configs(with_dyn);
        agents[0].signal("HUP");
        std::thread::sleep(Duration::from_secs(1));
        agents[1].signal("HUP");
        let settled = wait_until(Duration::from_secs(20), || accepts(dynamic) == with_dyn);
        assert!(settled, "dyn open: {with_dyn} never took effect");
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut done, mut failed) = (0, Vec::new());
    for c in clients {
        let (d, f) = c.join().unwrap();
        done += d;
        failed.extend(f);
    }
    println!(
        "{done} clients ok during 4 reloads; gateway pool_unanswered {}",
        pool_unanswered(&gateway)
    );
    assert!(
        failed.is_empty(),
        "{} of {} clients failed: {failed:?}",
        failed.len(),
        done + failed.len()
    );
    assert!(done >= 100, "only {done} clients in the run");
    let rejected = gateway.proc.count_log("config rejected");
    assert!(
        rejected >= 1,
        "no reload made the gateway refuse an agent's config"
    );
}

/// TLS resumption (issue 15 item 2): with one TLS data connection per client (reuse off),
/// every connection after the first few resumes a session instead of a full handshake, and the
/// gateway counts both kinds and what its session cache holds. With resumption off on the agent,
/// every handshake is a full one.
#[test]
fn data_connections_resume_tls_sessions() {
    const CLIENTS: u64 = 40;
    let off = [("SALLYPORT_DATA_REUSE", "off")];
    let full_only = [
        ("SALLYPORT_DATA_REUSE", "off"),
        ("SALLYPORT_TLS_RESUMPTION", "off"),
    ];
    for (agent_env, resumes) in [(&off[..], true), (&full_only[..], false)] {
        let echo = EchoServer::start();
        let t = tls_tunnel(echo.addr, 2, &off, agent_env);
        for i in 0..CLIENTS {
            echo_client(t.public, &pseudo_random(100, i));
        }
        t.wait_records(CLIENTS as usize);
        let stats = t.gateway.api("/api/stats");
        let tls = &stats["tls"];
        let full = tls["handshakes_full"].as_u64().unwrap();
        let resumed = tls["handshakes_resumed"].as_u64().unwrap();
        // The control channel, the pool's connections and one data connection per client.
        assert!(full + resumed > CLIENTS + 2, "{tls}");
        let entries = tls["sessions"]["entries"].as_u64().unwrap();
        let bytes = tls["sessions"]["bytes"].as_u64().unwrap();
        println!("resumption {resumes}: {tls}");
        if resumes {
            assert!(full <= 4, "full handshakes with resumption on: {tls}");
            assert!(resumed >= CLIENTS, "{tls}");
            // Each kept session holds the agent's certificate chain: about a kilobyte or two.
            assert!(entries > 0 && entries <= 256, "{tls}");
            let each = bytes / entries;
            assert!(
                (300..4096).contains(&each),
                "{each} bytes per session: {tls}"
            );
        } else {
            assert_eq!(resumed, 0, "{tls}");
        }
        let metrics = metrics_text(&t.gateway);
        let line = format!("sallyport_tls_handshakes_total{{kind=\"resumed\"}} {resumed}");
        assert!(metrics.contains(&line), "{line} not in /metrics");
    }
}

/// UDP flows handed pooled TLS connections on a gateway and agent that reuse them for TCP: a
/// flow's datagrams go unframed on both sides and its connection is not reused (protocol.md
/// 7.16), so every flow gets its own answers while TCP clients keep going through reused
/// connections around them.
#[test]
fn udp_flows_on_reusing_pooled_connections_are_carried_unframed() {
    let udp_backend = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_addr = udp_backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = udp_backend.recv_from(&mut buf) {
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp_backend.send_to(&reply, from);
        }
    });
    let echo = EchoServer::start();
    let (tcp_public, udp_public) = (local(free_port()), local(free_port()));
    let mut flows = listener("flows", udp_public.port(), udp_addr);
    flows.extra = "protocol = \"udp\"\nidle_timeout = \"1s\"\n".into();
    let listeners = [listener("data", tcp_public.port(), echo.addr), flows];
    let t = tls_tunnel_with(tcp_public, &listeners, 2, "", &[], &[]);
    for i in 0..12u64 {
        echo_client(t.public, &pseudo_random(3000, i));
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for k in 0..3u64 {
            let datagram = pseudo_random(200 + k as usize, i * 10 + k);
            client.send_to(&datagram, udp_public).unwrap();
            let mut buf = [0u8; 2048];
            let (n, _) = client.recv_from(&mut buf).expect("the flow's answer");
            assert_eq!(&buf[..5], b"echo:", "flow {i}, datagram {k}");
            assert_eq!(&buf[5..n], &datagram[..], "flow {i}, datagram {k}");
        }
    }
    let log = t.gateway.proc.log_lines();
    let pooled_flows = log
        .iter()
        .filter(|l| l.contains("warm pool") && l.contains("listener=\"flows\""))
        .count();
    assert!(pooled_flows > 0, "no flow was handed a pooled connection");
    let stats = t.gateway.api("/api/stats");
    assert_eq!(pool_unanswered(&t.gateway), 0, "{stats}");
}

fn metrics_text(gateway: &Gateway) -> String {
    let addr = gateway.admin.expect("admin");
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
