//! Issue 17 item 1: bans owned by the inside. `sallyport ban` talks to the agent's admin API;
//! the agent keeps the list in its state file and pushes it to every gateway of its site, which
//! refuse the banned addresses at accept. Clients are real TCP connections from loopback
//! aliases (127.0.0.7 plays the attacker, 127.0.0.8 an innocent client).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use support::servers::EchoServer;
use support::*;

const ATTACKER: &str = "127.0.0.7";
const INNOCENT: &str = "127.0.0.8";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Whether a client from `source` gets a line echoed through `addr`. A banned one is reset at
/// accept: its read fails or ends at once.
fn served_from(source: &str, addr: SocketAddr) -> bool {
    let Ok(mut s) = connect_from(ip(source), addr) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut got = [0u8; 5];
    s.read_exact(&mut got).is_ok() && &got == b"ping\n"
}

/// Runs `sallyport ban ARGS --admin URL`; its stdout, after asserting success.
fn ban(admin: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("ban")
        .args(args)
        .args(["--admin", admin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sallyport ban {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls until `source` is refused through `addr`; how long that took.
fn time_until_refused(source: &str, addr: SocketAddr, limit: Duration) -> Duration {
    refused_since(Instant::now(), source, addr, limit)
}

/// Polls until `source` is refused through `addr`; the time since `start`.
fn refused_since(start: Instant, source: &str, addr: SocketAddr, limit: Duration) -> Duration {
    while served_from(source, addr) {
        assert!(
            start.elapsed() < limit,
            "{source} still served through {addr} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn site_listener(name: &str, port: u16, backend: SocketAddr) -> ListenerDef {
    // Without an IP: each gateway binds it on its own `[clients] bind` address.
    ListenerDef {
        public: port.to_string(),
        ..listener(name, port, backend)
    }
}

/// A ban reaches both gateways of the site within a second (measured from the moment the
/// command returns, and printed), refuses the attacker there and cuts its established
/// connection, leaves another address and another site's listener alone, is counted and shown
/// by the gateways, and lifts with `ban remove`.
#[test]
fn a_ban_refuses_the_address_on_every_gateway_of_the_site_only() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let g1 = start_gateway_named(&dir, "gw1", "");
    let g2 = start_gateway_named(&dir, "gw2", "[clients]\nbind = \"127.0.0.2\"\n");
    let port = free_port();
    let (a1_addr, a2_addr) = (local(port), SocketAddr::new(ip("127.0.0.2"), port));
    let agent = start_agent(
        &dir,
        "agent",
        &[g1.control, g2.control],
        &[site_listener("web", port, echo.addr)],
        "",
        "",
    );
    let admin = agent_admin_url(&agent);
    // Another site on gw1, whose agent bans the innocent address for its own site only.
    let other_port = free_port();
    let other_config = agent_config(
        &[g1.control],
        &[listener("other", other_port, echo.addr)],
        "name = \"other\"",
    )
    .replace("site = \"test-site\"", "site = \"other-site\"");
    let other_path = dir.write("other.toml", &other_config);
    let other = Proc::spawn(
        "other",
        &["agent", "--config", other_path.to_str().unwrap()],
    );
    let other_admin = agent_admin_url(&other);
    let other_addr = local(other_port);
    for addr in [a1_addr, a2_addr, other_addr] {
        wait_open(addr, Duration::from_secs(10));
        assert!(served_from(ATTACKER, addr) && served_from(INNOCENT, addr));
    }
    // An established connection from the attacker, through gw1.
    let mut established = connect_from(ip(ATTACKER), a1_addr).unwrap();
    established.write_all(b"hello\n").unwrap();
    let mut got = [0u8; 6];
    established.read_exact(&mut got).unwrap();

    let asked = Instant::now();
    let out = ban(&admin, &["add", ATTACKER, "--reason", "test: brute force"]);
    let returned = asked.elapsed();
    assert!(out.contains("banned 127.0.0.7/32"), "{out}");
    // From the moment `sallyport ban add` was started, the CLI's own start included.
    let on_g1 = refused_since(asked, ATTACKER, a1_addr, Duration::from_secs(5));
    let on_g2 = refused_since(asked, ATTACKER, a2_addr, Duration::from_secs(5));
    println!(
        "ban add -> refusal: the command took {} ms; refused on gw1 {} ms and on gw2 {} ms after it started",
        returned.as_millis(),
        on_g1.as_millis(),
        on_g2.as_millis()
    );
    assert!(on_g1 < Duration::from_secs(1) && on_g2 < Duration::from_secs(1));
    assert!(served_from(INNOCENT, a1_addr) && served_from(INNOCENT, a2_addr));
    // The other site is not touched by this site's ban ...
    assert!(served_from(ATTACKER, other_addr));
    // ... and its own ban does not reach this site.
    ban(&other_admin, &["add", INNOCENT]);
    time_until_refused(INNOCENT, other_addr, Duration::from_secs(5));
    assert!(served_from(INNOCENT, a1_addr) && served_from(INNOCENT, a2_addr));

    // The established connection was cut.
    established
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = [0u8; 16];
    let cut = matches!(established.read(&mut rest), Ok(0) | Err(_));
    assert!(
        cut,
        "the banned client's established connection still pipes"
    );

    // Counted, logged, and shown read-only by each gateway.
    let stats = g1.api("/api/stats");
    assert!(
        stats["refusals"]["banned"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    g1.proc.wait_for_log(
        "client refused: banned (127.0.0.7/32",
        Duration::from_secs(5),
    );
    let shown = g2.api("/api/bans");
    assert_eq!(shown[0]["site"], "test-site", "{shown}");
    assert_eq!(shown[0]["bans"][0]["net"], "127.0.0.7/32", "{shown}");
    assert_eq!(
        shown[0]["bans"][0]["reason"], "test: brute force",
        "{shown}"
    );
    let metrics = Command::new("curl")
        .args(["-s", &format!("{}/metrics", g1.admin_url())])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("sallyport_refusals_total{reason=\"banned\"}"),
        "{metrics}"
    );
    let listed = ban(&admin, &["list"]);
    assert!(
        listed.contains("127.0.0.7/32") && listed.contains("never"),
        "{listed}"
    );

    ban(&admin, &["remove", ATTACKER]);
    assert!(wait_until(Duration::from_secs(2), || served_from(
        ATTACKER, a1_addr
    ) && served_from(
        ATTACKER, a2_addr
    )));
}

/// The agent keeps its bans in `state_dir`: an agent restart and a gateway restart (which
/// forgets everything) bring them back. A `--for` ban lifts on the gateway on time even with no
/// agent of the site connected.
#[test]
fn bans_survive_restarts_and_expire_on_the_gateway_alone() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let control = local(free_port());
    let listen = format!("listen = \"{control}\"");
    let gw = start_gateway_with(&dir, "gw", &listen, "");
    let port = free_port();
    let public = local(port);
    let state = dir.path().join("state");
    let top = format!("state_dir = \"{}\"", state.display());
    let listeners = [listener("web", port, echo.addr)];
    let mut agent = start_agent(&dir, "agent", &[gw.control], &listeners, &top, "");
    let admin = agent_admin_url(&agent);
    wait_open(public, Duration::from_secs(10));
    ban(&admin, &["add", INNOCENT, "--for", "2s"]);
    ban(&admin, &["add", "127.0.0.4/30", "--reason", "kept"]);
    time_until_refused(INNOCENT, public, Duration::from_secs(5));
    time_until_refused(ATTACKER, public, Duration::from_secs(5));
    assert!(state.join("bans.json").exists());

    // No agent: the listener closes, the bans stay, and the timed one lifts on the gateway.
    agent.kill();
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || {
            let bans = gw.api("/api/bans");
            bans[0]["total"] == 1 && bans[0]["bans"][0]["net"] == "127.0.0.4/30"
        }),
        "the --for ban did not lift: {}",
        gw.api("/api/bans")
    );
    println!(
        "timed ban lifted on the gateway {} ms after its agent was gone",
        t0.elapsed().as_millis()
    );
    assert_eq!(gw.api("/api/status")["agents"], serde_json::json!([]));

    // The gateway restarts (it keeps nothing), then the agent: its state file brings the ban.
    drop(gw);
    let gw = start_gateway_with(&dir, "gw-again", &listen, "");
    assert_eq!(gw.api("/api/bans"), serde_json::json!([]));
    let _agent = start_agent(&dir, "agent-again", &[gw.control], &listeners, &top, "");
    wait_open(public, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || !served_from(
        ATTACKER, public
    )));
    assert!(served_from(INNOCENT, public), "the expired ban came back");
    let bans = gw.api("/api/bans");
    assert_eq!(bans[0]["bans"][0]["reason"], "kept", "{bans}");
}

/// Bad input to `sallyport ban` gets a clear error and changes nothing.
#[test]
fn bad_ban_requests_are_refused_clearly() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("web", free_port(), echo.addr)],
        "",
        "",
    );
    let admin = agent_admin_url(&agent);
    let fail = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("ban")
            .args(args)
            .args(["--admin", &admin])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(fail(&["add", "10.0.0.5/24"]).contains("did you mean 10.0.0.0/24"));
    assert!(fail(&["add", "not-an-ip"]).contains("not an IP address"));
    assert!(fail(&["add", "10.0.0.5", "--for", "soon"]).contains("for"));
    assert!(fail(&["remove", "10.0.0.9"]).contains("no ban for 10.0.0.9"));
    let out = ban(&admin, &["add", "10.0.0.5"]);
    assert!(out.contains("no state_dir"), "{out}");
    let listed = ban(&admin, &["list"]);
    assert!(listed.contains("1 ban(s)"), "{listed}");
}

