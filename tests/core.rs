//! End-to-end scenarios of the core: the real gateway and agent binaries on loopback.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::relay::Relay;
use support::servers::{echo_transfer, EchoServer, ReplyAfterEofServer};
use support::*;

#[test]
fn bytes_and_half_close_travel_both_ways() {
    let dir = Workdir::new();
    let reply = pseudo_random(3 * 1024 * 1024 + 17, 7);
    let backend = ReplyAfterEofServer::start(reply.clone());
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("web", public, backend.addr)],
        "",
        "",
    );
    wait_open(local(public), Duration::from_secs(10));

    let request = pseudo_random(1024 * 1024 + 3, 8);
    let mut client = TcpStream::connect(local(public)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    client.write_all(&request).unwrap();
    // Half-close: the backend must see EOF while the client can still read.
    client.shutdown(Shutdown::Write).unwrap();
    // wait_open's probe connections reached the backend too, with nothing in them: skip those.
    let got = std::iter::from_fn(|| backend.received.recv_timeout(Duration::from_secs(20)).ok())
        .find(|r| !r.is_empty())
        .expect("the backend never saw end of stream");
    assert_eq!(
        sha256_hex(&got),
        sha256_hex(&request),
        "request changed in transit"
    );
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), reply.len(), "reply truncated");
    assert_eq!(
        sha256_hex(&back),
        sha256_hex(&reply),
        "reply changed in transit"
    );
}

#[test]
fn two_hundred_concurrent_clients_each_echo_one_mib() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public, echo.addr)],
        "",
        "",
    );
    wait_open(local(public), Duration::from_secs(10));

    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = Arc::new(pseudo_random(1024 * 1024, 1000 + i));
                let want = sha256_hex(&data);
                let stream = TcpStream::connect(local(public)).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let back =
                    echo_transfer(stream, data, 64 * 1024, Duration::ZERO).expect("transfer");
                (back.len(), sha256_hex(&back) == want)
            })
        })
        .collect();
    let mut intact = 0;
    for c in clients {
        let (len, ok) = c.join().unwrap();
        assert_eq!(len, 1024 * 1024);
        if ok {
            intact += 1;
        }
    }
    assert_eq!(intact, 200, "every client's bytes must come back unchanged");
}

#[test]
fn control_cut_keeps_transfers_closes_and_reopens_listeners() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let relay = Relay::start(gateway.control);
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[relay.addr],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "[reconnect]\ninitial = \"200ms\"\nmax = \"2s\"\n",
    );
    wait_open(public, Duration::from_secs(10));

    // A transfer of 24 MiB paced over about 6 s, across the cut.
    let data = Arc::new(pseudo_random(24 * 1024 * 1024, 99));
    let want = sha256_hex(&data);
    let stream = TcpStream::connect(public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let transfer = std::thread::spawn(move || {
        echo_transfer(stream, data, 64 * 1024, Duration::from_millis(16))
    });

    std::thread::sleep(Duration::from_secs(1));
    let controls_before = relay
        .control_conns
        .load(std::sync::atomic::Ordering::SeqCst);
    let cut_at = Instant::now();
    relay.cut_control(Duration::from_secs(3));

    // No control channel: the public port refuses new clients.
    wait_refused(public, Duration::from_secs(3));
    gateway.proc.wait_for_log(
        "last agent gone: closed 1 listener(s)",
        Duration::from_secs(2),
    );
    assert!(refuses(public));

    // The agent retries (refused by the relay), then gets back in once the cut is lifted.
    wait_open(public, Duration::from_secs(10));
    let reopened = cut_at.elapsed();
    assert!(
        reopened >= Duration::from_secs(3),
        "reopened before the cut was lifted"
    );
    assert!(
        relay
            .control_conns
            .load(std::sync::atomic::Ordering::SeqCst)
            > controls_before,
        "the agent must have opened a new control channel"
    );
    agent.wait_for_log("control channel lost", Duration::from_secs(1));
    echo_round_trip(public, "after the cut");

    let back = transfer
        .join()
        .unwrap()
        .expect("the established transfer failed");
    assert_eq!(back.len(), 24 * 1024 * 1024);
    assert_eq!(
        sha256_hex(&back),
        want,
        "the established transfer was corrupted"
    );
    eprintln!(
        "listener reopened {:.2} s after the cut (3 s refusal)",
        reopened.as_secs_f64()
    );
}

#[test]
fn killed_agent_closes_the_port_and_a_restarted_one_reopens_it() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let public = local(free_port());
    let listeners = [listener("echo", public.port(), echo.addr)];
    let mut agent = start_agent(&dir, "agent", &[gateway.control], &listeners, "", "");
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "first life");

    // An established connection outlives the agent's control channel... but not the agent:
    // the agent process carried its data connection, so that one ends with it.
    agent.kill();
    wait_refused(public, Duration::from_secs(5));

    let _agent = start_agent(&dir, "agent2", &[gateway.control], &listeners, "", "");
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "second life");
}

