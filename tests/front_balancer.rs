//! The real client address behind a front balancer (issue 18 item 3): a real HAProxy with
//! `send-proxy-v2` in front of the gateway (`[clients] proxy_protocol_from`), a real nginx
//! behind the agent with a PROXY-enabled listener logging `$proxy_protocol_addr`.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use support::haproxy::Haproxy;
use support::nginx::{curl, Nginx, NginxOptions};
use support::*;

/// curl from `source` (a loopback address of its own) to `port` on 127.0.0.1; (ok, body).
fn curl_from(source: &str, port: u16) -> (bool, String) {
    let url = format!("http://127.0.0.1:{port}/index.html");
    let (ok, body, err) = curl(&["--interface", source, &url]);
    (ok, if ok { body } else { err })
}

fn refusal(gateway: &Gateway, key: &str) -> u64 {
    gateway.api("/api/stats")["refusals"][key]
        .as_u64()
        .unwrap_or(0)
}

/// Sends `bytes` on a new connection to `addr` from `source`; what came back before the
/// connection ended (an error: it was reset).
fn raw_from(source: &str, addr: SocketAddr, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = connect_from(source.parse().unwrap(), addr)?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(bytes)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    Ok(back)
}

/// A PROXY v2 header claiming `client` (to 127.0.0.1:443).
fn forged_v2(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().unwrap();
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    let SocketAddr::V4(c) = client else { panic!() };
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[test]
fn haproxy_send_proxy_v2_in_front_nginx_logs_the_clients_own_address() {
    let dir = Workdir::new();
    let nginx = Nginx::start(
        &dir,
        "web",
        NginxOptions {
            proxy_protocol: true,
            ..Default::default()
        },
    );
    // HAProxy connects from 127.0.0.1: that balancer is trusted, nobody else.
    let gateway = start_gateway(
        &dir,
        "[clients]\nbind = \"127.0.0.1\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n",
    );
    let public = free_port();
    let mut web = listener("web", public, local(nginx.port));
    // The listener's own rules see the client's address, not the balancer's.
    web.extra =
        "proxy_protocol = \"v2\"\nclients = { default = \"allow\", except = [\"127.0.0.88\"] }\n"
            .into();
    let _agent = start_agent(&dir, "agent", &[gateway.control], &[web], "", "");
    wait_open(local(public), Duration::from_secs(10));
    let front = free_port();
    let _haproxy = Haproxy::start_with(&dir, &[(front, public)], &["127.0.0.1"], "send-proxy-v2");

    let (ok, body) = curl_from("127.0.0.77", front);
    assert!(ok, "curl through HAProxy and the gateway failed: {body}");
    assert_eq!(body, Nginx::PAGE);
    assert!(
        wait_until(Duration::from_secs(5), || nginx.access_lines().iter().any(
            |l| l.contains("pp=127.0.0.77:") && l.contains("GET /index.html")
        )),
        "nginx must log the client's own address: {:?}",
        nginx.access_lines()
    );
    // The gateway's own record of it names the client too.
    gateway
        .proc
        .wait_for_log("client_ip=127.0.0.77", Duration::from_secs(5));
    // A client the listener's rules deny is refused although the balancer is allowed.
    let (ok, _) = curl_from("127.0.0.88", front);
    assert!(!ok, "127.0.0.88 is denied by the listener's rules");
    assert!(
        !nginx
            .access_lines()
            .iter()
            .any(|l| l.contains("127.0.0.88")),
        "{:?}",
        nginx.access_lines()
    );

    // A trusted address without a header: closed and counted, nothing reaches nginx.
    let before = nginx.access_lines().len();
    let answer = raw_from(
        "127.0.0.1",
        local(public),
        b"GET /index.html HTTP/1.0\r\n\r\n",
    );
    assert!(
        answer.as_ref().map_or(true, |b| b.is_empty()),
        "a trusted connection without a PROXY header must get nothing: {answer:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || refusal(&gateway, "proxy_header")
            == 1),
        "proxy_header = {}",
        refusal(&gateway, "proxy_header")
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(nginx.access_lines().len(), before);
}

#[test]
fn a_stranger_cannot_claim_an_address_with_a_forged_proxy_header() {
    let dir = Workdir::new();
    let nginx = Nginx::start(
        &dir,
        "web",
        NginxOptions {
            proxy_protocol: true,
            ..Default::default()
        },
    );
    // Only 127.0.0.5 is a trusted balancer; the attacker connects from 127.0.0.66.
    let gateway = start_gateway(
        &dir,
        "[clients]\nbind = \"127.0.0.1\"\nproxy_protocol_from = [\"127.0.0.5\"]\n",
    );
    let public = free_port();
    let mut web = listener("web", public, local(nginx.port));
    web.extra = "proxy_protocol = \"v2\"\n".into();
    let _agent = start_agent(&dir, "agent", &[gateway.control], &[web], "", "");
    wait_open(local(public), Duration::from_secs(10));

    let mut forged = forged_v2("198.51.100.1:1234");
    forged.extend_from_slice(b"GET /index.html HTTP/1.0\r\n\r\n");
    let answer = raw_from("127.0.0.66", local(public), &forged).unwrap_or_default();
    let text = String::from_utf8_lossy(&answer);
    // nginx read the agent's header (the attacker's real address) and took the forged one
    // for a bad request: no page.
    assert!(!text.contains(Nginx::PAGE.trim()), "{text}");
    assert!(
        wait_until(Duration::from_secs(5), || nginx
            .access_lines()
            .iter()
            .any(|l| l.contains("pp=127.0.0.66:"))),
        "nginx must see the attacker's real address: {:?}",
        nginx.access_lines()
    );
    let lines = nginx.access_lines();
    assert!(
        !lines.iter().any(|l| l.contains("198.51.100.1")),
        "the forged address must not be used: {lines:?}"
    );
    gateway
        .proc
        .wait_for_log("client_ip=127.0.0.66", Duration::from_secs(5));
    assert!(!gateway
        .proc
        .log_lines()
        .iter()
        .any(|l| l.contains("198.51.100.1")));
    assert_eq!(refusal(&gateway, "proxy_header"), 0);

    // The same header from the trusted address is honoured (the parse path is the real one).
    let answer = raw_from("127.0.0.5", local(public), &forged).unwrap();
    assert!(String::from_utf8_lossy(&answer).contains(Nginx::PAGE.trim()));
    assert!(
        wait_until(Duration::from_secs(5), || nginx
            .access_lines()
            .iter()
            .any(|l| l.contains("pp=198.51.100.1:1234"))),
        "{:?}",
        nginx.access_lines()
    );
}
