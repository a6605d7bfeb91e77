//! Operations: exact counters in /api/stats and /metrics (checked by promtool), pause, resume,
//! stop with drain, restart, the admin token, gateway reload, `status` and `ctl`.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::servers::{echo_transfer, EchoServer, ReplyAfterEofServer};
use support::*;

/// Runs the real curl against the admin API; returns (HTTP status, body).
fn http(method: &str, url: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method, url]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn get_json(gw: &Gateway, path: &str) -> Value {
    let (code, body) = http("GET", &format!("{}{path}", gw.admin_url()), &[]);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn ctl(gw: &Gateway, action: &str, token: Option<&str>) -> (bool, String) {
    let mut args = vec![
        "ctl".to_string(),
        action.to_string(),
        "--admin".into(),
        gw.admin_url(),
    ];
    if let Some(t) = token {
        args.extend(["--token".into(), t.to_string()]);
    }
    let out = Command::new(BIN)
        .args(&args)
        .env_remove("SALLYPORT_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn light(gw: &Gateway) -> String {
    get_json(gw, "/api/status")["light"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn counters_are_exact_in_the_api_and_in_metrics() {
    let dir = Workdir::new();
    let backend = ReplyAfterEofServer::start(vec![b'r'; 3000]);
    let gw = start_gateway(&dir, "");
    let port = free_port();
    let mut web = listener("web", port, backend.addr);
    web.extra = r#"clients = { default = "allow", except = ["127.0.0.8"] }"#.into();
    let agent = start_agent(&dir, "agent", &[gw.control], &[web], "", "");
    // Wait on the agent's log, not by connecting: probes would count as clients.
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));

    let mut sent = 0u64;
    for i in 0..5u64 {
        let mut c = TcpStream::connect(local(port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = pseudo_random(1000 + i as usize, i);
        c.write_all(&request).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), 3000);
        sent += request.len() as u64;
    }
    for _ in 0..3 {
        if let Ok(mut c) = connect_from("127.0.0.8".parse().unwrap(), local(port)) {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = c.read(&mut [0u8; 1]);
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let t = &get_json(&gw, "/api/stats")["totals"];
            t["closed"] == 5 && t["rejected"] == 3
        }),
        "stats never settled: {}",
        get_json(&gw, "/api/stats")["totals"]
    );
    let stats = get_json(&gw, "/api/stats");
    let t = &stats["totals"];
    assert_eq!(
        (
            t["accepted"].as_u64(),
            t["active"].as_u64(),
            t["pending"].as_u64()
        ),
        (Some(5), Some(0), Some(0))
    );
    assert_eq!(t["bytes"]["client_read"].as_u64(), Some(sent));
    assert_eq!(t["bytes"]["agent_written"].as_u64(), Some(sent));
    assert_eq!(t["bytes"]["client_written"].as_u64(), Some(15_000));
    assert_eq!(t["bytes"]["agent_read"].as_u64(), Some(15_000));
    assert_eq!(stats["refusals"]["client_rules"].as_u64(), Some(3));
    // Every refusal key the API reports is documented where operators look for alert names.
    let ops = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    for key in stats["refusals"].as_object().unwrap().keys() {
        assert!(
            ops.contains(&format!("`{key}`")),
            "refusal key {key} is not documented in docs/operations.md"
        );
    }
    let l = &stats["listeners"][0];
    assert_eq!(
        (l["site"].as_str(), l["name"].as_str()),
        (Some("test-site"), Some("web"))
    );
    assert_eq!(l["accepted"], t["accepted"]);
    assert_eq!(l["bytes"], t["bytes"]);
    assert_eq!(stats["agents"].as_u64(), Some(1));

    let (code, metrics) = http("GET", &format!("{}/metrics", gw.admin_url()), &[]);
    assert_eq!(code, 200);
    let labels = r#"{site="test-site",listener="web"}"#;
    for (name, value) in [
        ("sallyport_clients_accepted_total", 5),
        ("sallyport_clients_rejected_total", 3),
        ("sallyport_clients_closed_total", 5),
        ("sallyport_client_bytes_read_total", sent),
        ("sallyport_client_bytes_written_total", 15_000),
        ("sallyport_agent_bytes_read_total", 15_000),
        ("sallyport_agent_bytes_written_total", sent),
        ("sallyport_clients_active", 0),
    ] {
        let line = format!("{name}{labels} {value}");
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(metrics.contains("sallyport_agents_connected{site=\"test-site\"} 1"));
    assert!(metrics.contains("sallyport_state{state=\"running\"} 1"));
    // Memory, split so a leak (allocated heap grows) shows apart from code pages and from what
    // the allocator keeps: the gateway's own figures, which must match what the kernel says.
    let value = |key: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{metrics}"))
    };
    let anon = value("sallyport_resident_memory_bytes{kind=\"anonymous\"}");
    let file = value("sallyport_resident_memory_bytes{kind=\"file\"}");
    let allocated = value("sallyport_heap_bytes{state=\"allocated\"}");
    // (VmRSS is anonymous + file + shared memory; the gateway has no shared memory.)
    let rss = anon + file;
    assert!(anon > 0.0 && file > 1e6, "{anon} {file}");
    assert!(
        allocated > 10e3 && allocated < rss,
        "allocated {allocated}, rss {rss}"
    );
    let kernel_rss: f64 = std::fs::read_to_string(format!("/proc/{}/status", gw.proc.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap();
    assert!(
        (rss / 1024.0 - kernel_rss).abs() < kernel_rss * 0.5,
        "metrics say {rss} B resident, /proc says {kernel_rss} kB"
    );
    // The real promtool from Debian's prometheus package lints the exposition.
    assert!(
        std::path::Path::new("/usr/bin/promtool").exists(),
        "promtool is missing: run scripts/test.sh"
    );
    let (ok, lint) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(metrics.as_bytes());
    assert!(ok, "promtool check metrics failed:\n{lint}");

    // An open connection shows up in /api/connections with its real address and bytes.
    let echo_like = TcpStream::connect(local(port)).unwrap();
    let me = echo_like.local_addr().unwrap();
    (&echo_like).write_all(b"hello").unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        get_json(&gw, "/api/connections")
            .as_array()
            .unwrap()
            .iter()
            .any(|c| {
                c["client"] == me.to_string()
                    && c["bytes"]["client_read"] == 5
                    && c["listener"] == "web"
            })
    }));
}

