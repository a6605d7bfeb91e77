//! The agent's page in a real browser: tests/dashboard/agent.mjs drives Debian's headless
//! Chromium through playwright-core against a real agent (and a real gateway, a down one, real
//! backends) started here; and against an agent whose "gateway" is a hostile fake that puts
//! markup in the strings it sends, which the page must show as text.
//!
//! The tools come from scripts/test.sh; without them the test fails and says so.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sallyport::protocol::{
    ConfigResult, Connection, Heartbeat, HelloAck, ListenerResult, ListenerStatus, Message,
};
use support::servers::EchoServer;
use support::*;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

fn script_dir() -> PathBuf {
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

/// Runs `node agent.mjs ARGS` to the end; its output goes to the test's log.
fn run_script(args: &[&str]) {
    let script = script_dir().join("agent.mjs");
    let mut all = vec![script.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut proc = Proc::spawn_program("agent.mjs", "node", &all);
    let code = proc.wait_exit(SCRIPT_TIMEOUT);
    assert!(
        code == Some(0) && proc.log_lines().iter().any(|l| l == "PASS"),
        "agent.mjs failed (exit status {code:?}); its output is above"
    );
}

#[test]
fn agent_page_shows_each_gateway_listener_and_backend_and_reloads_with_the_token() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let down = local(free_port());
    let dead_backend = local(free_port());
    let (echo_port, dead_port, added_port) = (free_port(), free_port(), free_port());
    // Listener "pair": the echo server and a second backend that agent.mjs serves, then kills;
    // checked every 300 ms.
    let (pair_port, pair_backend) = (free_port(), free_port());
    let pair = || {
        let mut l = listener("pair", pair_port, echo.addr);
        l.backend = format!("[\"{}\", \"127.0.0.1:{pair_backend}\"]", echo.addr);
        l.extra = "health = { interval = \"300ms\", timeout = \"250ms\" }\n".into();
        l
    };
    let token = "agent-page-token-0123456789";
    let tables = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n"
    );
    let listeners = [
        listener("echo", echo_port, echo.addr),
        listener("dead", dead_port, dead_backend),
        pair(),
    ];
    let agent = start_agent(&dir, "agent", &[gw.control, down], &listeners, "", &tables);
    let url = agent_admin_url(&agent);
    wait_open(local(echo_port), Duration::from_secs(10));
    // The next configuration, applied only when the page's Reload asks for it.
    let mut next = agent_config_without_admin(
        &[gw.control, down],
        &[
            listener("echo", echo_port, echo.addr),
            listener("dead", dead_port, dead_backend),
            pair(),
            listener("added", added_port, echo.addr),
        ],
        "",
    );
    next.push_str(&tables);
    dir.write("agent.toml", &next);

    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/agent-page.png");
    let _ = std::fs::remove_file(&screenshot);
    run_script(&[
        "main",
        &url,
        &gw.control.to_string(),
        &down.to_string(),
        &echo_port.to_string(),
        &dead_port.to_string(),
        &dead_backend.to_string(),
        &added_port.to_string(),
        token,
        screenshot.to_str().unwrap(),
        &echo.addr.to_string(),
        &pair_backend.to_string(),
    ]);
    let reloads = agent
        .log_lines()
        .iter()
        .filter(|l| l.ends_with("admin API: reload"))
        .count();
    assert_eq!(reloads, 1, "one reload, from the page");
    assert!(
        agent.count_log("reload refused (missing or wrong credentials)") >= 1,
        "the first try had no token"
    );
    let png = std::fs::read(&screenshot).expect("the script saved no screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "the screenshot looks empty"
    );
    if std::env::var_os("SALLYPORT_UPDATE_DOCS").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/agent-page.png");
        std::fs::write(&docs, &png).unwrap();
    }
}

/// Markup an owned gateway might send to reach the operator's browser.
const HOSTILE: &str = "<img src=x onerror=\"window.__owned=1\"><b class=\"injected\">pwned</b>";

/// A fake gateway on `listener`: accepts agents' control channels (plaintext), answers the
/// hello, answers every push with listener `echo` failed for [`HOSTILE`] and a listener the
/// agent never pushed, then sends heartbeats.
async fn hostile_gateway(listener: tokio::net::TcpListener) {
    use tokio::io::AsyncReadExt;
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut magic = [0u8; 4];
            stream.read_exact(&mut magic).await?;
            let mut conn = Connection::new(stream, 1 << 20);
            let Message::Hello(_) = conn.expect_message().await? else {
                return Ok(());
            };
            conn.write_message(&Message::HelloAck(HelloAck {
                // Version 1: no session secret to send (the fake needs nothing of v2).
                version: 1,
                software: "<script>window.__owned=1</script>".into(),
                heartbeat_ms: 500,
                data_tls: false,
            }))
            .await?;
            let mut beat = tokio::time::interval(Duration::from_millis(500));
            let mut seq = 0;
            loop {
                tokio::select! {
                    msg = conn.expect_message() => {
                        if let Message::PushConfig(push) = msg? {
                            let failed = |name: &str| ListenerResult {
                                name: name.into(),
                                status: ListenerStatus::Failed { error: HOSTILE.into() },
                            };
                            conn.write_message(&Message::ConfigResult(ConfigResult {
                                generation: push.generation,
                                listeners: vec![failed("echo"), failed("<b class=\"injected\">ghost</b>")],
                            }))
                            .await?;
                        }
                    }
                    _ = beat.tick() => {
                        seq += 1;
                        conn.write_message(&Message::Heartbeat(Heartbeat { seq })).await?;
                    }
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        });
    }
}

#[test]
fn a_hostile_gateways_strings_are_shown_as_text() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let socket = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let fake = socket.local_addr().unwrap();
    runtime.spawn(hostile_gateway(socket));

    let dir = Workdir::new();
    let echo = EchoServer::start();
    let agent = start_agent(
        &dir,
        "agent",
        &[fake],
        &[listener("echo", free_port(), echo.addr)],
        "pool = 0",
        "",
    );
    let url = agent_admin_url(&agent);
    agent.wait_for_log("listener FAILED on the gateway", Duration::from_secs(10));
    run_script(&["hostile", &url, &fake.to_string(), HOSTILE]);
}
