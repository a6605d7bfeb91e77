//! Behaviour at scale (issue 13 item 14), with the real binary: a config push larger than
//! `max_frame` is explained on both sides and not retried in a loop; 5,000 listeners open and
//! close with one INFO line per site (each listener's line at DEBUG); the admin API answers fast
//! at 5,000 listeners and filters by site; a 16,000-listener agent.toml validates fast.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// `count` listeners with names of 60 characters on consecutive ports from `base`.
fn many_listeners(count: u16, base: u16, ip: &str) -> Vec<ListenerDef> {
    (0..count)
        .map(|i| ListenerDef {
            name: format!("listener-with-a-rather-long-descriptive-name-number-{i:08}"),
            public: format!("{ip}:{}", base + i),
            backend: "127.0.0.1:9".to_string(),
            extra: String::new(),
        })
        .collect()
}

/// Lines of `proc`'s log at INFO level that contain `needle`.
fn info_lines(proc: &Proc, needle: &str) -> usize {
    proc.log_lines()
        .iter()
        .filter(|l| l.contains(" INFO ") && l.contains(needle))
        .count()
}

/// One HTTP GET over a plain socket: (status line, body length, time to the last byte).
fn timed_get(admin: std::net::SocketAddr, path: &str) -> (String, usize, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(admin).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.len(),
        took,
    )
}

#[test]
fn a_push_over_the_agents_max_frame_is_explained_once_and_not_retried() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let listeners = many_listeners(14_000, 20_000, "127.0.0.1");
    let agent = start_agent(&dir, "agent", &[gw.control], &listeners, "", "");
    let line = agent.wait_for_log("exceeds max_frame 1048576", Duration::from_secs(30));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("(14000 listeners)"), "{line}");
    assert!(
        line.contains("not retrying until the configuration changes"),
        "{line}"
    );
    let gw_line = gw
        .proc
        .wait_for_log("cannot push its config", Duration::from_secs(10));
    assert!(gw_line.contains("ERROR"), "{gw_line}");
    assert!(gw_line.contains("exceeds max_frame 1048576"), "{gw_line}");
    assert!(gw_line.contains("14000 listeners"), "{gw_line}");
    // The harness's reconnect delays are 100 ms to 1 s: a loop would have retried many times.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(agent.count_log("exceeds max_frame"), 1);
    assert_eq!(gw.proc.count_log("cannot push its config"), 1);
    assert_eq!(gw.proc.count_log("connection closed by peer"), 0);
}

#[test]
fn a_push_over_the_gateways_max_frame_is_explained_on_both_sides() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "[limits]\nmax_frame = 1048576\n");
    let listeners = many_listeners(14_000, 20_000, "127.0.0.1");
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &listeners,
        "max_frame = 4194304",
        "\n[reconnect]\ninitial = \"100ms\"\nmax = \"2s\"\n",
    );
    let gw_line = gw
        .proc
        .wait_for_log("exceeds max_frame 1048576", Duration::from_secs(30));
    assert!(gw_line.contains("ERROR"), "{gw_line}");
    assert!(gw_line.contains("push of "), "{gw_line}");
    assert!(gw_line.contains("from agent \"test-agent\""), "{gw_line}");
    let line = agent.wait_for_log(
        "the gateway refused the config push",
        Duration::from_secs(10),
    );
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("(14000 listeners)"), "{line}");
    assert!(line.contains("max_frame 1048576"), "{line}");
    // Once per attempt, backing off (100 ms doubling to `reconnect.max` 2 s, equal jitter: at
    // least half of each step), not every 100 ms. Even attempts that cost nothing would be at
    // 0, 0.05, 0.15, 0.35, 0.75, 1.55, 2.55, 3.55, 4.55 s and later at the earliest: at most 10
    // in the ~6 s watched; every 100 ms would be about 60. (A bound of 4 assumed each 14,000-
    // listener push takes about a second, and failed at 5 on a faster moment.)
    std::thread::sleep(Duration::from_secs(5));
    let attempts = gw.proc.count_log("exceeds max_frame 1048576");
    assert!(
        (1..=10).contains(&attempts),
        "{attempts} attempts in about 5 s"
    );
    assert_eq!(
        agent.count_log("the gateway refused the config push"),
        attempts
    );
}

