//! The agent's admin server (issue 16 part 1), through the real binary, curl and promtool: what
//! `/api/status`, `/api/stats` and `/metrics` say about gateways that are up and down, listeners
//! that opened and failed, backends that answer and do not; `POST /api/reload` with the same
//! credentials rules as the gateway's mutating calls, doing what SIGHUP does; `sallyport status`
//! against either daemon saying which one it talks to; the `[admin]` defaults.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::servers::EchoServer;
use support::*;

/// Runs the real curl; returns (HTTP status, body).
fn http(method: &str, url: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]);
    cmd.args(["-X", method, url]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn get_json(base: &str, path: &str) -> Value {
    let (code, body) = http("GET", &format!("{base}{path}"), &[]);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// The entry of `/api/status` `gateways` for `name` (as configured).
fn gateway_entry(status: &Value, name: &str) -> Value {
    status["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["gateway"] == name)
        .unwrap_or_else(|| panic!("no gateway {name} in {status:#}"))
        .clone()
}

fn listener_at(gateway: &Value, name: &str) -> Value {
    gateway["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {gateway:#}"))
        .clone()
}

fn stats_of(stats: &Value, name: &str) -> Value {
    stats["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {stats:#}"))
        .clone()
}

/// The value of one sample line `name{labels} value` in a Prometheus exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn promtool_check(metrics: &str) {
    assert!(
        std::path::Path::new("/usr/bin/promtool").exists(),
        "promtool is missing: run scripts/test.sh (Debian package prometheus)"
    );
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics is not clean:\n{}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `request`, half-closes, reads the echo back; returns the bytes received.
fn echo_exchange(public: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(public).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    back
}

#[test]
fn agent_api_reports_gateways_listeners_backends_and_exact_counters() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    // Mutual TLS, so the agent has a TLS version and a verified name to show.
    let gw = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
        "",
    );
    // A gateway that is down: nothing listens there.
    let down = local(free_port());
    // A backend that is down, and a public port the gateway cannot open (taken here).
    let dead_backend = local(free_port());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let (echo_port, dead_port) = (free_port(), free_port());
    let listeners = [
        listener("echo", echo_port, echo.addr),
        listener("dead", dead_port, dead_backend),
        listener("blocked", taken.local_addr().unwrap().port(), echo.addr),
    ];
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control, down],
        &listeners,
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    let api = agent_admin_url(&agent);
    let (gw_name, down_name) = (gw.control.to_string(), down.to_string());
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = get_json(&api, "/api/status");
            listener_at(&gateway_entry(&s, &gw_name), "echo")["state"] == "open"
                && gateway_entry(&s, &down_name)["reconnect_attempts"].as_u64() >= Some(2)
        }),
        "the agent never reported the echo listener open: {:#}",
        get_json(&api, "/api/status")
    );

    // Traffic with known sizes: three echoed clients, two whose backend is down.
    let mut sent = 0;
    for i in 0..3 {
        let request = pseudo_random(1000 + i * 77, i as u64);
        assert_eq!(echo_exchange(local(echo_port), &request), request);
        sent += request.len() as u64;
    }
    for _ in 0..2 {
        let mut c = TcpStream::connect(local(dead_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.read(&mut [0u8; 1]);
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = get_json(&api, "/api/stats");
            stats_of(&s, "echo")["served"] == 3
                && stats_of(&s, "echo")["active"] == 0
                && stats_of(&s, "dead")["backend_failures"] == 2
        }),
        "agent stats never settled: {:#}",
        get_json(&api, "/api/stats")
    );

    // Status: which daemon, the light, each gateway, each listener on each gateway.
    let status = get_json(&api, "/api/status");
    assert_eq!(status["daemon"], "agent");
    assert_eq!(
        (status["site"].as_str(), status["agent"].as_str()),
        (Some("test-site"), Some("test-agent"))
    );
    assert_eq!(status["light"], "amber", "one of two gateways is down");
    let up = gateway_entry(&status, &gw_name);
    assert_eq!(up["connected"], true);
    assert_eq!(up["light"], "amber", "a listener failed there");
    assert_eq!(up["addr"], gw_name);
    assert_eq!(up["tls"]["version"], "TLS 1.3");
    assert_eq!(up["tls"]["server_name"], "127.0.0.1");
    assert_eq!(up["data_tls"], true);
    assert!(up["connected_seconds"].as_u64().is_some(), "{up:#}");
    let rtt = up["rtt_ms"].as_f64().expect("a round-trip time");
    assert!((0.0..1000.0).contains(&rtt), "loopback round trip {rtt} ms");
    assert_eq!(up["reconnect_attempts"], 0);
    assert_eq!(up["last_error"], Value::Null);
    // The default pool: four idle connections whatever the traffic, every client counted as a
    // hit or a miss.
    let pool = &up["pool"];
    assert_eq!(pool["size"], 4, "the default warm pool: {up:#}");
    assert_eq!(
        (pool["min"].as_u64(), pool["max"].as_u64()),
        (Some(4), Some(4)),
        "{up:#}"
    );
    assert_eq!(
        pool["hits"].as_u64().unwrap() + pool["misses"].as_u64().unwrap(),
        5,
        "{up:#}"
    );
    let open = listener_at(&up, "echo");
    assert_eq!(open["addrs"][0], local(echo_port).to_string());
    assert_eq!(open["error"], Value::Null);
    let blocked = listener_at(&up, "blocked");
    assert_eq!(blocked["state"], "failed");
    let why = blocked["error"].as_str().unwrap();
    assert!(why.contains("in use"), "the gateway's reason: {why}");
    let gone = gateway_entry(&status, &down_name);
    assert_eq!(gone["connected"], false);
    assert_eq!(gone["light"], "red");
    assert!(
        gone["last_error"].as_str().unwrap().contains("refused"),
        "{gone:#}"
    );
    assert_eq!(listener_at(&gone, "echo")["state"], "down");
    assert_eq!(status["config"]["generation"], 1);
    assert_eq!(status["config"]["digest"].as_str().unwrap().len(), 64);
    assert_eq!(status["outbound"], Value::Null);

    // Stats: exact, and the same bytes the gateway counted on its side of the pipe.
    let stats = get_json(&api, "/api/stats");
    let e = stats_of(&stats, "echo");
    assert_eq!(e["offered"], 3);
    assert_eq!(e["bytes"]["from_client"], sent);
    assert_eq!(e["bytes"]["to_client"], sent);
    let d = stats_of(&stats, "dead");
    assert_eq!(
        (d["offered"].as_u64(), d["served"].as_u64()),
        (Some(2), Some(0))
    );
    let failure = d["last_failure"]["error"].as_str().unwrap();
    assert!(failure.contains(&dead_backend.to_string()), "{failure}");
    let theirs = gw.api("/api/stats");
    let gateway_echo = theirs["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "echo")
        .unwrap()
        .clone();
    assert_eq!(gateway_echo["bytes"]["client_read"], sent);
    assert_eq!(gateway_echo["bytes"]["client_written"], sent);

    // Metrics: promtool-clean, with a per-gateway up gauge.
    let (code, metrics) = http("GET", &format!("{api}/metrics"), &[]);
    assert_eq!(code, 200);
    promtool_check(&metrics);
    let g = |name: &str, labels: &str| sample(&metrics, &format!("{name}{{{labels}}}"));
    for kind in ["anonymous", "file"] {
        let v = g(
            "sallyport_agent_resident_memory_bytes",
            &format!("kind=\"{kind}\""),
        );
        assert!(v.is_some_and(|v| v > 0.0), "{kind}: {v:?}");
    }
    let allocated = g("sallyport_agent_heap_bytes", "state=\"allocated\"");
    assert!(allocated.is_some_and(|v| v > 10e3), "{allocated:?}");
    assert_eq!(
        g(
            "sallyport_agent_gateway_up",
            &format!("gateway=\"{gw_name}\"")
        ),
        Some(1.0)
    );
    assert_eq!(
        g(
            "sallyport_agent_gateway_up",
            &format!("gateway=\"{down_name}\"")
        ),
        Some(0.0)
    );
    let on = |l: &str| format!("gateway=\"{gw_name}\",listener=\"{l}\"");
    assert_eq!(g("sallyport_agent_listener_up", &on("echo")), Some(1.0));
    assert_eq!(g("sallyport_agent_listener_up", &on("blocked")), Some(0.0));
    let l = |l: &str| format!("listener=\"{l}\"");
    assert_eq!(
        g("sallyport_agent_clients_served_total", &l("echo")),
        Some(3.0)
    );
    assert_eq!(
        g("sallyport_agent_backend_failures_total", &l("dead")),
        Some(2.0)
    );
    assert_eq!(
        g("sallyport_agent_bytes_from_clients_total", &l("echo")),
        Some(sent as f64)
    );
    assert_eq!(g("sallyport_agent_clients_active", &l("echo")), Some(0.0));
    assert!(sample(&metrics, "sallyport_agent_config_generation") == Some(1.0));
}

