//! Limits: hitting one closes the offender only, is counted, and is logged at most once per
//! interval.

mod support;

use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::time::Duration;

use sallyport::protocol::ErrorCode;
use support::servers::EchoServer;
use support::wire::{bogus_data_hello, exchange, Reply};
use support::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Connects from `source` and checks the echo works; returns the open connection.
fn echoing_client(source: &str, port: u16) -> TcpStream {
    use std::io::Write;
    let mut s = connect_from(ip(source), local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hi");
    s
}

/// A client the gateway closes at once: reading gets end of stream or a reset.
fn closed_at_once(source: &str, port: u16) -> bool {
    let Ok(mut s) = connect_from(ip(source), local(port)) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1];
    match s.read(&mut buf) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn client_connections_per_ip_and_in_total() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(
        &dir,
        "[limits]\nmax_connections = 5\nmax_connections_per_ip = 2\n",
    );
    let port = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", port, echo.addr)],
        "",
        "",
    );
    wait_open(local(port), Duration::from_secs(10));
    // wait_open's probes have been closed by now; give the gateway a moment to notice.
    std::thread::sleep(Duration::from_millis(200));

    let _a = [
        echoing_client("127.0.0.11", port),
        echoing_client("127.0.0.11", port),
    ];
    for _ in 0..20 {
        assert!(
            closed_at_once("127.0.0.11", port),
            "a third client from one IP must be refused"
        );
    }
    let _b = [
        echoing_client("127.0.0.12", port),
        echoing_client("127.0.0.12", port),
    ];
    let _c = echoing_client("127.0.0.13", port);
    assert!(
        closed_at_once("127.0.0.14", port),
        "a sixth client must be refused"
    );

    // 21 refusals, one log line (once per 10 s), and the line counts.
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<String> = gw
        .proc
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("client refused: client connections reached"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("the limit of 2 per IP address") && lines[0].contains("(1 so far)"),
        "{lines:?}"
    );

    // Closing a connection frees its place.
    drop(_c);
    assert!(wait_until(Duration::from_secs(2), || {
        connect_from(ip("127.0.0.14"), local(port)).is_ok_and(|mut s| {
            use std::io::Write;
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut got = [0u8; 2];
            s.write_all(b"ok").is_ok() && s.read_exact(&mut got).is_ok()
        })
    }));
}

#[test]
fn unfinished_handshakes_per_ip() {
    let dir = Workdir::new();
    let gw = start_gateway(
        &dir,
        "[limits]\nmax_handshakes_per_ip = 3\nhello_timeout = \"1s\"\n",
    );
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| connect_from(ip("127.0.0.21"), gw.control).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    match exchange(
        gw.control,
        Some(ip("127.0.0.21")),
        &bogus_data_hello(),
        false,
        Duration::from_secs(5),
    ) {
        Reply::Refused(e) => {
            assert_eq!(e.code, ErrorCode::LIMIT);
            assert!(e.message.contains("too many unfinished handshakes"), "{e}");
        }
        other => panic!("expected a LIMIT refusal, got {other:?}"),
    }
    // Another address is not affected.
    assert!(matches!(
        exchange(
            gw.control,
            Some(ip("127.0.0.22")),
            &bogus_data_hello(),
            false,
            Duration::from_secs(5)
        ),
        Reply::Frame(_)
    ));
    // Once the silent ones time out, the address may try again.
    drop(silent);
    std::thread::sleep(Duration::from_millis(1300));
    assert!(matches!(
        exchange(
            gw.control,
            Some(ip("127.0.0.21")),
            &bogus_data_hello(),
            false,
            Duration::from_secs(5)
        ),
        Reply::Frame(_)
    ));
    gw.proc.wait_for_log(
        "unfinished handshakes reached the limit of 3 per IP address",
        Duration::from_secs(1),
    );
}
