//! The adversarial review's attacks (issue 12), each reproduced with the real binary on loopback:
//! what a stranger, an owned peer or a page in the operator's browser tried, and what must hold.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use sallyport::protocol::{
    self, ClientFailed, ControlHello, ErrorCode, FrameCodec, ListenerSpec, Message, OutboundHello,
    PushConfig, RawFrame, Role,
};
use support::wire::{exchange, Reply};
use support::*;
use tokio_util::codec::{Decoder, Encoder};

/// A control channel spoken by hand (no agent process): hello, pushes, reads.
struct RawControl {
    stream: TcpStream,
    codec: FrameCodec,
    buf: bytes::BytesMut,
}

impl RawControl {
    /// Opens a control channel; `Err` carries the gateway's refusal.
    fn open(gateway: SocketAddr, site: &str, agent: &str) -> Result<RawControl, Box<Reply>> {
        let mut stream = TcpStream::connect(gateway).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let hello = protocol::hello(Role::Control(ControlHello {
            site: site.into(),
            agent: agent.into(),
            heartbeat_ms: 5000,
        }));
        stream.write_all(&protocol::with_preamble(&hello)).unwrap();
        let mut head = [0u8; 4];
        stream.read_exact(&mut head).unwrap();
        if head == protocol::MAGIC {
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            let mut all = head.to_vec();
            all.extend_from_slice(&rest);
            return Err(Box::new(support::wire::parse_reply(&all)));
        }
        let mut raw = RawControl {
            stream,
            codec: FrameCodec::new(1 << 20),
            buf: bytes::BytesMut::from(&head[..]),
        };
        match raw.read() {
            Message::HelloAck(_) => Ok(raw),
            other => Err(Box::new(Reply::Frame(other))),
        }
    }

    fn send(&mut self, msg: &Message) {
        let mut out = bytes::BytesMut::new();
        self.codec.encode(msg.to_frame(), &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// The next message other than a heartbeat.
    fn read(&mut self) -> Message {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                let frame: RawFrame = frame;
                match Message::from_frame(&frame).unwrap() {
                    Some(Message::Heartbeat(_) | Message::SessionSecret(_)) | None => continue,
                    Some(m) => return m,
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("the gateway answers");
            assert!(n > 0, "the gateway closed the control channel");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn spec(name: &str, port: u16) -> ListenerSpec {
    ListenerSpec {
        name: name.into(),
        public: format!("127.0.0.1:{port}").parse().unwrap(),
        clients: Default::default(),
    }
}

/// No log line was forged (a line of its own starting with the attacker's text) and none
/// carries a raw control character.
fn assert_no_injection(proc: &Proc, marker: &str) {
    for line in proc.log_lines() {
        assert!(
            !line.trim_start().starts_with(marker),
            "{}: forged log line {line:?}",
            proc.name
        );
        assert!(
            !line.chars().any(|c| c.is_control()),
            "{}: raw control character in {line:?}",
            proc.name
        );
    }
}

/// Issue 12 item 8: the agent name in a control hello is validated at the protocol edge. Before
/// the fix a name with an ESC sequence and a newline was accepted, stored, shown raw by
/// `sallyport status`, and the newline forged a gateway log line.
#[test]
fn an_agent_name_with_control_characters_is_refused_and_never_logged_raw() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "[limits]\nhello_timeout = \"1s\"\n");
    let evil = "evil\x1b]0;pwned\x07\nFORGED agent line";
    match RawControl::open(gw.control, "test-site", evil).map_err(|e| *e) {
        Err(Reply::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::BAD_HELLO, "{e}");
            assert!(e.message.contains("invalid agent name"), "{e}");
            assert!(!e.message.chars().any(|c| c.is_control()), "{e:?}");
        }
        Err(other) => panic!("expected a BAD_HELLO refusal, got {other:?}"),
        Ok(_) => panic!("a control hello with an ESC sequence in the agent name was accepted"),
    }
    gw.proc
        .wait_for_log("invalid agent name", Duration::from_secs(5));
    // Past the hello timeout: a session that had been let in would have logged its end.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(gw.api("/api/status")["agents"], serde_json::json!([]));
    assert_no_injection(&gw.proc, "FORGED");
}

/// Issue 12 item 8: a pushed listener whose name has control characters is refused in the
/// ConfigResult and never stored, so `sallyport status` (and the dashboard) never show it; a
/// ClientFailed reason with a newline cannot forge a log line. Before the fix the name was kept
/// as a failed listener and `status` printed its ESC sequences raw.
#[test]
fn a_listener_name_with_escape_sequences_never_reaches_status_or_the_log() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let mut control = RawControl::open(gw.control, "test-site", "raw-agent").unwrap();
    let (good, bad) = (free_port(), free_port());
    let evil = "x\x1b[2J\x1b]0;owned\x07\nFORGED listener";
    control.send(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "d".into(),
        listeners: vec![spec(evil, bad), spec("good", good)],
    }));
    let Message::ConfigResult(result) = control.read() else {
        panic!("expected a config result");
    };
    match &result.listeners[0].status {
        protocol::ListenerStatus::Failed { error } => {
            assert!(error.contains("invalid listener name"), "{error}");
            assert!(!error.chars().any(|c| c.is_control()), "{error:?}");
        }
        other => panic!("the evil listener was not refused: {other:?}"),
    }
    assert!(refuses(local(bad)));
    control.send(&Message::ClientFailed(ClientFailed {
        id: 424242,
        reason: "gone\nFORGED reason line\x1b[31m".into(),
    }));
    gw.proc
        .wait_for_log("agent could not serve client", Duration::from_secs(5));

    let out = Command::new(BIN)
        .args(["status", "--admin", &gw.admin_url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("good"), "{text}");
    assert!(
        !out.stdout.contains(&0x1b),
        "status printed a raw ESC sequence: {text:?}"
    );
    assert!(
        !text.contains("owned"),
        "the refused listener is shown: {text}"
    );
    let listeners = gw.api("/api/status")["listeners"].clone();
    assert_eq!(listeners.as_array().unwrap().len(), 1, "{listeners}");
    assert_no_injection(&gw.proc, "FORGED");
}