#[test]
fn reload_over_the_api_needs_the_same_credentials_and_does_what_sighup_does() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let token = "agent-admin-token-0123456";
    let (first, second) = (free_port(), free_port());
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("first", first, echo.addr)],
        "",
        &admin,
    );
    let api = agent_admin_url(&agent);
    wait_open(local(first), Duration::from_secs(10));
    let digest = get_json(&api, "/api/status")["config"]["digest"].clone();

    // The new file adds a listener; nothing may apply it without the right credentials.
    let mut config = agent_config_without_admin(
        &[gw.control],
        &[
            listener("first", first, echo.addr),
            listener("second", second, echo.addr),
        ],
        "",
    );
    config.push_str(&format!(
        "\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n{admin}"
    ));
    dir.write("agent.toml", &config);
    let url = format!("{api}/api/reload");
    let auth = format!("Authorization: Bearer {token}");
    let host = api.trim_start_matches("http://");
    for (headers, want, what) in [
        (vec!["X-Requested-By: t"], 401, "no token"),
        (
            vec![
                "X-Requested-By: t",
                "Authorization: Bearer wrong-token-000000000",
            ],
            401,
            "a wrong token",
        ),
        (vec![auth.as_str()], 403, "no X-Requested-By"),
        (
            vec![
                "X-Requested-By: t",
                auth.as_str(),
                "Origin: http://evil.example",
            ],
            403,
            "another origin",
        ),
        (
            vec!["X-Requested-By: t", auth.as_str(), "Host: evil.example"],
            421,
            "a rebinding Host",
        ),
    ] {
        let (code, body) = http("POST", &url, &headers);
        assert_eq!(code, want, "{what}: {body}");
        assert!(body.contains("\"error\""), "{what}: {body}");
    }
    assert_eq!(get_json(&api, "/api/status")["config"]["generation"], 1);
    assert!(refuses(local(second)), "a refused reload applied nothing");
    assert_eq!(
        http(
            "GET",
            &format!("{api}/api/status"),
            &[&format!("Host: {host}")]
        )
        .0,
        200,
        "the admin address itself is a valid Host"
    );

    let (code, body) = http("POST", &url, &["X-Requested-By: t", auth.as_str()]);
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["action"], "reload");
    assert_eq!(answer["generation"], 2);
    assert_ne!(answer["digest"], digest);
    wait_open(local(second), Duration::from_secs(10));
    echo_round_trip(local(second), "reloaded over the API");
    agent.wait_for_log("admin API: reload", Duration::from_secs(1));

    // A broken file: refused with file, line and field; the running config stays.
    dir.write(
        "agent.toml",
        &config.replace(&echo.addr.to_string(), "10.0.0.5"),
    );
    let (code, body) = http("POST", &url, &["X-Requested-By: t", auth.as_str()]);
    assert_eq!(code, 422, "{body}");
    let error = serde_json::from_str::<Value>(&body).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("agent.toml:") && error.contains("backend") && error.contains("keeping"),
        "{error}"
    );
    let status = get_json(&api, "/api/status");
    assert_eq!(status["config"]["generation"], 2);
    assert!(status["config"]["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("backend"));
    echo_round_trip(local(second), "still served");

    // `ctl reload` is the same call; SIGHUP goes through the same code and counts too.
    dir.write("agent.toml", &config);
    let out = Command::new(BIN)
        .args(["ctl", "reload", "--admin", &api, "--token", token])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("agent configuration generation 3"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.signal("HUP");
    assert!(wait_until(Duration::from_secs(5), || get_json(
        &api,
        "/api/status"
    )["config"]["generation"]
        == 4));
    // Gateway-only actions against the agent say so, with a non-zero exit.
    let out = Command::new(BIN)
        .args(["ctl", "pause", "--admin", &api, "--token", token])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("agent"),
        "ctl pause against an agent: {said}"
    );
}

#[test]
fn status_command_says_which_daemon_it_talks_to() {
    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let public = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public, echo.addr)],
        "",
        "",
    );
    let api = agent_admin_url(&agent);
    // Not by connecting: a probe would be a client too.
    agent.wait_for_log("listener open on the gateway", Duration::from_secs(10));
    echo_round_trip(local(public), "one client");
    let status = |url: &str, extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["status", "--admin", url])
            .args(extra)
            .env_remove("SALLYPORT_ADMIN")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let on_gateway = status(&gw.admin_url(), &[]);
    assert!(on_gateway.starts_with("Sallyport gateway "), "{on_gateway}");
    let on_agent = status(&api, &[]);
    let first = on_agent.lines().next().unwrap();
    assert!(
        first.starts_with("Sallyport agent ")
            && first.contains("test-agent")
            && first.contains("test-site"),
        "{on_agent}"
    );
    // The gateway table and the listener table, with this client counted.
    let gw_row = on_agent
        .lines()
        .find(|l| l.contains(&gw.control.to_string()))
        .unwrap_or_else(|| panic!("no row for the gateway:\n{on_agent}"));
    assert!(gw_row.contains("connected"), "{gw_row}");
    let echo_row = on_agent
        .lines()
        .find(|l| l.trim_start().starts_with("echo "))
        .unwrap_or_else(|| panic!("no row for the listener:\n{on_agent}"));
    assert!(
        echo_row.contains("open") && echo_row.contains(&echo.addr.to_string()),
        "{echo_row}"
    );
    let json: Value = serde_json::from_str(&status(&api, &["--json"])).unwrap();
    assert_eq!(json["status"]["daemon"], "agent");
    assert_eq!(stats_of(&json["stats"], "echo")["served"], 1);
}