/// `Command::output` with bytes on stdin; returns (success, stdout + stderr).
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String);
}

impl OutputWithStdin for Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> (bool, String) {
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

#[test]
fn pause_keeps_transfers_and_agents_resume_reopens_restart_brings_agents_back() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(3), || light(&gw) == "green"));

    // A transfer of 8 MiB paced over about 2.5 s, across the pause.
    let data = Arc::new(pseudo_random(8 * 1024 * 1024, 5));
    let want = sha256_hex(&data);
    let stream = TcpStream::connect(public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let transfer = std::thread::spawn(move || {
        echo_transfer(stream, data, 64 * 1024, Duration::from_millis(20))
    });
    std::thread::sleep(Duration::from_millis(300));

    let (ok, out) = ctl(&gw, "pause", None);
    assert!(ok && out.contains("state: paused"), "{out}");
    wait_refused(public, Duration::from_secs(3));
    assert_eq!(light(&gw), "amber");
    let status = get_json(&gw, "/api/status");
    assert_eq!(status["state"], "paused");
    assert_eq!(
        status["agents"].as_array().unwrap().len(),
        1,
        "agents stay connected while paused"
    );
    assert_eq!(status["listeners"][0]["state"], "paused");

    let back = transfer
        .join()
        .unwrap()
        .expect("the established transfer failed during the pause");
    assert_eq!(sha256_hex(&back), want);

    let (ok, out) = ctl(&gw, "resume", None);
    assert!(ok && out.contains("state: running"), "{out}");
    wait_open(public, Duration::from_secs(3));
    echo_round_trip(public, "after resume");
    assert_eq!(light(&gw), "green");

    // Restart: everything drops, the gateway starts again, the agent comes back by itself.
    let (ok, out) = ctl(&gw, "restart", None);
    assert!(ok, "{out}");
    gw.proc
        .wait_for_log("restarting the gateway", Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(15), || gw
            .proc
            .count_log("agent connected (")
            >= 2),
        "the agent did not come back after the restart"
    );
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "after restart");
}

