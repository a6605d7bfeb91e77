//! The web dashboard in a real browser: tests/dashboard/dashboard.mjs drives Debian's headless
//! Chromium through playwright-core against a real gateway, agent and echo backend started here.
//!
//! The script does the clicking and its own TCP clients (node's `net`, 127.0.0.1 only); this
//! side owns the processes and starts the agent when the script asks ("READY-FOR-AGENT"), so the
//! page is seen first without an agent. The tools come from scripts/test.sh; without them the
//! test fails and says so rather than skipping.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::servers::{EchoServer, UdpEcho};
use support::*;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// tests/dashboard, after checking node, Chromium and node_modules are there.
fn dashboard_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard");
    let hint = "run scripts/test.sh, which installs node, npm and chromium (Debian packages) \
                and tests/dashboard/node_modules (npm ci --prefix tests/dashboard)";
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing ({node:?}): {hint}"
    );
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: {hint}"
    );
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "{}/node_modules/playwright-core is missing: {hint}",
        dir.display()
    );
    dir
}

/// Starts `node dashboard.mjs ARGS`; its stdout and stderr go to the Proc log.
fn start_script(args: &[&str]) -> Proc {
    let script = dashboard_dir().join("dashboard.mjs");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    Proc::spawn_program("dashboard.mjs", "node", &all)
}

/// Waits for a line from the script; fails at once if the script has exited instead.
fn wait_script_line(script: &mut Proc, line: &str, timeout: Duration) {
    let mut exited = None;
    let seen = wait_until(timeout, || {
        if script.log_lines().iter().any(|l| l == line) {
            return true;
        }
        exited = script.wait_exit(Duration::ZERO);
        exited.is_some()
    });
    assert!(
        seen && exited.is_none(),
        "dashboard.mjs did not print {line:?} (exit status {exited:?}); its output is above"
    );
}

/// How many of the gateway's log lines end with `text` ("admin API: pause", not "... refused").
fn lines_ending(proc: &Proc, text: &str) -> usize {
    proc.log_lines()
        .iter()
        .filter(|l| l.ends_with(text))
        .count()
}

/// Waits for the script to end and checks that it passed.
fn assert_script_passed(script: &mut Proc) {
    let code = script.wait_exit(SCRIPT_TIMEOUT);
    assert!(
        code == Some(0) && script.log_lines().iter().any(|l| l == "PASS"),
        "dashboard.mjs failed (exit status {code:?}); its output is above"
    );
}

#[test]
fn dashboard_shows_the_light_counters_and_controls_the_gateway() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let mut gw = start_gateway(&dir, "");
    let public = local(free_port());
    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png");
    let _ = std::fs::remove_file(&screenshot);

    let mut script = start_script(&[
        "main",
        &gw.admin_url(),
        &public.port().to_string(),
        screenshot.to_str().unwrap(),
    ]);
    // The page has shown the red light; now the agent may connect.
    wait_script_line(&mut script, "READY-FOR-AGENT", Duration::from_secs(60));
    // A listener on a port shared by host name: the page shows its names.
    let mut web = listener("web", free_port(), echo.addr);
    web.extra = "hostnames = [\"www.example.test\", \"*.example.org\"]".into();
    let _agent = start_agent(
        &dir,
        "test-agent",
        &[gw.control],
        &[listener("echo", public.port(), echo.addr), web],
        "",
        "",
    );
    assert_script_passed(&mut script);

    // The Stop button stopped the gateway for real, gracefully.
    assert_eq!(
        gw.proc.wait_exit(Duration::from_secs(10)),
        Some(0),
        "the gateway exits 0 after the dashboard's Stop"
    );
    for action in ["pause", "resume", "stop"] {
        assert_eq!(
            lines_ending(&gw.proc, &format!("admin API: {action}")),
            1,
            "one {action} call from the dashboard"
        );
    }

    // The screenshot is a test artifact; with SALLYPORT_UPDATE_DOCS=1 it also becomes the
    // picture in docs/operations.md (not on every run: that would dirty the checkout).
    let png = std::fs::read(&screenshot).expect("the script saved no screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "the screenshot looks empty"
    );
    if std::env::var_os("SALLYPORT_UPDATE_DOCS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
        std::fs::write(&docs, &png).unwrap();
    }
}

#[test]
fn dashboard_asks_for_the_admin_token_and_keeps_it_for_the_tab() {
    let dir = Workdir::new();
    let token = "dashboard-admin-token-0123";
    let gw = start_gateway(
        &dir,
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n"),
    );
    let mut script = start_script(&["token", &gw.admin_url(), token]);
    assert_script_passed(&mut script);

    // What the gateway saw: refusals without and with a wrong token, then the actions.
    assert!(
        gw.proc.count_log("pause refused") >= 3,
        "expected refused pause calls (no token, wrong token, after clearing the tab's token)"
    );
    assert_eq!(lines_ending(&gw.proc, "admin API: pause"), 1);
    assert_eq!(lines_ending(&gw.proc, "admin API: resume"), 1);
}

/// A UDP listener's panel: a real flow through the gateway (node's dgram client, the UDP echo
/// backend here) shows as one flow, datagrams each way and an `oversize` drop.
#[test]
fn dashboard_shows_udp_flows_datagrams_and_drops() {
    let dir = Workdir::new();
    let echo = UdpEcho::start();
    let gw = start_gateway(&dir, "[limits]\nmax_datagram = 1200\n");
    let public = free_port();
    let mut udp = listener("echo", public, echo.addr);
    udp.extra = "protocol = \"udp\"".into();
    let _agent = start_agent(&dir, "test-agent", &[gw.control], &[udp], "", "");
    let mut script = start_script(&["udp", &gw.admin_url(), &public.to_string()]);
    assert_script_passed(&mut script);
    // The backend got the flow's datagrams (the first may have been retried), never the
    // oversize one.
    let got: Vec<_> = echo.received.try_iter().map(|(_, d)| d.len()).collect();
    assert!(got.len() >= 5 && !got.contains(&1300), "{got:?}");
}
