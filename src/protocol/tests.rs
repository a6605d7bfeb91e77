//! Unit tests of `protocol`: version negotiation, the worked examples, framing, the preamble.

use super::*;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

#[test]
fn negotiation() {
    // A v1 peer keeps v1; a v2 peer gets v2; a newer one is brought down to ours.
    let negotiate = |min, max| negotiate_up_to(MAX_VERSION, min, max);
    assert_eq!(negotiate(1, 1).unwrap(), 1);
    assert_eq!(negotiate(1, 2).unwrap(), 2);
    assert_eq!(negotiate(2, 2).unwrap(), 2);
    assert_eq!(negotiate(1, 3).unwrap(), 3);
    assert_eq!(negotiate(1, 4).unwrap(), 4);
    assert_eq!(negotiate(0, 1).unwrap(), 1);
    assert_eq!(negotiate(1, 9).unwrap(), MAX_VERSION);
    assert!(matches!(
        negotiate(5, 6),
        Err(ProtocolError::NoCommonVersion { .. })
    ));
    assert!(negotiate(0, 0).is_err());
    assert!(negotiate(3, 1).is_err());
    assert!(negotiate(2, 1).is_err());
    // A side capped at v2 (an old build, or reuse switched off) meets a v3 peer at v2.
    assert_eq!(negotiate_up_to(2, 1, 3).unwrap(), 2);
}

#[test]
fn features_follow_the_negotiated_version() {
    assert!(!Feature::SessionBinding.on(1));
    assert!(Feature::SessionBinding.on(2));
    assert!(!Feature::PoolAccepted.on(1));
    assert!(Feature::PoolAccepted.on(2));
    assert!(Feature::PoolAccepted.on(MAX_VERSION));
    assert!(!Feature::DataReuse.on(2));
    assert!(Feature::DataReuse.on(3));
    assert!(!Feature::PlainReuse.on(3));
    assert!(Feature::PlainReuse.on(4));
}

/// The worked examples of docs/protocol.md (sections 3 and 7.11), byte for byte: if this
/// fails, fix the page too.
#[test]
fn the_specs_worked_examples_are_true() {
    let hex = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 2,
        software: "sallyport/0.1.0".into(),
        role: Role::Control(ControlHello {
            site: "acme-mft".into(),
            agent: "int1".into(),
            heartbeat_ms: 5000,
        }),
    });
    assert_eq!(
        hex(&with_preamble(&hello)),
        "53 50 52 54 00 00 00 25 00 01 01 02 0f 73 61 6c 6c 79 70 6f 72 74 2f 30 2e 31 2e \
             30 00 08 61 63 6d 65 2d 6d 66 74 04 69 6e 74 31 88 27"
    );
    let encode = |m: &Message| {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(m.to_frame(), &mut buf)
            .unwrap();
        hex(&buf)
    };
    let ack = Message::HelloAck(HelloAck {
        version: 2,
        software: "sallyport/0.1.0".into(),
        heartbeat_ms: 5000,
        data_tls: true,
    });
    assert_eq!(
        encode(&ack),
        "00 00 00 16 00 02 02 0f 73 61 6c 6c 79 70 6f 72 74 2f 30 2e 31 2e 30 88 27 01"
    );
    assert_eq!(
        hex(&with_preamble(&Message::error(
            ErrorCode::PEER_DENIED,
            "no"
        ))),
        "53 50 52 54 00 00 00 06 00 03 07 02 6e 6f"
    );
    assert_eq!(
        encode(&Message::Heartbeat(Heartbeat { seq: 1 })),
        "00 00 00 03 00 30 01"
    );
    assert_eq!(
        encode(&Message::Heartbeat(Heartbeat { seq: 300 })),
        "00 00 00 04 00 30 ac 02"
    );
    assert_eq!(
        encode(&Message::PoolAccepted(PoolAccepted { id: 300 })),
        "00 00 00 04 00 23 ac 02"
    );
}

#[tokio::test]
async fn preamble_recognizes_tls_and_garbage() {
    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&[0x16, 0x03, 0x01, 0x00]).await.unwrap();
    assert!(matches!(
        read_preamble(&mut b).await,
        Err(ProtocolError::UnexpectedTls)
    ));
    a.write_all(b"GET ").await.unwrap();
    assert!(matches!(
        read_preamble(&mut b).await,
        Err(ProtocolError::BadMagic(_))
    ));
    a.write_all(&MAGIC).await.unwrap();
    read_preamble(&mut b).await.unwrap();
}

#[tokio::test]
async fn connection_keeps_bytes_after_the_last_frame() {
    let (a, mut b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(a, DEFAULT_MAX_FRAME);
    let mut bytes = with_preamble(&Message::Heartbeat(Heartbeat { seq: 5 }));
    bytes.extend_from_slice(b"payload");
    b.write_all(&bytes[4..]).await.unwrap();
    let msg = conn.read_message().await.unwrap();
    assert_eq!(msg, Some(Message::Heartbeat(Heartbeat { seq: 5 })));
    let (_, rest) = conn.into_parts();
    assert_eq!(&rest[..], b"payload");
}

#[tokio::test]
async fn a_split_connection_reads_frames_buffered_before_the_split_at_once() {
    let (a, mut b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(a, DEFAULT_MAX_FRAME);
    let mut bytes = BytesMut::new();
    for seq in [1, 2] {
        FrameCodec::default()
            .encode(Message::Heartbeat(Heartbeat { seq }).to_frame(), &mut bytes)
            .unwrap();
    }
    // Both frames arrive together: the first read buffers the second one.
    b.write_all(&bytes).await.unwrap();
    let first = conn.read_message().await.unwrap();
    assert_eq!(first, Some(Message::Heartbeat(Heartbeat { seq: 1 })));
    let (mut reader, _writer) = conn.split();
    // No more bytes come from the peer, yet the buffered frame is there.
    let second = tokio::time::timeout(Duration::from_secs(1), reader.read_message())
        .await
        .expect("the buffered frame was not decoded");
    assert_eq!(
        second.unwrap(),
        Some(Message::Heartbeat(Heartbeat { seq: 2 }))
    );
}

#[tokio::test]
async fn eof_inside_a_frame_is_an_error() {
    let (a, mut b) = tokio::io::duplex(1024);
    let mut conn = Connection::new(a, DEFAULT_MAX_FRAME);
    b.write_all(&[0, 0, 0, 10, 0, 1, 2]).await.unwrap();
    drop(b);
    assert!(conn.read_message().await.is_err());
}
