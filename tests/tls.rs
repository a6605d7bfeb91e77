//! Mutual TLS between agent and gateway, with certificates from `sallyport cert init`.

mod support;

use std::time::Duration;

use support::servers::EchoServer;
use support::*;

/// Gateway with TLS from `certs`; `control_extra` adds keys to [control].
fn tls_gateway(dir: &Workdir, certs: &std::path::Path, control_extra: &str) -> Gateway {
    start_gateway_with(
        dir,
        "gateway",
        &format!(
            "listen = \"127.0.0.1:0\"\n{}\n{control_extra}",
            gateway_tls(certs)
        ),
        "",
    )
}

/// Waits a little and checks the port never opened.
fn stays_closed(addr: std::net::SocketAddr) {
    assert!(
        !wait_until(Duration::from_secs(2), || accepts(addr)),
        "{addr} opened although the agent should have been refused"
    );
}

#[test]
fn agent_and_gateway_talk_tls_13_with_verified_certificates() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "");
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "over mutual TLS");
    gateway
        .proc
        .wait_for_log("TLS 1.3, certificate verified", Duration::from_secs(1));
    agent.wait_for_log(
        "control channel up (TLS 1.3, gateway verified",
        Duration::from_secs(1),
    );
    assert_eq!(gateway.proc.count_log("PLAINTEXT"), 0);
}

#[test]
fn a_second_agent_certificate_from_the_same_ca_works() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    make_certs(&dir, "certs", &["--agent-name", "agent-b"]);
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "");
    let public = local(free_port());
    let _agent = start_agent(
        &dir,
        "agent-b",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent-b"),
        "",
    );
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "agent-b");
}

#[test]
fn data_tls_off_keeps_control_encrypted_and_data_plain() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "data_tls = false");
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    wait_open(public, Duration::from_secs(10));
    echo_round_trip(public, "plaintext data, encrypted control");
    agent.wait_for_log("data connections in plaintext", Duration::from_secs(1));
    gateway
        .proc
        .wait_for_log("data_tls = false", Duration::from_secs(1));
}

#[test]
fn an_agent_certificate_from_another_ca_is_refused() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let rogue = make_certs(&dir, "rogue", &[]);
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "");
    let public = local(free_port());
    // It trusts the right CA for the gateway, but its own certificate is from another CA.
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &rogue, "agent"),
        "",
    );
    let line = gateway
        .proc
        .wait_for_log("TLS handshake failed", Duration::from_secs(10));
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    let line = agent.wait_for_log("control channel lost", Duration::from_secs(5));
    assert!(
        line.contains("the gateway rejected this agent's TLS certificate"),
        "{line}"
    );
    stays_closed(public);
}

#[test]
fn an_agent_expecting_another_gateway_name_refuses_to_connect() {
    let dir = Workdir::new();
    let certs = make_certs(
        &dir,
        "certs",
        &[
            "--gateway-name",
            "dmz-gw1.example",
            "--gateway-ip",
            "127.0.0.1",
        ],
    );
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "");
    let public = local(free_port());
    let tls =
        agent_tls(&certs, &certs, "agent").replace(" }", ", server_name = \"dmz-gw2.example\" }");
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &tls,
        "",
    );
    let line = agent.wait_for_log("control channel lost", Duration::from_secs(10));
    assert!(line.contains("TLS handshake with"), "{line}");
    assert!(
        line.contains("NotValidForName") || line.contains("not valid for name"),
        "{line}"
    );
    stays_closed(public);

    // The right name (here the IP the agent dials, also in the certificate) works.
    let public2 = local(free_port());
    let _good = start_agent(
        &dir,
        "agent2",
        &[gateway.control],
        &[listener("echo2", public2.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    wait_open(public2, Duration::from_secs(10));
}

#[test]
fn a_plaintext_agent_gets_a_clear_refusal_from_a_tls_gateway() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    let gateway = tls_gateway(&dir, &certs, "");
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        "",
        "",
    );
    let line = agent.wait_for_log("control channel lost", Duration::from_secs(5));
    assert!(
        line.contains(
            "the gateway refused the connection: TLS required (8): this gateway requires TLS"
        ),
        "{line}"
    );
    gateway
        .proc
        .wait_for_log("refused: TLS required", Duration::from_secs(1));
    stays_closed(public);
}

#[test]
fn a_tls_agent_gets_a_clear_refusal_from_a_plaintext_gateway() {
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    let gateway = start_gateway(&dir, "");
    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    let line = agent.wait_for_log("control channel lost", Duration::from_secs(5));
    assert!(
        line.contains("this gateway has no TLS configured"),
        "{line}"
    );
    stays_closed(public);
}