/// Issue 12 item 8, from the other side: `sallyport check` prints what a gateway answers (its
/// refusals, listener results), and a hostile or spoofed gateway chooses those words. A
/// "gateway" that refuses every connection with ESC sequences and a newline in its message
/// reaches neither the operator's terminal raw nor a line of its own in check's output.
#[test]
fn sallyport_check_escapes_what_a_hostile_gateway_says() {
    let dir = Workdir::new();
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = fake.local_addr().unwrap();
    let refusal = protocol::with_preamble(&Message::error(
        ErrorCode::PEER_DENIED,
        "denied\x1b[2J\x1b]0;owned\x07\nFORGED check line\u{202e}",
    ));
    std::thread::spawn(move || {
        for conn in fake.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(&refusal);
        }
    });
    let config = agent_config(&[addr], &[listener("echo", free_port(), addr)], "");
    let path = dir.write("agent.toml", &config);
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    // The refusal was shown (escaped), so the check did read the hostile words.
    assert!(stdout.contains("\\u{1b}[2J"), "{stdout}");
    assert!(
        !out.stdout.contains(&0x1b),
        "raw ESC in check's output: {stdout:?}"
    );
    assert!(
        !stdout.contains('\u{202e}'),
        "raw bidi override: {stdout:?}"
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with("FORGED")),
        "a forged line: {stdout}"
    );
}

/// An agent with an outbound proxy and a gateway that allows one destination.
fn outbound_setup(dir: &Workdir) -> (Gateway, Proc, SocketAddr) {
    let gw = start_gateway(dir, "[egress]\nallow = [\"127.0.0.1:9\"]\n");
    let proxy = local(free_port());
    let agent = start_agent(
        dir,
        "agent",
        &[gw.control],
        &[],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    agent.wait_for_log("outbound proxy (SOCKS5", Duration::from_secs(10));
    gw.proc
        .wait_for_log("config generation 1 applied", Duration::from_secs(10));
    (gw, agent, proxy)
}

/// A SOCKS5 CONNECT (no authentication) to a domain name given as raw bytes; the reply code.
fn socks5_connect(proxy: SocketAddr, host: &[u8], port: u16) -> u8 {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).unwrap();
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host);
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    reply[1]
}

/// Issue 12 item 8: the outbound destination host (SOCKS5 ATYP 3, HTTP CONNECT, or an outbound
/// hello sent straight to the gateway) is validated at the edge; newlines, NUL bytes and bidi
/// overrides never reach either log raw. Before the fix the agent and the gateway both logged
/// `outbound connection to evil\nFORGED...` with the newline and the NUL.
#[test]
fn an_outbound_destination_with_control_characters_is_refused_at_the_edge() {
    let dir = Workdir::new();
    let (gw, agent, proxy) = outbound_setup(&dir);
    // 0x08: address type not supported (the name is not a host name).
    assert_eq!(
        socks5_connect(proxy, b"evil\nFORGED socks line\x00x", 80),
        0x08
    );
    assert_eq!(
        socks5_connect(proxy, "a\u{202e}b.example".as_bytes(), 443),
        0x08
    );

    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let target = "a\u{85}FORGED\u{202e}.example:443";
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // Straight to the gateway: an outbound hello from a peer, with no agent in between.
    let hello = protocol::hello(Role::Outbound(OutboundHello {
        site: "test-site".into(),
        host: "evil\nFORGED gateway line\x1b[2J".into(),
        port: 9,
        client_addr: "127.0.0.1:1".parse().unwrap(),
    }));
    match exchange(
        gw.control,
        None,
        &protocol::with_preamble(&hello),
        false,
        Duration::from_secs(5),
    ) {
        Reply::Frame(Message::Error(e)) | Reply::Refused(e) => {
            assert!(e.message.contains("invalid destination host"), "{e}");
            assert!(!e.message.chars().any(|c| c.is_control()), "{e:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    gw.proc
        .wait_for_log("invalid destination host", Duration::from_secs(5));
    agent.wait_for_log("invalid host name", Duration::from_secs(5));
    assert_no_injection(&agent, "FORGED");
    assert_no_injection(&gw.proc, "FORGED");
}

/// `curl -s -i` with extra arguments; the status code and the raw head and body.
fn curl_i(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// Issue 12 item 7: DNS rebinding and clickjacking on the admin API. A page on a rebinding
/// domain sends its own name as Host (refused, 421) and its own origin on POST (refused, 403);
/// every answer forbids framing and sniffing. Before the fix any Host was served, a cross-origin
/// POST with the token paused the gateway, and no answer carried those headers.
#[test]
fn the_admin_api_refuses_rebinding_hosts_cross_origin_posts_and_framing() {
    let dir = Workdir::new();
    let token = "a-long-admin-token-for-tests";
    let gw = start_gateway(
        &dir,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"),
    );
    let base = gw.admin_url();
    let port = gw.admin.unwrap().port();
    let auth = format!("Authorization: Bearer {token}");

    // The rebinding page: Host is its own name.
    let evil_host = format!("Host: rebind.attacker.example:{port}");
    for path in [
        "/api/status",
        "/api/stats",
        "/api/connections",
        "/metrics",
        "/",
        "/dashboard.js",
    ] {
        let (code, text) = curl_i(&["-H", &evil_host, &format!("{base}{path}")]);
        assert_eq!(code, 421, "GET {path} with a foreign Host: {text}");
    }
    let (code, text) = curl_i(&[
        "-X",
        "POST",
        "-H",
        &evil_host,
        "-H",
        "X-Requested-By: x",
        "-H",
        &auth,
        &format!("{base}/api/pause"),
    ]);
    assert_eq!(code, 421, "{text}");
    // Same Host as the server, but the request comes from another origin.
    let (code, text) = curl_i(&[
        "-X",
        "POST",
        "-H",
        "X-Requested-By: x",
        "-H",
        &auth,
        "-H",
        &format!("Origin: http://rebind.attacker.example:{port}"),
        &format!("{base}/api/pause"),
    ]);
    assert_eq!(code, 403, "{text}");
    assert_eq!(gw.api("/api/status")["state"], "running");

    // What operators use keeps working: the listen address, localhost through a tunnel on
    // another local port, the dashboard's own origin.
    let (code, text) = curl_i(&[&format!("{base}/api/status")]);
    assert_eq!(code, 200, "{text}");
    let (code, _) = curl_i(&["-H", "Host: localhost:19999", &format!("{base}/api/status")]);
    assert_eq!(code, 200);
    let (code, text) = curl_i(&[
        "-X",
        "POST",
        "-H",
        "X-Requested-By: dashboard",
        "-H",
        &auth,
        "-H",
        &format!("Origin: {base}"),
        &format!("{base}/api/pause"),
    ]);
    assert_eq!(code, 200, "{text}");
    assert_eq!(gw.api("/api/status")["state"], "paused");

    // Every answer, the refusals included, forbids framing and sniffing.
    for args in [
        vec![format!("{base}/")],
        vec!["-H".into(), evil_host.clone(), format!("{base}/api/status")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, text) = curl_i(&args);
        let head = text.to_ascii_lowercase();
        assert!(head.contains("x-frame-options: deny"), "{text}");
        assert!(head.contains("frame-ancestors 'none'"), "{text}");
        assert!(head.contains("x-content-type-options: nosniff"), "{text}");
    }
    gw.proc
        .wait_for_log("DNS rebinding?", Duration::from_secs(2));
}

/// Issue 12 item 7: a gateway whose admin API has no token says so at start.
#[test]
fn an_admin_api_without_a_token_is_warned_about() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let line = gw
        .proc
        .wait_for_log("[admin] has no token", Duration::from_secs(5));
    assert!(line.contains("WARN"), "{line}");
}

/// Silent connections to the admin port (slowloris): each is closed once idle for 15 s
/// (src/admin/conn.rs), so they cannot pile up and take the process's descriptors; under the
/// cap of 256 the API keeps answering meanwhile. Before, hyper waited for a request forever.
#[test]
fn silent_admin_connections_are_closed_when_idle_and_the_api_keeps_answering() {
    use std::time::Instant;
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "[admin]\nlisten = \"127.0.0.1:0\"\n");
    let admin = gw.admin.unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.proc.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    // A half-sent request is as silent as no request at all.
    silent[0]
        .write_all(b"GET /api/status HTTP/1.1\r\nHost: 127.")
        .unwrap();
    let (code, text) = curl_i(&[&format!("{}/api/health", gw.admin_url())]);
    assert!(
        code == 200 || code == 503,
        "the API answers beside 100 silent connections: {text}"
    );
    assert!(
        fds() >= before + 100,
        "the gateway holds the silent connections"
    );
    for (i, s) in silent.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(n) => panic!("silent connection {i} got {n} bytes of answer instead of a close"),
            Err(e) => panic!("silent connection {i} still open after 30 s: {e}"),
        }
    }
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_secs(14) && after < Duration::from_secs(40),
        "closed after {after:?}, not about 15 s"
    );
    drop(silent);
    assert!(
        wait_until(Duration::from_secs(5), || fds() <= before + 2),
        "descriptors back: {} vs {before}",
        fds()
    );
}

