//! `[peers]` rules on the control port and per-listener `clients` rules, with 127.0.0.x and ::1
//! as distinct hosts.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use sallyport::protocol::{ErrorCode, Message};
use support::servers::EchoServer;
use support::wire::{bogus_data_hello, exchange, Reply};
use support::*;

/// What the gateway answers a data hello (with a made-up client id) from `source`: a plain
/// Error frame (unknown client: the peer was let in) or a refusal before the hello.
#[derive(Debug, PartialEq)]
enum Answer {
    LetIn,
    Refused(ErrorCode, String),
}

fn probe(gateway: SocketAddr, source: IpAddr) -> Answer {
    match exchange(
        gateway,
        Some(source),
        &bogus_data_hello(),
        false,
        Duration::from_secs(5),
    ) {
        Reply::Refused(e) => Answer::Refused(e.code, e.message),
        Reply::Frame(Message::Error(e)) if e.code == ErrorCode::UNKNOWN_CLIENT => Answer::LetIn,
        other => panic!("unexpected answer {other:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A dual-stack gateway (listening on [::]) with the given [peers] section.
fn gateway_with_peers(dir: &Workdir, peers: &str) -> Gateway {
    let gw = start_gateway_with(
        dir,
        "gateway",
        "listen = \"[::]:0\"",
        &format!("[peers]\n{peers}\n"),
    );
    Gateway {
        control: SocketAddr::new(ip("127.0.0.1"), gw.control.port()),
        ..gw
    }
}

const EXCEPT: &str =
    r#"except = ["127.0.0.2", "127.0.5.*", "127.0.6.10-127.0.6.20", "127.0.7.0/24", "::1/128"]"#;

#[test]
fn peers_allow_by_default_with_every_exception_form() {
    let dir = Workdir::new();
    let gw = gateway_with_peers(&dir, &format!("default = \"allow\"\n{EXCEPT}"));
    let v6 = SocketAddr::new(ip("::1"), gw.control.port());
    for denied in [
        "127.0.0.2",
        "127.0.5.9",
        "127.0.6.10",
        "127.0.6.20",
        "127.0.7.200",
    ] {
        match probe(gw.control, ip(denied)) {
            Answer::Refused(code, msg) => {
                assert_eq!(code, ErrorCode::PEER_DENIED, "{denied}");
                assert_eq!(
                    msg,
                    format!("{denied} is not allowed by the gateway's [peers] rules")
                );
            }
            other => panic!("{denied} should be denied, got {other:?}"),
        }
    }
    assert!(matches!(
        probe(v6, ip("::1")),
        Answer::Refused(ErrorCode::PEER_DENIED, _)
    ));
    for allowed in ["127.0.0.1", "127.0.0.9", "127.0.6.21", "127.0.8.1"] {
        assert_eq!(probe(gw.control, ip(allowed)), Answer::LetIn, "{allowed}");
    }
    let line = gw.proc.wait_for_log(
        "peer 127.0.7.200 denied by the [peers] rules",
        Duration::from_secs(2),
    );
    assert!(
        line.contains("(5 so far)"),
        "each denial is counted: {line}"
    );
}

#[test]
fn peers_deny_by_default_with_every_exception_form() {
    let dir = Workdir::new();
    let gw = gateway_with_peers(&dir, &format!("default = \"deny\"\n{EXCEPT}"));
    let v6 = SocketAddr::new(ip("::1"), gw.control.port());
    for allowed in ["127.0.0.2", "127.0.5.9", "127.0.6.15", "127.0.7.1"] {
        assert_eq!(probe(gw.control, ip(allowed)), Answer::LetIn, "{allowed}");
    }
    assert_eq!(probe(v6, ip("::1")), Answer::LetIn);
    for denied in ["127.0.0.1", "127.0.0.3", "127.0.6.9", "127.0.8.1"] {
        assert!(
            matches!(
                probe(gw.control, ip(denied)),
                Answer::Refused(ErrorCode::PEER_DENIED, _)
            ),
            "{denied}"
        );
    }
}

#[test]
fn a_denied_agent_is_told_why_and_opens_nothing() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = gateway_with_peers(&dir, "default = \"allow\"\nexcept = [\"127.0.0.3\"]");
    let (p1, p2) = (local(free_port()), local(free_port()));
    let denied = start_agent(
        &dir,
        "denied",
        &[gw.control],
        &[listener("a", p1.port(), echo.addr)],
        "source_ip = \"127.0.0.3\"",
        "",
    );
    let line = denied.wait_for_log("control channel lost", Duration::from_secs(5));
    assert!(
        line.contains("the gateway refused the connection: peer denied (7): 127.0.0.3 is not allowed by the gateway's [peers] rules"),
        "{line}"
    );
    let _allowed = start_agent(
        &dir,
        "allowed",
        &[gw.control],
        &[listener("b", p2.port(), echo.addr)],
        "source_ip = \"127.0.0.4\"",
        "",
    );
    wait_open(p2, Duration::from_secs(10));
    echo_round_trip(p2, "allowed agent works");
    assert!(refuses(p1));
}

#[test]
fn client_rules_per_listener_reject_and_count() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let (open_port, strict_port) = (free_port(), free_port());
    let mut strict = listener("strict", strict_port, echo.addr);
    strict.extra =
        r#"clients = { default = "deny", except = ["127.0.0.7", "127.0.9.0/24"] }"#.into();
    let mut open = listener("open", open_port, echo.addr);
    open.extra = r#"clients = { default = "allow", except = ["127.0.0.8"] }"#.into();
    let _agent = start_agent(&dir, "agent", &[gw.control], &[strict, open], "", "");
    wait_open(local(open_port), Duration::from_secs(10));

    let through = |source: &str, port: u16| -> bool {
        let Ok(mut s) = connect_from(ip(source), local(port)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(b"ping\n").is_err() {
            return false;
        }
        let mut got = [0u8; 5];
        s.read_exact(&mut got).is_ok() && &got == b"ping\n"
    };
    assert!(through("127.0.0.7", strict_port));
    assert!(through("127.0.9.44", strict_port));
    assert!(!through("127.0.0.1", strict_port));
    assert!(!through("127.0.0.8", strict_port));
    assert!(through("127.0.0.1", open_port));
    assert!(!through("127.0.0.8", open_port));
    let line = gw
        .proc
        .wait_for_log("client=127.0.0.8:", Duration::from_secs(2));
    assert!(
        line.contains("client rejected by the listener's rules"),
        "{line}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || gw
            .proc
            .count_log("client rejected by the listener's rules")
            == 3),
        "three rejections must be logged"
    );
    let last = gw
        .proc
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("client rejected"))
        .unwrap();
    assert!(last.contains("(3 so far)"), "{last}");
}

