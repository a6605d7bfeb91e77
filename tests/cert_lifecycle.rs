//! Issue 20 item 3: the certificate lifecycle. A reload (SIGHUP) swaps renewed certificates
//! without dropping a connection in flight, and new handshakes use the new ones; expiry shows in
//! both daemons' status, metrics and `sallyport check`, with a warning under 30 days; `cert
//! revoke` and `[control] tls.crl` cut a connected agent at the reload and refuse it after.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

/// `sallyport ARGS`, which must succeed; its stdout and stderr.
fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sallyport {args:?}: {text}");
    text
}

/// An agent of `site` presenting `certs/cert_name.crt`, with one echo listener on `public`.
fn agent_of(
    dir: &Workdir,
    name: &str,
    site: &str,
    certs: &Path,
    gateway: &Gateway,
    public: u16,
    backend: std::net::SocketAddr,
) -> (Proc, std::path::PathBuf) {
    let top = format!("name = \"{name}\"\n{}", agent_tls(certs, certs, name));
    let mut config = agent_config(
        &[gateway.control],
        &[listener("echo", public, backend)],
        &top,
    )
    .replacen("site = \"test-site\"", &format!("site = \"{site}\""), 1);
    config.push_str("\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n");
    let path = dir.write(&format!("{name}.toml"), &config);
    let proc = Proc::spawn(name, &["agent", "--config", path.to_str().unwrap()]);
    (proc, path)
}

fn get(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(url: &str) -> serde_json::Value {
    serde_json::from_str(&get(url)).unwrap_or(serde_json::Value::Null)
}

fn promtool_clean(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a status certificate has `days` left (issued `days` ago at most a minute before),
/// and its warning.
fn days_left(cert: &serde_json::Value, days: i64) -> (bool, bool) {
    let left = cert["expires_in_seconds"].as_i64().unwrap_or(-1);
    let full = days * 86_400;
    (
        (full - 120..=full).contains(&left),
        cert["warning"].is_string(),
    )
}

#[test]
fn a_reload_swaps_renewed_certificates_without_dropping_a_transfer_and_shows_their_expiry() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &["--gateway-ip", "127.0.0.1"]);
    let c = certs.to_str().unwrap();
    let echo = EchoServer::start();
    let gateway = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
        "",
    );
    let public = local(free_port());
    let (agent, agent_toml) = agent_of(
        &dir,
        "agent",
        "test-site",
        &certs,
        &gateway,
        public.port(),
        echo.addr,
    );
    wait_open(public, Duration::from_secs(10));
    let agent_url = agent_admin_url(&agent);

    // Issued for 825 days: no warning anywhere.
    let status = gateway.api("/api/status");
    let old_gateway_serial = status["control"]["cert"]["serial"].clone();
    let old_agent_serial = status["agents"][0]["cert"]["serial"].clone();
    assert_eq!(
        days_left(&status["control"]["cert"], 825),
        (true, false),
        "{status}"
    );
    assert_eq!(
        days_left(&status["agents"][0]["cert"], 825),
        (true, false),
        "{status}"
    );

    // A transfer in flight.
    let mut client = TcpStream::connect(public).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut back = [0u8; 7];
    client.write_all(b"before\n").unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"before\n");

    // Both certificates renewed in place for 10 days, both daemons reloaded.
    let out = run_ok(&[
        "cert",
        "renew",
        "--dir",
        c,
        "--gateway",
        "gateway",
        "--days",
        "10",
    ]);
    assert!(out.contains("renewed"), "{out}");
    let out = run_ok(&[
        "cert", "renew", "--dir", c, "--agent", "agent", "--days", "10",
    ]);
    assert!(out.contains("replaced serial"), "{out}");
    gateway.proc.signal("HUP");
    gateway.proc.wait_for_log(
        "reload: gateway configuration applied",
        Duration::from_secs(10),
    );
    agent.signal("HUP");

    // New handshakes use the new certificates: the agent reconnects with its new one, and
    // the gateway presents its new one.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let s = gateway.api("/api/status");
            let agents = s["agents"].as_array().cloned().unwrap_or_default();
            s["control"]["cert"]["serial"] != old_gateway_serial
                && agents.len() == 1
                && agents[0]["cert"]["serial"] != old_agent_serial
                && json(&format!("{agent_url}/api/status"))["gateways"][0]["cert"]["serial"]
                    == s["control"]["cert"]["serial"]
        }),
        "the new certificates are not in use: {}",
        gateway.api("/api/status")
    );
    // The transfer in flight survived both reloads.
    client.write_all(b"after!\n").unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"after!\n");
    echo_round_trip(public, "a new client after the reload");

    // Ten days left: a warning in both statuses, both metrics and `sallyport check`.
    let status = gateway.api("/api/status");
    assert_eq!(
        days_left(&status["control"]["cert"], 10),
        (true, true),
        "{status}"
    );
    assert_eq!(
        days_left(&status["agents"][0]["cert"], 10),
        (true, true),
        "{status}"
    );
    let agent_status = json(&format!("{agent_url}/api/status"));
    assert_eq!(
        days_left(&agent_status["cert"], 10),
        (true, true),
        "{agent_status}"
    );
    assert_eq!(
        days_left(&agent_status["gateways"][0]["cert"], 10),
        (true, true),
        "{agent_status}"
    );

    let metrics = get(&format!("{}/metrics", gateway.admin_url()));
    promtool_clean(&metrics);
    for role in ["gateway", "agent"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("sallyport_cert_expiry_seconds{")
                    && l.contains(&format!("role=\"{role}\""))
            })
            .unwrap_or_else(|| panic!("no {role} expiry in\n{metrics}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((9.99 * 86_400.0..=10.0 * 86_400.0).contains(&v), "{line}");
    }
    let metrics = get(&format!("{agent_url}/metrics"));
    promtool_clean(&metrics);
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("sallyport_agent_cert_expiry_seconds{"))
            .count(),
        2,
        "{metrics}"
    );

    let shown = run_ok(&["status", "--admin", &gateway.admin_url()]);
    assert!(shown.contains("WARNING: gateway certificate"), "{shown}");
    assert!(shown.contains("WARNING: agent agent"), "{shown}");
    let shown = run_ok(&["status", "--admin", &agent_url]);
    assert!(shown.contains("WARNING: agent certificate"), "{shown}");
    let check = Command::new(BIN)
        .args(["check", "--config", agent_toml.to_str().unwrap()])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.contains("warn  agent certificate") && check.contains("day(s) (under 30 days)"),
        "{check}"
    );
    assert!(check.contains("warn  gateway 127.0.0.1:"), "{check}");
}

