//! `sallyport check`: all ok against a healthy setup (exit 0), and one FAIL naming the cause
//! and the fix for each fault (exit 1).

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use support::servers::{banner_server, EchoServer};
use support::*;

/// Runs `sallyport check` on an agent config; returns (exit code, stdout).
fn check(dir: &Workdir, name: &str, config: &str) -> (i32, String) {
    let path = dir.write(name, config);
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().unwrap()])
        .env_remove("SALLYPORT_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "--- check {name} ---\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn fail_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("FAIL")).collect()
}

struct Setup {
    dir: Workdir,
    certs: std::path::PathBuf,
    gateway: Gateway,
    echo: EchoServer,
    banner: std::net::SocketAddr,
}

fn setup(peers: &str) -> Setup {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let gateway = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
        peers,
    );
    Setup {
        echo: EchoServer::start(),
        banner: banner_server(b"SSH-2.0-TestBanner\r\n"),
        dir,
        certs,
        gateway,
    }
}

impl Setup {
    fn config(&self, top: &str, listeners: &[ListenerDef]) -> String {
        let mut top = top.to_string();
        if !top.contains("tls =") {
            top.push_str(&format!(
                "\n{}",
                agent_tls(&self.certs, &self.certs, "agent")
            ));
        }
        agent_config(&[self.gateway.control], listeners, &top)
    }
}

#[test]
fn a_healthy_setup_passes_every_check() {
    let s = setup("");
    let (banner_port, echo_port) = (free_port(), free_port());
    let config = s.config(
        "",
        &[
            listener("ssh", banner_port, s.banner),
            listener("echo", echo_port, s.echo.addr),
        ],
    );
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 0, "{out}");
    assert!(fail_lines(&out).is_empty(), "{out}");
    for expected in [
        "valid (site test-site, 2 listener(s), 1 gateway(s), mutual TLS)",
        "TLS 1.3 handshake ok",
        "is allowed by the gateway's [peers] rules",
        &format!(
            "listener ssh on {}: open at 127.0.0.1:{banner_port}",
            s.gateway.control
        ),
        &format!("backend {} (listener echo): reachable", s.echo.addr),
        "the backend answered \"SSH-2.0-TestBanner\"",
        "the backend waits for the client to speak",
        "all good",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
}

#[test]
fn gateway_down() {
    let s = setup("");
    let dead = free_port();
    let config = agent_config(
        &[local(dead)],
        &[listener("echo", free_port(), s.echo.addr)],
        "",
    );
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 1, "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails
            .iter()
            .any(|l| l.contains("control port not reachable")
                && l.contains("refused")
                && l.contains("start the gateway")),
        "{out}"
    );
}

#[test]
fn peer_address_denied() {
    let s = setup("[peers]\ndefault = \"allow\"\nexcept = [\"127.0.0.5\"]\n");
    let config = s.config(
        "source_ip = \"127.0.0.5\"",
        &[listener("echo", free_port(), s.echo.addr)],
    );
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 1, "{out}");
    assert!(
        fail_lines(&out).iter().any(|l| l
            .contains("127.0.0.5 is not allowed by the gateway's [peers] rules")
            && l.contains("add 127.0.0.5 to the gateway's [peers] except list")),
        "{out}"
    );
}

#[test]
fn wrong_ca() {
    let s = setup("");
    let other = make_certs(&s.dir, "other", &[]);
    let config = s.config(
        &agent_tls(&other, &s.certs, "agent"),
        &[listener("echo", free_port(), s.echo.addr)],
    );
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 1, "{out}");
    assert!(
        fail_lines(&out)
            .iter()
            .any(|l| l.contains("TLS handshake failed")
                && l.contains("UnknownIssuer")
                && l.contains("tls.ca")),
        "{out}"
    );
}

#[test]
fn listener_port_taken() {
    let s = setup("");
    let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().port();
    let config = s.config("", &[listener("busy", taken, s.echo.addr)]);
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 1, "{out}");
    assert!(
        fail_lines(&out).iter().any(|l| l.contains("listener busy")
            && l.contains("address in use")
            && l.contains("free that port")),
        "{out}"
    );
}

#[test]
fn backend_down() {
    let s = setup("");
    let dead = local(free_port());
    let config = s.config("", &[listener("web", free_port(), dead)]);
    let (code, out) = check(&s.dir, "agent.toml", &config);
    assert_eq!(code, 1, "{out}");
    let fails = fail_lines(&out);
    assert!(
        fails.iter().any(|l| l.contains(&format!("backend {dead}"))
            && l.contains("not reachable")
            && l.contains("start the backend")),
        "{out}"
    );
    assert!(
        fails
            .iter()
            .any(|l| l.contains("test connection") && l.contains("closed at once")),
        "{out}"
    );
    let _ = Duration::ZERO;
}
