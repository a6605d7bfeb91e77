//! Unit tests of `protocol::message`: every message round-trips; unknown types, trailing bytes
//! and truncation are handled as the spec says.

use super::*;
use crate::addr::PortRange;

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            software: "t".into(),
            role: Role::Control(ControlHello {
                site: "acme".into(),
                agent: "a1".into(),
                heartbeat_ms: 5000,
            }),
        }),
        Message::Hello(Hello {
            min_version: 1,
            max_version: 3,
            software: "t".into(),
            role: Role::Data(DataHello {
                id: 42,
                token: Token::random(),
            }),
        }),
        Message::HelloAck(HelloAck {
            version: 1,
            software: "g".into(),
            heartbeat_ms: 5000,
            data_tls: true,
        }),
        Message::error(ErrorCode::UNKNOWN_CLIENT, "no such client"),
        Message::PushConfig(PushConfig {
            generation: 3,
            digest: "ab".into(),
            listeners: vec![ListenerSpec {
                name: "sftp".into(),
                public: PublicAddr {
                    ip: Some("127.0.0.1".parse().unwrap()),
                    ports: PortRange::new(30000, 30049).unwrap(),
                },
                clients: ClientRules {
                    default: Policy::Deny,
                    except: vec!["10.0.0.*".into()],
                },
            }],
        }),
        Message::ConfigResult(ConfigResult {
            generation: 3,
            listeners: vec![
                ListenerResult {
                    name: "a".into(),
                    status: ListenerStatus::Bound {
                        addrs: vec!["[::1]:80".parse().unwrap()],
                        kept: true,
                    },
                },
                ListenerResult {
                    name: "b".into(),
                    status: ListenerStatus::Failed {
                        error: "address in use".into(),
                    },
                },
            ],
        }),
        Message::ClientArrived(ClientArrived {
            id: 7,
            token: Token::random(),
            listener: "sftp".into(),
            port_offset: 0,
            client_addr: "198.51.100.7:50000".parse().unwrap(),
            gateway_addr: "192.0.2.1:2222".parse().unwrap(),
        }),
        Message::ClientFailed(ClientFailed {
            id: 7,
            reason: "backend refused".into(),
        }),
        Message::Heartbeat(Heartbeat { seq: u64::MAX }),
        Message::PoolAssign(PoolAssign {
            id: 9,
            listener: "web".into(),
            port_offset: 2,
            client_addr: "[2001:db8::7]:50000".parse().unwrap(),
            gateway_addr: "192.0.2.1:443".parse().unwrap(),
        }),
        Message::PoolAccepted(PoolAccepted { id: 9 }),
        Message::BanList(BanList {
            generation: 2,
            total: 2,
            bans: vec![
                Ban {
                    addr: "198.51.100.7".parse().unwrap(),
                    prefix: 32,
                    remaining_ms: 0,
                    reason: "fail2ban sshd".into(),
                },
                Ban {
                    addr: "2001:db8::".parse().unwrap(),
                    prefix: 32,
                    remaining_ms: 600_000,
                    reason: String::new(),
                },
            ],
        }),
        Message::BanResult(BanResult {
            generation: 2,
            applied: 2,
            error: None,
        }),
        Message::SessionSecret(SessionSecret {
            secret: Token::random(),
        }),
        Message::Hello(Hello {
            min_version: 1,
            max_version: 2,
            software: "t".into(),
            role: Role::SessionPool(
                PoolHello {
                    site: "acme".into(),
                    agent: "a1".into(),
                },
                Token::random(),
            ),
        }),
        Message::Hello(Hello {
            min_version: 1,
            max_version: 2,
            software: "t".into(),
            role: Role::SessionOutbound(
                OutboundHello {
                    site: "acme".into(),
                    host: "partner.example".into(),
                    port: 22,
                    client_addr: "10.0.0.9:40000".parse().unwrap(),
                },
                Token::random(),
            ),
        }),
    ]
}

#[test]
fn every_message_round_trips() {
    for msg in all_messages() {
        let frame = msg.to_frame();
        assert_eq!(Message::from_frame(&frame).unwrap(), Some(msg));
    }
}

#[test]
fn unknown_types_critical_or_advisory() {
    let frame = |kind| RawFrame {
        kind,
        payload: Bytes::from_static(b"xyz"),
    };
    assert!(matches!(
        Message::from_frame(&frame(0x0777)),
        Err(ProtocolError::UnknownMessage { kind: 0x0777 })
    ));
    assert_eq!(Message::from_frame(&frame(0x8001)).unwrap(), None);
}

#[test]
fn trailing_bytes_and_truncation_are_errors() {
    let mut frame = Message::Heartbeat(Heartbeat { seq: 1 }).to_frame();
    let mut long = frame.payload.to_vec();
    long.push(0);
    frame.payload = Bytes::from(long);
    assert!(matches!(
        Message::from_frame(&frame),
        Err(ProtocolError::BadPayload { .. })
    ));
    let mut hello = all_messages()[0].to_frame();
    hello.payload = hello.payload.slice(..hello.payload.len() - 1);
    assert!(Message::from_frame(&hello).is_err());
}

#[test]
fn hello_versions_decode_from_any_hello() {
    let frame = all_messages()[1].to_frame();
    let (v, _) = postcard::take_from_bytes::<HelloVersions>(&frame.payload).unwrap();
    assert_eq!((v.min_version, v.max_version), (1, 3));
}