#[test]
fn stop_drains_established_connections_then_exits() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let mut gw = start_gateway(&dir, "[limits]\ndrain_timeout = \"20s\"\n");
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    wait_open(public, Duration::from_secs(10));

    let data = Arc::new(pseudo_random(4 * 1024 * 1024, 6));
    let want = sha256_hex(&data);
    let stream = TcpStream::connect(public).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let transfer = std::thread::spawn(move || {
        echo_transfer(stream, data, 64 * 1024, Duration::from_millis(25))
    });
    std::thread::sleep(Duration::from_millis(300));

    // SIGTERM is the same graceful stop as `ctl stop`.
    gw.proc.signal("TERM");
    wait_refused(public, Duration::from_secs(3));
    let back = transfer
        .join()
        .unwrap()
        .expect("the draining transfer failed");
    assert_eq!(
        sha256_hex(&back),
        want,
        "the drained transfer must be intact"
    );
    assert_eq!(
        gw.proc.wait_exit(Duration::from_secs(10)),
        Some(0),
        "the gateway exits 0 after draining"
    );
    gw.proc
        .wait_for_log("gateway stopped", Duration::from_secs(1));
}

#[test]
fn mutating_calls_need_the_token_and_the_csrf_header() {
    let dir = Workdir::new();
    let token = "s3cret-admin-token-0123";
    let gw = start_gateway(
        &dir,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"),
    );
    let url = format!("{}/api/pause", gw.admin_url());
    let (code, body) = http("POST", &url, &["X-Requested-By: test"]);
    assert_eq!(code, 401, "{body}");
    let (code, _) = http(
        "POST",
        &url,
        &[
            "X-Requested-By: test",
            "Authorization: Bearer wrong-token-0000000",
        ],
    );
    assert_eq!(code, 401);
    let (code, body) = http("POST", &url, &[&format!("Authorization: Bearer {token}")]);
    assert_eq!(
        code, 403,
        "without X-Requested-By a browser page elsewhere could call it: {body}"
    );
    assert_eq!(
        get_json(&gw, "/api/status")["state"],
        "running",
        "GET needs no token, and nothing changed"
    );
    let (code, body) = http(
        "POST",
        &url,
        &[
            "X-Requested-By: test",
            &format!("Authorization: Bearer {token}"),
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(get_json(&gw, "/api/status")["state"], "paused");

    let (ok, out) = ctl(&gw, "resume", None);
    assert!(!ok && out.contains("401 unauthorized"), "{out}");
    let (ok, out) = ctl(&gw, "resume", Some(token));
    assert!(ok && out.contains("state: running"), "{out}");
}

#[test]
fn gateway_reload_applies_peers_and_limits_and_keeps_connections() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    let mut held = TcpStream::connect(public).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"one").unwrap();
    let mut got = [0u8; 3];
    held.read_exact(&mut got).unwrap();

    // Same control and admin addresses; new peer rules and a per-IP limit of 1.
    let config = format!(
        "[control]\nlisten = \"{}\"\n\n[clients]\nbind = \"127.0.0.1\"\n\n[admin]\nlisten = \"{}\"\n\n\
         [peers]\ndefault = \"allow\"\nexcept = [\"127.0.0.3\"]\n\n[limits]\nmax_connections_per_ip = 1\n",
        gw.control,
        gw.admin.unwrap()
    );
    dir.write("gateway.toml", &config);
    gw.proc.signal("HUP");
    gw.proc.wait_for_log(
        "reload: gateway configuration applied",
        Duration::from_secs(5),
    );

    // The held connection lives on; it is the one connection 127.0.0.1 may have now.
    held.write_all(b"two").unwrap();
    held.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"two");
    let mut second = TcpStream::connect(public).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(
        matches!(second.read(&mut [0u8; 1]), Ok(0) | Err(_)),
        "the per-IP limit of 1 must apply"
    );
    // The new peer rules apply to new agents.
    let denied = start_agent(
        &dir,
        "denied",
        &[gw.control],
        &[listener("other", free_port(), echo.addr)],
        "source_ip = \"127.0.0.3\"",
        "",
    );
    denied.wait_for_log("peer denied", Duration::from_secs(5));
    // The agent's own control channel was not disturbed.
    assert_eq!(gw.proc.count_log("agent session ended"), 0);
}