/// Issue 12 item 9: an IPv4-mapped exception (`::ffff:127.0.0.7/128`) in `[peers]` or in a
/// listener's client rules names the IPv4 host it carries. Before the fix it parsed and then
/// matched nothing, so a deny exception let its host in.
#[test]
fn ipv4_mapped_exceptions_apply_to_peers_and_to_clients() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = gateway_with_peers(
        &dir,
        "default = \"allow\"\nexcept = [\"::ffff:127.0.0.7/128\", \"::ffff:127.0.8.0/120\"]",
    );
    for denied in ["127.0.0.7", "127.0.8.9"] {
        assert!(
            matches!(
                probe(gw.control, ip(denied)),
                Answer::Refused(ErrorCode::PEER_DENIED, _)
            ),
            "{denied} must be denied by its IPv4-mapped [peers] exception"
        );
    }
    assert_eq!(probe(gw.control, ip("127.0.0.6")), Answer::LetIn);

    let port = free_port();
    let mut l = listener("mapped", port, echo.addr);
    l.extra = r#"clients = { default = "allow", except = ["::ffff:127.0.0.8/128"] }"#.into();
    let _agent = start_agent(&dir, "agent", &[gw.control], &[l], "", "");
    wait_open(local(port), Duration::from_secs(10));
    let echoes = |source: &str| -> bool {
        let Ok(mut s) = connect_from(ip(source), local(port)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 5];
        s.write_all(b"ping\n").is_ok() && s.read_exact(&mut got).is_ok() && &got == b"ping\n"
    };
    assert!(echoes("127.0.0.9"));
    assert!(
        !echoes("127.0.0.8"),
        "127.0.0.8 must be rejected by its IPv4-mapped client exception"
    );
    gw.proc.wait_for_log(
        "client rejected by the listener's rules",
        Duration::from_secs(2),
    );
}

/// `source_ip` as a list: the control channel comes from the first address, data and pool
/// connections from each in turn (several (source, gateway) tuples for TIME-WAIT: more new
/// clients per second sustained), and every client is served.
#[test]
fn an_agent_with_several_source_addresses_spreads_its_data_connections_over_them() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", port, echo.addr)],
        "source_ip = [\"127.0.0.21\", \"127.0.0.22\", \"127.0.0.23\"]\npool = 2",
        "",
    );
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    let session = gw
        .proc
        .wait_for_log("agent connected (", Duration::from_secs(5));
    assert!(session.contains("127.0.0.21:"), "{session}");
    for i in 0..12 {
        echo_round_trip(local(port), &format!("client {i}"));
    }
    assert!(wait_until(Duration::from_secs(5), || gw
        .proc
        .count_log("event=\"connection_end\"")
        >= 12));
    let sources: std::collections::BTreeSet<String> = gw
        .proc
        .log_lines()
        .iter()
        .filter(|l| l.contains("event=\"connection_end\""))
        .filter_map(|l| l.split("agent_addr=").nth(1))
        .filter_map(|a| a.split(':').next().map(str::to_string))
        .collect();
    assert_eq!(
        sources.into_iter().collect::<Vec<_>>(),
        ["127.0.0.21", "127.0.0.22", "127.0.0.23"],
        "data connections did not come from every source address"
    );
    assert_eq!(echo.accepted(), 12);
}