// ---- Items 1 and 2: pool and outbound connections bound to a live control session ----------

/// A TLS gateway with `data_tls = false`, an echo listener served by an agent with a warm pool,
/// and the cert dir (its CA also issued a certificate "other" that no session uses).
struct PlainData {
    dir: Workdir,
    certs: std::path::PathBuf,
    gw: Gateway,
    agent: Proc,
    public: SocketAddr,
    echo: support::servers::EchoServer,
}

fn plain_data_gateway(egress: &str, pool: usize) -> PlainData {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    make_certs(&dir, "certs", &["--agent-name", "other"]);
    let echo = support::servers::EchoServer::start();
    let gw = start_gateway_with(
        &dir,
        "gateway",
        &format!(
            "listen = \"127.0.0.1:0\"\n{}\ndata_tls = false",
            gateway_tls(&certs)
        ),
        egress,
    );
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        &format!("{}\npool = {pool}", agent_tls(&certs, &certs, "agent")),
        "",
    );
    wait_open(public, Duration::from_secs(10));
    PlainData {
        dir,
        certs,
        gw,
        agent,
        public,
        echo,
    }
}

fn pooled(gw: &Gateway) -> u64 {
    gw.api("/api/stats")["pooled"].as_u64().unwrap_or(0)
}

/// Sends `hello` on `stream` and returns the gateway's first answer (refusal or frame), or
/// `None` when it is still silent after `wait` (a parked pool connection says nothing).
fn first_answer<S: Read + Write>(stream: &mut S, hello: &Message, wait: Duration) -> Option<Reply> {
    stream.write_all(&protocol::with_preamble(hello)).unwrap();
    let deadline = std::time::Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                // A whole frame (after an optional refusal preamble) is enough.
                let frame = got.strip_prefix(&protocol::MAGIC[..]).unwrap_or(&got);
                if frame.len() >= 4
                    && frame.len()
                        >= 4 + u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize
                {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if std::time::Instant::now() >= deadline {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    (!got.is_empty()).then(|| support::wire::parse_reply(&got))
}

fn pool_hello(secret: Option<protocol::Token>) -> Message {
    let hello = protocol::PoolHello {
        site: "test-site".into(),
        agent: "test-agent".into(),
    };
    protocol::hello(match secret {
        Some(s) => Role::SessionPool(hello, s),
        None => Role::Pool(hello),
    })
}

/// The issue's attack (item 1): from the agent's own address, with no certificate, plaintext
/// pool hellos (v1, and v2 with a guessed session secret) are refused and get no clients; a TLS
/// pool hello with another certificate of the same CA gets none either. Before the fix the 20
/// plaintext hellos were parked and the next clients were handed to them (the reviewer saw 4
/// of 6 internet clients hijacked with their requests and cookies).
#[test]
fn pool_hellos_without_the_sessions_proof_get_no_clients() {
    let s = plain_data_gateway("", 2);
    assert!(wait_until(Duration::from_secs(10), || pooled(&s.gw) == 2));
    let mut attackers = Vec::new();
    let mut refusals = Vec::new();
    for i in 0..20 {
        let mut c = TcpStream::connect(s.gw.control).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let secret = (i % 2 == 1).then(protocol::Token::random);
        match first_answer(&mut c, &pool_hello(secret), Duration::from_millis(500)) {
            Some(Reply::Refused(e)) | Some(Reply::Frame(Message::Error(e))) => refusals.push(e),
            other => panic!("plaintext pool hello {i} was not refused: {other:?}"),
        }
        attackers.push(c);
    }
    let v1 = &refusals[0];
    assert_eq!(v1.code, ErrorCode::TLS_REQUIRED, "{v1}");
    assert!(v1.message.contains("upgrade the agent"), "{v1}");
    let guessed = &refusals[1];
    assert_eq!(guessed.code, ErrorCode::BAD_HELLO, "{guessed}");
    assert!(guessed.message.contains("session secret"), "{guessed}");

    // TLS with a certificate of the same CA that is not the session's.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let certs = s.certs.clone();
    let control = s.gw.control;
    let foreign = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = sallyport::transport::ClientTls::load(
            &certs.join("ca.crt"),
            &certs.join("other.crt"),
            &certs.join("other.key"),
            None,
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(control).await.unwrap();
        let mut stream = tls
            .connect(tls.name_for(&control.to_string()).unwrap(), tcp)
            .await
            .unwrap();
        stream
            .write_all(&protocol::with_preamble(&pool_hello(None)))
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got)).await;
        support::wire::parse_reply(&got)
    });
    // A refusal before the HelloAck: `SPRT` + Error (docs/protocol.md section 1).
    match foreign {
        Reply::Refused(e) => {
            assert_eq!(e.code, ErrorCode::BAD_HELLO, "{e}");
            assert!(e.message.contains("certificate"), "{e}");
        }
        other => panic!("a foreign certificate's pool hello was not refused: {other:?}"),
    }

    // Internet clients all reach the real agent; the attackers' connections stay silent.
    let before = s.echo.accepted();
    for i in 0..6 {
        echo_round_trip(s.public, &format!("client {i} with its cookie"));
    }
    assert_eq!(s.echo.accepted() - before, 6);
    for c in &mut attackers {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = c.read(&mut buf) {
            assert_eq!(n, 0, "an attacker's connection received {:?}", &buf[..n]);
        }
    }
    // The real agent's pool works in plaintext: it proves itself with the session secret.
    assert!(s.gw.proc.count_log("(warm pool)") >= 1);
    let refused = s.gw.api("/api/stats")["refusals"]["session_proof"].as_u64();
    assert!(refused >= Some(11), "{refused:?}");
    drop(s.agent);
}

