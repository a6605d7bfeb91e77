//! Assume breach: the gateway host is owned. A hostile gateway, written here with the crate's own
//! protocol types and a certificate of the test CA, completes a valid mutual-TLS hello, takes the
//! agent's config push and then misbehaves, one test per kind. Each test checks what the agent
//! must hold to (issue 20, item 1):
//! - it connects to nothing but its configured backends and its gateways: sentinel listeners on
//!   the ports next to the backends see no connection, and every `connect(2)` the agent makes
//!   (strace, seccomp-filtered so the trace does not slow it) targets one of them;
//! - it never holds more than its `[limits]` (counted at the backend and at the hostile
//!   gateway), keeps bounded memory (RSS from /proc) and does not crash;
//! - it logs one clear line per kind, not one per hostile message;
//! - it drops the hostile gateway when the protocol is broken;
//! - it keeps serving its other gateway, a real `sallyport gateway` process: a client through
//!   it gets its echo while the hostile one misbehaves.

mod support;

use std::collections::HashSet;
use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use sallyport::protocol::{
    self, ClientArrived, ConfigResult, FrameCodec, HelloAck, ListenerResult, ListenerStatus,
    Message, PoolAssign, Role, SessionSecret, Token,
};
use sallyport::transport::{ServerTls, Stream};
use support::servers::EchoServer;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio_util::codec::FramedRead;

// ---------------------------------------------------------------------------------------------
// The hostile gateway

/// One frame on the wire: length (type included), type, payload.
fn wire(msg: &Message) -> Vec<u8> {
    let frame = msg.to_frame();
    raw_frame(frame.kind, &frame.payload)
}

fn raw_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A control session of the hostile gateway, after the hello and the config push.
struct Ctl {
    /// Which control connection of this gateway this is (0 first): a test can misbehave
    /// differently on each reconnection.
    n: usize,
    reader: FramedRead<ReadHalf<Stream>, FrameCodec>,
    writer: WriteHalf<Stream>,
}

impl Ctl {
    async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.send_raw(&wire(msg)).await
    }

    async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await
    }

    /// Reads until the agent closes the connection (true) or `wait` passes (false); collects
    /// what it said.
    async fn until_closed(&mut self, wait: Duration, said: &mut Vec<Message>) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.reader.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(frame))) => {
                    if let Ok(Some(m)) = Message::from_frame(&frame) {
                        said.push(m);
                    }
                }
            }
        }
    }
}

type Script = Arc<dyn Fn(Ctl) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the hostile gateway does with data and pool connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DataMode {
    /// Acknowledge, then hold the connection open without a byte.
    Hold,
    /// Answer the hello with this many bytes of garbage, then close.
    Garbage,
    /// Acknowledge, then send `PoolAssign` for listener "hold" on every pool connection.
    AssignPool,
}

/// Counts of the hostile gateway, for assertions.
#[derive(Default)]
struct Seen {
    control: AtomicUsize,
    data: AtomicUsize,
    data_open: AtomicUsize,
    data_open_max: AtomicUsize,
    pool: AtomicUsize,
}

struct Hostile {
    addr: SocketAddr,
    seen: Arc<Seen>,
    _runtime: tokio::runtime::Runtime,
}

impl Hostile {
    /// A hostile gateway on loopback with the test CA's gateway certificate.
    fn start(certs: &Path, mode: DataMode, script: Script) -> Hostile {
        let tls = ServerTls::load(
            &certs.join("gateway.crt"),
            &certs.join("gateway.key"),
            &certs.join("ca.crt"),
            None,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let seen2 = seen.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (tls, seen, script) = (tls.clone(), seen2.clone(), script.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    serve(stream, mode, &seen, script).await;
                });
            }
        });
        Hostile {
            addr,
            seen,
            _runtime: runtime,
        }
    }
}

