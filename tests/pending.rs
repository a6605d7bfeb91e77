//! The pending table seen from outside: a scripted agent (the library's own protocol module over
//! a real socket) leaves a client unclaimed, presents wrong and reused tokens, and checks that
//! none of it disturbs a healthy connection.
//!
//! The gateway runs in-process ([`support::harness`]): the tests wait on its status, and read
//! its log lines only where a line itself is asserted.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sallyport::addr::{PortRange, PublicAddr};
use sallyport::protocol::{
    self, ClientArrived, ClientRules, Connection, ControlHello, DataHello, ErrorCode, ListenerSpec,
    ListenerStatus, Message, ProtocolError, PushConfig, Role, Token, DEFAULT_MAX_FRAME,
};
use support::harness::Harness;
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
        // A v2 session's secret comes first: this scripted agent has no pool to prove.
        if !matches!(msg, Message::Heartbeat(_) | Message::SessionSecret(_)) {
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
    let gateway = Harness::start("[limits]\npending_timeout = \"1s\"\n").await;
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
    gateway
        .logs()
        .wait_for(
            "no data connection within 1s; closing client (1 so far)",
            Duration::from_secs(2),
        )
        .await;
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
        .logs()
        .wait_for("wrong token for client id", Duration::from_secs(2))
        .await;
    gateway
        .logs()
        .wait_for("already claimed client id", Duration::from_secs(2))
        .await;
    let reused_line = gateway
        .logs()
        .wait_for("already claimed client id", Duration::from_secs(1))
        .await;
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
    let gateway = Harness::start("").await;
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
    gateway
        .logs()
        .wait_for(
            "agent could not serve client: backend 10.0.0.5:22 unreachable",
            Duration::from_secs(2),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_clients_per_listener_are_bounded() {
    let gateway =
        Harness::start("[limits]\nmax_pending_per_listener = 2\npending_timeout = \"5s\"\n").await;
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
    gateway
        .logs()
        .wait_for(
            "clients waiting for the agent reached the limit (4096 in total, 2 per listener)",
            Duration::from_secs(2),
        )
        .await;
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

/// Opens a connection speaking protocol versions 1..=`max_version`.
async fn open_v(gateway: SocketAddr, role: Role, max_version: u16) -> Connection<TcpStream> {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    let hello = Message::Hello(protocol::Hello {
        min_version: 1,
        max_version,
        software: "scripted".into(),
        role,
    });
    stream
        .write_all(&protocol::with_preamble(&hello))
        .await
        .unwrap();
    Connection::new(stream, DEFAULT_MAX_FRAME)
}

/// A scripted agent's control session (protocol 1..=`max_version`): hello, push of one
/// listener on `public`, the result. Returns the session and its secret (v2).
async fn scripted_session_v(
    gateway: SocketAddr,
    agent: &str,
    public: u16,
    max_version: u16,
) -> (Connection<TcpStream>, Option<Token>) {
    let role = Role::Control(ControlHello {
        site: "scripted".into(),
        agent: agent.into(),
        heartbeat_ms: 60_000,
    });
    let mut ctl = open_v(gateway, role, max_version).await;
    assert!(matches!(
        ctl.expect_message().await.unwrap(),
        Message::HelloAck(_)
    ));
    let secret = if max_version >= 2 {
        match ctl.expect_message().await.unwrap() {
            Message::SessionSecret(s) => Some(s.secret),
            other => panic!("expected the session secret, got {other:?}"),
        }
    } else {
        None
    };
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
    (ctl, secret)
}

async fn scripted_session(gateway: SocketAddr, agent: &str, public: u16) -> Connection<TcpStream> {
    scripted_session_v(gateway, agent, public, protocol::MAX_VERSION)
        .await
        .0
}

/// A refusal counter (`/api/stats` `refusals`), from the gateway's status.
fn refusals(gateway: &Harness, reason: &str) -> u64 {
    gateway.status().refusal(reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_agent_of_a_re_offered_client_loses_its_claim_quietly() {
    let gateway = Harness::start("").await;
    let public = free_port();
    // The client is offered to a (the only agent), a goes away, the client is offered to b, b
    // claims it; then a's data connection arrives after all, with the right token.
    let mut a = scripted_session(gateway.control, "a", public).await;
    let mut client = TcpStream::connect(local(public)).await.unwrap();
    let first = arrived(&mut a).await;
    let mut b = scripted_session(gateway.control, "b", public).await;
    drop(a);
    let second = arrived(&mut b).await;
    assert_eq!((second.id, second.token), (first.id, first.token));
    claim(gateway.control, second.id, second.token)
        .await
        .unwrap();
    ping(&mut client, "served by b").await;

    let late = claim(gateway.control, first.id, first.token).await;
    // Refused with the usual words, so the peer learns nothing new ...
    assert!(
        matches!(&late, Err(ProtocolError::Peer(e)) if e.code == ErrorCode::UNKNOWN_CLIENT),
        "{late:?}"
    );
    // ... but it is a lost race, not a guessed or replayed token: not counted, no warning.
    gateway
        .logs()
        .wait_for(
            "was claimed by another agent it was offered to",
            Duration::from_secs(2),
        )
        .await;
    assert_eq!(refusals(&gateway, "data_token"), 0);
    assert_eq!(refusals(&gateway, "client_agent_failed"), 0);
    assert!(
        !gateway
            .logs()
            .lines()
            .iter()
            .any(|l| l.contains("WARN") && l.contains("data connection refused")),
        "the lost race was logged as a refusal"
    );
    // A wrong token for the same id still counts.
    let guessed = claim(gateway.control, first.id, Token::random()).await;
    assert!(guessed.is_err());
    gateway
        .wait_until("the guessed token counted", Duration::from_secs(2), |s| {
            s.refusal("data_token") == 1
        })
        .await;
    ping(&mut client, "still served").await;
}

/// The agent reconnected while the gateway still holds its old session (a cut it has not
/// noticed yet): two sessions of agent "x" from one address. Pool connections opened for the
/// new session must survive the old one's end, and serve.
async fn reconnected_agents_pool(max_version: u16) {
    let gateway = Harness::start("").await;
    let public = free_port();
    let (old, _) = scripted_session_v(gateway.control, "x", public, max_version).await;
    let (mut new, secret) = scripted_session_v(gateway.control, "x", public, max_version).await;
    let hello = protocol::PoolHello {
        site: "scripted".into(),
        agent: "x".into(),
    };
    let role = || match secret {
        Some(secret) => Role::SessionPool(hello.clone(), secret),
        None => Role::Pool(hello.clone()),
    };
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut m = open_v(gateway.control, role(), max_version).await;
        // A plaintext pool connection gets at most v3: v4 (reuse in plaintext) only when the
        // gateway's owner set `data_reuse`.
        let granted = max_version.min(protocol::Feature::PlainReuse.since() - 1);
        match m.expect_message().await.unwrap() {
            Message::HelloAck(ack) => assert_eq!(ack.version, granted),
            other => panic!("unexpected {other:?}"),
        }
        members.push(m);
    }
    let pooled = || gateway.status().pooled();
    gateway
        .wait_until("3 pooled", Duration::from_secs(5), |s| s.pooled() == 3)
        .await;

    // The old session is finally noticed dead: it takes only its own pooled connections.
    drop(old);
    gateway
        .wait_until("the old session ended", Duration::from_secs(5), |s| {
            s.agents() == 1
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        pooled(),
        3,
        "the new session's pooled connections were closed"
    );

    // And they serve: a client is handed to one, which answers at once (v2) and echoes.
    let (assigned_tx, mut assigned) = tokio::sync::mpsc::channel(3);
    for mut m in members {
        let assigned_tx = assigned_tx.clone();
        tokio::spawn(async move {
            let Ok(Message::PoolAssign(assign)) = m.expect_message().await else {
                return;
            };
            if max_version >= 2 {
                let answer = Message::PoolAccepted(protocol::PoolAccepted { id: assign.id });
                m.write_message(&answer).await.unwrap();
            }
            assigned_tx.send(assign.id).await.unwrap();
            let (mut stream, leftover) = m.into_parts();
            stream.write_all(&leftover).await.unwrap();
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
    let mut client = TcpStream::connect(local(public)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), assigned.recv())
        .await
        .expect("no pooled connection got the client");
    ping(&mut client, "through the new session's pool").await;
    // The new session saw no announcement: the client went through its pool.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), next(&mut new))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_agents_pool_is_filed_under_its_new_session() {
    reconnected_agents_pool(protocol::MAX_VERSION).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_v1_agents_pool_is_filed_under_its_new_session() {
    reconnected_agents_pool(1).await;
}