/// Item 2, the egress attack: a host in `[peers]` that is no agent sends a plaintext outbound
/// hello (v1, or v2 with a guessed secret) while an agent of the site is connected. Before the
/// fix the gateway dialed the allowed destination and piped it; now nothing is dialed. The real
/// agent's outbound proxy still works in plaintext data mode.
#[test]
fn outbound_hellos_without_the_sessions_proof_dial_nothing() {
    let target = support::servers::EchoServer::start();
    let s = plain_data_gateway(&format!("[egress]\nallow = [\"{}\"]\n", target.addr), 0);
    for secret in [None, Some(protocol::Token::random())] {
        let hello = OutboundHello {
            site: "test-site".into(),
            host: "127.0.0.1".into(),
            port: target.addr.port(),
            client_addr: "127.0.0.1:1".parse().unwrap(),
        };
        let role = match secret {
            Some(sec) => Role::SessionOutbound(hello, sec),
            None => Role::Outbound(hello),
        };
        let reply = exchange(
            s.gw.control,
            None,
            &protocol::with_preamble(&protocol::hello(role)),
            false,
            Duration::from_secs(5),
        );
        match reply {
            Reply::Refused(e) | Reply::Frame(Message::Error(e)) => {
                assert!(
                    e.code == ErrorCode::TLS_REQUIRED || e.code == ErrorCode::EGRESS_DENIED,
                    "{e}"
                );
            }
            other => panic!("an unproven outbound hello was served: {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(target.accepted(), 0, "the gateway dialed for a stranger");

    // The agent's own proxy (SOCKS5 through the real agent) reaches the destination.
    let proxy = local(free_port());
    let config = agent_config(
        &[s.gw.control],
        &[],
        &format!(
            "name = \"proxy-agent\"\n{}",
            agent_tls(&s.certs, &s.certs, "other")
        ),
    )
    // A site of its own: agents of one site must push identical configurations.
    .replace("site = \"test-site\"", "site = \"proxy-site\"")
        + &format!("\n[outbound]\nlisten = \"{proxy}\"\n");
    let path = s.dir.write("proxy-agent.toml", &config);
    let proxy_agent = Proc::spawn(
        "proxy-agent",
        &["agent", "--config", path.to_str().unwrap()],
    );
    proxy_agent.wait_for_log("control channel up", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || {
        let Ok(mut c) = TcpStream::connect(proxy) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
        req.extend_from_slice(&target.addr.port().to_be_bytes());
        let mut reply = [0u8; 12];
        c.write_all(&req).is_ok() && c.read_exact(&mut reply).is_ok() && reply[3] == 0
    }));
    // The echo server counts in its own accept thread: wait for it.
    assert!(wait_until(Duration::from_secs(2), || target.accepted() == 1));
    assert_eq!(target.accepted(), 1);
}

// ---- Item 5: agents bind only where the gateway's owner allows ---------------------------

/// Issue 12 item 5: `[clients] bind` is enforced and `[clients] ports` restricts ports. The
/// reviewer's pushes (`127.0.0.1:81` and `0.0.0.0:28090` on a gateway binding `127.0.0.10`) are
/// refused per listener with a clear error; a listener without an IP, or with an allowed one,
/// opens. Before the fix both opened.
#[test]
fn agents_cannot_bind_outside_the_gateways_clients_rules() {
    let dir = Workdir::new();
    let echo = support::servers::EchoServer::start();
    let (free, low, wildcard, extra, other) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let gw = start_gateway_with(
        &dir,
        "gateway",
        "listen = \"127.0.0.1:0\"",
        &format!(
            "[clients]\nbind = \"127.0.0.10\"\nallow_ips = [\"127.0.0.11\"]\nports = [\"{free}\", \"{extra}\", \"{other}\", \"{wildcard}\"]\n"
        ),
    );
    let l_other_ip = listener("other-ip", other, echo.addr); // 127.0.0.1:other
    let mut l_wild = listener("wildcard", wildcard, echo.addr);
    l_wild.public = format!("0.0.0.0:{wildcard}");
    let mut l_port = listener("port", low, echo.addr);
    l_port.public = low.to_string();
    let mut l_ok = listener("ok", free, echo.addr);
    l_ok.public = free.to_string();
    let mut l_allowed = listener("allowed-ip", extra, echo.addr);
    l_allowed.public = format!("127.0.0.11:{extra}");
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[l_other_ip, l_wild, l_port, l_ok, l_allowed],
        "",
        "",
    );
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let failed = |name: &str| {
        agent
            .log_lines()
            .into_iter()
            .find(|l| l.contains("listener FAILED") && l.ends_with(&format!("listener={name}")))
            .unwrap_or_else(|| panic!("no failure logged for {name}"))
    };
    assert!(
        failed("other-ip").contains("127.0.0.1 is not an address this gateway lets agents bind")
    );
    assert!(failed("wildcard").contains("0.0.0.0 is not an address"));
    assert!(failed("port").contains(&format!("port {low} is outside")));
    assert!(refuses(local(other)), "127.0.0.1:{other} must stay closed");
    assert!(refuses(SocketAddr::from(([0, 0, 0, 0], wildcard))));
    echo_round_trip(
        SocketAddr::from(([127, 0, 0, 10], free)),
        "bound where allowed",
    );
    echo_round_trip(
        SocketAddr::from(([127, 0, 0, 11], extra)),
        "an allowed extra IP",
    );
}

// ---- Item 6: the agent's outbound proxy bounds silent and numerous clients ----------------

/// Issue 12 item 6: a silent proxy client is closed within `[outbound] handshake_timeout` (the
/// first-byte wait included), and proxy clients are capped per address and in total; the
/// agent's inbound service keeps working throughout. Before the fix a silent client was held
/// forever and 20,000 of them exhausted the agent's descriptors.
#[test]
fn the_outbound_proxy_closes_silent_clients_and_caps_them() {
    let dir = Workdir::new();
    let echo = support::servers::EchoServer::start();
    let gw = start_gateway(&dir, "[egress]\nallow = [\"127.0.0.1:9\"]\n");
    let proxy = local(free_port());
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        &format!(
            "\n[outbound]\nlisten = \"{proxy}\"\nhandshake_timeout = \"1s\"\nmax_clients = 40\nmax_clients_per_ip = 20\n"
        ),
    );
    wait_open(public, Duration::from_secs(10));
    agent.wait_for_log("outbound proxy (SOCKS5", Duration::from_secs(10));

    // None: reset so soon that connect() itself reported it (a refused client, under load).
    let silent_from = |source: &str, n: usize| -> Vec<Option<TcpStream>> {
        (0..n)
            .map(|_| match connect_from(source.parse().unwrap(), proxy) {
                Ok(s) => Some(s),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
                Err(e) => panic!("connect to the proxy: {e}"),
            })
            .collect()
    };
    // Closed (end of stream or reset) within the timeout, or still open.
    let closed_within = |s: &mut Option<TcpStream>, wait: Duration| -> bool {
        let Some(s) = s else {
            return true;
        };
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 8];
        match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    let mut first = silent_from("127.0.0.21", 25);
    // Over the per-address cap: the last five are refused at once.
    for s in first.iter_mut().skip(20) {
        assert!(
            closed_within(s, Duration::from_millis(500)),
            "a 21st client from one address was kept"
        );
    }
    let mut second = silent_from("127.0.0.22", 20);
    // 40 in total now: a third address is refused too.
    let mut third = silent_from("127.0.0.23", 1);
    assert!(
        closed_within(&mut third[0], Duration::from_millis(500)),
        "a 41st client was kept"
    );
    // The inbound service is untouched.
    echo_round_trip(public, "inbound while the proxy is flooded");
    // The silent ones are closed at the handshake timeout.
    let started = std::time::Instant::now();
    for s in first.iter_mut().take(20).chain(second.iter_mut()) {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "a silent client was held past the timeout"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "silent clients were closed after {waited:?}"
    );
    agent.wait_for_log("proxy clients reached", Duration::from_secs(2));
    agent.wait_for_log("no complete request within 1s", Duration::from_secs(2));
    // Places are given back: a new client from the first address is served again (its SOCKS
    // greeting is answered).
    let mut again = connect_from("127.0.0.21".parse().unwrap(), proxy).unwrap();
    again
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    again.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    again.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0]);
}

