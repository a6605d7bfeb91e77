//! `sallyport check --config agent.toml`: the manual's troubleshooting list, automated. One
//! line per check, `ok` or `FAIL` with the cause and the fix; exit status 1 on any failure.
//!
//! 1. the config file is valid;
//! 2. per gateway: the address resolves, the control port is reachable, the TLS handshake and
//!    certificate names are fine, the gateway's `[peers]` rules let this host in (the gateway
//!    says so in its refusal; the probe is a data hello for [`PROBE_ID`], which the gateway
//!    counts as a check, not as a knock);
//! 3. per gateway and listener: the gateway opened it (or why not); to learn that, the check
//!    runs a real agent with this config for a few seconds (as a second agent of the site named
//!    `NAME.check`, without the outbound proxy or a warm pool, it changes nothing on the
//!    gateway and serves any client it is handed);
//! 4. per backend: reachable from this host; the outbound proxy's port: free, or held by a
//!    SOCKS5 proxy;
//! 5. per listener: a test connection through the gateway's public port gets through: the
//!    backend's first bytes come back (SSH, FTP, SMTP banners), or the connection stays open,
//!    which it would not if the agent could not reach the backend.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::agent::dial::{dial, DialError, Target};
use crate::agent::Agent;
use crate::config::{AgentConfig, Backend};
use crate::escape::escaped;
use crate::net;
use crate::protocol::{DataHello, ErrorCode, ListenerStatus, ProtocolError, Role, Token, PROBE_ID};

/// Collects results and prints them as they come.
#[derive(Default)]
struct Report {
    checks: usize,
    failures: usize,
    warnings: usize,
}

impl Report {
    /// Something that fails only if the agent runs the way this check runs (its user and
    /// capabilities may differ): said, not counted as a failure.
    fn warn(&mut self, what: &str, cause: impl AsRef<str>, fix: impl AsRef<str>) {
        self.checks += 1;
        self.warnings += 1;
        println!(
            "warn  {what}: {} -> fix: {}",
            escaped(cause.as_ref()),
            escaped(fix.as_ref())
        );
    }

    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        self.checks += 1;
        // Details carry the gateway's words (listener results, refusals): escaped.
        println!("ok    {what}: {}", escaped(detail.as_ref()));
    }

    fn fail(&mut self, what: &str, cause: impl AsRef<str>, fix: impl AsRef<str>) {
        self.checks += 1;
        self.failures += 1;
        println!(
            "FAIL  {what}: {} -> fix: {}",
            escaped(cause.as_ref()),
            escaped(fix.as_ref())
        );
    }
}

/// Runs every check; returns whether all passed.
pub async fn run(path: &Path) -> bool {
    let mut r = Report::default();
    let config = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            r.fail("config", e.to_string(), "correct the file at that line");
            return false;
        }
    };
    r.ok(
        &format!("config {}", path.display()),
        format!(
            "valid (site {}, {} listener(s), {} gateway(s){})",
            config.site,
            config.listeners.len(),
            config.gateways.len(),
            if config.tls.is_some() {
                ", mutual TLS"
            } else {
                ", PLAINTEXT"
            }
        ),
    );

    if let Some(tls) = &config.tls {
        let what = format!("agent certificate {}", tls.cert.display());
        if tls.identity.serves(&config.site) == Some(false) {
            r.fail(
                &what,
                format!(
                    "bound to site \"{}\", not to this agent's site \"{}\": gateways refuse it (WRONG_SITE)",
                    tls.identity.sites.join("\", \""),
                    config.site
                ),
                format!("issue one for this site: sallyport cert issue --dir DIR --agent NAME --site {}", config.site),
            );
        }
        check_expiry(
            &mut r,
            &what,
            &tls.identity,
            "sallyport cert renew --dir DIR --agent NAME",
        );
    }
    let mut usable = Vec::new();
    for gateway in &config.gateways {
        if let Some(addr) = check_gateway(&mut r, &config, gateway).await {
            usable.push((gateway.clone(), addr));
        }
    }
    check_backends(&mut r, &config).await;
    check_outbound(&mut r, &config).await;
    check_transparent(&mut r, &config);
    for (gateway, addr) in &usable {
        check_listeners(&mut r, &config, gateway, *addr).await;
    }
    let warned = match r.warnings {
        0 => String::new(),
        n => format!(", {n} warning(s)"),
    };
    println!(
        "\n{} check(s), {} failed{warned}{}",
        r.checks,
        r.failures,
        if r.failures == 0 && r.warnings == 0 {
            ": all good"
        } else {
            ""
        }
    );
    r.failures == 0
}

