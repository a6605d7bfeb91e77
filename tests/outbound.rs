//! The outbound proxy: internal hosts reach partner hosts through the agent's SOCKS5 / HTTP
//! CONNECT endpoint and the gateway, only where the gateway's `[egress] allow` list permits.
//! Real curl, a real nginx standing for a partner's web server, real sftp through
//! `nc -X 5` (netcat-openbsd) to a real sshd standing for a partner's SFTP server.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::nginx::{curl, Nginx, NginxOptions};
use support::sshd::{require_openssh, Sshd};
use support::*;

struct Setup {
    _dir: Workdir,
    gw: Gateway,
    agent: Proc,
    proxy: SocketAddr,
}

/// A gateway with `egress` (the `allow` list's entries) and an agent whose outbound proxy
/// listens on a free loopback port, with `outbound_extra` added to `[outbound]`.
fn setup(egress: &[String], outbound_extra: &str) -> Setup {
    let dir = Workdir::new();
    let allow: Vec<String> = egress.iter().map(|e| format!("\"{e}\"")).collect();
    let gw = start_gateway(&dir, &format!("[egress]\nallow = [{}]\n", allow.join(", ")));
    let proxy = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n{outbound_extra}\n"),
    );
    agent.wait_for_log(
        "outbound proxy (SOCKS5 and HTTP CONNECT) listening",
        Duration::from_secs(10),
    );
    gw.proc
        .wait_for_log("agent connected", Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .count_log("config generation")
            > 0
            || gw.proc.count_log("config generation 1 applied") > 0),
        "the agent never pushed its config"
    );
    Setup {
        _dir: dir,
        gw,
        agent,
        proxy,
    }
}

/// A raw SOCKS5 CONNECT (no authentication) to a domain name; the reply code.
fn socks5_connect(proxy: SocketAddr, host: &str, port: u16) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0], "no-auth method selected");
    let mut req = vec![5, 1, 0, 3, host.len() as u8];
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 5);
    (reply[1], s)
}

/// A raw HTTP CONNECT; the status line.
fn http_connect(proxy: SocketAddr, target: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn outbound_stats(gw: &Gateway) -> serde_json::Value {
    let stats = gw.api("/api/stats");
    stats["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "(outbound)")
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn curl_through_socks5_and_http_connect_reaches_the_partner_web_server() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let s = setup(&[format!("localhost:{}", partner.port)], "");

    // SOCKS5 with the name resolved by the gateway (socks5h).
    let url = format!("http://localhost:{}/", partner.port);
    let (ok, body, err) = curl(&["--socks5-hostname", &s.proxy.to_string(), &url]);
    assert!(ok, "curl --socks5-hostname: {err}");
    assert_eq!(body, Nginx::PAGE);

    // HTTP CONNECT (--proxytunnel makes curl tunnel even for http:// URLs).
    let (ok, body, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{}", s.proxy),
        &url,
    ]);
    assert!(ok, "curl --proxy (CONNECT): {err}");
    assert_eq!(body, Nginx::PAGE);

    // The partner saw two requests; the gateway counted two outbound connections with bytes.
    assert!(wait_until(Duration::from_secs(5), || partner
        .access_lines()
        .len()
        == 2));
    assert!(
        wait_until(Duration::from_secs(5), || {
            let o = outbound_stats(&s.gw);
            o["accepted"] == 2 && o["closed"] == 2
        }),
        "{}",
        outbound_stats(&s.gw)
    );
    let o = outbound_stats(&s.gw);
    assert!(
        o["bytes"]["client_read"].as_u64().unwrap() >= 2 * Nginx::PAGE.len() as u64,
        "{o}"
    );
    assert!(o["bytes"]["client_written"].as_u64().unwrap() > 0, "{o}");
    assert_eq!(o["rejected"], 0);
    // The metrics carry it too.
    let metrics = Command::new("curl")
        .args(["-s", &format!("{}/metrics", s.gw.admin_url())])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sallyport_clients_accepted_total")
                && l.contains("listener=\"(outbound)\"")
                && l.ends_with(" 2")),
        "{metrics}"
    );
    let _ = &s.agent;
}

#[test]
fn sftp_through_netcat_socks5_reaches_the_partner_sshd() {
    require_openssh();
    let dir = Workdir::new();
    let sshd = Sshd::start(&dir);
    let s = setup(&[format!("127.0.0.1:{}", sshd.port)], "");
    let data = pseudo_random(3 * 1024 * 1024 + 17, 7);
    let src = dir.write("upload.bin", "");
    std::fs::write(&src, &data).unwrap();
    let back = dir.path().join("download.bin");
    let remote = sshd.data_dir.join("via-socks.bin");
    let batch = dir.write(
        "batch",
        &format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            remote.display(),
            remote.display(),
            back.display()
        ),
    );
    let out = Command::new("sftp")
        .arg("-b")
        .arg(&batch)
        .arg("-i")
        .arg(&sshd.key)
        .arg("-P")
        .arg(sshd.port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", sshd.known_hosts.display()))
        .args(["-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("ProxyCommand=nc -X 5 -x {} %h %p", s.proxy))
        .arg(format!("{}@127.0.0.1", support::sshd::TEST_USER))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sftp through the SOCKS5 proxy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&remote), sha256_hex(&data), "upload changed");
    assert_eq!(sha256_file(&back), sha256_hex(&data), "download changed");
    assert!(s.gw.proc.count_log("outbound connection to 127.0.0.1:") >= 1);
}