// ---- Item 3: a handshake flood cannot lock the agent out ----------------------------------

/// Issue 12 item 3: five addresses open silent connections to the control port until the
/// strangers' share of `max_handshakes` is full; the real agent (whose address holds an
/// authenticated control session) still gets its data connections through, so every public
/// client is served. Before the fix the flood took every place and 6 of 8 clients failed (the
/// agent's data connections were refused with LIMIT).
#[test]
fn a_handshake_flood_does_not_starve_the_agents_data_connections() {
    let dir = Workdir::new();
    let echo = support::servers::EchoServer::start();
    let gw = start_gateway(
        &dir,
        "[limits]\nmax_handshakes = 100\nmax_handshakes_per_ip = 25\nhello_timeout = \"30s\"\nfirst_byte_timeout = \"30s\"\npending_timeout = \"5s\"\n",
    );
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "pool = 0",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    let mut flood = Vec::new();
    for host in 11..=15 {
        for _ in 0..25 {
            if let Ok(s) = connect_from(format!("127.0.0.{host}").parse().unwrap(), gw.control) {
                flood.push(s);
            }
        }
    }
    gw.proc
        .wait_for_log("unfinished handshakes reached", Duration::from_secs(5));
    // A stranger is refused now ...
    match exchange(
        gw.control,
        Some("127.0.0.16".parse().unwrap()),
        b"",
        false,
        Duration::from_secs(5),
    ) {
        Reply::Refused(e) => assert_eq!(e.code, ErrorCode::LIMIT, "{e}"),
        other => panic!("a stranger got in during the flood: {other:?}"),
    }
    // ... while every client of the real agent is served.
    let before = echo.accepted();
    for i in 0..8 {
        echo_round_trip(public, &format!("client {i} during the flood"));
    }
    assert_eq!(echo.accepted() - before, 8);
    drop(flood);
}

