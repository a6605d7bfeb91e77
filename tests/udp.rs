//! UDP listeners end to end: the real gateway and agent binaries, real dnsmasq answering real
//! `dig` through the gateway's public UDP port, and small Rust UDP peers for what dnsmasq
//! cannot show (many flows, idle expiry, oversize drops, the PROXY v2 header, a control cut).

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::relay::Relay;
use support::servers::{EchoServer, UdpEcho};
use support::*;

fn udp_listener(name: &str, port: u16, backend: SocketAddr, extra: &str) -> ListenerDef {
    let mut l = listener(name, port, backend);
    l.extra = format!("protocol = \"udp\"\n{extra}");
    l
}

/// A client socket on `ip` with a read timeout.
fn client_on(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s
}

/// Sends `payload` and returns the answer, or `None` after the socket's timeout.
fn ask(s: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    s.send_to(payload, to).unwrap();
    let mut buf = vec![0u8; 70_000];
    s.recv_from(&mut buf).ok().map(|(n, _)| buf[..n].to_vec())
}

/// Asks until an answer comes (the listener opens a moment after the agent starts).
fn ask_until(s: &UdpSocket, to: SocketAddr, payload: &[u8], timeout: Duration) -> Vec<u8> {
    let start = Instant::now();
    loop {
        if let Some(a) = ask(s, to, payload) {
            return a;
        }
        assert!(
            start.elapsed() < timeout,
            "no answer from {to} within {timeout:?}"
        );
    }
}

/// The `udp` part of a listener's statistics in `/api/stats`.
fn udp_stats(gateway: &Gateway, name: &str) -> serde_json::Value {
    let stats = gateway.api("/api/stats");
    stats["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .map(|l| l["udp"].clone())
        .unwrap_or(serde_json::Value::Null)
}

fn flows(gateway: &Gateway, name: &str) -> u64 {
    udp_stats(gateway, name)["flows"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// dnsmasq on 127.0.0.1:`port` answering one local record, started and stopped by the test.
fn start_dnsmasq(dir: &Workdir, port: u16) -> Proc {
    let conf = dir.write(
        "dnsmasq.conf",
        &format!(
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             host-record=app.sallyport.test,10.1.2.3\nuser=root\npid-file=\n\
             log-facility=-\n"
        ),
    );
    Proc::spawn_program(
        "dnsmasq",
        "/usr/sbin/dnsmasq",
        &[
            "--keep-in-foreground",
            &format!("--conf-file={}", conf.to_str().unwrap()),
        ],
    )
}

fn dig(public: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &public.to_string(),
            name,
            "A",
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .output()
        .expect("run dig (package bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn dig_gets_dnsmasqs_answer_through_the_gateway_and_tcp_shares_the_port() {
    let dir = Workdir::new();
    let dns_port = free_port();
    let dnsmasq = start_dnsmasq(&dir, dns_port);
    dnsmasq.wait_for_log("started, version", Duration::from_secs(10));
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let dns: SocketAddr = format!("127.0.0.1:{dns_port}").parse().unwrap();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[
            udp_listener("dns", public, dns, ""),
            // The same port number over TCP is another listener.
            listener("web", public, echo.addr),
        ],
        "",
        "",
    );
    wait_open(local(public), Duration::from_secs(10));
    let start = Instant::now();
    let mut answer = String::new();
    while start.elapsed() < Duration::from_secs(10) && answer != "10.1.2.3" {
        answer = dig(public, "app.sallyport.test");
    }
    assert_eq!(answer, "10.1.2.3", "dig through the gateway");
    // A second query from a new flow, and TCP on the same port number still works.
    assert_eq!(dig(public, "app.sallyport.test"), "10.1.2.3");
    echo_round_trip(local(public), "tcp beside udp");
    let udp = udp_stats(&gateway, "dns");
    assert!(
        udp["datagrams_from_clients"].as_u64().unwrap() >= 2,
        "{udp}"
    );
    assert!(udp["datagrams_to_clients"].as_u64().unwrap() >= 2, "{udp}");
    let metrics = Command::new("curl")
        .args(["-s", &format!("{}/metrics", gateway.admin_url())])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(
            "sallyport_udp_datagrams_from_clients_total{site=\"test-site\",listener=\"dns\"}"
        ),
        "{metrics}"
    );
}

#[test]
fn concurrent_flows_from_different_ports_each_get_their_own_answers() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener("echo", public, echo.addr, "")],
        "",
        "",
    );
    let to = local(public);
    // Kept open: a client socket that reused its port would be the same flow.
    let probe = client_on("127.0.0.1");
    ask_until(&probe, to, b"ready?", Duration::from_secs(10));
    let threads: Vec<_> = (0..40)
        .map(|i| {
            thread::spawn(move || {
                let s = client_on("127.0.0.1");
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                for round in 0..5 {
                    let payload = format!("client {i} round {round} ").repeat(i + 1);
                    let answer = ask(&s, to, payload.as_bytes()).expect("an answer");
                    assert_eq!(answer, format!("echo:{payload}").into_bytes(), "client {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a client got a wrong or no answer");
    }
    // 40 clients + the probe: each its own flow, hence its own backend socket.
    let sources: std::collections::HashSet<SocketAddr> =
        echo.received.try_iter().map(|(from, _)| from).collect();
    assert_eq!(sources.len(), 41, "one backend socket per flow");
    assert!(flows(&gateway, "echo") >= 41);
}

#[test]
fn an_idle_flow_expires_and_the_flow_count_returns_to_zero() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener(
            "echo",
            public,
            echo.addr,
            "idle_timeout = \"700ms\"",
        )],
        "",
        "",
    );
    let s = client_on("127.0.0.1");
    ask_until(&s, local(public), b"one", Duration::from_secs(10));
    // Traffic keeps the flow alive past its idle timeout.
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(300));
        assert_eq!(ask(&s, local(public), b"more").unwrap(), b"echo:more");
        assert_eq!(flows(&gateway, "echo"), 1);
    }
    assert!(
        wait_until(Duration::from_secs(10), || flows(&gateway, "echo") == 0),
        "the idle flow did not end: {}",
        udp_stats(&gateway, "echo")
    );
    // The next datagram opens a new flow, from a new backend socket.
    assert_eq!(ask(&s, local(public), b"again").unwrap(), b"echo:again");
    let sources: std::collections::HashSet<SocketAddr> =
        echo.received.try_iter().map(|(from, _)| from).collect();
    assert_eq!(sources.len(), 2, "a new flow after the idle one ended");
}

