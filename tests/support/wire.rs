//! Raw conversations with the control port: send exact bytes, read what the gateway answers.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use sallyport::protocol::{self, DataHello, ErrorMsg, Message, RawFrame, Role, Token, MAGIC};

/// What the gateway said before closing.
#[derive(Debug)]
pub enum Reply {
    /// `SPRT` + an Error frame: refused before the hello was accepted.
    Refused(ErrorMsg),
    /// A plain frame (an Error after the hello, or a HelloAck).
    Frame(Message),
    /// Closed without a byte.
    Silent,
}

/// Parses everything the gateway sent on one connection.
pub fn parse_reply(bytes: &[u8]) -> Reply {
    if bytes.is_empty() {
        return Reply::Silent;
    }
    let refused = bytes.starts_with(&MAGIC);
    let frame = if refused { &bytes[4..] } else { bytes };
    assert!(frame.len() >= 6, "short answer from the gateway: {bytes:?}");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    let raw = RawFrame {
        kind: u16::from_be_bytes([frame[4], frame[5]]),
        payload: bytes::Bytes::copy_from_slice(&frame[6..4 + len]),
    };
    match Message::from_frame(&raw).expect("the gateway sent a valid frame") {
        Some(Message::Error(e)) if refused => Reply::Refused(e),
        Some(msg) if !refused => Reply::Frame(msg),
        other => panic!("unexpected answer {other:?} (refusal prefix: {refused})"),
    }
}

/// Connects (from `source` if given), writes `bytes`, optionally half-closes, and reads the
/// answer until the gateway closes (at most `wait`).
pub fn exchange(
    gateway: SocketAddr,
    source: Option<IpAddr>,
    bytes: &[u8],
    half_close: bool,
    wait: Duration,
) -> Reply {
    let mut s = match source {
        Some(ip) => super::connect_from(ip, gateway).expect("connect"),
        None => TcpStream::connect(gateway).expect("connect"),
    };
    s.set_read_timeout(Some(wait)).unwrap();
    // A refused peer may be closed before everything is written; only the answer matters.
    let _ = s.write_all(bytes);
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = Vec::new();
    if let Err(e) = s.read_to_end(&mut reply) {
        assert!(
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
                || !reply.is_empty(),
            "the gateway neither answered nor closed within {wait:?}"
        );
    }
    parse_reply(&reply)
}

/// A data hello for a client id nobody is waiting for.
pub fn bogus_data_hello() -> Vec<u8> {
    protocol::with_preamble(&protocol::hello(Role::Data(DataHello {
        id: 999_999_999,
        token: Token::random(),
    })))
    .to_vec()
}

/// The gateway answers hellos: a bogus data hello gets the plain UNKNOWN_CLIENT error.
pub fn gateway_answers(gateway: SocketAddr) -> bool {
    matches!(
        exchange(gateway, None, &bogus_data_hello(), false, Duration::from_secs(5)),
        Reply::Frame(Message::Error(e)) if e.code == protocol::ErrorCode::UNKNOWN_CLIENT
    )
}