#[test]
fn five_thousand_listeners_open_and_close_with_one_info_line_and_a_fast_api() {
    let dir = Workdir::new();
    let base = 21_000;
    let gw = start_gateway(
        &dir,
        "[clients]\nbind = \"127.0.13.1\"\n\n[limits]\nmax_listen_ports = 6000\nmax_listen_ports_per_site = 6000\n",
    );
    let listeners: Vec<ListenerDef> = many_listeners(5_000, base, "127.0.13.1");
    let mut agent = start_agent(&dir, "agent", &[gw.control], &listeners, "", "");
    let opened = format!(
        "opened 5000 listeners (ports {base}-{}) for site test-site",
        base + 4999
    );
    gw.proc.wait_for_log(&opened, Duration::from_secs(60));
    agent.wait_for_log(
        "5000 listener(s) open on the gateway",
        Duration::from_secs(30),
    );
    wait_open(local_on("127.0.13.1", base + 4999), Duration::from_secs(5));
    assert_eq!(info_lines(&gw.proc, "listening on 127.0.13.1"), 0);
    assert!(
        gw.proc.count_log("listening on 127.0.13.1") >= 5000,
        "DEBUG lines kept"
    );
    assert_eq!(info_lines(&agent, "listener open on the gateway"), 0);

    // The admin API at 5,000 listeners: one request each, timed.
    let admin = gw.admin.unwrap();
    for path in ["/api/stats", "/metrics", "/api/status"] {
        let (status, len, took) = timed_get(admin, path);
        eprintln!("{path}: {status}, {len} bytes in {} ms", took.as_millis());
        assert!(status.contains("200"), "{path}: {status}");
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
    }
    let site = gw.api("/api/status?site=test-site");
    assert_eq!(site["listeners"].as_array().map(Vec::len), Some(5000));
    let other = gw.api("/api/status?site=no-such-site");
    assert_eq!(other["listeners"].as_array().map(Vec::len), Some(0));
    assert_eq!(other["agents"].as_array().map(Vec::len), Some(0));

    // A control-channel drop: one summary line, not 5,000.
    agent.kill();
    let closed = format!(
        "closed 5000 listeners (ports {base}-{}) for site test-site: no agent of the site is connected",
        base + 4999
    );
    gw.proc.wait_for_log(&closed, Duration::from_secs(60));
    assert_eq!(info_lines(&gw.proc, "closing listener"), 0);
    wait_refused(local_on("127.0.13.1", base), Duration::from_secs(5));
}

fn local_on(ip: &str, port: u16) -> std::net::SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// `sallyport agent --check-config` on a file of `count` listeners: how long it took.
fn check_config_time(dir: &Workdir, count: u16) -> Duration {
    let listeners = many_listeners(count, 20_000, "127.0.0.1");
    let text = agent_config(&[local(44500)], &listeners, "");
    let path = dir.write(&format!("agent-{count}.toml"), &text);
    let started = Instant::now();
    let out = std::process::Command::new(BIN)
        .args([
            "agent",
            "--config",
            path.to_str().unwrap(),
            "--check-config",
        ])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

#[test]
fn sixteen_thousand_listeners_validate_in_linear_time() {
    let dir = Workdir::new();
    let small = check_config_time(&dir, 2_000);
    let large = check_config_time(&dir, 16_000);
    eprintln!(
        "--check-config: 2,000 listeners in {} ms, 16,000 in {} ms",
        small.as_millis(),
        large.as_millis()
    );
    assert!(
        large < Duration::from_secs(2),
        "16,000 listeners: {large:?}"
    );
    // The ratio is printed, not asserted: on a loaded machine it went from 10x to 43x between
    // runs (the whole process is timed, TOML parsing included), too noisy for a bound.
}
