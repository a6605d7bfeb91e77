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
//!
//! This file runs them in that order and prints the report; check 2 is in `check/gateway.rs`,
//! checks 3 and 5 in `check/listeners.rs`.

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

mod gateway;
mod listeners;

use gateway::check_gateway;
pub use listeners::check_agent_name;
use listeners::check_listeners;

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