#[test]
fn a_revoked_agent_is_cut_at_the_reload_and_refused_at_its_next_handshake() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &["--gateway-ip", "127.0.0.1"]);
    let c = certs.to_str().unwrap();
    for name in ["edge-1", "edge-2"] {
        run_ok(&["cert", "issue", "--dir", c, "--agent", name]);
    }
    let echo = EchoServer::start();
    let control = format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs));
    let gateway = start_gateway_with(&dir, "gateway", &control, "");
    let (p1, p2) = (local(free_port()), local(free_port()));
    let (edge1, _) = agent_of(
        &dir,
        "edge-1",
        "site-1",
        &certs,
        &gateway,
        p1.port(),
        echo.addr,
    );
    let (_edge2, _) = agent_of(
        &dir,
        "edge-2",
        "site-2",
        &certs,
        &gateway,
        p2.port(),
        echo.addr,
    );
    wait_open(p1, Duration::from_secs(10));
    wait_open(p2, Duration::from_secs(10));
    // A client of each agent, connected and piping when the revocation comes.
    let session = |addr| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hello\n").unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).unwrap();
        s
    };
    let (mut held1, mut held2) = (session(p1), session(p2));

    let out = run_ok(&["cert", "revoke", "--dir", c, "--agent", "edge-1"]);
    assert!(
        out.contains("revoked") && out.contains("1 certificate(s) revoked"),
        "{out}"
    );
    let again = run_ok(&["cert", "revoke", "--dir", c, "--agent", "edge-1"]);
    assert!(again.contains("was already revoked"), "{again}");

    // The gateway loads the CRL at its reload and cuts edge-1 at once.
    let with_crl = gateway_tls(&certs).replace(" }", &format!(", crl = \"{c}/crl.pem\" }}"));
    let config = std::fs::read_to_string(dir.path().join("gateway.toml"))
        .unwrap()
        .replace(&gateway_tls(&certs), &with_crl);
    dir.write("gateway.toml", &config);
    gateway.proc.signal("HUP");
    let line = gateway.proc.wait_for_log(
        "reload: agent REVOKED: its certificate is now refused",
        Duration::from_secs(10),
    );
    assert!(line.contains("edge-1"), "{line}");
    // What edge-1 was piping is cut too ([peers] drop_established, the default); edge-2's
    // client keeps going.
    let mut buf = [0u8; 16];
    held1
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = held1.write_all(b"more\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let cut = loop {
        match held1.read(&mut buf) {
            Ok(0) => break true,
            // The echo of bytes that passed before the cut.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if std::time::Instant::now() > deadline {
                    break false;
                }
            }
            Err(_) => break true,
        }
    };
    assert!(cut, "edge-1's established client survived its revocation");
    held2.write_all(b"again\n").unwrap();
    let mut got = [0u8; 6];
    held2.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again\n");
    wait_refused(p1, Duration::from_secs(10));
    edge1.wait_for_log("certificate revoked", Duration::from_secs(10));
    // Its next handshakes fail on the CRL; it says why and slows down to its longest delay.
    // (Its warm-pool dials log the same reason at debug level, sometimes first.)
    let refused = edge1.wait_for_log(
        "control channel refused: the gateway rejected this agent's TLS certificate as REVOKED",
        Duration::from_secs(10),
    );
    assert!(refused.contains("this needs an operator"), "{refused}");
    gateway
        .proc
        .wait_for_log("TLS handshake failed", Duration::from_secs(10));

    // edge-2 was never touched.
    echo_round_trip(p2, "edge-2 still serves");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!accepts(p1), "the revoked agent's listener reopened");
    let status = gateway.api("/api/status");
    let agents: Vec<&str> = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(agents, ["edge-2"], "{status}");
    assert_eq!(status["revoked"][0]["agent"], "edge-1", "{status}");
    assert_eq!(status["revoked"][0]["established_closed"], true, "{status}");
    let stats = gateway.api("/api/stats");
    assert_eq!(stats["refusals"]["revoked"], 1, "{stats}");
    assert!(
        stats["refusals"]["tls_failed"].as_u64().unwrap() >= 1,
        "{stats}"
    );
}