#[test]
fn status_prints_the_tables() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "something to count");
    let out = Command::new(BIN)
        .args(["status", "--admin", &gw.admin_url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("RUNNING (green)"), "{text}");
    assert!(
        text.contains("Agents (1)") && text.contains("test-agent"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains(" echo "))
        .expect("a listener row");
    assert!(
        row.contains("listening") && row.contains(&public.to_string()),
        "{row}"
    );
    assert!(text.contains("client read"), "{text}");
    // Unreachable admin API: a clear error, non-zero exit.
    let out = Command::new(BIN)
        .args(["status", "--admin", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin API"));
}

/// A SOCKS5 CONNECT (no authentication) to an IPv4 address; the reply code and the stream.
fn socks5_connect_ip(proxy: std::net::SocketAddr, to: std::net::SocketAddr) -> (u8, TcpStream) {
    let std::net::IpAddr::V4(ip) = to.ip() else {
        panic!("IPv4 only")
    };
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).unwrap();
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&to.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    (reply[1], s)
}

/// The number in `column` of a `status` table row, by header position.
fn column(header: &str, row: &str, name: &str) -> u64 {
    let start = header.find(name).unwrap();
    row[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number under {name} in {row:?}"))
}

/// Issue 13 item 11: the listener table of `sallyport status` adds up to its totals, the
/// agents' outbound proxy traffic included (its "(outbound)" row was missing), and clients
/// refused by `max_connections_per_ip` count in their listener's `rejected`.
#[test]
fn status_rows_add_up_to_the_totals_with_outbound_and_limit_refusals() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let partner = EchoServer::start();
    let gw = start_gateway(
        &dir,
        &format!(
            "[egress]\nallow = [\"{}\"]\n\n[limits]\nmax_connections_per_ip = 1\n",
            partner.addr
        ),
    );
    let public = local(free_port());
    let proxy = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));

    // One client through the listener, held open; a second from the same address is refused.
    let mut held = TcpStream::connect(public).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    held.write_all(b"x").unwrap();
    held.read_exact(&mut [0u8; 1]).unwrap();
    let mut refused = TcpStream::connect(public).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(matches!(refused.read(&mut [0u8; 1]), Ok(0) | Err(_)));
    // Two outbound connections through the agent's SOCKS5 proxy.
    for _ in 0..2 {
        let (code, mut s) = socks5_connect_ip(proxy, partner.addr);
        assert_eq!(code, 0, "SOCKS5 CONNECT to an allowed destination");
        s.write_all(b"out").unwrap();
        let mut got = [0u8; 3];
        s.read_exact(&mut got).unwrap();
    }
    drop(held);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let t = &get_json(&gw, "/api/stats")["totals"];
            t["active"] == 0 && t["accepted"] == 3
        }),
        "{}",
        get_json(&gw, "/api/stats")["totals"]
    );
    let stats = get_json(&gw, "/api/stats");
    let echo_stats = stats["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "echo")
        .unwrap();
    assert_eq!(
        echo_stats["rejected"], 1,
        "a client refused by max_connections_per_ip counts as rejected: {echo_stats}"
    );

    let out = Command::new(BIN)
        .args(["status", "--admin", &gw.admin_url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let header_at = lines
        .iter()
        .position(|l| l.contains("LISTENER") && l.contains("ACCEPTED"))
        .unwrap();
    let header = lines[header_at];
    let rows: Vec<&str> = lines[header_at + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .copied()
        .collect();
    assert!(
        rows.iter().any(|r| r.contains("(outbound)")),
        "no (outbound) row:\n{text}"
    );
    let totals = lines.iter().find(|l| l.starts_with("Clients:")).unwrap();
    let total = |what: &str| -> u64 {
        let at = totals.find(what).unwrap();
        totals[..at]
            .rsplit([' ', ','])
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    for (col, word) in [
        ("ACCEPTED", "accepted"),
        ("REJECTED", "rejected"),
        ("CLOSED", "closed"),
    ] {
        let sum: u64 = rows.iter().map(|r| column(header, r, col)).sum();
        assert_eq!(sum, total(word), "{col} rows do not add up:\n{text}");
    }
    assert_eq!(total("accepted"), 3, "{text}");
}
