//! docs/protocol.md against the code: every byte example in the spec is parsed out of the text
//! and decoded with the real codec, then re-encoded to the same bytes. The test fails when the
//! spec's bytes drift from the implementation, or the implementation from the spec.
//!
//! The scenarios against a gateway run it in-process ([`support::harness`]); the agent side
//! is spoken from the spec over blocking sockets in the test body, which runs on the runtime's
//! own thread while the gateway runs on its workers.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sallyport::protocol::{
    self, ControlHello, ErrorCode, FrameCodec, Heartbeat, Hello, HelloAck, ListenerResult,
    ListenerSpec, ListenerStatus, Message, OutboundHello, PoolAccepted, PoolHello, PushConfig,
    Role, Token,
};
use support::harness::Harness;
use support::wire::{exchange, parse_reply, Reply};
use support::*;
use tokio_util::codec::{Decoder, Encoder};

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md");
    std::fs::read_to_string(path).expect("docs/protocol.md")
}

/// Whether `s` is hex bytes separated by single spaces ("88 27").
fn is_hex_bytes(s: &str) -> bool {
    !s.is_empty()
        && s.split(' ')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
}

fn bytes_of(s: &str) -> Vec<u8> {
    s.split(' ')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The first backquoted hex byte string after `anchor` in the spec.
fn hex_after(doc: &str, anchor: &str) -> Vec<u8> {
    let at = doc
        .find(anchor)
        .unwrap_or_else(|| panic!("docs/protocol.md no longer says {anchor:?}"));
    let rest = &doc[at + anchor.len()..];
    // Spans are between backquotes; a span may wrap onto the next line.
    let spans = rest.split('`').skip(1).step_by(2);
    for span in spans.take(4) {
        let span = span.split_whitespace().collect::<Vec<_>>().join(" ");
        if is_hex_bytes(&span) {
            return bytes_of(&span);
        }
    }
    panic!("no hex bytes after {anchor:?} in docs/protocol.md")
}

/// The bytes of the code block after `anchor`: the hex columns of each line, before the
/// explanation.
fn block_after(doc: &str, anchor: &str) -> Vec<u8> {
    let at = doc
        .find(anchor)
        .unwrap_or_else(|| panic!("docs/protocol.md no longer says {anchor:?}"));
    let block = doc[at..].split("```").nth(1).expect("a code block");
    let mut out = Vec::new();
    for line in block.lines() {
        for word in line.split_whitespace() {
            if word.len() == 2 && word.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push(u8::from_str_radix(word, 16).unwrap());
            } else {
                break;
            }
        }
    }
    out
}

/// Decodes one frame (no preamble) that must fill `bytes` exactly.
fn decode_frame(bytes: &[u8]) -> Message {
    let mut buf = BytesMut::from(bytes);
    let frame = FrameCodec::default()
        .decode(&mut buf)
        .expect("a valid frame")
        .expect("a whole frame");
    assert!(buf.is_empty(), "{} bytes after the frame", buf.len());
    Message::from_frame(&frame)
        .expect("a valid message")
        .expect("a known message")
}

fn encode_frame(msg: &Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(msg.to_frame(), &mut buf)
        .unwrap();
    buf.to_vec()
}

/// Decodes, compares with what the spec says the bytes mean, and re-encodes to the same bytes.
fn check_frame(bytes: &[u8], want: Message) {
    let got = decode_frame(bytes);
    assert_eq!(got, want);
    assert_eq!(encode_frame(&got), bytes, "re-encoding {want:?}");
}

fn without_preamble(bytes: &[u8]) -> &[u8] {
    assert_eq!(&bytes[..4], b"SPRT", "the example starts with the preamble");
    &bytes[4..]
}

fn control_hello() -> Message {
    Message::Hello(Hello {
        min_version: 1,
        max_version: 2,
        software: "sallyport/0.1.0".into(),
        role: Role::Control(ControlHello {
            site: "acme-mft".into(),
            agent: "int1".into(),
            heartbeat_ms: 5000,
        }),
    })
}

