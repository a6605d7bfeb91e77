//! The pending table seen from outside: a scripted agent (the library's own protocol module over
//! a real socket) leaves a client unclaimed, presents wrong and reused tokens, and checks that
//! none of it disturbs a healthy connection.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sallyport::addr::{PortRange, PublicAddr};
use sallyport::protocol::{
    self, ClientArrived, ClientRules, Connection, ControlHello, DataHello, ErrorCode, ListenerSpec,
    ListenerStatus, Message, ProtocolError, PushConfig, Role, Token, DEFAULT_MAX_FRAME,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn open(gateway: SocketAddr, role: Role) -> Connection<TcpStream> {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream
        .write_all(&protocol::with_preamble(&protocol::hello(role)))
        .await
        .unwrap();
    Connection::new(stream, DEFAULT_MAX_FRAME)
}

/// Next message that is not a heartbeat.
async fn next(ctl: &mut Connection<TcpStream>) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ctl.expect_message())
            .await
            .expect("no message from the gateway")
            .unwrap();
        if !matches!(msg, Message::Heartbeat(_)) {
            return msg;
        }
    }
}

async fn arrived(ctl: &mut Connection<TcpStream>) -> ClientArrived {
    match next(ctl).await {
        Message::ClientArrived(a) => a,
        other => panic!("expected client-arrived, got {other:?}"),
    }
}

/// Dials a data connection for `id` with `token`; on success echoes everything back.
async fn claim(gateway: SocketAddr, id: u64, token: Token) -> Result<(), ProtocolError> {
    let mut conn = open(gateway, Role::Data(DataHello { id, token })).await;
    match conn.expect_message().await? {
        Message::HelloAck(_) => {}
        other => panic!("unexpected {other:?}"),
    }
    let (mut stream, leftover) = conn.into_parts();
    tokio::spawn(async move {
        stream.write_all(&leftover).await.unwrap();
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    });
    Ok(())
}