/// Runs in a network namespace of its own: the one test that uses the real default port must
/// not meet another run of itself (or anything else on the host's 9091).
#[test]
fn admin_defaults_to_loopback_9091_can_be_turned_off_and_a_clash_exits_78() {
    let mut namespaces = support::netns::Namespaces::new();
    let ns = namespaces.add("a9091");
    support::netns::in_ns(&ns, admin_defaults_in_this_namespace);
}

fn admin_defaults_in_this_namespace() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    // The one test that uses the real default port.
    let first = start_agent(&dir, "first", &[gw.control], &[], "", "[admin]\n");
    assert_eq!(agent_admin_url(&first), "http://127.0.0.1:9091");
    assert_eq!(
        get_json("http://127.0.0.1:9091", "/api/status")["daemon"],
        "agent"
    );

    let mut second = start_agent(
        &dir,
        "second",
        &[gw.control],
        &[],
        "name = \"second\"",
        "[admin]\n",
    );
    assert_eq!(
        second.wait_exit(Duration::from_secs(10)),
        Some(78),
        "a taken admin port stops the agent before it dials, like a config error"
    );
    second.wait_for_log("127.0.0.1:9091", Duration::from_secs(1));
    assert_eq!(gw.proc.count_log("agent=second"), 0, "it never connected");

    let off = start_agent(
        &dir,
        "off",
        &[gw.control],
        &[],
        "name = \"off\"",
        "[admin]\nenabled = false\n",
    );
    gw.proc.wait_for_log("agent=off", Duration::from_secs(10));
    assert_eq!(off.count_log(AGENT_ADMIN_LINE), 0);
    assert_eq!(off.count_log("9091"), 0);
}