/// Issue 12 item 3: a connection that sends nothing is closed after `first_byte_timeout`
/// (default 2 s), not after the whole hello timeout. Before the fix it held its place for 10 s.
#[test]
fn a_silent_control_port_connection_is_closed_at_the_first_byte_timeout() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "[limits]\nfirst_byte_timeout = \"300ms\"\n");
    let mut s = TcpStream::connect(gw.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 8];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(1500),
        "a silent connection was held {waited:?}"
    );
    gw.proc
        .wait_for_log("no first byte within 300ms", Duration::from_secs(2));
}

/// Issue 12 item 3: a gateway.toml without `[peers]` does not start (exit 78, the reason on
/// stderr); `default = "allow"` written out starts, with a warning.
#[test]
fn a_gateway_without_peers_rules_refuses_to_start() {
    let dir = Workdir::new();
    let path = dir.write(
        "no-peers.toml",
        "[control]\nlisten = \"127.0.0.1:0\"\n[admin]\nenabled = false\n",
    );
    let out = Command::new(BIN)
        .args(["gateway", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no [peers] section"), "{stderr}");
    let gw = start_gateway(&dir, "");
    gw.proc
        .wait_for_log("[peers] default = \"allow\"", Duration::from_secs(5));
}

// ---- Item 4: descriptors and ports are budgets, not a free-for-all -------------------------

/// Starts a gateway limited to `nofile` open files (soft and hard, with prlimit).
fn gateway_with_nofile(dir: &Workdir, nofile: u32, extra: &str) -> Gateway {
    let config = format!(
        "[control]\nlisten = \"127.0.0.1:0\"\n\n[clients]\nbind = \"127.0.0.1\"\n\n[peers]\ndefault = \"allow\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}\n"
    );
    let path = dir.write("gateway.toml", &config);
    let proc = Proc::spawn_program(
        "gateway",
        "prlimit",
        &[
            &format!("--nofile={nofile}:{nofile}"),
            BIN,
            "gateway",
            "--config",
            path.to_str().unwrap(),
        ],
    );
    let line = proc.wait_for_log("control port listening on ", Duration::from_secs(10));
    let addr = |l: &str, prefix: &str| -> SocketAddr {
        let rest = l.rsplit(prefix).next().unwrap();
        rest[..rest.find(['/', ' ']).unwrap_or(rest.len())]
            .trim()
            .parse()
            .unwrap()
    };
    let control = addr(&line, "control port listening on ");
    let admin = proc
        .log_lines()
        .iter()
        .find(|l| l.contains("admin API and dashboard listening on http://"))
        .map(|l| addr(l, "listening on http://"));
    Gateway {
        proc,
        control,
        admin,
    }
}

/// Issue 12 item 4: a gateway allowed 1,100 open files. Site A pushes 500 ports: past its share
/// (a quarter of the descriptors in total, half of that per site: 137) each listener is refused
/// in its ConfigResult with the limit named, and site B still opens its port. Then clients pile
/// up until the descriptor reserve: new ones are refused, while the admin API answers and the
/// established clients keep echoing. Before the fix the gateway opened every port and, past the
/// limit, wedged: accept failed ten times a second, the admin API hung.
#[test]
fn ports_and_descriptors_are_capped_and_the_gateway_stays_manageable() {
    let dir = Workdir::new();
    let echo = support::servers::EchoServer::start();
    let gw = gateway_with_nofile(&dir, 1100, "");
    gw.proc.wait_for_log(
        "public ports: at most 275, 137 per site",
        Duration::from_secs(5),
    );
    // Below the ephemeral range, so no client port collides with them.
    let base = 10000 + (std::process::id() % 100) as u16 * 200;
    let listeners: Vec<ListenerDef> = (0..5u16)
        .map(|i| {
            let mut l = listener(&format!("range{i}"), 0, echo.addr);
            let first = base + i * 100;
            l.public = format!("127.0.0.1:{}-{}", first, first + 99);
            l.backend = format!("127.0.0.1:{}", echo.addr.port());
            l
        })
        .collect();
    let a = start_agent(
        &dir,
        "a",
        &[gw.control],
        &listeners,
        "name = \"a\"\npool = 0",
        "",
    );
    a.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    let failure = a.wait_for_log("listener FAILED", Duration::from_secs(5));
    assert!(
        failure.contains("would exceed this site's limit of 137"),
        "{failure}"
    );
    let b_port = free_port();
    let b_config = agent_config(
        &[gw.control],
        &[listener("b", b_port, echo.addr)],
        "name = \"b\"\npool = 0",
    )
    .replace("site = \"test-site\"", "site = \"site-b\"");
    let b_path = dir.write("b.toml", &b_config);
    let _b = Proc::spawn("b", &["agent", "--config", b_path.to_str().unwrap()]);
    wait_open(local(b_port), Duration::from_secs(10));
    echo_round_trip(local(b_port), "site B opens its port");

    // Clients until the reserve: each costs two descriptors on the gateway.
    let first_port = base;
    let mut clients = Vec::new();
    for i in 0..700 {
        let Ok(mut c) = TcpStream::connect(local(first_port)) else {
            break;
        };
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let line = format!("client {i}\n");
        let mut got = vec![0u8; line.len()];
        if c.write_all(line.as_bytes()).is_err() || c.read_exact(&mut got).is_err() {
            break;
        }
        clients.push(c);
    }
    let served = clients.len();
    assert!(
        (150..500).contains(&served),
        "{served} clients were served before the reserve"
    );
    gw.proc
        .wait_for_log("open files are near their limit", Duration::from_secs(5));
    // At the limit: the admin API answers at once, and established clients still echo.
    let started = std::time::Instant::now();
    let status = gw.api("/api/status");
    assert_eq!(status["state"], "running", "{status}");
    assert!(started.elapsed() < Duration::from_secs(2));
    for (i, c) in clients.iter_mut().enumerate().step_by(50) {
        let line = format!("still here {i}\n");
        c.write_all(line.as_bytes()).unwrap();
        let mut got = vec![0u8; line.len()];
        c.read_exact(&mut got).unwrap();
    }
    // Freed descriptors are usable again.
    clients.truncate(served / 2);
    std::thread::sleep(Duration::from_millis(600));
    echo_round_trip(local(first_port), "after some clients left");
    assert_eq!(gw.proc.count_log("accept failed"), 0);
}

/// A SOCKS5 CONNECT to an IPv4 address through the agent's proxy: the reply code, and the
/// stream (open on success).
fn socks5_connect_v4(proxy: SocketAddr, to: SocketAddr) -> (u8, TcpStream) {
    let mut c = TcpStream::connect(proxy).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let std::net::IpAddr::V4(ip) = to.ip() else {
        panic!("an IPv4 destination");
    };
    let mut req = vec![5, 1, 0, 5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&to.port().to_be_bytes());
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 12];
    c.read_exact(&mut reply).unwrap();
    (reply[3], c)
}

/// Issue 12 item 4, the other two caps: `[limits] max_sites` and `max_outbound`. With
/// `max_sites = 1`, an agent of a second site is told so (`LIMIT`, the key named) after its
/// push, and its port never opens, while the first site keeps serving; with `max_outbound = 2`
/// a third concurrent outbound connection is refused (SOCKS 0x01, the gateway logs the key),
/// the two open ones keep echoing, and a place freed is usable again. Before the fix neither
/// cap existed: any number of sites and outbound connections took descriptors.
#[test]
fn sites_and_outbound_connections_are_capped() {
    let dir = Workdir::new();
    let echo = support::servers::EchoServer::start();
    let gw = start_gateway(
        &dir,
        &format!(
            "[limits]\nmax_sites = 1\nmax_outbound = 2\n[egress]\nallow = [\"{}\"]\n",
            echo.addr
        ),
    );
    let (public, proxy) = (local(free_port()), local(free_port()));
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    wait_open(public, Duration::from_secs(10));
    agent.wait_for_log("outbound proxy (SOCKS5", Duration::from_secs(10));

    // A second site: its push is answered with the limit, and nothing of it opens.
    let mut b = RawControl::open(gw.control, "site-b", "b").unwrap();
    let b_port = free_port();
    b.send(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "d".into(),
        listeners: vec![spec("b", b_port)],
    }));
    match b.read() {
        Message::Error(e) => {
            assert_eq!(e.code, ErrorCode::LIMIT, "{e}");
            assert!(e.message.contains("[limits] max_sites"), "{e}");
            assert!(e.message.contains("site \"site-b\""), "{e}");
        }
        other => panic!("a second site was not refused: {other:?}"),
    }
    assert!(refuses(local(b_port)));
    echo_round_trip(public, "the first site still serves");
    let agents = gw.api("/api/status")["agents"].clone();
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "{agents}");

    // Outbound: two at once are served, a third is refused while they are open.
    let (code1, mut first) = socks5_connect_v4(proxy, echo.addr);
    let (code2, mut second) = socks5_connect_v4(proxy, echo.addr);
    assert_eq!((code1, code2), (0, 0));
    let (code3, _third) = socks5_connect_v4(proxy, echo.addr);
    assert_eq!(code3, 0x01, "a third outbound connection was served");
    gw.proc
        .wait_for_log("[limits] max_outbound", Duration::from_secs(5));
    for (i, c) in [&mut first, &mut second].into_iter().enumerate() {
        let line = format!("outbound {i} still open\n");
        c.write_all(line.as_bytes()).unwrap();
        let mut got = vec![0u8; line.len()];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got, line.as_bytes());
    }
    drop(first);
    assert!(
        wait_until(Duration::from_secs(5), || socks5_connect_v4(
            proxy, echo.addr
        )
        .0 == 0),
        "a freed outbound place was not given back"
    );
}