#[test]
fn the_worked_hello_frame_decodes_to_what_the_spec_says() {
    let doc = spec();
    let bytes = block_after(&doc, "**Worked example: a control Hello frame**");
    check_frame(without_preamble(&bytes), control_hello());
}

#[test]
fn the_inline_examples_decode_to_what_the_spec_says() {
    let doc = spec();
    // Scalars: a varint and a string, as postcard encodes them.
    assert_eq!(
        hex_after(&doc, "`5000` →"),
        postcard::to_stdvec(&5000u32).unwrap()
    );
    assert_eq!(
        hex_after(&doc, "`\"sftp\"` →"),
        postcard::to_stdvec("sftp").unwrap()
    );
    let v4: std::net::SocketAddr = "192.0.2.1:2222".parse().unwrap();
    let v6: std::net::SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    for (addr, anchor) in [(v4, "`192.0.2.1:2222` →"), (v6, "`[2001:db8::1]:443` →")] {
        let bytes = hex_after(&doc, anchor);
        assert_eq!(
            postcard::from_bytes::<std::net::SocketAddr>(&bytes).unwrap(),
            addr
        );
        assert_eq!(postcard::to_stdvec(&addr).unwrap(), bytes);
    }

    check_frame(
        &hex_after(&doc, "The HelloAck to it from a gateway"),
        Message::HelloAck(HelloAck {
            version: 2,
            software: "sallyport/0.1.0".into(),
            heartbeat_ms: 5000,
            data_tls: true,
        }),
    );
    check_frame(
        without_preamble(&hex_after(
            &doc,
            "A refusal `PEER_DENIED` with message `no` is",
        )),
        Message::error(ErrorCode::PEER_DENIED, "no"),
    );
    check_frame(
        &hex_after(&doc, "with `seq` 1 is"),
        Message::Heartbeat(Heartbeat { seq: 1 }),
    );
    check_frame(
        &hex_after(&doc, "With `seq` 300 it is"),
        Message::Heartbeat(Heartbeat { seq: 300 }),
    );
    check_frame(
        &hex_after(&doc, "(version 2) for client id 300 is"),
        Message::PoolAccepted(PoolAccepted { id: 300 }),
    );
    check_frame(
        &hex_after(&doc, "one listener `sftp` that waits for a resume is"),
        Message::ConfigResult(sallyport::protocol::ConfigResult {
            generation: 1,
            listeners: vec![ListenerResult {
                name: "sftp".into(),
                status: ListenerStatus::Paused,
            }],
        }),
    );
}

