//! What `gateway`/`agent` print for `--check-config` and `--check`, and the exit status of a
//! configuration that does not load (78, `EX_CONFIG`). It only renders what the config
//! module parsed; it never opens a socket.

use std::path::Path;
use std::process::ExitCode;

use super::EXIT_CONFIG;
use crate::config::{AgentConfig, GatewayConfig};

/// `gateway --check`: what the gateway would run with.
pub(super) fn describe_gateway(path: &Path, cfg: &GatewayConfig) -> String {
    let mut out = format!("{}: valid; the gateway would run with:\n", path.display());
    out.push_str(&crate::config::reference::render(&cfg.settings()));
    for n in &cfg.notices {
        out.push_str(&format!("warning: {n}\n"));
    }
    out
}

/// `agent --check`: what the agent would run with.
pub(super) fn describe_agent(path: &Path, cfg: &AgentConfig) -> String {
    let mut out = format!("{}: valid; the agent would run with:\n", path.display());
    out.push_str(&crate::config::reference::render(&cfg.settings()));
    out.push_str(&format!(
        "  listeners ({}, config digest {}):\n",
        cfg.listeners.len(),
        &cfg.digest()[..16]
    ));
    for l in &cfg.listeners {
        let backend = match (&l.backend, &l.group) {
            (_, Some(g)) => describe_group(g),
            (crate::config::Backend::Tcp(b), None) => b.to_string(),
            (crate::config::Backend::Local, None) => "(this process)".to_string(),
        };
        out.push_str(&format!(
            "    {}  public {}  backend {}  proxy_protocol {:?}  impersonation {:?}  clients {} except {}\n",
            l.name,
            l.public,
            backend,
            l.proxy_protocol,
            l.impersonation,
            l.clients.default,
            l.clients.except_text()
        ));
    }
    for n in &cfg.notices {
        out.push_str(&format!("warning: {n}\n"));
    }
    out
}

/// A listener's several backends as `--check` prints them: `[a, b] round-robin, health ...`.
fn describe_group(g: &crate::config::BackendGroup) -> String {
    let all: Vec<String> = g.backends.iter().map(|b| b.to_string()).collect();
    let health = match &g.health {
        None => "no health check".to_string(),
        Some(h) => format!(
            "health every {} within {} ({})",
            humantime::format_duration(h.interval),
            humantime::format_duration(h.timeout),
            h.http
                .as_deref()
                .map_or("TCP connect".to_string(), |p| format!("GET {p}"))
        ),
    };
    format!("[{}] {}, {health}", all.join(", "), g.balance.word())
}

pub(super) fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// `--check-config` on a file that loaded: its warnings, then a line saying it is valid.
pub(super) fn config_valid(path: &Path, notices: &[String]) -> ExitCode {
    for n in notices {
        eprintln!("warning: {n}");
    }
    println!("{}: valid", path.display());
    ExitCode::SUCCESS
}
