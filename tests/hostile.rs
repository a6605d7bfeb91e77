//! Hostile input on the control port. After each attack the gateway must still serve: the real
//! agent's listener still echoes and a fresh hello still gets its answer.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sallyport::protocol::{self, ControlHello, ErrorCode, Hello, Message, Role, MAGIC};
use support::servers::EchoServer;
use support::wire::{bogus_data_hello, exchange, gateway_answers, Reply};
use support::*;

struct Setup {
    _dir: Workdir,
    _echo: EchoServer,
    gateway: Gateway,
    _agent: Proc,
    public: SocketAddr,
}

fn setup() -> Setup {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "[limits]\nhello_timeout = \"1s\"\n");
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    Setup {
        _dir: dir,
        _echo: echo,
        gateway,
        _agent: agent,
        public,
    }
}

impl Setup {
    fn still_serving(&self, after: &str) {
        echo_round_trip(self.public, &format!("after {after}"));
        assert!(
            gateway_answers(self.gateway.control),
            "the gateway stopped answering after {after}"
        );
        assert_eq!(
            self.gateway.proc.count_log("agent session ended"),
            0,
            "the real agent's session must survive {after}"
        );
    }

    fn send(&self, bytes: &[u8]) -> Reply {
        exchange(
            self.gateway.control,
            None,
            bytes,
            true,
            Duration::from_secs(5),
        )
    }
}

fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn refused_with(reply: Reply, code: ErrorCode, text: &str) {
    match reply {
        Reply::Refused(e) => {
            assert_eq!(e.code, code, "{e}");
            assert!(e.message.contains(text), "{e}");
        }
        other => panic!("expected a refusal {code}, got {other:?}"),
    }
}

#[test]
fn random_bytes() {
    let s = setup();
    let mut junk = pseudo_random(4096, 1);
    junk[0] = b'G'; // neither the preamble nor a TLS record
    refused_with(
        s.send(&junk),
        ErrorCode::BAD_HELLO,
        "does not speak the Sallyport protocol",
    );
    s.still_serving("random bytes");
}

#[test]
fn a_four_gib_length_prefix() {
    let s = setup();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x01]);
    refused_with(
        s.send(&bytes),
        ErrorCode::FRAME_TOO_LARGE,
        // Before the hello, frames are capped at 4 KiB whatever max_frame says.
        "frame of 4294967295 bytes exceeds the maximum of 4096",
    );
    s.still_serving("a 4 GiB length prefix");
}

#[test]
fn a_truncated_frame() {
    let s = setup();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&frame(protocol::kind::HELLO, &[1u8; 100])[..40]);
    refused_with(
        s.send(&bytes),
        ErrorCode::PROTOCOL,
        "connection closed in the middle of a frame (40 of 106 bytes)",
    );
    s.still_serving("a truncated frame");
}

#[test]
fn an_unknown_message_type_before_and_after_the_hello() {
    let s = setup();
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&frame(0x0777, b"whatever"));
    refused_with(s.send(&bytes), ErrorCode::UNKNOWN_MESSAGE, "0x0777");

    // An advisory type is skipped: the hello after it is answered.
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&frame(0x8001, b"hint"));
    bytes.extend_from_slice(&bogus_data_hello()[4..]);
    assert!(
        matches!(s.send(&bytes), Reply::Frame(Message::Error(e)) if e.code == ErrorCode::UNKNOWN_CLIENT),
        "an advisory frame before the hello must be skipped"
    );

    // On an established control channel of another site: that session ends, nothing else does.
    let mut ctl = TcpStream::connect(s.gateway.control).unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = protocol::hello(Role::Control(ControlHello {
        site: "mallory".into(),
        agent: "mallory".into(),
        heartbeat_ms: 60_000,
    }));
    ctl.write_all(&protocol::with_preamble(&hello)).unwrap();
    ctl.write_all(&frame(0x0777, b"boom")).unwrap();
    let mut reply = Vec::new();
    let _ = ctl.read_to_end(&mut reply);
    // HelloAck and SessionSecret (protocol v2), then the error frame, then the close.
    let frame_len =
        |at: usize| 4 + u32::from_be_bytes(reply[at..at + 4].try_into().unwrap()) as usize;
    let ack_len = frame_len(0);
    let secret_len = frame_len(ack_len);
    match support::wire::parse_reply(&reply[ack_len + secret_len..]) {
        Reply::Frame(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UNKNOWN_MESSAGE),
        other => panic!("expected an error frame, got {other:?}"),
    }
    s.gateway
        .proc
        .wait_for_log("site=mallory", Duration::from_secs(2));
    echo_round_trip(
        s.public,
        "after a bad message on another site's control channel",
    );
    assert!(gateway_answers(s.gateway.control));
}

#[test]
fn a_wrong_version() {
    let s = setup();
    let hello = Message::Hello(Hello {
        min_version: 9,
        max_version: 12,
        software: "future".into(),
        role: Role::Control(ControlHello {
            site: "x".into(),
            agent: "x".into(),
            heartbeat_ms: 1000,
        }),
    });
    refused_with(
        s.send(&protocol::with_preamble(&hello)),
        ErrorCode::UNSUPPORTED_VERSION,
        "we speak 1..=4, the peer 9..=12",
    );
    // A future hello whose role this version cannot even decode still gets the version error.
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&frame(protocol::kind::HELLO, &[5, 6, 0, 9, 0xff]));
    refused_with(
        s.send(&bytes),
        ErrorCode::UNSUPPORTED_VERSION,
        "the peer 5..=6",
    );
    s.still_serving("wrong versions");
}

#[test]
fn a_hello_that_never_completes_is_closed_at_the_hello_timeout() {
    let s = setup();
    let mut stream = TcpStream::connect(s.gateway.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&MAGIC).unwrap();
    stream.write_all(&[0, 0, 0]).unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 16];
    let n = stream.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "nothing is sent to a peer that never finished its hello"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    s.gateway
        .proc
        .wait_for_log("no hello within 1s", Duration::from_secs(1));
    s.still_serving("a slow hello");
}

#[test]
fn a_data_hello_with_a_guessed_token() {
    let s = setup();
    // Ids no client ever had (small ids may belong to clients that just left, which are not
    // counted as attacks).
    for id in 1_000_000..1_000_020u64 {
        let hello = protocol::hello(Role::Data(protocol::DataHello {
            id,
            token: protocol::Token::from_bytes([id as u8; 16]),
        }));
        match s.send(&protocol::with_preamble(&hello)) {
            Reply::Frame(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UNKNOWN_CLIENT),
            other => panic!("a guessed token must be refused, got {other:?}"),
        }
    }
    let line = s
        .gateway
        .proc
        .wait_for_log("(20 so far)", Duration::from_secs(2));
    assert!(line.contains("data connection refused"), "{line}");
    s.still_serving("guessed tokens");
}

#[test]
fn a_thousand_connections_that_say_nothing() {
    let s = setup();
    let silent: Vec<TcpStream> = (0..1000)
        .map(|i| {
            TcpStream::connect(s.gateway.control).unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    // While they hang around, everything else works.
    s.still_serving("1000 silent connections (during)");
    // The gateway closes every one of them at the hello timeout.
    std::thread::sleep(Duration::from_millis(1500));
    for (i, mut c) in silent.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        let n = c.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "silent connection {i} was not closed");
    }
    s.still_serving("1000 silent connections (after)");
}