/// Attack: an agent that stops (SIGSTOP: its sockets stay open, nothing is read or closed)
/// would keep its flows, and their places in `max_udp_flows_per_listener`, for ever. The
/// gateway ends a flow silent for the idle timeout (700 ms) plus 5 s itself and frees its place.
#[test]
fn a_stopped_agents_flow_is_ended_by_the_gateway_after_idle_timeout_plus_margin() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "[limits]\nmax_udp_flows_per_listener = 1\n");
    let public = free_port();
    // A slow heartbeat: the control channel must outlive the stop (dead after 3 x 20 s).
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener(
            "echo",
            public,
            echo.addr,
            "idle_timeout = \"700ms\"",
        )],
        "heartbeat = \"20s\"",
        "",
    );
    let s = client_on("127.0.0.1");
    ask_until(&s, local(public), b"one", Duration::from_secs(10));
    agent.signal("STOP");
    let stopped = Instant::now();
    // The agent's own timer cannot run; the flow holds the listener's only place.
    let other = client_on("127.0.0.2");
    assert_eq!(ask(&other, local(public), b"refused"), None);
    assert!(
        wait_until(Duration::from_secs(20), || flows(&gateway, "echo") == 0),
        "the gateway kept the stopped agent's flow: {}",
        udp_stats(&gateway, "echo")
    );
    let after = stopped.elapsed();
    assert!(
        after >= Duration::from_secs(4),
        "ended after {after:?}: before idle_timeout + 5 s"
    );
    let udp = udp_stats(&gateway, "echo");
    assert_eq!(udp["flows_idle_ended"], 1, "{udp}");
    assert!(udp["dropped"]["refused"].as_u64().unwrap() >= 1, "{udp}");
    // The place is free: another client's flow is admitted once the agent runs again.
    agent.signal("CONT");
    assert_eq!(
        ask_until(&other, local(public), b"two", Duration::from_secs(10)),
        b"echo:two"
    );
}