async fn ping(client: &mut TcpStream, text: &str) {
    client.write_all(text.as_bytes()).await.unwrap();
    let mut got = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut got))
        .await
        .expect("no echo")
        .unwrap();
    assert_eq!(got, text.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_clients_expire_and_wrong_or_reused_tokens_are_refused() {
    let dir = Workdir::new();
    let gateway = start_gateway(&dir, "[limits]\npending_timeout = \"1s\"\n");
    let public = free_port();

    let mut ctl = open(
        gateway.control,
        Role::Control(ControlHello {
            site: "scripted".into(),
            agent: "scripted-agent".into(),
            heartbeat_ms: 60_000,
        }),
    )
    .await;
    assert!(matches!(next(&mut ctl).await, Message::HelloAck(_)));
    ctl.write_message(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "scripted".into(),
        listeners: vec![ListenerSpec {
            name: "l".into(),
            public: PublicAddr {
                ip: Some("127.0.0.1".parse().unwrap()),
                ports: PortRange::single(public),
            },
            clients: ClientRules::default(),
        }],
    }))
    .await
    .unwrap();
    match next(&mut ctl).await {
        Message::ConfigResult(r) => assert!(matches!(
            r.listeners[0].status,
            ListenerStatus::Bound { .. }
        )),
        other => panic!("expected config-result, got {other:?}"),
    }

    // A: claimed properly, and kept busy through everything below.
    let mut a = TcpStream::connect(local(public)).await.unwrap();
    let offer_a = arrived(&mut ctl).await;
    assert_eq!(offer_a.listener, "l");
    assert_eq!(offer_a.client_addr, a.local_addr().unwrap());
    assert_eq!(offer_a.gateway_addr, local(public));
    claim(gateway.control, offer_a.id, offer_a.token)
        .await
        .unwrap();
    ping(&mut a, "a-1").await;

    // B: nobody claims it; the gateway closes it at its 1 s deadline.
    let mut b = TcpStream::connect(local(public)).await.unwrap();
    let _offer_b = arrived(&mut ctl).await;
    let t0 = Instant::now();
    let mut buf = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf))
        .await
        .expect("unclaimed client was never closed");
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "unclaimed client got data: {end:?}"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "closed too early: {waited:?}"
    );
    gateway.proc.wait_for_log(
        "no data connection within 1s; closing client (1 so far)",
        Duration::from_secs(2),
    );
    ping(&mut a, "a-2").await;

    // C: a guessed token and a reused one are refused and counted; the right one still works.
    let mut c = TcpStream::connect(local(public)).await.unwrap();
    let offer_c = arrived(&mut ctl).await;
    let wrong = claim(gateway.control, offer_c.id, Token::random()).await;
    assert!(
        matches!(&wrong, Err(ProtocolError::Peer(e)) if e.code == ErrorCode::UNKNOWN_CLIENT),
        "{wrong:?}"
    );
    let reused = claim(gateway.control, offer_a.id, offer_a.token).await;
    assert!(
        matches!(&reused, Err(ProtocolError::Peer(e)) if e.code == ErrorCode::UNKNOWN_CLIENT),
        "{reused:?}"
    );
    gateway
        .proc
        .wait_for_log("wrong token for client id", Duration::from_secs(2));
    gateway
        .proc
        .wait_for_log("already claimed client id", Duration::from_secs(2));
    let reused_line = gateway
        .proc
        .wait_for_log("already claimed client id", Duration::from_secs(1));
    assert!(
        reused_line.contains("(2 so far)"),
        "two refusals counted: {reused_line}"
    );
    claim(gateway.control, offer_c.id, offer_c.token)
        .await
        .unwrap();
    ping(&mut c, "c-1").await;
    ping(&mut a, "a-3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_failed_closes_the_client_at_once() {
    let dir = Workdir::new();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let mut ctl = open(
        gateway.control,
        Role::Control(ControlHello {
            site: "scripted".into(),
            agent: "scripted-agent".into(),
            heartbeat_ms: 60_000,
        }),
    )
    .await;
    assert!(matches!(next(&mut ctl).await, Message::HelloAck(_)));
    ctl.write_message(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "d".into(),
        listeners: vec![ListenerSpec {
            name: "l".into(),
            public: PublicAddr {
                ip: Some("127.0.0.1".parse().unwrap()),
                ports: PortRange::single(public),
            },
            clients: ClientRules::default(),
        }],
    }))
    .await
    .unwrap();
    assert!(matches!(next(&mut ctl).await, Message::ConfigResult(_)));
    let mut client = TcpStream::connect(local(public)).await.unwrap();
    let offer = arrived(&mut ctl).await;
    let t0 = Instant::now();
    ctl.write_message(&Message::ClientFailed(protocol::ClientFailed {
        id: offer.id,
        reason: "backend 10.0.0.5:22 unreachable: connection refused".into(),
    }))
    .await
    .unwrap();
    let mut buf = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(end, Ok(0) | Err(_)));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "closed only at the deadline"
    );
    gateway.proc.wait_for_log(
        "agent could not serve client: backend 10.0.0.5:22 unreachable",
        Duration::from_secs(2),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_clients_per_listener_are_bounded() {
    let dir = Workdir::new();
    let gateway = start_gateway(
        &dir,
        "[limits]\nmax_pending_per_listener = 2\npending_timeout = \"5s\"\n",
    );
    let public = free_port();
    let mut ctl = open(
        gateway.control,
        Role::Control(ControlHello {
            site: "scripted".into(),
            agent: "scripted-agent".into(),
            heartbeat_ms: 60_000,
        }),
    )
    .await;
    assert!(matches!(next(&mut ctl).await, Message::HelloAck(_)));
    ctl.write_message(&Message::PushConfig(PushConfig {
        generation: 1,
        digest: "d".into(),
        listeners: vec![ListenerSpec {
            name: "l".into(),
            public: PublicAddr {
                ip: Some("127.0.0.1".parse().unwrap()),
                ports: PortRange::single(public),
            },
            clients: ClientRules::default(),
        }],
    }))
    .await
    .unwrap();
    assert!(matches!(next(&mut ctl).await, Message::ConfigResult(_)));

    // Two clients wait (their offers arrive, nobody claims them); a third is refused at once.
    let w1 = TcpStream::connect(local(public)).await.unwrap();
    let _offer1 = arrived(&mut ctl).await;
    let mut w2 = TcpStream::connect(local(public)).await.unwrap();
    let offer2 = arrived(&mut ctl).await;
    // The gateway resets it at once: sometimes before the connect itself has completed.
    if let Ok(mut third) = TcpStream::connect(local(public)).await {
        let mut buf = [0u8; 1];
        let end = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
            .await
            .expect("the third client must be closed at once");
        assert!(matches!(end, Ok(0) | Err(_)));
    }
    gateway.proc.wait_for_log(
        "clients waiting for the agent reached the limit (4096 in total, 2 per listener)",
        Duration::from_secs(2),
    );
    // A waiting client that leaves gives its place back at once, long before its deadline.
    drop(w1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(local(public)).await.unwrap();
    let offer4 = arrived(&mut ctl).await;
    claim(gateway.control, offer4.id, offer4.token)
        .await
        .unwrap();
    ping(&mut fourth, "room again").await;
    claim(gateway.control, offer2.id, offer2.token)
        .await
        .unwrap();
    ping(&mut w2, "the second one still waited").await;
}