/// Issue 12 item 3: per-address limits count IPv6 per /64. In a namespace of its own, a gateway
/// with `max_handshakes_per_ip = 2` takes two silent connections from fd00:12::2 and fd00:12::3
/// and refuses a third from fd00:12::4 (`LIMIT`): one /64 is one client; fd00:13::1 (another /64)
/// still gets in. Before the fix each of the three addresses had a limit of its own.
#[test]
fn ipv6_addresses_of_one_64_share_a_per_address_limit() {
    use support::netns::{connect_in, sh_in, Namespaces};
    let dir = Workdir::new();
    let mut net = Namespaces::new();
    let ns = net.add("v6");
    sh_in(
        &ns,
        "for a in fd00:12::1 fd00:12::2 fd00:12::3 fd00:12::4 fd00:13::1; do \
         ip addr add $a/128 dev lo nodad; done",
    );
    let config = dir.write(
        "gateway.toml",
        "[control]\nlisten = \"[fd00:12::1]:0\"\n[peers]\ndefault = \"allow\"\n[admin]\nenabled = false\n\
         [limits]\nmax_handshakes_per_ip = 2\nfirst_byte_timeout = \"30s\"\nhello_timeout = \"30s\"\n",
    );
    let gw = Proc::spawn_program(
        "gateway",
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            BIN,
            "gateway",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let line = gw.wait_for_log("control port listening on ", Duration::from_secs(10));
    let control: SocketAddr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // What a silent connection from `source` gets within half a second: a LIMIT refusal, or
    // nothing (it holds a handshake place).
    let open_from = |source: &str| -> (TcpStream, Option<Reply>) {
        let mut s = connect_in(
            &ns,
            Some(source.parse().unwrap()),
            control,
            Duration::from_secs(2),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let reply = (!got.is_empty()).then(|| support::wire::parse_reply(&got));
        (s, reply)
    };
    let (_a, first) = open_from("fd00:12::2");
    let (_b, second) = open_from("fd00:12::3");
    assert!(first.is_none() && second.is_none(), "{first:?} {second:?}");
    match open_from("fd00:12::4") {
        (_, Some(Reply::Refused(e))) => {
            assert_eq!(e.code, ErrorCode::LIMIT, "{e}");
            assert!(e.message.contains("per IP address"), "{e}");
        }
        (_, other) => panic!("a third address of the same /64 got in: {other:?}"),
    }
    let (_c, other_64) = open_from("fd00:13::1");
    assert!(other_64.is_none(), "another /64 was refused: {other_64:?}");
}

/// Issue 17: a hostile agent's ban list. Every entry is checked; a list with one bad entry, an
/// announced total over the cap, more entries than announced or a reason with escape sequences
/// is refused whole with a clear BanResult, the previous list stays in force, the session goes
/// on, and nothing it sent reaches the log raw. A chunk that does not decode ends the session.
#[test]
fn a_hostile_ban_list_is_refused_and_the_previous_one_kept() {
    use protocol::{Ban, BanList, BanResult};
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let mut control = RawControl::open(gw.control, "test-site", "raw-agent").unwrap();
    let port = free_port();
    control.send(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "d".into(),
        listeners: vec![spec("web", port)],
    }));
    assert!(matches!(control.read(), Message::ConfigResult(_)));
    let ban = |addr: &str, prefix: u8, reason: &str| Ban {
        addr: addr.parse().unwrap(),
        prefix,
        remaining_ms: 0,
        reason: reason.into(),
    };
    let mut list = |generation: u64, total: u32, bans: Vec<Ban>| -> BanResult {
        control.send(&Message::BanList(BanList {
            generation,
            total,
            bans,
        }));
        match control.read() {
            Message::BanResult(r) => r,
            other => panic!("expected a ban result, got {other:?}"),
        }
    };
    let good = list(1, 1, vec![ban("198.51.100.7", 32, "ok")]);
    assert_eq!((good.applied, good.error), (1, None));
    let refusals = [
        (
            vec![ban("10.0.0.0", 8, ""), ban("10.0.0.1", 8, "")],
            "host bits",
        ),
        (vec![ban("10.0.0.1", 40, "")], "prefix"),
        (vec![ban("::ffff:10.0.0.1", 128, "")], "IPv4"),
        (
            vec![ban("10.0.0.1", 32, "x\x1b[2J\nFORGED ban line")],
            "control characters",
        ),
        (
            vec![ban("10.0.0.1", 32, &"r".repeat(300))],
            "reason is 300 bytes",
        ),
    ];
    for (i, (bans, why)) in refusals.into_iter().enumerate() {
        let total = bans.len() as u32;
        let r = list(2 + i as u64, total, bans);
        let error = r.error.unwrap_or_default();
        assert!(error.contains(why), "expected {why:?}: {error:?}");
    }
    let huge = list(20, 1_000_000, vec![]);
    assert!(huge.error.unwrap().contains("at most 100000"));
    let over = list(
        21,
        1,
        vec![ban("10.0.0.1", 32, ""), ban("10.0.0.2", 32, "")],
    );
    assert!(over
        .error
        .unwrap()
        .contains("more entries than the 1 announced"));
    // A flood of bad lists is answered list by list, but logged at most 5 times per 10 s (7
    // refusals above, 200 here, all within a few seconds: at most 10 lines even across a
    // window boundary).
    for i in 0..200u64 {
        let r = list(100 + i, 1, vec![ban("10.0.0.1", 40, "")]);
        assert!(r.error.unwrap().contains("prefix"));
    }
    let logged = gw.proc.count_log("ban list refused");
    assert!(
        (1..=10).contains(&logged),
        "{logged} 'ban list refused' lines for 207 refusals"
    );
    // The first list is still the one in force.
    let shown = gw.api("/api/bans");
    assert_eq!(shown[0]["total"], 1, "{shown}");
    assert_eq!(shown[0]["bans"][0]["net"], "198.51.100.7/32", "{shown}");
    assert_no_injection(&gw.proc, "FORGED");
    // Garbage in a ban-list frame is a protocol error: the session ends.
    let mut out = bytes::BytesMut::new();
    let garbage = RawFrame {
        kind: protocol::kind::BAN_LIST,
        payload: bytes::Bytes::from_static(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
    };
    control.codec.encode(garbage, &mut out).unwrap();
    control.stream.write_all(&out).unwrap();
    gw.proc.wait_for_log(
        "malformed payload for message type 0x8010",
        Duration::from_secs(5),
    );
}