#[test]
fn a_taken_port_is_reported_per_listener_and_the_others_work() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let free = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[
            listener("taken", taken, echo.addr),
            listener("free", free, echo.addr),
        ],
        "",
        "",
    );
    let line = agent.wait_for_log("listener FAILED on the gateway", Duration::from_secs(10));
    assert!(
        line.contains(&format!("127.0.0.1:{taken}: address in use")),
        "{line}"
    );
    assert!(line.contains("taken"), "{line}");
    wait_open(local(free), Duration::from_secs(5));
    echo_round_trip(local(free), "the other listener works");
}

#[test]
fn silent_control_channel_is_declared_dead_and_replaced() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let relay = Relay::start(gateway.control);
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[relay.addr],
        &[listener("echo", public.port(), echo.addr)],
        "heartbeat = \"200ms\"\nconnect_timeout = \"2s\"",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    // The gateway goes silent toward the agent: the agent notices 3 missed heartbeats (600 ms)
    // and reconnects.
    relay.set_control_silent(false, true);
    agent.wait_for_log("3 heartbeats missed", Duration::from_secs(5));
    relay.set_control_silent(false, false);
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "after the gateway's silence");
    // The agent goes silent toward the gateway: the gateway notices and closes the listener.
    relay.set_control_silent(true, false);
    gateway
        .proc
        .wait_for_log("3 heartbeats missed", Duration::from_secs(5));
    gateway
        .proc
        .wait_for_log("last agent gone", Duration::from_secs(2));
    relay.set_control_silent(false, false);
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "after the agent's silence");
}

#[test]
fn demo_serves_through_its_own_gateway() {
    let port = free_port();
    let demo = Proc::spawn("demo", &["demo", "--port", &port.to_string()]);
    demo.wait_for_log(
        &format!("curl http://127.0.0.1:{port}/"),
        Duration::from_secs(15),
    );
    let mut s = TcpStream::connect(local(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let me = s.local_addr().unwrap();
    assert!(
        body.contains(&format!("You are {me} (the real client address")),
        "{body}"
    );
}

#[test]
fn reload_restarts_only_changed_listeners() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let (keep, drop_, add) = (free_port(), free_port(), free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[
            listener("keep", keep, echo.addr),
            listener("drop", drop_, echo.addr),
        ],
        "",
        "",
    );
    wait_open(local(keep), Duration::from_secs(10));
    wait_open(local(drop_), Duration::from_secs(10));

    // An established connection on the listener that will stay.
    let mut live = TcpStream::connect(local(keep)).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut round_trip = |text: &[u8]| {
        live.write_all(text).unwrap();
        let mut got = vec![0u8; text.len()];
        live.read_exact(&mut got).unwrap();
        assert_eq!(got, text);
    };
    round_trip(b"before reload");

    let mut config = agent_config(
        &[gateway.control],
        &[
            listener("keep", keep, echo.addr),
            listener("add", add, echo.addr),
        ],
        "",
    );
    config.push_str("\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
    dir.write("agent.toml", &config);
    agent.signal("HUP");

    agent.wait_for_log("pushing generation 2", Duration::from_secs(5));
    wait_open(local(add), Duration::from_secs(5));
    wait_refused(local(drop_), Duration::from_secs(5));
    let kept = agent.wait_for_log("listener kept on the gateway", Duration::from_secs(5));
    assert!(kept.contains("keep"), "{kept}");
    round_trip(b"after reload, same connection");
    assert_eq!(
        gateway.proc.count_log("closing listener"),
        1,
        "only \"drop\" may close"
    );

    // A broken file is refused and the running config stays.
    dir.write("agent.toml", "site = \"test-site\"\ngateways = [\"nope\"\n");
    agent.signal("HUP");
    agent.wait_for_log(
        "reload refused, keeping the running config",
        Duration::from_secs(5),
    );
    round_trip(b"still fine");
    echo_round_trip(local(add), "new listener works");
}

#[test]
fn a_port_range_listener_opens_and_closes_as_a_whole() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    // Three consecutive free ports, below the ephemeral range (busy when other tests run).
    let first = support::ftp::free_port_range(3);
    let range = ListenerDef {
        name: "range".into(),
        public: format!("127.0.0.1:{first}-{}", first + 2),
        backend: echo.addr.to_string(),
        extra: String::new(),
    };
    let mut agent = start_agent(&dir, "agent", &[gateway.control], &[range], "", "");
    for p in first..=first + 2 {
        wait_open(local(p), Duration::from_secs(10));
        echo_round_trip(local(p), &format!("port {p}"));
    }
    agent.wait_for_log(
        &format!("127.0.0.1:{first} .. 127.0.0.1:{} (3 ports)", first + 2),
        Duration::from_secs(1),
    );
    agent.kill();
    for p in first..=first + 2 {
        wait_refused(local(p), Duration::from_secs(5));
    }
}