/// `client_rate` on datagrams: a flood at about 16 times the rate delivers about the rate's
/// worth (the bucket's 16 KiB burst plus 64 KiB/s), the rest dropped whole and counted
/// (`rate`), while another client's flow, with buckets of its own, gets every answer.
#[test]
fn client_rate_drops_a_floods_excess_and_another_flow_is_unaffected() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener(
            "echo",
            public,
            echo.addr,
            "client_rate = \"64KiB/s\"",
        )],
        "",
        "",
    );
    let flood = client_on("127.0.0.1");
    ask_until(&flood, local(public), b"ready?", Duration::from_secs(10));
    let other = client_on("127.0.0.2");
    ask_until(&other, local(public), b"ready?", Duration::from_secs(10));
    // Let the flood flow's bucket fill again, then forget what came so far.
    thread::sleep(Duration::from_millis(500));
    let _ = echo.received.try_iter().count();
    let datagram = vec![b'x'; 1000];
    let start = Instant::now();
    let flooder = thread::spawn(move || {
        // 1 MB/s for 3 s, in bursts of 10 datagrams every 10 ms.
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            for _ in 0..10 {
                flood.send_to(&datagram, local(public)).unwrap();
                sent += 1;
            }
            thread::sleep(Duration::from_millis(10));
        }
        (sent, start.elapsed())
    });
    for i in 0..20 {
        let q = format!("other {i}");
        let answer = ask(&other, local(public), q.as_bytes());
        assert_eq!(
            answer,
            Some(format!("echo:{q}").into_bytes()),
            "other client, {i}"
        );
    }
    let (sent, took) = flooder.join().unwrap();
    thread::sleep(Duration::from_millis(500));
    let flooded = echo
        .received
        .try_iter()
        .filter(|(_, d)| d.len() == 1000)
        .count() as f64;
    let expected = (16_384.0 + 65_536.0 * took.as_secs_f64()) / 1000.0;
    let udp = udp_stats(&gateway, "echo");
    eprintln!("sent {sent} in {took:?}, delivered {flooded}, expected about {expected:.0}: {udp}");
    assert!(
        flooded <= expected * 1.15 && flooded >= expected * 0.6,
        "delivered {flooded} datagrams of 1000 bytes, expected about {expected:.0}"
    );
    let rate = udp["dropped"]["rate"].as_u64().unwrap() as f64;
    assert!(
        rate >= sent as f64 * 0.5,
        "{rate} of {sent} dropped for the rate: {udp}"
    );
}

#[test]
fn oversize_datagrams_are_dropped_and_counted_and_boundaries_hold() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "[limits]\nmax_datagram = 1200\n");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener("echo", public, echo.addr, "")],
        "",
        "",
    );
    let s = client_on("127.0.0.1");
    let to = local(public);
    ask_until(&s, to, b"hi", Duration::from_secs(10));
    assert_eq!(
        ask(&s, to, &[7u8; 1201]),
        None,
        "an oversize datagram is not forwarded"
    );
    // Several datagrams in a burst keep their boundaries, empty ones included.
    let sizes = [1200usize, 0, 1, 513, 1000];
    for (i, n) in sizes.iter().enumerate() {
        s.send_to(&vec![i as u8; *n], to).unwrap();
    }
    let mut buf = vec![0u8; 70_000];
    for (i, n) in sizes.iter().enumerate() {
        let (got, _) = s.recv_from(&mut buf).expect("an echo per datagram");
        assert_eq!(got, 5 + n, "datagram {i}");
        assert!(buf[5..got].iter().all(|b| *b == i as u8));
    }
    let udp = udp_stats(&gateway, "echo");
    assert_eq!(udp["dropped"]["oversize"], 1, "{udp}");
    let got: Vec<usize> = echo.received.try_iter().map(|(_, d)| d.len()).collect();
    assert!(!got.contains(&1201), "the backend never saw it: {got:?}");
}

