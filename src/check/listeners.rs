//! Checks 3 and 5, per gateway and listener: a real agent with this config runs for a few
//! seconds as a second agent of the site (`NAME.check`, no outbound proxy, no warm pool) to learn
//! which listeners the gateway opened, then a test connection through each public port must get
//! through (the backend's first bytes come back, or the connection stays open).

use super::*;

/// What the gateway says about each listener, and a test connection through each.
pub(super) async fn check_listeners(
    r: &mut Report,
    config: &AgentConfig,
    gateway: &str,
    reached: SocketAddr,
) {
    let agent = Arc::new(Agent::new(test_agent_config(config, gateway)));
    let mut status = agent.status();
    let stop = CancellationToken::new();
    let runner = agent.clone();
    let mut task = tokio::spawn({
        let stop = stop.clone();
        async move { runner.run(stop).await }
    });
    let wait_for_result = async {
        loop {
            if status
                .borrow_and_update()
                .gateways
                .get(gateway)
                .is_some_and(|g| !g.listeners.is_empty() || config.listeners.is_empty())
            {
                return;
            }
            if status.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    // The test agent may also end on its own (it could not start): that is the answer then.
    let (answered, ended) = tokio::select! {
        r = tokio::time::timeout(config.connect_timeout * 2, wait_for_result) => (r.is_ok(), None),
        ended = &mut task => (false, Some(ended)),
    };
    let results = status
        .borrow()
        .gateways
        .get(gateway)
        .cloned()
        .unwrap_or_default();
    // The certificate the gateway presented to the test agent (no extra connection).
    if let Some(cert) = &results.cert {
        let what = format!("gateway {gateway} certificate");
        let fix = "sallyport cert renew --dir DIR --gateway NAME on the CA host, copy it to the gateway, reload it";
        check_expiry(r, &what, cert, fix);
    }
    if !answered {
        let why = match ended {
            Some(Ok(Err(e))) => format!("the test agent could not run: {e:#}"),
            Some(Ok(Ok(()))) => "the test agent stopped before the gateway answered".into(),
            Some(Err(e)) => format!("the test agent failed: {e}"),
            None => results.last_error.clone().unwrap_or_else(|| {
                format!(
                    "no answer within {}",
                    humantime::format_duration(config.connect_timeout * 2)
                )
            }),
        };
        r.fail(
            &format!("gateway {gateway}"),
            format!("no config result: {why}"),
            "see the agent's and gateway's logs",
        );
    }
    report_listeners(r, config, gateway, reached, &results, answered).await;
    stop.cancel();
    if !task.is_finished() {
        let _ = task.await;
    }
}

/// One line per listener from the gateway's config result, and a test connection through
/// each open one. `answered`: the gateway sent its result (else silence is no news).
async fn report_listeners(
    r: &mut Report,
    config: &AgentConfig,
    gateway: &str,
    reached: SocketAddr,
    results: &crate::agent::status::GatewayStatus,
    answered: bool,
) {
    for l in &config.listeners {
        let what = format!("listener {} on {gateway}", l.name);
        match results.listeners.get(&l.name) {
            Some(ListenerStatus::Bound { addrs, .. }) => {
                r.ok(
                    &what,
                    format!("open at {}", crate::addr::display_addrs(addrs)),
                );
                let port = addrs.first().map(|a| a.port()).unwrap_or(0);
                let ip = match l.public.ip {
                    Some(ip) if !ip.is_unspecified() => ip,
                    _ => reached.ip(),
                };
                test_connection(r, &l.name, SocketAddr::new(ip, port), &l.hostnames).await;
            }
            Some(ListenerStatus::Failed { error }) => r.fail(
                &what,
                format!("the gateway could not open it: {error}"),
                if error.contains("address in use") {
                    "free that port on the gateway host, or choose another `public` port"
                } else {
                    "see the gateway's log"
                },
            ),
            Some(ListenerStatus::Paused) => r.fail(
                &what,
                "the gateway is paused",
                "`sallyport ctl resume` on the gateway",
            ),
            None if answered => r.fail(
                &what,
                "the gateway did not report it",
                "see the gateway's log",
            ),
            None => {}
        }
    }
}

/// The agent `check` runs to learn the gateway's answers: this site's listeners, one gateway,
/// and nothing a running agent of the same config holds or would be confused with.
fn test_agent_config(config: &AgentConfig, gateway: &str) -> AgentConfig {
    let mut one = config.clone();
    one.gateways = vec![gateway.to_string()];
    // No warm pool: a pooled connection could be handed a real client that dies with `check`.
    one.pool = crate::config::PoolConfig::fixed(0);
    // The running agent holds the outbound port; the test agent has no use for it.
    one.outbound = None;
    // The gateway's log and status tell the test agent from the real one.
    one.name = check_agent_name(&config.name);
    one
}

/// `NAME.check`, within the 64 characters a name may have.
pub fn check_agent_name(name: &str) -> String {
    const SUFFIX: &str = ".check";
    let keep = name.len().min(64 - SUFFIX.len());
    format!("{}{SUFFIX}", &name[..keep])
}

/// Connects through the public port and waits for the backend's first bytes. On a port shared
/// by host name (`hostnames`), it first sends a TLS ClientHello naming one of the listener's
/// names, so the gateway routes it there rather than closing a silent client.
async fn test_connection(r: &mut Report, listener: &str, public: SocketAddr, hostnames: &[String]) {
    let routed_as = (!hostnames.is_empty()).then(|| crate::peek::probe_name(hostnames));
    let what = match &routed_as {
        Some(name) => format!("test connection to {public} as {name} (listener {listener})"),
        None => format!("test connection to {public} (listener {listener})"),
    };
    let mut stream = match net::connect_addr(public, Duration::from_secs(5)).await {
        Ok(s) => s,
        Err(e) => {
            r.fail(
                &what,
                format!("cannot connect: {e}"),
                "the public port is not reachable from this host (a firewall?): test from outside",
            );
            return;
        }
    };
    if let Some(hello) = routed_as.as_deref().and_then(crate::peek::client_hello) {
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(&hello).await;
    }
    let mut buf = [0u8; 256];
    match tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 && crate::protocol::looks_like_tls(&buf[..n]) => r.ok(
            &what,
            "round trip through gateway and agent: the backend answered with a TLS handshake",
        ),
        Ok(Ok(n)) if n > 0 => {
            let first_line: String = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .take(60)
                .collect();
            r.ok(&what, format!("round trip through gateway and agent: the backend answered {first_line:?}"))
        }
        Ok(_) => r.fail(
            &what,
            "closed at once",
            "the agent could not reach the backend, or the listener's client rules refuse this host: see the logs",
        ),
        Err(_) => r.ok(&what, "connected through gateway and agent; the backend waits for the client to speak"),
    }
}