/// Reads the preamble and the hello, and plays the part the hello's role asks for.
async fn serve(mut stream: Stream, mode: DataMode, seen: &Seen, script: Script) {
    if protocol::read_preamble(&mut stream).await.is_err() {
        return;
    }
    let (read, mut writer) = tokio::io::split(stream);
    let mut reader = FramedRead::new(read, FrameCodec::new(1 << 20));
    let Some(Ok(frame)) = reader.next().await else {
        return;
    };
    let Ok(Some(Message::Hello(hello))) = Message::from_frame(&frame) else {
        return;
    };
    let ack = |heartbeat_ms| {
        wire(&Message::HelloAck(HelloAck {
            version: 2,
            software: "hostile/0".into(),
            heartbeat_ms,
            data_tls: true,
        }))
    };
    match hello.role {
        Role::Control(c) => {
            let n = seen.control.fetch_add(1, Ordering::SeqCst);
            let mut first = ack(c.heartbeat_ms);
            first.extend(wire(&Message::SessionSecret(SessionSecret {
                secret: Token::from_bytes([7; 16]),
            })));
            if writer.write_all(&first).await.is_err() {
                return;
            }
            // The agent's ban list (advisory, sent before the push) is skipped, as a gateway
            // that does not know bans would.
            let push = loop {
                let Some(Ok(frame)) = reader.next().await else {
                    return;
                };
                match Message::from_frame(&frame) {
                    Ok(Some(Message::PushConfig(push))) => break push,
                    Ok(Some(Message::BanList(_))) | Ok(None) => continue,
                    _ => return,
                }
            };
            let result = Message::ConfigResult(ConfigResult {
                generation: push.generation,
                listeners: push
                    .listeners
                    .iter()
                    .map(|l| ListenerResult {
                        name: l.name.clone(),
                        status: ListenerStatus::Bound {
                            addrs: vec!["192.0.2.1:1".parse().unwrap()],
                            kept: false,
                        },
                    })
                    .collect(),
            });
            if writer.write_all(&wire(&result)).await.is_err() {
                return;
            }
            script(Ctl { n, reader, writer }).await;
        }
        Role::Data(_) => {
            seen.data.fetch_add(1, Ordering::SeqCst);
            let open = seen.data_open.fetch_add(1, Ordering::SeqCst) + 1;
            seen.data_open_max.fetch_max(open, Ordering::SeqCst);
            match mode {
                DataMode::Garbage => {
                    let _ = writer.write_all(&pseudo_random(64, 20)).await;
                    let _ = writer.shutdown().await;
                }
                DataMode::Hold | DataMode::AssignPool => {
                    if writer.write_all(&ack(0)).await.is_ok() {
                        // Until the agent closes it.
                        let mut inner = reader.into_inner();
                        let mut buf = [0u8; 4096];
                        while matches!(inner.read(&mut buf).await, Ok(n) if n > 0) {}
                    }
                }
            }
            seen.data_open.fetch_sub(1, Ordering::SeqCst);
        }
        Role::Pool(_) | Role::SessionPool(..) => {
            seen.pool.fetch_add(1, Ordering::SeqCst);
            if writer.write_all(&ack(0)).await.is_err() {
                return;
            }
            if mode == DataMode::AssignPool {
                let assign = Message::PoolAssign(PoolAssign {
                    id: 1_000_000 + seen.pool.load(Ordering::SeqCst) as u64,
                    listener: "hold".into(),
                    port_offset: 0,
                    client_addr: "198.51.100.7:40000".parse().unwrap(),
                    gateway_addr: "192.0.2.1:443".parse().unwrap(),
                });
                let _ = writer.write_all(&wire(&assign)).await;
            }
            let mut inner = reader.into_inner();
            let mut buf = [0u8; 4096];
            while matches!(inner.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        _ => {}
    }
}

/// A client offer as the hostile gateway makes it.
fn offer(id: u64, listener: &str, port_offset: u16) -> Message {
    Message::ClientArrived(ClientArrived {
        id,
        token: Token::from_bytes([9; 16]),
        listener: listener.into(),
        port_offset,
        client_addr: "198.51.100.7:40000".parse().unwrap(),
        gateway_addr: "192.0.2.1:443".parse().unwrap(),
    })
}

// ---------------------------------------------------------------------------------------------
// The internal side: backends, sentinels, the agent under strace

/// A backend that holds every connection open until its client closes, and counts them.
struct HoldServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    open_max: Arc<AtomicUsize>,
    /// The first bytes of each connection (up to 256), in the order they were accepted.
    firsts: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl HoldServer {
    fn start() -> HoldServer {
        Self::on(StdListener::bind("127.0.0.1:0").unwrap())
    }

    fn on(listener: StdListener) -> HoldServer {
        let addr = listener.local_addr().unwrap();
        let s = HoldServer {
            addr,
            accepted: Arc::default(),
            open: Arc::default(),
            open_max: Arc::default(),
            firsts: Arc::default(),
        };
        let (accepted, open, open_max, firsts) = (
            s.accepted.clone(),
            s.open.clone(),
            s.open_max.clone(),
            s.firsts.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                open_max.fetch_max(now, Ordering::SeqCst);
                let index = {
                    let mut f = firsts.lock();
                    f.push(Vec::new());
                    f.len() - 1
                };
                let (open, firsts) = (open.clone(), firsts.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let mut f = firsts.lock();
                                let first = &mut f[index];
                                let room = 256usize.saturating_sub(first.len());
                                first.extend_from_slice(&buf[..n.min(room)]);
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        s
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Listeners on local ports no configuration names: the agent must never connect to them.
struct Sentinels {
    listeners: Vec<StdListener>,
}

impl Sentinels {
    fn on(ports: impl IntoIterator<Item = u16>) -> Sentinels {
        let listeners = ports
            .into_iter()
            .filter_map(|p| StdListener::bind(("127.0.0.1", p)).ok())
            .inspect(|l| l.set_nonblocking(true).unwrap())
            .collect();
        Sentinels { listeners }
    }

    fn ports(&self) -> Vec<u16> {
        self.listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect()
    }

    /// Ports that saw a connection.
    fn touched(&self) -> Vec<u16> {
        self.listeners
            .iter()
            .filter(|l| l.accept().is_ok())
            .map(|l| l.local_addr().unwrap().port())
            .collect()
    }
}

/// Everything a hostile-gateway test runs against: an honest gateway, the backends, sentinels
/// and an agent (under strace) serving both gateways.
struct World {
    _dir: Workdir,
    hostile: Hostile,
    honest: Gateway,
    echo: EchoServer,
    hold: HoldServer,
    /// Ports of the "range" listener's backend (4 ports, each a hold server).
    range: Vec<HoldServer>,
    sentinels: Sentinels,
    agent: Proc,
    trace: PathBuf,
    /// The public port of the "echo" listener on the honest gateway.
    public: SocketAddr,
}

/// Four consecutive free ports, bound.
fn four_ports() -> Vec<StdListener> {
    loop {
        let first = free_port();
        if first > 65000 {
            continue;
        }
        let bound: Vec<StdListener> = (first..first + 4)
            .filter_map(|p| StdListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if bound.len() == 4 {
            return bound;
        }
    }
}

impl World {
    /// `top`: extra top-level agent.toml keys; `tables`: extra tables (e.g. `[limits]`).
    fn start(mode: DataMode, script: Script, top: &str, tables: &str) -> World {
        assert!(
            Path::new("/usr/bin/strace").exists(),
            "strace is missing: run the tests with scripts/test.sh, which installs it"
        );
        let dir = Workdir::new();
        let certs = make_certs(&dir, "certs", &[]);
        let hostile = Hostile::start(&certs, mode, script);
        let honest = start_gateway_with(
            &dir,
            "honest",
            &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
            "",
        );
        let echo = EchoServer::start();
        let hold = HoldServer::start();
        let range: Vec<HoldServer> = four_ports().into_iter().map(HoldServer::on).collect();
        let range_first = range[0].addr.port();
        // Around every backend port: the next ports up and down.
        let mut near: HashSet<u16> = HashSet::new();
        for p in [
            echo.addr.port(),
            hold.addr.port(),
            range_first,
            range_first + 3,
        ] {
            for d in 1..=3u16 {
                near.insert(p.saturating_add(d));
                near.insert(p.saturating_sub(d));
            }
        }
        for s in [&echo.addr, &hold.addr] {
            near.remove(&s.port());
        }
        for r in &range {
            near.remove(&r.addr.port());
        }
        let sentinels = Sentinels::on(near);
        let public = local(free_port());
        let range_public = free_port_range4();
        let mut range_def = listener("range", range_public, range[0].addr);
        range_def.public = format!("127.0.0.1:{range_public}-{}", range_public + 3);
        range_def.backend = format!("127.0.0.1:{range_first}-{}", range_first + 3);
        let mut hold_def = listener("hold", free_port(), hold.addr);
        hold_def.extra = "proxy_protocol = \"v1\"\n".into();
        let config = agent_config(
            &[honest.control, hostile.addr],
            &[
                listener("echo", public.port(), echo.addr),
                hold_def,
                range_def,
            ],
            &format!("{}\n{top}", agent_tls(&certs, &certs, "agent")),
        );
        let config = format!("{config}\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n{tables}");
        let path = dir.write("agent.toml", &config);
        let trace = dir.path().join("agent.strace");
        let agent = Proc::spawn_program(
            "agent",
            "/usr/bin/strace",
            &[
                "-f",
                "-qq",
                "--seccomp-bpf",
                "-e",
                "trace=connect",
                "-o",
                trace.to_str().unwrap(),
                BIN,
                "agent",
                "--config",
                path.to_str().unwrap(),
            ],
        );
        wait_open(public, Duration::from_secs(15));
        World {
            _dir: dir,
            hostile,
            honest,
            echo,
            hold,
            range,
            sentinels,
            agent,
            trace,
            public,
        }
    }

    /// The agent process itself (strace's child).
    fn agent_pid(&self) -> u32 {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.agent.pid()))
                .unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The honest gateway still serves: a client through it gets its echo.
    fn honest_serves(&self, during: &str) {
        echo_round_trip(self.public, &format!("through the honest gateway {during}"));
    }

    /// Every address the agent passed to connect(2) (AF_INET and AF_INET6).
    fn connect_targets(&self) -> Vec<SocketAddr> {
        let text = std::fs::read_to_string(&self.trace).unwrap_or_default();
        text.lines().filter_map(connect_target).collect()
    }

    /// The agent connected to nothing but its gateways and its backends; no sentinel saw a
    /// connection.
    fn only_configured_targets(&self) {
        let mut allowed: HashSet<SocketAddr> = [
            self.honest.control,
            self.hostile.addr,
            self.echo.addr,
            self.hold.addr,
        ]
        .into();
        allowed.extend(self.range.iter().map(|r| r.addr));
        let targets = self.connect_targets();
        assert!(
            targets.len() >= 3,
            "the trace must show the agent's connects: {targets:?}"
        );
        let stray: Vec<&SocketAddr> = targets.iter().filter(|t| !allowed.contains(t)).collect();
        assert!(
            stray.is_empty(),
            "connect(2) outside the configuration: {stray:?}"
        );
        let touched = self.sentinels.touched();
        assert!(
            touched.is_empty(),
            "ports no configuration names saw connections: {touched:?} (of {:?})",
            self.sentinels.ports()
        );
    }

    fn agent_alive(&self) {
        let pid = self.agent_pid();
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the agent died: {:#?}",
            self.agent
                .log_lines()
                .iter()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
        );
    }

    /// The agent's `/api/stats`.
    fn stats(&self) -> serde_json::Value {
        let url = agent_admin_url(&self.agent);
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", &format!("{url}/api/stats")])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    fn metrics(&self) -> String {
        let url = agent_admin_url(&self.agent);
        let out = std::process::Command::new("curl")
            .args(["-s", "--max-time", "5", &format!("{url}/metrics")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Log lines of the agent that mention the hostile gateway and contain `needle`.
    fn hostile_lines(&self, needle: &str) -> Vec<String> {
        let gw = self.hostile.addr.to_string();
        self.agent
            .log_lines()
            .into_iter()
            .filter(|l| l.contains(&gw) && l.contains(needle))
            .collect()
    }
}

/// Four consecutive free ports (for a public range).
fn free_port_range4() -> u16 {
    let bound = four_ports();
    let first = bound[0].local_addr().unwrap().port();
    drop(bound);
    first
}

/// The address of one strace line of a connect(2), e.g.
/// `123 connect(9, {sa_family=AF_INET, sin_port=htons(44500), sin_addr=inet_addr("127.0.0.1")}, 16) = -1 EINPROGRESS`.
fn connect_target(line: &str) -> Option<SocketAddr> {
    if !line.contains("connect(") {
        return None;
    }
    let between = |start: &str, end: &str| -> Option<String> {
        let i = line.find(start)? + start.len();
        let j = line[i..].find(end)? + i;
        Some(line[i..j].to_string())
    };
    let port: u16 = between("sin_port=htons(", ")")
        .or_else(|| between("sin6_port=htons(", ")"))?
        .parse()
        .ok()?;
    let ip: std::net::IpAddr = match between("inet_addr(\"", "\"") {
        Some(ip) => ip.parse().ok()?,
        None => between("inet_pton(AF_INET6, \"", "\"")?.parse().ok()?,
    };
    Some(SocketAddr::new(ip, port))
}

fn script<F, Fut>(f: F) -> Script
where
    F: Fn(Ctl) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |ctl| Box::pin(f(ctl)))
}

/// Sends a heartbeat every 500 ms until the connection fails.
async fn heartbeats(mut writer: WriteHalf<Stream>) {
    for seq in 1.. {
        let beat = wire(&Message::Heartbeat(protocol::Heartbeat { seq }));
        if writer.write_all(&beat).await.is_err() || writer.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Holds a control session open with heartbeats, reading whatever the agent says.
async fn idle(ctl: Ctl) {
    let Ctl {
        mut reader, writer, ..
    } = ctl;
    let beats = tokio::spawn(heartbeats(writer));
    while let Some(Ok(_)) = reader.next().await {}
    beats.abort();
}

/// RSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    support::netns::rss_kib(pid)
}

// ---------------------------------------------------------------------------------------------
// The tests

const FLOOD: u64 = 100_000;
/// Limits low enough for a flood to meet every one of them quickly.
const LOW_LIMITS: &str = "[limits]
max_data_connections = 25
max_backend_connections = 30
max_backend_connections_per_listener = 20
offers_per_second = 200
offer_burst = 50
";

/// 100,000 offers on the control channel (half for listener "hold", half spread over the
/// "range" ports), every data connection held open, and a `PoolAssign` on every warm-pool
/// connection: the agent opens no more backend connections than its limits allow, refuses the
/// rest with ClientFailed, counts them, logs a few lines, keeps its memory and its session, and
/// the honest gateway's client still gets its echo during the flood.
#[test]
fn a_flood_of_offers_and_pool_assignments_stays_within_the_agent_limits() {
    let done = Arc::new(AtomicUsize::new(0));
    let failed_seen = Arc::new(AtomicUsize::new(0));
    let (done2, failed2) = (done.clone(), failed_seen.clone());
    let flood = script(move |ctl: Ctl| {
        let (done, failed) = (done2.clone(), failed2.clone());
        async move {
            let Ctl {
                mut reader,
                mut writer,
                ..
            } = ctl;
            let counting = tokio::spawn(async move {
                while let Some(Ok(frame)) = reader.next().await {
                    if let Ok(Some(Message::ClientFailed(_))) = Message::from_frame(&frame) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            let mut batch = Vec::new();
            for id in 1..=FLOOD {
                let m = if id % 2 == 0 {
                    offer(id, "hold", 0)
                } else {
                    offer(id, "range", (id % 4) as u16)
                };
                batch.extend(wire(&m));
                if id % 1000 == 0 {
                    if writer.write_all(&batch).await.is_err() {
                        return;
                    }
                    batch.clear();
                }
            }
            let _ = writer.flush().await;
            done.store(1, Ordering::SeqCst);
            heartbeats(writer).await;
            counting.abort();
        }
    });
    let w = World::start(DataMode::AssignPool, flood, "pool = 4", LOW_LIMITS);
    let pid = w.agent_pid();
    let rss_before = rss_kib(pid);
    let started = std::time::Instant::now();
    // The honest gateway serves while the flood runs.
    let mut during = 0;
    while done.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the flood never ended"
        );
        w.honest_serves("during the flood");
        during += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(during >= 1);
    // Let the agent work through what it has read.
    let refused_total = |s: &serde_json::Value| -> u64 {
        s["refused"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0)
    };
    let offered = |s: &serde_json::Value| s["totals"]["offered"].as_u64().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = w.stats();
            refused_total(&s) + offered(&s) >= FLOOD
        }),
        "the agent did not account for every offer: {}",
        w.stats()
    );
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    w.honest_serves("after the flood");
    w.agent_alive();

    // Never more than the limits at the backends and at the gateway.
    let range_accepted: usize = w.range.iter().map(HoldServer::accepted).sum();
    let hold_max = w.hold.open_max.load(Ordering::SeqCst);
    assert!(
        hold_max <= 20,
        "{hold_max} connections at once to one listener's backend"
    );
    assert!(
        w.hold.accepted() + range_accepted <= 25,
        "{} + {range_accepted} backend connections (limit: 25 data connections)",
        w.hold.accepted()
    );
    // The burst admits up to 25 (the data-connection limit), about half of them for "hold".
    assert!(
        w.hold.accepted() >= 5,
        "the flood's admitted offers were served"
    );
    let data_max = w.hostile.seen.data_open_max.load(Ordering::SeqCst);
    assert!(data_max <= 25, "{data_max} data connections at once");
    // Pool members refused by the limits pause before they are replaced.
    let pool = w.hostile.seen.pool.load(Ordering::SeqCst);
    assert!(
        pool as f64 <= 8.0 + 8.0 * elapsed,
        "{pool} pool connections in {elapsed:.1} s"
    );

    // Refusals are counted and answered, by reason.
    let s = w.stats();
    assert!(s["refused"]["rate"].as_u64().unwrap() > 90_000, "{s}");
    // Answers beyond the outbox's 256 places are dropped while it is full (the gateway's
    // pending deadline closes those clients): at least a full outbox's worth arrives.
    let answers = failed_seen.load(Ordering::SeqCst);
    assert!(answers >= 256, "{answers} ClientFailed answers");
    let metrics = w.metrics();
    assert!(
        metrics.contains("sallyport_agent_offers_refused_total{reason=\"rate\"}"),
        "{metrics}"
    );

    // A few lines, not 100,000; the session survived.
    let lines = w.hostile_lines("offer refused");
    assert!(!lines.is_empty());
    let allowed = 6 * (2 + (elapsed / 10.0) as usize);
    assert!(lines.len() <= allowed, "{} lines: {lines:#?}", lines.len());
    assert!(
        w.agent.log_lines().len() < 2_000,
        "{} log lines",
        w.agent.log_lines().len()
    );
    assert!(w.hostile_lines("control channel lost").is_empty());

    // Bounded memory.
    let rss_after = rss_kib(pid);
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS {rss_before} KiB before, {rss_after} KiB after the flood"
    );
    eprintln!(
        "flood: {FLOOD} offers in {elapsed:.1} s; RSS {rss_before} -> {rss_after} KiB; {} lines; {answers} ClientFailed; {pool} pool connections; refused {}",
        lines.len(),
        s["refused"]
    );
    w.only_configured_targets();
}

/// Offers for listeners the agent does not have and for ports outside a listener's range, a
/// thousand of each: every one is refused with ClientFailed before anything is dialed, counted
/// by reason, logged once per reason, and the session carries on (an offer is not a protocol
/// error: the gateway may have an older config).
#[test]
fn offers_on_unknown_listeners_and_out_of_range_ports_are_refused() {
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let failed2 = failed.clone();
    let play = script(move |ctl: Ctl| {
        let failed = failed2.clone();
        async move {
            let Ctl {
                mut reader,
                mut writer,
                ..
            } = ctl;
            tokio::spawn(async move {
                while let Some(Ok(frame)) = reader.next().await {
                    if let Ok(Some(Message::ClientFailed(f))) = Message::from_frame(&frame) {
                        failed.lock().push(f.reason);
                    }
                }
            });
            let long = "x".repeat(10_000);
            let offers: [(&str, u16); 8] = [
                ("nope", 0),
                ("../../etc/passwd", 0),
                ("echo\nFAKE LOG LINE", 0),
                (&long, 0),
                ("range", 4),
                ("range", 100),
                ("range", 65535),
                ("hold", 1),
            ];
            let mut id = 0;
            for _ in 0..1000 {
                let mut batch = Vec::new();
                for (name, offset) in offers {
                    id += 1;
                    batch.extend(wire(&offer(id, name, offset)));
                }
                if writer.write_all(&batch).await.is_err() {
                    return;
                }
                // Paced a little, so the ClientFailed answers are not dropped at a full outbox.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            heartbeats(writer).await;
        }
    });
    let w = World::start(DataMode::Hold, play, "pool = 0", "");
    assert!(
        wait_until(Duration::from_secs(60), || {
            let s = w.stats();
            s["refused"]["unknown_listener"] == 4000 && s["refused"]["bad_port"] == 4000
        }),
        "{}",
        w.stats()
    );
    w.honest_serves("after 8,000 bad offers");
    w.agent_alive();
    let failed = failed.lock().clone();
    assert!(failed.len() > 1000, "{} ClientFailed answers", failed.len());
    assert!(failed
        .iter()
        .any(|r| r == "offer for listener \"nope\", which this agent does not have"));
    assert!(failed.iter().any(|r| r.contains("port offset 65535")));
    // Nothing was dialed for them: no data connection, no backend connection.
    assert_eq!(w.hostile.seen.data.load(Ordering::SeqCst), 0);
    assert_eq!(w.hold.accepted(), 0);
    assert_eq!(w.range.iter().map(HoldServer::accepted).sum::<usize>(), 0);
    let lines = w.hostile_lines("offer refused");
    assert!(
        (2..=4).contains(&lines.len()),
        "one line per reason per 10 s: {lines:#?}"
    );
    // Names from the gateway are quoted and cut: no forged log line, no 10 kB line.
    assert!(w.agent.count_log("FAKE LOG LINE") <= 1);
    assert!(!w
        .agent
        .log_lines()
        .iter()
        .any(|l| l.starts_with("FAKE LOG LINE")));
    assert!(w.agent.log_lines().iter().all(|l| l.len() < 4000));
    assert!(w.hostile_lines("control channel lost").is_empty());
    w.only_configured_targets();
}

/// What one broken control connection does, and the line the agent must log for it.
const BREAKAGES: &[(&str, &str)] = &[
    ("oversized frame", "exceeds the maximum"),
    ("truncated frame", "in the middle of a frame"),
    (
        "malformed payload",
        "malformed payload for message type 0x0020",
    ),
    (
        "unknown critical type",
        "unknown critical message type 0x0077",
    ),
    (
        "wrong sequence: hello-ack",
        "unexpected hello-ack from the gateway",
    ),
    (
        "wrong sequence: session-secret",
        "unexpected session-secret from the gateway",
    ),
    (
        "a config the agent never sent",
        "unexpected push-config from the gateway",
    ),
    (
        "a config result never pushed",
        "answered a config push it was never sent",
    ),
];

/// Each control connection breaks the protocol a different way (oversized, truncated and
/// malformed frames, an unknown critical type, known messages out of sequence, a config push
/// and a config result the agent never sent): the agent drops the gateway each time with one
/// clear line, and after the last breakage a flood of unasked ban-list refusals (logged a few
/// times) and an advisory frame of an unknown type are skipped and the session stays.
#[test]
fn a_broken_protocol_drops_the_hostile_gateway_with_one_line_per_kind() {
    let closed = Arc::new(Mutex::new(Vec::<(usize, bool, Vec<String>)>::new()));
    let closed2 = closed.clone();
    let play = script(move |mut ctl: Ctl| {
        let closed = closed2.clone();
        async move {
            let n = ctl.n;
            let breakage: Vec<u8> = match n {
                0 => 0xFFFF_FFF0u32.to_be_bytes().to_vec(),
                1 => {
                    let mut v = 100u32.to_be_bytes().to_vec();
                    v.extend_from_slice(&[0, 0x20, 1, 2, 3, 4]);
                    v
                }
                2 => raw_frame(0x0020, &[0xff; 3]),
                3 => raw_frame(0x0077, b""),
                4 => wire(&Message::HelloAck(HelloAck {
                    version: 2,
                    software: "hostile/0".into(),
                    heartbeat_ms: 1000,
                    data_tls: true,
                })),
                5 => wire(&Message::SessionSecret(SessionSecret {
                    secret: Token::from_bytes([1; 16]),
                })),
                6 => wire(&Message::PushConfig(protocol::PushConfig {
                    generation: 1,
                    digest: "00".repeat(32),
                    listeners: vec![],
                })),
                7 => wire(&Message::ConfigResult(ConfigResult {
                    generation: 77,
                    listeners: vec![],
                })),
                _ => {
                    // 200 ban-list refusals the agent never asked for: recorded, logged at most
                    // 5 times per 10 s, and no reason to drop the gateway.
                    let refusal = wire(&Message::BanResult(protocol::BanResult {
                        generation: 9,
                        applied: 0,
                        error: Some("refused by a hostile gateway".into()),
                    }));
                    for _ in 0..200 {
                        let _ = ctl.send_raw(&refusal).await;
                    }
                    // An advisory type nobody knows: skipped.
                    let _ = ctl.send_raw(&raw_frame(0x8001, b"a hint")).await;
                    return idle(ctl).await;
                }
            };
            let _ = ctl.send_raw(&breakage).await;
            if n == 1 {
                // The frame ends early: the connection closes properly (close_notify).
                let _ = ctl.writer.shutdown().await;
            }
            let mut said = Vec::new();
            let gone = ctl.until_closed(Duration::from_secs(10), &mut said).await;
            let errors = said
                .iter()
                .filter_map(|m| match m {
                    Message::Error(e) => Some(e.to_string()),
                    _ => None,
                })
                .collect();
            closed.lock().push((n, gone, errors));
        }
    });
    let w = World::start(DataMode::Hold, play, "pool = 0", "");
    assert!(
        wait_until(Duration::from_secs(90), || w
            .hostile
            .seen
            .control
            .load(Ordering::SeqCst)
            > BREAKAGES.len()),
        "the agent stopped reconnecting: {} control connections",
        w.hostile.seen.control.load(Ordering::SeqCst)
    );
    w.honest_serves("after every breakage");
    w.agent_alive();
    let closed = closed.lock().clone();
    for (n, (kind, text)) in BREAKAGES.iter().enumerate() {
        let (_, gone, errors) = closed
            .iter()
            .find(|c| c.0 == n)
            .unwrap_or_else(|| panic!("no result for {kind}"));
        assert!(gone, "the agent kept the connection after: {kind}");
        let lines = w.hostile_lines(text);
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("control channel lost"))
                .count(),
            1,
            "{kind}: want one line with {text:?}, got {lines:#?}"
        );
        // What the gateway sent wrong is named to it before the close (not for an early end).
        if n != 1 {
            assert_eq!(errors.len(), 1, "{kind}: the agent's last words {errors:?}");
        }
    }
    // The advisory frames kept the last session, and the refusal flood is logged a few times.
    std::thread::sleep(Duration::from_secs(2));
    let refused = w.hostile_lines("the gateway refused the ban list").len();
    assert!(
        (1..=10).contains(&refused),
        "{refused} lines for 200 ban-list refusals"
    );
    assert_eq!(
        w.hostile_lines("control channel lost").len(),
        BREAKAGES.len(),
        "{:#?}",
        w.hostile_lines("control channel lost")
    );
    w.only_configured_targets();
}

/// A gateway that stops in the middle of a frame is declared dead after three heartbeat
/// intervals of silence (the partial frame does not count as life), and dropped.
#[test]
fn a_gateway_stalling_mid_frame_is_dropped_after_three_heartbeats() {
    let play = script(move |mut ctl: Ctl| async move {
        if ctl.n > 0 {
            return idle(ctl).await;
        }
        let mut partial = 50u32.to_be_bytes().to_vec();
        partial.extend_from_slice(&[0, 0x20, 1]);
        let _ = ctl.send_raw(&partial).await;
        let mut said = Vec::new();
        ctl.until_closed(Duration::from_secs(60), &mut said).await;
    });
    let w = World::start(DataMode::Hold, play, "pool = 0\nheartbeat = \"200ms\"", "");
    let line = w
        .agent
        .wait_for_log("heartbeats missed", Duration::from_secs(10));
    assert!(line.contains(&w.hostile.addr.to_string()), "{line}");
    assert!(
        wait_until(Duration::from_secs(10), || w
            .hostile
            .seen
            .control
            .load(Ordering::SeqCst)
            >= 2),
        "the agent did not reconnect"
    );
    w.honest_serves("after the stall");
    w.agent_alive();
    assert_eq!(w.hostile_lines("heartbeats missed").len(), 1);
    w.only_configured_targets();
}

/// Every data hello answered with 64 bytes of garbage: each client fails (ClientFailed, a
/// counted data failure), the backend connection made alongside is closed, the warnings are
/// rate-limited, and the control session stays.
#[test]
fn garbage_answers_to_data_hellos_fail_each_client_quietly() {
    const OFFERS: u64 = 200;
    let failed = Arc::new(AtomicUsize::new(0));
    let failed2 = failed.clone();
    let play = script(move |ctl: Ctl| {
        let failed = failed2.clone();
        async move {
            let Ctl {
                mut reader,
                mut writer,
                ..
            } = ctl;
            tokio::spawn(async move {
                while let Some(Ok(frame)) = reader.next().await {
                    if let Ok(Some(Message::ClientFailed(_))) = Message::from_frame(&frame) {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            for id in 1..=OFFERS {
                if writer
                    .write_all(&wire(&offer(id, "hold", 0)))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            heartbeats(writer).await;
        }
    });
    let w = World::start(DataMode::Garbage, play, "pool = 0", "");
    // Per listener: a client of the honest gateway may count a data failure of its own (the
    // harness's port probe leaves before its data connection arrives).
    let hold_failures = |s: serde_json::Value| {
        s["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == "hold").cloned())
            .and_then(|l| l["data_failures"].as_u64())
    };
    assert!(
        wait_until(Duration::from_secs(60), || hold_failures(w.stats())
            == Some(OFFERS)),
        "{}",
        w.stats()
    );
    assert!(wait_until(
        Duration::from_secs(10),
        || failed.load(Ordering::SeqCst) as u64 == OFFERS
    ));
    // The backend connections opened alongside were all closed again.
    assert!(wait_until(Duration::from_secs(10), || w
        .hold
        .open
        .load(Ordering::SeqCst)
        == 0));
    w.honest_serves("after garbage data answers");
    w.agent_alive();
    let warnings = w
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| l.contains(" WARN ") && l.contains("data connection failed"))
        .count();
    assert!(warnings <= 21, "{warnings} warnings for {OFFERS} failures");
    assert!(w.hostile_lines("control channel lost").is_empty());
    w.only_configured_targets();
}

/// PROXY-header lies: an IPv6 client address beside an IPv4 gateway address, port 0, an
/// IPv4-mapped address. The agent writes a well-formed header (one family; a mapped address as
/// IPv4) with whatever the gateway claimed: spoofing the client address is what an owned
/// gateway can do (docs/security.md); corrupting the header or the agent is not.
#[test]
fn proxy_header_lies_give_well_formed_headers() {
    let play = script(move |mut ctl: Ctl| async move {
        let lies: [(&str, &str); 3] = [
            ("[::1]:0", "127.0.0.1:443"),
            ("[::ffff:198.51.100.7]:1234", "192.0.2.1:0"),
            ("0.0.0.0:0", "[::]:0"),
        ];
        for (i, (client, gateway)) in lies.iter().enumerate() {
            let msg = Message::ClientArrived(ClientArrived {
                id: i as u64 + 1,
                token: Token::from_bytes([9; 16]),
                listener: "hold".into(),
                port_offset: 0,
                client_addr: client.parse().unwrap(),
                gateway_addr: gateway.parse().unwrap(),
            });
            let _ = ctl.send(&msg).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        idle(ctl).await
    });
    let w = World::start(DataMode::Hold, play, "pool = 0", "");
    assert!(
        wait_until(Duration::from_secs(20), || {
            let f = w.hold.firsts.lock();
            f.len() == 3 && f.iter().all(|h| h.ends_with(b"\r\n"))
        }),
        "{:?}",
        w.hold.firsts.lock()
    );
    let headers: Vec<String> = w
        .hold
        .firsts
        .lock()
        .iter()
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .collect();
    assert_eq!(headers[0], "PROXY TCP6 ::1 ::ffff:127.0.0.1 0 443\r\n");
    assert_eq!(headers[1], "PROXY TCP4 198.51.100.7 192.0.2.1 1234 0\r\n");
    assert_eq!(headers[2], "PROXY TCP6 ::ffff:0.0.0.0 :: 0 0\r\n");
    w.honest_serves("after PROXY-header lies");
    w.agent_alive();
    assert!(w.hostile_lines("control channel lost").is_empty());
    w.only_configured_targets();
}

/// The backend limits, each reached in turn: offers for "hold" until its listener limit (20)
/// bites, then for the "range" ports until the gateway's backend total (30) bites; the data
/// connection limit (100) and the rate stay out of the way. Counted at the backends.
#[test]
fn backend_connections_stay_within_the_per_listener_and_total_limits() {
    let sent = Arc::new(AtomicUsize::new(0));
    let sent2 = sent.clone();
    let play = script(move |ctl: Ctl| {
        let sent = sent2.clone();
        async move {
            let Ctl {
                mut reader,
                mut writer,
                ..
            } = ctl;
            tokio::spawn(async move { while let Some(Ok(_)) = reader.next().await {} });
            let mut id = 0;
            for (listener, count) in [("hold", 100u16), ("range", 100)] {
                for i in 0..count {
                    id += 1;
                    if writer
                        .write_all(&wire(&offer(
                            id,
                            listener,
                            if listener == "hold" { 0 } else { i % 4 },
                        )))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
            sent.store(1, Ordering::SeqCst);
            heartbeats(writer).await;
        }
    });
    let limits = "[limits]
max_data_connections = 100
max_backend_connections = 30
max_backend_connections_per_listener = 20
offers_per_second = 100000
offer_burst = 100000
";
    let w = World::start(DataMode::Hold, play, "pool = 0", limits);
    assert!(wait_until(Duration::from_secs(60), || sent
        .load(Ordering::SeqCst)
        == 1));
    let refused = |key: &str| w.stats()["refused"][key].as_u64().unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(30), || {
            refused("listener_backend_connections") + refused("backend_connections") >= 150
        }),
        "{}",
        w.stats()
    );
    std::thread::sleep(Duration::from_secs(1));
    let range: usize = w.range.iter().map(|r| r.open.load(Ordering::SeqCst)).sum();
    let range_max: usize = w.range.iter().map(HoldServer::accepted).sum();
    let hold_max = w.hold.open_max.load(Ordering::SeqCst);
    assert_eq!(hold_max, 20, "one listener's backend at once");
    assert_eq!(w.hold.accepted(), 20, "nothing closed, so nothing replaced");
    assert_eq!((range, range_max), (10, 10), "the rest of the total of 30");
    assert_eq!(refused("listener_backend_connections"), 80);
    assert_eq!(refused("backend_connections"), 90);
    assert_eq!(refused("rate") + refused("data_connections"), 0);
    assert_eq!(w.hostile_lines("offer refused").len(), 2);
    w.honest_serves("with the hostile gateway's backend share used up");
    w.agent_alive();
    w.only_configured_targets();
}