#[test]
fn destinations_outside_the_allow_list_get_the_right_refusal() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let other = Nginx::start(&dir, "other", NginxOptions::default());
    let s = setup(&[format!("localhost:{}", partner.port)], "");

    // SOCKS5: 0x02 "connection not allowed by ruleset".
    let (code, _) = socks5_connect(s.proxy, "localhost", other.port);
    assert_eq!(code, 0x02);
    // An address literal is not the allowed name: refused too.
    let (code, _) = socks5_connect(s.proxy, "127.0.0.1", partner.port);
    assert_eq!(code, 0x02);
    // HTTP CONNECT: 403.
    let status = http_connect(s.proxy, &format!("localhost:{}", other.port), "");
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    // curl reports the SOCKS refusal.
    let (ok, _, err) = curl(&[
        "--socks5-hostname",
        &s.proxy.to_string(),
        &format!("http://localhost:{}/", other.port),
    ]);
    assert!(!ok);
    assert!(
        err.contains("SOCKS5") || err.contains("not allowed"),
        "{err}"
    );
    // Nothing reached the other server; refusals are counted and logged.
    assert!(other.access_lines().is_empty());
    let stats = s.gw.api("/api/stats");
    assert_eq!(
        stats["refusals"]["egress_denied"], 4,
        "{}",
        stats["refusals"]
    );
    assert_eq!(outbound_stats(&s.gw)["rejected"], 4);
    assert!(
        s.gw.proc
            .count_log("is not in the gateway's [egress] allow list")
            >= 1
    );
    // The allowed destination still works.
    let (code, _) = socks5_connect(s.proxy, "localhost", partner.port);
    assert_eq!(code, 0x00);
}

#[test]
fn an_allowed_destination_that_refuses_gets_socks_05_and_http_502() {
    let closed = free_port();
    let s = setup(&[format!("127.0.0.1:{closed}")], "");
    let (code, _) = socks5_connect(s.proxy, "127.0.0.1", closed);
    assert_eq!(code, 0x05, "connection refused");
    let status = http_connect(s.proxy, &format!("127.0.0.1:{closed}"), "");
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    assert_eq!(s.gw.api("/api/stats")["refusals"]["egress_unreachable"], 2);
}

#[test]
fn an_empty_allow_list_refuses_everything() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let s = setup(&[], "");
    for host in ["localhost", "127.0.0.1"] {
        let (code, _) = socks5_connect(s.proxy, host, partner.port);
        assert_eq!(code, 0x02, "{host}");
        let status = http_connect(s.proxy, &format!("{host}:{}", partner.port), "");
        assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    }
    assert!(partner.access_lines().is_empty());
}

#[test]
fn proxy_users_are_required_when_configured() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let s = setup(
        &[format!("localhost:{}", partner.port)],
        "users = [{ name = \"batch\", password = \"s3cret-pass\" }]",
    );
    let url = format!("http://localhost:{}/", partner.port);
    // SOCKS5 without credentials: no acceptable method (0xFF).
    let mut raw = TcpStream::connect(s.proxy).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(&[5, 1, 0]).unwrap();
    let mut choice = [0u8; 2];
    raw.read_exact(&mut choice).unwrap();
    assert_eq!(choice, [5, 0xff]);
    // With the right user and password (RFC 1929), through curl.
    let (ok, body, err) = curl(&[
        "--proxy",
        &format!("socks5h://batch:s3cret-pass@{}", s.proxy),
        &url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(body, Nginx::PAGE);
    // A wrong password fails.
    let (ok, _, _) = curl(&[
        "--proxy",
        &format!("socks5h://batch:wrong@{}", s.proxy),
        &url,
    ]);
    assert!(!ok);
    // HTTP CONNECT: 407 without credentials, 200 with Basic credentials.
    let target = format!("localhost:{}", partner.port);
    assert!(http_connect(s.proxy, &target, "").starts_with("HTTP/1.1 407"));
    let (ok, body, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://batch:s3cret-pass@{}", s.proxy),
        &url,
    ]);
    assert!(ok, "{err}");
    assert_eq!(body, Nginx::PAGE);
    assert_eq!(partner.access_lines().len(), 2);
}

