//! The warm pool: idle data connections the agent opens ahead of time, so a new client is
//! piped without a notification round trip.
//!
//! The gateway and agents run in-process ([`support::harness`]) and the tests wait on their
//! status; log lines are read where a line itself is asserted. One scenario keeps the real
//! binaries: an agent killed with SIGKILL.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::harness::Harness;
use support::servers::EchoServer;
use support::*;

fn pooled(gw: &Gateway) -> u64 {
    gw.api("/api/stats")["pooled"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_fills_serves_clients_without_a_notification_and_refills() {
    let echo = EchoServer::start();
    let gw = Harness::start("").await;
    let port = free_port();
    let listeners = [listener("echo", port, echo.addr)];
    let agent = gw.agent("agent", &listeners, "pool = 3", "").await;
    agent.wait_bound("echo").await;
    let five = Duration::from_secs(5);
    gw.wait_until("the pool filled to 3", five, |s| s.pooled() == 3)
        .await;

    for i in 0..10 {
        echo_round_trip(local(port), &format!("pooled client {i}"));
    }
    // Every client went through a pooled connection: none was announced on the control
    // channel, and the pool is back to its size.
    let logs = gw.logs();
    logs.gateway().wait_count("(warm pool)", 10, five).await;
    logs.agents()
        .wait_count("client connected in", 10, five)
        .await;
    assert_eq!(logs.gateway().count("client connected after"), 10);
    gw.wait_until("the pool refilled to 3", five, |s| s.pooled() == 3)
        .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_client_whose_backend_is_down_is_closed_and_counted() {
    let gw = Harness::start("").await;
    let port = free_port();
    let dead = local(free_port());
    let agent = gw
        .agent("agent", &[listener("dead", port, dead)], "pool = 2", "")
        .await;
    agent.wait_bound("dead").await;
    let five = Duration::from_secs(5);
    gw.wait_until("the pool filled to 2", five, |s| s.pooled() == 2)
        .await;
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = c.write_all(b"hello");
    let mut buf = [0u8; 16];
    // Closed cleanly (an orderly end of stream, not a reset) and soon (not at a 10 s deadline).
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    // The agent connects the backend before it answers the pooled connection, and declines
    // the client when it refuses; with no other agent, the gateway announces the client to
    // this one again, which reports that it cannot serve it (protocol.md 7.3).
    let logs = gw.logs();
    logs.agents().wait_for("pooled client declined", five).await;
    gw.wait_until("pool_declined and client_agent_failed counted", five, |s| {
        s.refusal("pool_declined") == 1 && s.refusal("client_agent_failed") == 1
    })
    .await;
}

/// Real binaries: the agent that leaves is killed with SIGKILL (no goodbye, every socket
/// closed by the kernel), which only a process can be.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_wanting_more_than_the_sites_pool_holds_back_off_quietly() {
    let echo = EchoServer::start();
    let gw = Harness::start("").await;
    let port = free_port();
    // Five agents of one site want 5 x 64 = 320 pooled connections; the gateway holds 256.
    let mut agents = Vec::new();
    for i in 0..5 {
        let top = format!("name = \"a{i}\"\npool = 64");
        let listeners = [listener("echo", port, echo.addr)];
        agents.push(gw.agent(&format!("agent-{i}"), &listeners, &top, "").await);
    }
    gw.wait_until("the pool filled to 256", Duration::from_secs(20), |s| {
        s.pooled() == 256
    })
    .await;
    let logs = gw.logs();
    let refused = || gw.status().refusal("pool_full");
    let (logged, counted) = (logs.gateway().count("pool connection refused"), refused());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (logged, counted) = (
        logs.gateway().count("pool connection refused") - logged,
        refused() - counted,
    );
    eprintln!(
        "pool over the site's cap: {counted} refusals in 6 s after it filled, {logged} log lines"
    );
    // Redialing every second would be 64 refusals (and 64 warnings) a second. The agents
    // back off (1, 2, 4 ... s, up to a minute) and the gateway warns at most once per 10 s.
    assert!(logged <= 1, "{logged} warnings in 6 s");
    assert!(counted <= 3 * 64, "{counted} refusals in 6 s");
    // Some agent said so (the agents' lines are not told apart in-process: any of them).
    assert!(
        logs.agents()
            .count("the gateway's pool for this site is full")
            >= 1
    );
    // The pool still serves.
    echo_round_trip(local(port), "a pooled client");
}

/// The agent's report of its pool to the one gateway: `pool` of /api/status.
fn agent_pool(api: &str) -> serde_json::Value {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("{api}/api/status")])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["gateways"][0]["pool"].clone()
}

