//! The warm pool: idle data connections the agent opens ahead of time, so a new client is
//! piped without a notification round trip.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

fn pooled(gw: &Gateway) -> u64 {
    gw.api("/api/stats")["pooled"].as_u64().unwrap_or(0)
}

#[test]
fn the_pool_fills_serves_clients_without_a_notification_and_refills() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", port, echo.addr)],
        "pool = 3",
        "",
    );
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || pooled(&gw) == 3),
        "pool never filled: {}",
        pooled(&gw)
    );

    for i in 0..10 {
        echo_round_trip(local(port), &format!("pooled client {i}"));
    }
    // Every client went through a pooled connection: none was announced on the control
    // channel, and the pool is back to its size.
    // (The log lines travel through pipes to the harness: wait for them.)
    assert!(wait_until(Duration::from_secs(5), || {
        gw.proc.count_log("(warm pool)") == 10 && agent.count_log("client connected in") == 10
    }));
    assert_eq!(gw.proc.count_log("client connected after"), 10);
    assert!(wait_until(Duration::from_secs(5), || pooled(&gw) == 3));
    let metrics = std::process::Command::new("curl")
        .args(["-s", &format!("{}/metrics", gw.admin_url())])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("sallyport_pool_idle_connections 3"));

    // A burst larger than the pool: the rest go the announced way, all are served.
    let clients: Vec<_> = (0..12)
        .map(|i| std::thread::spawn(move || echo_round_trip(local(port), &format!("burst {i}"))))
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(echo.accepted(), 22);
}

#[test]
fn a_pooled_client_whose_backend_is_down_is_closed_and_counted() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let dead = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("dead", port, dead)],
        "pool = 2",
        "",
    );
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || pooled(&gw) == 2));
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(b"hello");
    let mut buf = [0u8; 16];
    // Closed cleanly (an orderly end of stream, not a reset) and soon (not at a 10 s deadline).
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert!(wait_until(Duration::from_secs(5), || gw
        .proc
        .count_log("(warm pool)")
        >= 1));
    assert!(wait_until(Duration::from_secs(5), || {
        gw.api("/api/stats")["refusals"]["client_agent_failed"] == 1
    }));
}

#[test]
fn an_agent_that_leaves_takes_its_pooled_connections_with_it() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let l = || listener("echo", port, echo.addr);
    let mut a = start_agent(
        &dir,
        "a",
        &[gw.control],
        &[l()],
        "name = \"a\"\npool = 4",
        "",
    );
    let b = start_agent(
        &dir,
        "b",
        &[gw.control],
        &[l()],
        "name = \"b\"\npool = 4",
        "",
    );
    assert!(wait_until(Duration::from_secs(10), || pooled(&gw) == 8));
    a.kill();
    assert!(
        wait_until(Duration::from_secs(5), || pooled(&gw) == 4),
        "{}",
        pooled(&gw)
    );
    for i in 0..8 {
        echo_round_trip(local(port), &format!("after a left {i}"));
    }
    assert!(wait_until(Duration::from_secs(5), || b
        .count_log("client connected in")
        == 8));
}

#[test]
fn agents_wanting_more_than_the_sites_pool_holds_back_off_quietly() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let port = free_port();
    // Five agents of one site want 5 x 64 = 320 pooled connections; the gateway holds 256.
    let agents: Vec<Proc> = (0..5)
        .map(|i| {
            let top = format!("name = \"a{i}\"\npool = 64");
            start_agent(
                &dir,
                &format!("agent-{i}"),
                &[gw.control],
                &[listener("echo", port, echo.addr)],
                &top,
                "",
            )
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(20), || pooled(&gw) == 256),
        "the pool never filled: {}",
        pooled(&gw)
    );
    let refused = || {
        gw.api("/api/stats")["refusals"]["pool_full"]
            .as_u64()
            .unwrap_or(0)
    };
    let (logged, counted) = (gw.proc.count_log("pool connection refused"), refused());
    std::thread::sleep(Duration::from_secs(6));
    let (logged, counted) = (
        gw.proc.count_log("pool connection refused") - logged,
        refused() - counted,
    );
    eprintln!(
        "pool over the site's cap: {counted} refusals in 6 s after it filled, {logged} log lines"
    );
    // Redialing every second would be 64 refusals (and 64 warnings) a second. The agents
    // back off (1, 2, 4 ... s, up to a minute) and the gateway warns at most once per 10 s.
    assert!(logged <= 1, "{logged} warnings in 6 s");
    assert!(counted <= 3 * 64, "{counted} refusals in 6 s");
    assert!(agents
        .iter()
        .any(|a| a.count_log("the gateway's pool for this site is full") >= 1));
    // The pool still serves.
    echo_round_trip(local(port), "a pooled client");
}