/// Runs `curl -i` (headers included); returns (HTTP status, head and body).
fn curl_i(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (all, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), all.to_string())
}

/// The gateway's issue 12 protections hold on the agent's server too (tests/attacks.rs checks the
/// gateway's): a DNS-rebinding page's Host gets 421 on every route, a foreign Origin cannot
/// reload, the page's own origin and an SSH tunnel's localhost port can, and every answer (the
/// refusals too) forbids framing and sniffing.
#[test]
fn agent_admin_refuses_rebinding_hosts_and_foreign_origins_and_cannot_be_framed() {
    let dir = Workdir::new();
    let gw = start_gateway(&dir, "");
    let token = "agent-admin-token-0123456";
    let admin = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n");
    let agent = start_agent(&dir, "agent", &[gw.control], &[], "", &admin);
    let base = agent_admin_url(&agent);
    let port = base.rsplit_once(':').unwrap().1.to_string();
    let evil_host = format!("Host: rebind.attacker.example:{port}");
    let auth = format!("Authorization: Bearer {token}");

    for path in [
        "/",
        "/api/status",
        "/api/stats",
        "/metrics",
        "/agent.js",
        "/common.js",
    ] {
        let (code, text) = curl_i(&["-H", &evil_host, &format!("{base}{path}")]);
        assert_eq!(code, 421, "GET {path} with a foreign Host: {text}");
    }
    let reload = format!("{base}/api/reload");
    let post = |extra: &[&str]| {
        let mut args = vec!["-X", "POST", "-H", "X-Requested-By: x", "-H", &auth];
        args.extend_from_slice(extra);
        args.push(&reload);
        curl_i(&args)
    };
    let (code, text) = post(&["-H", &evil_host]);
    assert_eq!(code, 421, "{text}");
    let (code, text) = post(&[
        "-H",
        &format!("Origin: http://rebind.attacker.example:{port}"),
    ]);
    assert_eq!(code, 403, "{text}");
    let status: Value = serde_json::from_str(&http("GET", &format!("{base}/api/status"), &[]).1)
        .expect("status JSON");
    assert_eq!(
        status["config"]["generation"], 1,
        "a refused call reloaded nothing"
    );

    // What operators use keeps working: localhost through a tunnel on another local port, and
    // the page's own origin.
    let (code, _) = curl_i(&["-H", "Host: localhost:19999", &format!("{base}/api/status")]);
    assert_eq!(code, 200);
    let (code, text) = post(&["-H", &format!("Origin: {base}")]);
    assert_eq!(code, 200, "{text}");

    for args in [
        vec![format!("{base}/")],
        vec![format!("{base}/api/status")],
        vec!["-H".into(), evil_host.clone(), format!("{base}/metrics")],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, text) = curl_i(&args);
        let head = text.to_ascii_lowercase();
        assert!(head.contains("x-frame-options: deny"), "{text}");
        assert!(head.contains("frame-ancestors 'none'"), "{text}");
        assert!(head.contains("x-content-type-options: nosniff"), "{text}");
    }
    agent.wait_for_log("DNS rebinding?", Duration::from_secs(2));
}
