//! Client impersonation and real protocols: nginx sees the real client through PROXY protocol
//! v1 and v2; HTTPS passes through untouched (curl verifies the backend's own certificate).

mod support;

use std::time::Duration;

use support::nginx::{curl, Nginx, NginxOptions};
use support::*;

fn through_gateway_with_proxy_protocol(version: &str) {
    let dir = Workdir::new();
    let nginx = Nginx::start(
        &dir,
        "nginx",
        NginxOptions {
            proxy_protocol: true,
            ..Default::default()
        },
    );
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let mut web = listener("web", public, local(nginx.port));
    web.extra = format!("proxy_protocol = \"{version}\"");
    let agent = start_agent(&dir, "agent", &[gateway.control], &[web], "", "");
    wait_open(local(public), Duration::from_secs(10));

    let url = format!("http://127.0.0.1:{public}/index.html");
    let (ok, body, err) = curl(&["--interface", "127.0.0.7", &url]);
    assert!(ok, "curl failed: {err}");
    assert_eq!(body, Nginx::PAGE);
    let line = nginx
        .access_lines()
        .into_iter()
        .find(|l| l.contains("GET /index.html"))
        .expect("nginx logged the request");
    assert!(
        line.starts_with("pp=127.0.0.7:"),
        "nginx must see the real client 127.0.0.7: {line}"
    );
    assert!(line.contains(" 200 "), "{line}");
    // The agent logs each connection with the real client address.
    agent.wait_for_log("client_ip=127.0.0.7 ", Duration::from_secs(2));
}

#[test]
fn nginx_sees_the_real_client_with_proxy_protocol_v1() {
    through_gateway_with_proxy_protocol("v1");
}

#[test]
fn nginx_sees_the_real_client_with_proxy_protocol_v2() {
    through_gateway_with_proxy_protocol("v2");
}

#[test]
fn https_passes_through_untouched_and_curl_verifies_the_backend() {
    let dir = Workdir::new();
    // The backend's own certificate (for 127.0.0.1), from a CA the gateway knows nothing about.
    let backend_certs = make_certs(&dir, "backend-certs", &["--gateway-ip", "127.0.0.1"]);
    let nginx = Nginx::start(
        &dir,
        "nginx",
        NginxOptions {
            proxy_protocol: true,
            tls: Some((
                &backend_certs.join("gateway.crt"),
                &backend_certs.join("gateway.key"),
            )),
            ..Default::default()
        },
    );
    // Mutual TLS between agent and gateway too, with another CA: two independent TLS layers.
    let link = make_certs(&dir, "link-certs", &[]);
    let gateway = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&link)),
        "",
    );
    let public = free_port();
    let mut web = listener("web", public, local(nginx.port));
    web.extra = "proxy_protocol = \"v2\"".into();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[web],
        &agent_tls(&link, &link, "agent"),
        "",
    );
    wait_open(local(public), Duration::from_secs(10));

    let ca = backend_certs.join("ca.crt");
    let url = format!("https://127.0.0.1:{public}/index.html");
    let (ok, body, err) = curl(&[
        "--interface",
        "127.0.0.7",
        "--cacert",
        ca.to_str().unwrap(),
        &url,
    ]);
    assert!(ok, "curl over HTTPS through the gateway failed: {err}");
    assert_eq!(body, Nginx::PAGE);
    // Without the backend's CA, curl refuses: the certificate it saw is the backend's.
    let (ok, _, err) = curl(&["--cacert", link.join("ca.crt").to_str().unwrap(), &url]);
    assert!(
        !ok,
        "curl must reject the backend certificate with the wrong CA"
    );
    assert!(err.contains("certificate"), "{err}");
    let line = nginx
        .access_lines()
        .into_iter()
        .find(|l| l.contains("GET /index.html"))
        .expect("nginx logged the request");
    assert!(line.starts_with("pp=127.0.0.7:"), "{line}");
}
