//! Check 2, per gateway: the address resolves, the control port answers, the TLS handshake and
//! the certificate names pass, and the gateway's `[peers]` rules let this host in (a data hello
//! for [`PROBE_ID`], which the gateway counts as a check, not as a knock). A failure says why
//! and what to fix.

use super::*;

/// Resolution, reachability, TLS, peer rules. Returns the address reached when usable.
pub(super) async fn check_gateway(
    r: &mut Report,
    config: &AgentConfig,
    gateway: &str,
) -> Option<SocketAddr> {
    let what = format!("gateway {gateway}");
    let (reached, source) = reach_control_port(r, config, gateway, &what).await?;
    probe_handshake(r, config, gateway, (reached, source), &what).await
}

/// Resolves the gateway and opens a TCP connection to its control port; `ok` or `fail` for
/// each. The address reached and this host's source address.
async fn reach_control_port(
    r: &mut Report,
    config: &AgentConfig,
    gateway: &str,
    what: &str,
) -> Option<(SocketAddr, std::net::IpAddr)> {
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(gateway).await {
        Ok(a) => a.collect(),
        Err(e) => {
            r.fail(
                what,
                format!("does not resolve: {e}"),
                "check DNS, or write the gateway's IP in `gateways`",
            );
            return None;
        }
    };
    let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    r.ok(what, format!("resolves to {}", list.join(", ")));

    let started = Instant::now();
    let tcp = match net::connect_from(gateway, config.source_ip, config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "start the gateway, or check its [control] listen address and port"
                }
                std::io::ErrorKind::TimedOut => "a firewall drops traffic to the control port: allow this host in",
                _ => "check the address, the route and the firewalls between this host and the gateway",
            };
            r.fail(what, format!("control port not reachable: {e}"), fix);
            return None;
        }
    };
    let reached = tcp.peer_addr().ok()?;
    let source = tcp.local_addr().ok()?.ip();
    drop(tcp);
    r.ok(
        what,
        format!(
            "control port {reached} reachable in {} ms",
            started.elapsed().as_millis()
        ),
    );
    Some((reached, source))
}

/// The handshake a data connection makes (TLS, `[peers]`, version), proved by the gateway's
/// UNKNOWN_CLIENT answer to a claim for a client id that is never a client.
async fn probe_handshake(
    r: &mut Report,
    config: &AgentConfig,
    gateway: &str,
    (reached, source): (SocketAddr, std::net::IpAddr),
    what: &str,
) -> Option<SocketAddr> {
    // A data hello for client id 0, which is never a client, goes through TLS, the peer
    // rules and the version check, then gets UNKNOWN_CLIENT: the answer that proves all of them
    // passed. The gateway counts it as a check probe, not as a wrong token (an alert).
    let probe = Role::Data(DataHello {
        id: PROBE_ID,
        token: Token::random(),
    });
    let target = Target {
        gateway,
        resolved: Some(reached),
    };
    let tls = config.tls.is_some();
    match dial(config, target, probe, tls).await {
        Err(DialError::Protocol(ProtocolError::Peer(e))) if e.code == ErrorCode::UNKNOWN_CLIENT => {
            if tls {
                r.ok(what, "TLS 1.3 handshake ok: gateway certificate valid for that name, agent certificate accepted");
            } else {
                r.ok(
                    what,
                    "protocol handshake ok (PLAINTEXT: configure `tls` for production)",
                );
            }
            r.ok(
                what,
                format!("this host ({source}) is allowed by the gateway's [peers] rules"),
            );
            Some(reached)
        }
        Ok(_) => {
            r.fail(
                what,
                "accepted a claim for a client that does not exist",
                "this is not a Sallyport gateway you can trust",
            );
            None
        }
        Err(DialError::Refused(e)) => {
            let fix = refusal_fix(config, e.code, source);
            r.fail(what, format!("refused by the gateway: {e}"), fix);
            None
        }
        Err(DialError::Tls { source: e, .. }) => {
            let text = e.to_string();
            let fix = tls_fix(&text);
            r.fail(what, format!("TLS handshake failed: {text}"), fix);
            None
        }
        Err(DialError::CertificateRevoked) => {
            r.fail(
                what,
                "the gateway refused this agent's certificate: it is REVOKED (listed in its [control] tls.crl)",
                "issue this agent a new certificate (sallyport cert issue --force, or cert renew) on the CA host",
            );
            None
        }
        Err(DialError::CertificateRejected(alert)) => {
            r.fail(
                what,
                format!("the gateway rejected this agent's certificate (TLS alert {alert:?})"),
                "issue the agent certificate from the CA named in the gateway's client_ca",
            );
            None
        }
        Err(e) => {
            r.fail(
                what,
                e.to_string(),
                "see both daemons' logs; is `tls` configured on one side only?",
            );
            None
        }
    }
}

/// What to do about a gateway's refusal of the probe.
fn refusal_fix(config: &AgentConfig, code: ErrorCode, source: std::net::IpAddr) -> String {
    match code {
        ErrorCode::PEER_DENIED => format!("add {source} to the gateway's [peers] except list (or set source_ip)"),
        ErrorCode::TLS_REQUIRED => "configure `tls` in agent.toml (see `sallyport cert init`)".to_string(),
        ErrorCode::UNSUPPORTED_VERSION => "run the same Sallyport version on agent and gateway".to_string(),
        ErrorCode::WRONG_SITE => format!("use a certificate issued for site \"{}\" (sallyport cert issue --agent NAME --site {})", config.site, config.site),
        ErrorCode::LIMIT => "the gateway is at its handshake limit: try again, or raise [limits] max_handshakes".to_string(),
        _ => "see the gateway's log".to_string(),
    }
}

/// What to do about a failed TLS handshake, from rustls' words.
fn tls_fix(text: &str) -> &'static str {
    if text.contains("UnknownIssuer") {
        "tls.ca in agent.toml must be the CA that issued the gateway's certificate"
    } else if text.contains("NotValidForName") {
        "dial the gateway by a name in its certificate, or set tls.server_name"
    } else if text.contains("Expired") {
        "issue a new certificate on the CA host (`sallyport cert issue --dir DIR --agent NAME --force`, or `--gateway NAME,...` for the gateway's)"
    } else {
        "check both sides' certificates and keys"
    }
}
