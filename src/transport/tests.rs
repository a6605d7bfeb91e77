//! Unit tests of `transport`: refusal sniffing and host names.

use super::*;
use crate::protocol::{with_preamble, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn sniff_turns_a_refusal_into_an_error() {
    let (mut gw, agent) = tokio::io::duplex(1024);
    let refusal = with_preamble(&Message::error(ErrorCode::PEER_DENIED, "go away"));
    gw.write_all(&refusal).await.unwrap();
    let mut sniff = Sniff::new(agent);
    let err = sniff.read(&mut [0u8; 64]).await.unwrap_err();
    let msg = refusal_of(&err);
    assert_eq!(msg.code, ErrorCode::PEER_DENIED);
    assert_eq!(msg.message, "go away");
}

fn refusal_of(e: &io::Error) -> ErrorMsg {
    refusal(e).cloned().expect("a refusal")
}

#[tokio::test]
async fn sniff_passes_other_bytes_through_unchanged() {
    for data in [
        &b"\x16\x03\x03hello world"[..],
        b"SP",
        b"SPRX-not-magic",
        b"",
    ] {
        let (mut gw, agent) = tokio::io::duplex(1024);
        gw.write_all(data).await.unwrap();
        drop(gw);
        let mut sniff = Sniff::new(agent);
        let mut got = Vec::new();
        sniff.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
    }
}

#[test]
fn hosts() {
    assert_eq!(host_of("gw.example:44500"), "gw.example");
    assert_eq!(host_of("[::1]:44500"), "::1");
    assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
}
