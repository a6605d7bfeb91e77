//! Issue 17 item 2: automatic bans at the edge, configured per listener in agent.toml and
//! decided by the gateway. Real clients from loopback aliases: 127.0.0.7 misbehaves, 127.0.0.8
//! does not.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use support::servers::EchoServer;
use support::*;

fn served_from(source: &str, addr: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(source.parse::<IpAddr>().unwrap(), addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 5];
    s.write_all(b"ping\n").is_ok() && s.read_exact(&mut got).is_ok() && &got == b"ping\n"
}

/// How long until `source` is served again (polling every 50 ms, at most `limit`).
fn banned_for(source: &str, addr: SocketAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    while !served_from(source, addr) {
        assert!(
            start.elapsed() < limit,
            "{source} still refused after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// More than 5 connections within 10 s bans the address for 2 s, then 4 s on the repeat
/// (doubling, capped at 4 s); the ban shows in `/api/bans` and counts as `banned`; another
/// address is served throughout.
#[test]
fn too_many_connections_ban_the_address_for_a_doubling_time() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let echo = EchoServer::start();
    let port = free_port();
    let mut l = listener("web", port, echo.addr);
    l.extra =
        "auto_ban = { connections = 5, within = \"10s\", ban = \"2s\", max_ban = \"4s\" }\n".into();
    let _agent = start_agent(&dir, "agent", &[gw.control], &[l], "", "");
    gw.proc
        .wait_for_log("automatic bans on for 1 listener", Duration::from_secs(10));
    let public = local(port);
    wait_open(public, Duration::from_secs(10));
    let mut lifted = Vec::new();
    // Round 2 starts with one connection counted: the poll that found the first ban lifted.
    for (round, allowed) in [(1, 5), (2, 4)] {
        let mut served = 0;
        while served_from("127.0.0.7", public) {
            served += 1;
            assert!(
                served <= allowed,
                "round {round}: {served} connections served"
            );
        }
        assert_eq!(served, allowed, "round {round}");
        let bans = gw.api("/api/bans");
        assert_eq!(bans[0]["bans"][0]["net"], "127.0.0.7/32", "{bans}");
        assert_eq!(bans[0]["bans"][0]["agent"], "(automatic)", "{bans}");
        let reason = bans[0]["bans"][0]["reason"].as_str().unwrap().to_string();
        assert!(reason.contains("more than 5 connections"), "{reason}");
        assert!(served_from("127.0.0.8", public), "127.0.0.8 was refused");
        lifted.push(banned_for("127.0.0.7", public, Duration::from_secs(10)));
    }
    println!("automatic bans lifted after {lifted:?} (set: 2 s, then 4 s)");
    assert!(lifted[0] > Duration::from_millis(1500) && lifted[0] < Duration::from_millis(3500));
    assert!(lifted[1] > Duration::from_millis(3500) && lifted[1] < Duration::from_millis(5500));
    let refused = gw.api("/api/stats")["refusals"]["banned"].as_u64().unwrap();
    assert!(refused >= 2, "{refused}");
}

/// A backend that closes every connection at once (as a server does after a failed login).
fn closing_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    addr
}

/// More than 3 connections shorter than 1 s within 30 s ban the address; long connections of
/// another address do not count.
#[test]
fn short_connections_ban_the_address() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let mut l = listener("ssh", port, closing_backend());
    l.extra = "auto_ban = { short_connections = 3, shorter_than = \"1s\", within = \"30s\", ban = \"1m\" }\n".into();
    let _agent = start_agent(&dir, "agent", &[gw.control], &[l], "", "");
    gw.proc
        .wait_for_log("automatic bans on for 1 listener", Duration::from_secs(10));
    let public = local(port);
    wait_open(public, Duration::from_secs(10));
    // Each connection is closed by the backend at once.
    let ended_at_once = |source: &str| {
        let mut s = connect_from(source.parse::<IpAddr>().unwrap(), public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(0))
    };
    for i in 1..=4 {
        assert!(ended_at_once("127.0.0.7"), "connection {i} was not served");
    }
    assert!(
        wait_until(Duration::from_secs(5), || gw.api("/api/bans")[0]["total"]
            == 1),
        "no automatic ban: {}",
        gw.api("/api/bans")
    );
    let bans = gw.api("/api/bans");
    let reason = bans[0]["bans"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("more than 3 connections shorter than 1s"),
        "{reason}"
    );
    assert!(
        connect_from("127.0.0.7".parse().unwrap(), public)
            .map(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                s.read(&mut [0u8; 1]).is_err()
            })
            .unwrap_or(true),
        "127.0.0.7 was not reset after its ban"
    );
    // 127.0.0.8 had two short connections: not banned.
    assert!(ended_at_once("127.0.0.8") && ended_at_once("127.0.0.8"));
    assert_eq!(gw.api("/api/bans")[0]["total"], 1);
}