/// Issue 13 item 13: two gateways of one site with different `[egress]` lists. The agent asks
/// the next gateway when one denies, so every request to a destination one of them allows gets
/// through (on main every other request failed: curl exit 97, SOCKS5 "not allowed").
#[test]
fn a_denial_by_one_gateway_is_asked_of_the_next() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let allowed = format!("localhost:{}", partner.port);
    let gw1 = start_gateway_named(&dir, "gw1", &format!("[egress]\nallow = [\"{allowed}\"]\n"));
    let gw2 = start_gateway_named(&dir, "gw2", "[egress]\nallow = []\n");
    let proxy = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw1.control, gw2.control],
        &[],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    for gw in [&gw1, &gw2] {
        gw.proc
            .wait_for_log("config generation 1 applied", Duration::from_secs(10));
    }
    agent.wait_for_log("outbound proxy", Duration::from_secs(5));
    let url = format!("http://localhost:{}/", partner.port);
    for i in 0..6 {
        let (ok, body, err) = curl(&["--socks5-hostname", &proxy.to_string(), &url]);
        assert!(ok, "request {i}: {err}");
        assert_eq!(body, Nginx::PAGE);
    }
    // gw2 was asked (round robin starts with each gateway in turn) and said no; gw1 served all.
    assert!(
        wait_until(Duration::from_secs(5), || outbound_stats(&gw1)["closed"]
            == 6),
        "{}",
        outbound_stats(&gw1)
    );
    assert!(
        gw2.api("/api/stats")["refusals"]["egress_denied"]
            .as_u64()
            .unwrap()
            >= 3
    );
    // A destination neither allows is denied, with both gateways' reasons.
    let (code, _s) = socks5_connect(proxy, "example.invalid", 443);
    assert_eq!(code, 0x02);
}

/// `sallyport ctl ACTION` against `gw`; whether it succeeded.
fn ctl(gw: &Gateway, action: &str) -> bool {
    Command::new(BIN)
        .args(["ctl", action, "--admin", &gw.admin_url()])
        .status()
        .unwrap()
        .success()
}

/// Issue 13 item 15: pausing a gateway pauses the outbound traffic through it too (on main a
/// paused gateway kept dialing out). New outbound requests go through the other gateway; one
/// already open through the paused gateway keeps going; with every gateway paused a request is
/// refused (SOCKS5 0x01) and works again after `ctl resume`.
#[test]
fn a_paused_gateway_takes_no_new_outbound_connections() {
    let dir = Workdir::new();
    let partner = Nginx::start(&dir, "partner", NginxOptions::default());
    let allow = format!("[egress]\nallow = [\"localhost:{}\"]\n", partner.port);
    let gw1 = start_gateway_named(&dir, "gw1", &allow);
    let gw2 = start_gateway_named(&dir, "gw2", &allow);
    let proxy = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw1.control, gw2.control],
        &[],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    for gw in [&gw1, &gw2] {
        gw.proc
            .wait_for_log("config generation 1 applied", Duration::from_secs(10));
    }
    agent.wait_for_log("outbound proxy", Duration::from_secs(5));
    // Open connections until one goes through gw1 (round robin: the first or the second).
    let mut through_gw1 = None;
    for _ in 0..2 {
        let (code, s) = socks5_connect(proxy, "localhost", partner.port);
        assert_eq!(code, 0);
        if wait_until(Duration::from_secs(2), || {
            outbound_stats(&gw1)["active"] == 1
        }) {
            through_gw1 = Some(s);
            break;
        }
    }
    let mut held = through_gw1.expect("no outbound connection went through gw1");

    // gw2 may already have served (and closed) the first try above.
    let gw2_closed = || outbound_stats(&gw2)["closed"].as_u64().unwrap_or(0);
    let closed_before = gw2_closed();
    assert!(ctl(&gw1, "pause"));
    let url = format!("http://localhost:{}/", partner.port);
    let socks = format!("socks5h://{proxy}");
    for i in 0..4 {
        let (ok, body, err) = curl(&["--proxy", &socks, &url]);
        assert!(ok, "request {i} while gw1 is paused: {err}");
        assert_eq!(body, Nginx::PAGE);
    }
    assert!(
        outbound_stats(&gw1)["rejected"].as_u64().unwrap() >= 2,
        "{}",
        outbound_stats(&gw1)
    );
    assert!(
        wait_until(Duration::from_secs(5), || gw2_closed() == closed_before + 4),
        "{}",
        outbound_stats(&gw2)
    );
    // The connection opened before the pause still works.
    write!(held, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with(Nginx::PAGE), "{answer}");

    // Both paused: nothing goes out, and the client hears it at once.
    assert!(ctl(&gw2, "pause"));
    let (code, _s) = socks5_connect(proxy, "localhost", partner.port);
    assert_eq!(code, 0x01);
    assert!(ctl(&gw1, "resume") && ctl(&gw2, "resume"));
    let (ok, body, err) = curl(&["--proxy", &socks, &url]);
    assert!(ok, "after resume: {err}");
    assert_eq!(body, Nginx::PAGE);
}