/// Resolution, reachability, TLS, peer rules. Returns the address reached when usable.
async fn check_gateway(r: &mut Report, config: &AgentConfig, gateway: &str) -> Option<SocketAddr> {
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

/// `ok` with the expiry date, or `warn` within 30 days (and after).
fn check_expiry(r: &mut Report, what: &str, cert: &crate::certinfo::CertInfo, fix: &str) {
    let left = cert.seconds_left(std::time::SystemTime::now());
    let words = crate::certinfo::describe_expiry(left);
    if crate::certinfo::expiry_warns(left) {
        r.warn(what, format!("{words} (under 30 days)"), fix);
    } else {
        r.ok(what, words);
    }
}

/// Every backend reachable from this host (both ends of a range).
async fn check_backends(r: &mut Report, config: &AgentConfig) {
    for l in &config.listeners {
        let Backend::Tcp(backend) = &l.backend else {
            continue;
        };
        let mut offsets = vec![0u16];
        if backend.ports.len() > 1 {
            offsets.push((backend.ports.len() - 1) as u16);
        }
        for offset in offsets {
            let Some(target) = backend.target(offset) else {
                continue;
            };
            let what = format!("backend {target} (listener {})", l.name);
            match net::connect(&target, config.connect_timeout).await {
                Ok(_) => r.ok(&what, "reachable from this host"),
                Err(e) => r.fail(
                    &what,
                    format!("not reachable: {e}"),
                    "start the backend, or correct `backend` in agent.toml",
                ),
            }
        }
    }
}

/// The outbound proxy's port: free (the agent opens it when it starts), or held by a SOCKS5
/// proxy (the running agent's), or taken by something else (the agent cannot start).
async fn check_outbound(r: &mut Report, config: &AgentConfig) {
    let Some(outbound) = &config.outbound else {
        return;
    };
    let listen = outbound.listen;
    let what = format!("outbound proxy {listen}");
    let target = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, listen.port()))
        }
        _ => listen,
    };
    let mut stream = match net::connect_addr(target, Duration::from_secs(2)).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            r.ok(&what, "port free: the agent opens it when it starts");
            return;
        }
        Err(e) => {
            r.fail(
                &what,
                format!("cannot test the port: {e}"),
                "check `[outbound] listen` in agent.toml",
            );
            return;
        }
    };
    // A SOCKS5 greeting offering "no authentication": any SOCKS5 server answers 05 and its
    // choice (00, or FF when it requires a password); other programs do not.
    use tokio::io::AsyncWriteExt;
    let mut reply = [0u8; 2];
    let answered = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(&[5, 1, 0]).await?;
        stream.read_exact(&mut reply).await
    })
    .await;
    match answered {
        Ok(Ok(_)) if reply[0] == 5 => r.ok(
            &what,
            "a SOCKS5 proxy answers there (the running agent's, if it is running)",
        ),
        _ => r.fail(
            &what,
            "the port is taken by a program that is not a SOCKS5 proxy: the agent cannot open it",
            "stop that program, or choose another `[outbound] listen`",
        ),
    }
}

/// Transparent listeners need `IP_TRANSPARENT` (root or CAP_NET_ADMIN). This process is not
/// necessarily the agent (a service manager may grant the agent more), so a refusal is a warning.
fn check_transparent(r: &mut Report, config: &AgentConfig) {
    for l in &config.listeners {
        if l.impersonation != crate::config::Impersonation::Transparent {
            continue;
        }
        let what = format!("listener {} (impersonation = \"transparent\")", l.name);
        match net::may_connect_transparent() {
            Ok(()) => r.ok(&what, "this process may set IP_TRANSPARENT"),
            Err(e) => r.warn(
                &what,
                format!("this process cannot set IP_TRANSPARENT ({e}): run like this, the agent would fail every client of it"),
                "run the agent as root or with CAP_NET_ADMIN (systemd: AmbientCapabilities=CAP_NET_ADMIN); ignore this if the agent's service has it",
            ),
        }
    }
}

/// What the gateway says about each listener, and a test connection through each.
async fn check_listeners(r: &mut Report, config: &AgentConfig, gateway: &str, reached: SocketAddr) {
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