/// `n` clients connected at once: each echoes a line, then all stay open until every one has.
fn concurrent_clients(port: u16, n: usize, tag: &str) {
    let all_in = std::sync::Arc::new(std::sync::Barrier::new(n));
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let all_in = all_in.clone();
            let line = format!("{tag} {i}");
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(local(port)).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                c.write_all(format!("{line}\n").as_bytes()).unwrap();
                let mut got = vec![0u8; line.len() + 1];
                c.read_exact(&mut got).unwrap();
                assert_eq!(got, format!("{line}\n").as_bytes());
                all_in.wait();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

/// An adaptive pool (`pool = { min, max, window }`): a burst that found it small raises its
/// target to the burst's size, so the next burst of that size is served from the pool without
/// one announcement; once the burst is older than the window the pool falls back to `min`.
async fn adaptive_pool_follows_bursts(tls: bool) {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let certs = make_certs(&dir, "certs", &[]);
    let (gateway_extra, agent_extra) = match tls {
        true => (gateway_tls(&certs), agent_tls(&certs, &certs, "agent")),
        false => (String::new(), String::new()),
    };
    // `[control]` is the gateway config's first table: its TLS line goes in there.
    let control = format!("listen = \"127.0.0.1:0\"\n{gateway_extra}");
    let gw = Harness::start_in(dir, &control, "").await;
    let pooled = || gw.status().pooled() as u64;
    let port = free_port();
    let top = format!("{agent_extra}\npool = {{ min = 1, max = 24, window = \"4s\" }}");
    let listeners = [listener("echo", port, echo.addr)];
    let agent = gw.agent("agent", &listeners, &top, "").await;
    agent.wait_bound("echo").await;
    let api = agent.admin_url();
    gw.wait_until("the pool filled to 1", Duration::from_secs(5), |s| {
        s.pooled() == 1
    })
    .await;
    assert_eq!(agent_pool(&api)["size"], 1);
    assert_eq!(
        (
            agent_pool(&api)["min"].as_u64(),
            agent_pool(&api)["max"].as_u64()
        ),
        (Some(1), Some(24))
    );

    // 16 clients at once against a pool of 1 (how many the replacements catch depends on the
    // machine: each client is a hit or a miss). The target follows the burst, and the pool on
    // the gateway grows to it (a fixed pool of 1 stays at 1: checked by pinning the target).
    concurrent_clients(port, 16, "first burst");
    let first = agent_pool(&api);
    assert_eq!(
        first["hits"].as_u64().unwrap() + first["misses"].as_u64().unwrap(),
        16
    );
    // The target is the busiest second's arrivals (the burst may straddle two seconds).
    assert!(first["size"].as_u64() >= Some(8), "{first}");
    let target = first["size"].as_u64().unwrap() as usize;
    let what = format!("the pool grew to its target {target}");
    gw.wait_until(&what, Duration::from_secs(10), |s| s.pooled() >= target)
        .await;

    // The next burst of 8 finds 8 idle: every client is a hit, none is announced.
    concurrent_clients(port, 8, "second burst");
    let second = agent_pool(&api);
    assert_eq!(second["misses"], first["misses"], "{second}");
    assert_eq!(
        second["hits"].as_u64(),
        Some(first["hits"].as_u64().unwrap() + 8)
    );
    assert_eq!(
        gw.logs().gateway().count("(warm pool)") as u64,
        second["hits"].as_u64().unwrap()
    );

    // Quiet for longer than the window: back to min, on the agent and on the gateway.
    assert!(
        wait_until(Duration::from_secs(15), || pooled() == 1
            && agent_pool(&api)["size"] == 1),
        "the pool did not shrink back: {} idle on the gateway, agent {}",
        pooled(),
        agent_pool(&api)
    );
    let metrics = std::process::Command::new("curl")
        .args(["-s", &format!("{api}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let miss = format!(
        "sallyport_agent_pool_clients_total{{gateway=\"{}\",result=\"miss\"}} {}",
        gw.control, second["misses"]
    );
    assert!(metrics.contains(&miss), "no {miss:?} in\n{metrics}");
    assert!(metrics.contains("sallyport_agent_pool_target_connections{"));
    assert_eq!(echo.accepted(), 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_pool_grows_for_a_burst_and_shrinks_after_its_window() {
    adaptive_pool_follows_bursts(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_pool_of_reused_tls_connections_grows_and_shrinks_alike() {
    adaptive_pool_follows_bursts(true).await;
}