/// CPU seconds (user + system) a process has used so far, from /proc (ticks of 10 ms).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After "(comm)": state is the first field; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// One storm's figures: gateway CPU µs per connection and connections per second.
struct StormCost {
    cpu_us: f64,
    rate: f64,
}

/// Runs `connect` `n` times in a row and measures the gateway's CPU over it.
fn storm(gw: &Gateway, n: usize, mut connect: impl FnMut()) -> StormCost {
    let cpu_before = cpu_secs(gw.proc.pid());
    let start = Instant::now();
    for _ in 0..n {
        connect();
    }
    let elapsed = start.elapsed();
    // Let the gateway finish what the last connections left it (log lines, closes).
    std::thread::sleep(Duration::from_millis(500));
    let cpu = cpu_secs(gw.proc.pid()) - cpu_before;
    StormCost {
        cpu_us: cpu * 1e6 / n as f64,
        rate: n as f64 / elapsed.as_secs_f64(),
    }
}

/// A gateway and an agent whose state file holds `extra` bans (10.x.y.z/32) besides the
/// attacker's; `n` connections from the banned attacker (refused at accept), then `n` from an
/// innocent address (checked against the same table, accepted and echoed one byte, closed
/// with a reset so no TIME_WAIT piles up). The gateway's CPU per connection for each.
fn storm_with_bans(extra: u32, n: usize) -> (StormCost, StormCost) {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut bans: Vec<serde_json::Value> = (0..extra)
        .map(|i| {
            let [_, b, c, d] = i.to_be_bytes();
            serde_json::json!({"net": format!("10.{b}.{c}.{d}/32"), "added": 0, "reason": "bulk"})
        })
        .collect();
    bans.push(serde_json::json!({"net": "127.0.0.7/32", "added": 0, "reason": "storm"}));
    let file = serde_json::json!({"version": 1, "bans": bans});
    std::fs::write(state.join("bans.json"), file.to_string()).unwrap();
    let port = free_port();
    let top = format!("state_dir = \"{}\"", state.display());
    let listeners = [listener("web", port, echo.addr)];
    let _agent = start_agent(&dir, "agent", &[gw.control], &listeners, &top, "");
    let public = local(port);
    wait_open(public, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(10), || !served_from(
        ATTACKER, public
    )));
    assert_eq!(gw.api("/api/bans")[0]["total"], extra as u64 + 1);
    let banned = || gw.api("/api/stats")["refusals"]["banned"].as_u64().unwrap();
    let before = banned();
    let refused = storm(&gw, n, || {
        let _ = connect_from(ip(ATTACKER), public);
    });
    assert!(
        wait_until(Duration::from_secs(10), || banned() - before >= n as u64),
        "{} of {n} storm connections counted as banned",
        banned() - before
    );
    let accepted = storm(&gw, n, || {
        let mut s = connect_from(ip(INNOCENT), public).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        s.read_exact(&mut got).unwrap();
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    assert_eq!(
        banned() - before,
        n as u64,
        "an innocent client was refused"
    );
    (refused, accepted)
}

/// Issue 17's storm figure: the ban check costs the same with 10,001 bans as with one. A storm
/// of 10,000 connections from a banned address (refused at accept), then 10,000 from an
/// innocent one (checked, accepted and served), with 1 and with 10,001 bans in the list; the
/// gateway's CPU per connection, printed. A measurement (minutes on a loaded machine), so
/// ignored by default:
/// `cargo nextest run --test bans --run-ignored only --no-capture storm`.
#[test]
#[ignore = "a measurement: run with --run-ignored only"]
fn a_storm_costs_the_same_with_10000_bans_as_with_one() {
    const N: usize = 10_000;
    let (one_refused, one_accepted) = storm_with_bans(0, N);
    let (many_refused, many_accepted) = storm_with_bans(10_000, N);
    for (what, one, many) in [
        ("refused (banned)", &one_refused, &many_refused),
        ("accepted (not banned)", &one_accepted, &many_accepted),
    ] {
        println!(
            "{N} connections {what}: 1 ban: {:.1} µs gateway CPU each, {:.0}/s; \
             10,001 bans: {:.1} µs each, {:.0}/s",
            one.cpu_us, one.rate, many.cpu_us, many.rate
        );
    }
    // Generous for a shared machine: a scan of 10,000 entries per accept would add tens of µs.
    assert!(
        many_refused.cpu_us < one_refused.cpu_us * 1.5 + 10.0,
        "10,001 bans: {:.1} µs per refusal instead of {:.1}",
        many_refused.cpu_us,
        one_refused.cpu_us
    );
    assert!(
        many_accepted.cpu_us < one_accepted.cpu_us * 1.5 + 10.0,
        "10,001 bans: {:.1} µs per accepted connection instead of {:.1}",
        many_accepted.cpu_us,
        one_accepted.cpu_us
    );
}