/// The spec says "send the shortest form" and that a longer one is malformed: the worked
/// Hello with heartbeat_ms 5000 written in three bytes (`88 a7 00`) must be refused.
#[test]
fn a_non_shortest_varint_is_refused_as_the_spec_says() {
    let doc = spec();
    let long = hex_after(&doc, "written in three bytes,");
    assert_eq!(long, [0x88, 0xa7, 0x00]);
    let good = encode_frame(&control_hello());
    // The payload ends with heartbeat_ms (88 27): put the long form in its place.
    let mut payload = good[6..good.len() - 2].to_vec();
    payload.extend_from_slice(&long);
    let mut frame = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&good[4..6]);
    frame.extend_from_slice(&payload);
    let mut buf = BytesMut::from(&frame[..]);
    let raw = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    let err = Message::from_frame(&raw).expect_err("a non-shortest varint must be refused");
    // A malformed payload: the gateway refuses such a Hello with BAD_HELLO (section 1 step 6).
    assert!(
        matches!(err, sallyport::protocol::ProtocolError::BadPayload { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("shortest"), "{err}");
}

/// A control channel spoken from the spec: hello, the v2 session secret, pushes, reads.
struct SpecAgent {
    stream: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
    secret: Option<Token>,
}

impl SpecAgent {
    fn open(gateway: SocketAddr, site: &str, agent: &str, heartbeat_ms: u32) -> SpecAgent {
        let mut stream = TcpStream::connect(gateway).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let hello = protocol::hello(Role::Control(ControlHello {
            site: site.into(),
            agent: agent.into(),
            heartbeat_ms,
        }));
        stream.write_all(&protocol::with_preamble(&hello)).unwrap();
        let mut a = SpecAgent {
            stream,
            codec: FrameCodec::new(1 << 20),
            buf: BytesMut::new(),
            secret: None,
        };
        match a.read(Duration::from_secs(5)) {
            Some(Message::HelloAck(ack)) => assert_eq!(ack.version, protocol::MAX_VERSION),
            other => panic!("expected a HelloAck, got {other:?}"),
        }
        match a.read(Duration::from_secs(5)) {
            Some(Message::SessionSecret(s)) => a.secret = Some(s.secret),
            other => panic!("expected the v2 SessionSecret, got {other:?}"),
        }
        a
    }

    fn send(&mut self, msg: &Message) {
        let mut out = BytesMut::new();
        self.codec.encode(msg.to_frame(), &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// The next message within `wait`, or None.
    fn read(&mut self, wait: Duration) -> Option<Message> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf).unwrap() {
                return Message::from_frame(&frame).unwrap();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the gateway closed the control channel"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The next message that is not a heartbeat.
    fn read_non_heartbeat(&mut self) -> Message {
        loop {
            match self.read(Duration::from_secs(5)) {
                Some(Message::Heartbeat(_)) => continue,
                Some(m) => return m,
                None => panic!("no answer from the gateway"),
            }
        }
    }

    fn push(&mut self, listeners: Vec<ListenerSpec>) -> Vec<ListenerResult> {
        self.send(&Message::PushConfig(PushConfig {
            generation: 1,
            digest: "any stable string".into(),
            listeners,
        }));
        match self.read_non_heartbeat() {
            Message::ConfigResult(r) => r.listeners,
            other => panic!("expected a ConfigResult, got {other:?}"),
        }
    }
}

fn spec_for(name: &str, public: &str) -> ListenerSpec {
    ListenerSpec {
        name: name.into(),
        public: public.parse().unwrap(),
        clients: Default::default(),
    }
}

/// Issue 13 item 16: the gateway sends no heartbeat before the first push (the spec now says
/// so; it said "both sides send their first heartbeat as soon as the session starts"), and
/// sends them at the agreed interval once the push has arrived. Found by this test: a push
/// later than three intervals after the HelloAck ended the session at once (fixed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_heartbeats_only_after_the_first_push() {
    let gw = Harness::start("").await;
    let mut agent = SpecAgent::open(gw.control, "spec-site", "spec-agent", 200);
    // Five intervals of silence on both sides before the push: only hello_timeout (10 s)
    // applies to a session without a config, so the gateway neither beats nor closes.
    assert_eq!(agent.read(Duration::from_millis(1000)), None);
    let results = agent.push(vec![]);
    assert!(results.is_empty());
    // Now both sides beat every 200 ms. (Before the fix the gateway counted the silence from
    // its HelloAck and ended this session right after the push: "no message for 1.01s".)
    let mut seq = 0;
    let mut beats = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1000) {
        seq += 1;
        agent.send(&Message::Heartbeat(Heartbeat { seq }));
        if let Some(Message::Heartbeat(_)) = agent.read(Duration::from_millis(200)) {
            beats += 1;
        }
    }
    assert!(beats >= 3, "{beats} heartbeats in 1 s at 200 ms");
}

/// Issue 13 item 16: a push with port 0 is answered Failed and binds nothing (on main it bound
/// a random port and reported it Bound); a paused gateway answers `Paused` (variant 2, now in
/// the spec) and opens the listener on resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_zero_is_refused_and_a_paused_gateway_answers_paused() {
    let gw = Harness::start("").await;
    let mut agent = SpecAgent::open(gw.control, "spec-site", "spec-agent", 5000);
    let results = agent.push(vec![spec_for("zero", "127.0.0.1:0")]);
    match &results[0].status {
        ListenerStatus::Failed { error } => assert!(error.contains("port 0"), "{error}"),
        other => panic!("port 0 was not refused: {other:?}"),
    }

    let port = free_port();
    let ok = std::process::Command::new(BIN)
        .args(["ctl", "pause", "--admin", &gw.admin_url()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    agent.send(&Message::PushConfig(PushConfig {
        generation: 2,
        digest: "any stable string".into(),
        listeners: vec![spec_for("later", &format!("127.0.0.1:{port}"))],
    }));
    let Message::ConfigResult(result) = agent.read_non_heartbeat() else {
        panic!("expected a ConfigResult");
    };
    assert_eq!(result.listeners[0].status, ListenerStatus::Paused);
    assert!(refuses(local(port)));
    let ok = std::process::Command::new(BIN)
        .args(["ctl", "resume", "--admin", &gw.admin_url()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    assert!(wait_until(Duration::from_secs(5), || accepts(local(port))));
}

/// Issue 13 item 16: pool and outbound refusals are `SPRT` + Error like every refusal before a
/// HelloAck (on main they were bare Error frames, which a spec-following agent reads as a
/// frame where it expects HelloAck or the preamble).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_outbound_refusals_carry_the_preamble() {
    let gw = Harness::start("").await;
    let wrong = Token::random();
    let pool = protocol::with_preamble(&protocol::hello(Role::SessionPool(
        PoolHello {
            site: "nobody".into(),
            agent: "nobody".into(),
        },
        wrong,
    )));
    match exchange(gw.control, None, &pool, false, Duration::from_secs(5)) {
        Reply::Refused(e) => assert_eq!(e.code, ErrorCode::BAD_HELLO, "{e}"),
        other => panic!("a pool hello without a session: {other:?}"),
    }
    let outbound = protocol::with_preamble(&protocol::hello(Role::SessionOutbound(
        OutboundHello {
            site: "nobody".into(),
            host: "localhost".into(),
            port: 80,
            client_addr: "127.0.0.1:1".parse().unwrap(),
        },
        wrong,
    )));
    match exchange(gw.control, None, &outbound, false, Duration::from_secs(5)) {
        Reply::Refused(e) => assert_eq!(e.code, ErrorCode::EGRESS_DENIED, "{e}"),
        other => panic!("an outbound hello without a session: {other:?}"),
    }
}

/// Issue 13 item 16: a full pool refuses before the HelloAck (`SPRT` + LIMIT). On main the
/// 257th pool connection of a site got a HelloAck and then an Error frame: the agent had
/// counted it as a pool member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_before_the_ack() {
    let gw = Harness::start("").await;
    let mut agent = SpecAgent::open(gw.control, "spec-site", "spec-agent", 5000);
    agent.push(vec![]);
    let hello = protocol::with_preamble(&protocol::hello(Role::SessionPool(
        PoolHello {
            site: "spec-site".into(),
            agent: "spec-agent".into(),
        },
        agent.secret.unwrap(),
    )));
    let mut members = Vec::new();
    for i in 0..256 {
        let mut s = TcpStream::connect(gw.control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&hello).unwrap();
        let mut head = [0u8; 4];
        s.read_exact(&mut head).unwrap();
        assert_ne!(head, protocol::MAGIC, "pool member {i} was refused");
        members.push(s);
    }
    // The gateway parks each member right after writing its ack: let the last ones settle.
    std::thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect(gw.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&hello).unwrap();
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    match parse_reply(&reply) {
        Reply::Refused(e) => {
            assert_eq!(e.code, ErrorCode::LIMIT, "{e}");
            assert!(e.message.contains("pool is full"), "{e}");
        }
        other => panic!("the 257th pool connection: {other:?}"),
    }
    drop(members);
}
