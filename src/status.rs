//! `sallyport status`: the admin API's status and statistics as terminal tables. Both daemons'
//! answers are read into the types their admin APIs serialise (the gateway's `StatusView` and
//! `StatsView`, the agent's `StatusReport` and `StatsReport`), never by string keys; an answer
//! this version cannot read is an error that says so. The gateway's tables are in
//! [`gateway`], the agent's in [`agent`]; the cells both use (sizes, durations, escaped names,
//! certificates) are here.

use serde_json::Value;

use crate::admin::client;
use crate::agent::report::{self, StatsReport, StatusReport};
use crate::certinfo::CertView;
use crate::escape::escape;
use crate::gateway::{StatsView, StatusView};

mod agent;
mod gateway;

pub use agent::render_agent;
pub use gateway::render;

/// `1.5 MB`, `12 KB`, `512 B`.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", v as u64)
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `3d 04h`, `1h 02m`, `5m 07s`, `12s`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h:02}h"),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            out.push_str(cell);
            if i + 1 < cells.len() {
                out.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// A name, error or address for the terminal. They come from agents (or from whoever answers
/// on the admin port): control characters are escaped, never printed.
fn s(v: impl std::fmt::Display) -> String {
    escape(&v.to_string())
}

/// "expires in 400 day(s)" for a certificate in the status; "-" without one.
fn cert_cell(cert: Option<&CertView>) -> String {
    match cert {
        Some(c) => crate::certinfo::describe_expiry(c.expires_in_seconds),
        None => "-".to_string(),
    }
}

/// One line about a certificate, a WARNING within 30 days of its expiry; empty without one.
fn cert_line(what: &str, cert: Option<&CertView>) -> String {
    let Some(c) = cert else {
        return String::new();
    };
    match &c.warning {
        Some(w) => format!("  WARNING: {what}: {}\n", escape(w)),
        None => format!(
            "  {what} \"{}\": {}\n",
            escape(&s(&c.subject)),
            cert_cell(cert)
        ),
    }
}

/// The lowercase word the API uses for a state (`running`, `listening`, ...).
fn word(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(w)) => w,
        _ => "-".to_string(),
    }
}

/// `sallyport status`: whichever daemon answers at `admin` (the gateway's or the agent's admin
/// server; `/api/status` says which).
pub async fn print(admin: String, token: Option<String>, json: bool) -> anyhow::Result<()> {
    let status = client::get(&admin, "/api/status", token.as_deref()).await?;
    let stats = client::get(&admin, "/api/stats", token.as_deref()).await?;
    if json {
        let both = serde_json::json!({"status": status, "stats": stats});
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else if status["daemon"] == report::DAEMON {
        let status: StatusReport = serde_json::from_value(status).map_err(|e| {
            anyhow::anyhow!("{admin}/api/status: an agent's answer this version does not read: {e}")
        })?;
        let stats: StatsReport = serde_json::from_value(stats).map_err(|e| {
            anyhow::anyhow!("{admin}/api/stats: an agent's answer this version does not read: {e}")
        })?;
        print!("{}", render_agent(&status, &stats));
    } else {
        let status: StatusView = serde_json::from_value(status).map_err(|e| {
            anyhow::anyhow!(
                "{admin}/api/status: a gateway's answer this version does not read: {e}"
            )
        })?;
        let stats: StatsView = serde_json::from_value(stats).map_err(|e| {
            anyhow::anyhow!("{admin}/api/stats: a gateway's answer this version does not read: {e}")
        })?;
        print!("{}", render(&status, &stats));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::outbound::OUTBOUND_LISTENER;

    /// A gateway's answers as its admin API writes them, read into its own types and
    /// rendered: every section, escaped names, counters without a pushed listener.
    #[test]
    fn a_gateways_answers_are_read_typed_and_rendered() {
        let status = serde_json::json!({
            "daemon": "gateway", "state": "running", "light": "green", "version": "9.9.9",
            "started_at": 1, "uptime_seconds": 3725,
            "control": {"listen": "0.0.0.0:44500", "tls": false, "data_tls": false, "cert": null},
            "agents": [{"site": "s", "name": "a\u{1b}1", "addr": "10.0.0.2:5000",
                        "connected_since": 1, "connected_seconds": 5, "inflight": 2, "cert": null}],
            "listeners": [{"site": "s", "name": "web", "public": "8080", "state": "listening",
                           "addrs": ["0.0.0.0:8080", "0.0.0.0:8081"], "error": null}],
            "routes": [], "revoked": []
        });
        let traffic = serde_json::json!({
            "accepted": 3, "rejected": 1, "closed": 2, "active": 1, "pending": 0,
            "bytes": {"client_read": 1500000, "client_written": 0, "agent_read": 0, "agent_written": 0},
            "rates": {"client_read": 0.0, "client_written": 0.0, "agent_read": 0.0, "agent_written": 0.0}
        });
        let mut outbound = traffic.clone();
        outbound["site"] = "s".into();
        outbound["name"] = OUTBOUND_LISTENER.into();
        let mut web = traffic.clone();
        web["site"] = "s".into();
        web["name"] = "web".into();
        let stats = serde_json::json!({
            "uptime_seconds": 3725, "agents": 1, "pooled": 0, "totals": traffic,
            "listeners": [web, outbound], "refusals": {"banned": 0, "client_rules": 4},
            "check_probes": 0,
            "tls": {"handshakes_full": 0, "handshakes_resumed": 0, "sessions": {"entries": 0, "bytes": 0}},
            "history": {"interval_seconds": 1, "client_read": [], "client_written": [],
                        "agent_read": [], "agent_written": [], "active": []}
        });
        let status: StatusView = serde_json::from_value(status).unwrap();
        let stats: StatsView = serde_json::from_value(stats).unwrap();
        let out = render(&status, &stats);
        assert!(out.starts_with("Sallyport gateway 9.9.9   ● RUNNING (green)   up 1h 02m   control 0.0.0.0:44500 (PLAINTEXT)\n"), "{out}");
        assert!(
            !out.contains('\u{1b}'),
            "control characters are escaped: {out}"
        );
        assert!(out.contains("0.0.0.0:8080 (+1 ports)  listening"), "{out}");
        assert!(out.contains("(outbound)"), "{out}");
        assert!(out.contains("outbound"), "{out}");
        assert!(out.contains("1.5 MB / 0 B"), "{out}");
        assert!(out.contains("\nRefused: client_rules 4\n"), "{out}");
    }

    #[test]
    fn humans() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1_500_000.0), "1.5 MB");
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(3725), "1h 02m");
        assert_eq!(human_duration(90000), "1d 01h");
    }
}