#[test]
fn proxy_v2_dgram_header_prefixes_the_first_datagram_only() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener(
            "echo",
            public,
            echo.addr,
            "proxy_protocol = \"v2\"",
        )],
        "",
        "",
    );
    let s = client_on("127.0.0.1");
    let me = s.local_addr().unwrap();
    ask_until(&s, local(public), b"first", Duration::from_secs(10));
    assert!(ask(&s, local(public), b"second").is_some());
    let got: Vec<Vec<u8>> = echo.received.try_iter().map(|(_, d)| d).collect();
    let first = got.iter().find(|d| d.ends_with(b"first")).unwrap();
    let header = ppp::v2::Header::try_from(first.as_slice()).expect("a PROXY v2 header");
    assert_eq!(header.protocol, ppp::v2::Protocol::Datagram);
    assert_eq!(first[13], 0x12, "AF_INET, DGRAM");
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            assert_eq!(SocketAddr::from((a.source_address, a.source_port)), me);
            assert_eq!(a.destination_port, public);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(&first[header.len()..], b"first");
    assert!(
        got.iter().any(|d| d == b"second"),
        "later datagrams carry no header: {got:?}"
    );
}

#[test]
fn client_rules_deny_an_address() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener(
            "echo",
            public,
            echo.addr,
            "clients.default = \"allow\"\nclients.except = [\"127.0.0.1\"]",
        )],
        "",
        "",
    );
    let allowed = client_on("127.0.0.2");
    ask_until(&allowed, local(public), b"ok", Duration::from_secs(10));
    let denied = client_on("127.0.0.1");
    assert_eq!(ask(&denied, local(public), b"no"), None);
    let udp = udp_stats(&gateway, "echo");
    assert!(udp["dropped"]["refused"].as_u64().unwrap() >= 1, "{udp}");
    assert!(echo.received.try_iter().all(|(_, d)| d != b"no"));
}

#[test]
fn a_control_channel_cut_closes_the_listener_and_ends_its_flows() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let relay = Relay::start(gateway.control);
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[relay.addr],
        &[udp_listener("echo", public, echo.addr, "")],
        "",
        "",
    );
    let s = client_on("127.0.0.1");
    ask_until(&s, local(public), b"before", Duration::from_secs(10));
    assert_eq!(flows(&gateway, "echo"), 1);
    // Control connections are reset; the data connection is left alone by the relay.
    relay.cut_control(Duration::from_secs(2));
    gateway
        .proc
        .wait_for_log("last agent gone", Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(5), || flows(&gateway, "echo") == 0),
        "the flow outlived its listener"
    );
    // The agent reconnects, the port opens again and new flows are served.
    let answer = ask_until(&s, local(public), b"after", Duration::from_secs(15));
    assert_eq!(answer, b"echo:after");
}

#[test]
fn a_ban_cuts_the_flow_and_refuses_new_ones_from_that_address() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[udp_listener("echo", public, echo.addr, "")],
        "",
        "",
    );
    let admin = agent_admin_url(&agent);
    let attacker = client_on("127.0.0.7");
    ask_until(&attacker, local(public), b"hi", Duration::from_secs(10));
    let innocent = client_on("127.0.0.8");
    ask_until(&innocent, local(public), b"hi", Duration::from_secs(10));
    assert_eq!(flows(&gateway, "echo"), 2);
    let out = Command::new(BIN)
        .args(["ban", "add", "127.0.0.7", "--admin", &admin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The attacker's live flow is cut, and its datagrams open no new one.
    assert!(
        wait_until(Duration::from_secs(5), || flows(&gateway, "echo") == 1),
        "the banned flow was not cut: {}",
        udp_stats(&gateway, "echo")
    );
    assert_eq!(ask(&attacker, local(public), b"again"), None);
    assert_eq!(
        ask(&innocent, local(public), b"still").unwrap(),
        b"echo:still"
    );
    let udp = udp_stats(&gateway, "echo");
    assert!(udp["dropped"]["refused"].as_u64().unwrap() >= 1, "{udp}");
}
