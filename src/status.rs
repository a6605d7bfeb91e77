//! `sallyport status`: the admin API's status and statistics as terminal tables. Both daemons'
//! answers are read into the types their admin APIs serialise (the gateway's `StatusView` and
//! `StatsView`, the agent's `StatusReport` and `StatsReport`), never by string keys; an answer
//! this version cannot read is an error that says so.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use crate::admin::client;
use crate::agent::report::{self, Light, ListenerStatsReport, StatsReport, StatusReport};
use crate::certinfo::CertView;
use crate::escape::escape;
use crate::gateway::outbound::OUTBOUND_LISTENER;
use crate::gateway::stats::TrafficSnapshot;
use crate::gateway::{
    AgentView, ListenerStatsView, ListenerView, RevokedView, RouteView, StatsView, StatusView,
};

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

/// One row of the listener table: its name, where it listens, its state and its counters
/// (zeros when it has none yet).
fn listener_row(
    key: &(String, String),
    public: String,
    state: String,
    st: Option<&TrafficSnapshot>,
) -> Vec<String> {
    let n = |f: fn(&TrafficSnapshot) -> u64| st.map_or(0, f).to_string();
    let bytes = st.map(|t| t.bytes).unwrap_or_default();
    vec![
        key.0.clone(),
        key.1.clone(),
        public,
        state,
        n(|t| t.active),
        n(|t| t.pending),
        n(|t| t.accepted),
        n(|t| t.rejected),
        n(|t| t.closed),
        format!(
            "{} / {}",
            human_bytes(bytes.client_read as f64),
            human_bytes(bytes.client_written as f64)
        ),
    ]
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

/// Renders the gateway's status and stats documents as the `status` command prints them, one
/// section after the other.
pub fn render(status: &StatusView, stats: &StatsView) -> String {
    let mut out = String::new();
    out.push_str(&gateway_header(status));
    out.push_str(&agents_section(&status.agents));
    out.push_str(&revoked_section(&status.revoked));
    out.push_str(&listeners_section(&status.listeners, &stats.listeners));
    out.push_str(&routes_section(&status.routes));
    out.push_str(&totals_section(stats));
    out
}

/// The first lines: version, state, uptime, control port, the gateway's certificate.
fn gateway_header(status: &StatusView) -> String {
    let mut out = String::new();
    let light = s(&status.light);
    let mark = match light.as_str() {
        "green" => "●",
        "amber" => "◐",
        _ => "○",
    };
    out.push_str(&format!(
        "Sallyport gateway {}   {mark} {} ({light})   up {}   control {} ({})\n",
        s(&status.version),
        word(&status.state).to_uppercase(),
        human_duration(status.uptime_seconds),
        s(status.control.listen),
        if status.control.tls {
            "mutual TLS"
        } else {
            "PLAINTEXT"
        },
    ));
    out.push_str(&cert_line(
        "gateway certificate",
        status.control.cert.as_ref(),
    ));
    out
}

/// The connected agents, with a WARNING line per certificate near its expiry.
fn agents_section(agents: &[AgentView]) -> String {
    let mut out = String::new();
    out.push_str(&format!("\nAgents ({})\n", agents.len()));
    if agents.is_empty() {
        out.push_str("  none connected: listeners are closed until an agent connects\n");
        return out;
    }
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                s(&a.site),
                s(&a.name),
                s(a.addr),
                human_duration(a.connected_seconds),
                a.inflight.to_string(),
                cert_cell(a.cert.as_ref()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SITE",
            "AGENT",
            "ADDRESS",
            "CONNECTED",
            "OFFERED",
            "CERTIFICATE",
        ],
        &rows,
    ));
    for a in agents {
        if let Some(w) = a.cert.as_ref().and_then(|c| c.warning.as_ref()) {
            out.push_str(&format!("  WARNING: agent {}: {}\n", s(&a.name), escape(w)));
        }
    }
    out
}

/// Agents revoked by `[peers]` and what became of their connections (nothing when none).
fn revoked_section(revoked: &[RevokedView]) -> String {
    let mut out = String::new();
    if revoked.is_empty() {
        return out;
    }
    out.push_str(&format!("\nRevoked by [peers] ({})\n", revoked.len()));
    let rows: Vec<Vec<String>> = revoked
        .iter()
        .map(|r| {
            let established = if r.established_closed {
                "closed"
            } else {
                "left to finish"
            };
            vec![
                s(&r.site),
                s(&r.agent),
                s(r.addr),
                s(&r.reason),
                format!(
                    "{} pooled, {} established ({established})",
                    r.pooled, r.established
                ),
            ]
        })
        .collect();
    out.push_str(&table(
        &["SITE", "AGENT", "ADDRESS", "WHY", "CONNECTIONS"],
        &rows,
    ));
    out
}

/// Every listener with its counters, then counters without a pushed listener (outbound traffic, listeners no longer pushed), so the table adds up to the totals.
fn listeners_section(listeners: &[ListenerView], per: &[ListenerStatsView]) -> String {
    let mut out = String::new();
    let key = |site: &str, name: &str| (s(site), s(name));
    let counters: HashMap<(String, String), &TrafficSnapshot> = per
        .iter()
        .map(|p| (key(&p.site, &p.name), &p.traffic))
        .collect();
    let mut shown = HashSet::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for l in listeners {
        let key = key(&l.site, &l.name);
        let st = counters.get(&key).copied();
        let mut state = word(&l.state);
        if let Some(e) = &l.error {
            state = format!("{state}: {e}");
        }
        let public = match l.addrs.len() {
            0 => s(&l.public),
            1 => s(l.addrs[0]),
            n => format!("{} (+{} ports)", s(l.addrs[0]), n - 1),
        };
        rows.push(listener_row(&key, public, state, st));
        shown.insert(key);
    }
    // Counters without a pushed listener: the agents' outbound proxy traffic, and listeners no
    // longer pushed. Without these rows the table would not add up to the totals below.
    for p in per {
        let key = key(&p.site, &p.name);
        if shown.contains(&key) {
            continue;
        }
        let state = if key.1 == OUTBOUND_LISTENER {
            "outbound"
        } else {
            "not pushed"
        };
        rows.push(listener_row(
            &key,
            "-".into(),
            state.into(),
            Some(&p.traffic),
        ));
    }
    out.push_str(&format!("\nListeners ({})\n", rows.len()));
    if !rows.is_empty() {
        out.push_str(&table(
            &[
                "SITE",
                "LISTENER",
                "PUBLIC",
                "STATE",
                "ACTIVE",
                "PENDING",
                "ACCEPTED",
                "REJECTED",
                "CLOSED",
                "CLIENT IN / OUT",
            ],
            &rows,
        ));
    }
    out
}

/// The routes of ports shared by host name (nothing when none).
fn routes_section(routes: &[RouteView]) -> String {
    let mut out = String::new();
    if !routes.is_empty() {
        let rows: Vec<Vec<String>> = routes
            .iter()
            .map(|r| vec![s(r.addr), s(&r.hostname), s(&r.site), s(&r.listener)])
            .collect();
        out.push_str(&format!("\nRoutes by host name ({})\n", rows.len()));
        out.push_str(&table(&["PORT", "HOST NAME", "SITE", "LISTENER"], &rows));
    }
    out
}

/// Client totals, bytes and rates, and the refusals that happened.
fn totals_section(stats: &StatsView) -> String {
    let mut out = String::new();
    let t = &stats.totals;
    out.push_str(&format!(
        "\nClients: {} active, {} pending, {} accepted, {} rejected, {} closed\n",
        t.active, t.pending, t.accepted, t.rejected, t.closed
    ));
    let (b, r) = (&t.bytes, &t.rates);
    let rows: Vec<Vec<String>> = [
        ("client read", b.client_read, r.client_read),
        ("client written", b.client_written, r.client_written),
        ("agent read", b.agent_read, r.agent_read),
        ("agent written", b.agent_written, r.agent_written),
    ]
    .iter()
    .map(|(label, total, rate)| {
        vec![
            label.to_string(),
            human_bytes(*total as f64),
            format!("{}/s", human_bytes(*rate)),
        ]
    })
    .collect();
    out.push_str(&table(&["BYTES", "TOTAL", "RATE"], &rows));
    let nonzero: Vec<String> = stats
        .refusals
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", escape(k)))
        .collect();
    if !nonzero.is_empty() {
        out.push_str(&format!("\nRefused: {}\n", nonzero.join(", ")));
    }
    out
}

/// Renders an agent's status and stats as the `status` command prints them.
pub fn render_agent(status: &StatusReport, stats: &StatsReport) -> String {
    let mut out = String::new();
    out.push_str(&agent_header(status));
    out.push_str(&gateways_section(status));
    out.push_str(&agent_listeners_section(status, stats));
    out.push_str(&agent_backends_section(status));
    out.push_str(&agent_totals_section(status, stats));
    out
}

/// The first lines: version, site, gateways connected, uptime, config; a refused reload and certificate warnings.
fn agent_header(status: &StatusReport) -> String {
    let mut out = String::new();
    let up = status.gateways.iter().filter(|g| g.connected).count();
    let (mark, light) = match status.light {
        Light::Green => ("●", "green"),
        Light::Amber => ("◐", "amber"),
        Light::Red => ("○", "red"),
    };
    out.push_str(&format!(
        "Sallyport agent {}   site {}, agent {}   {mark} {up} OF {} GATEWAYS CONNECTED ({light})   up {}   config generation {} ({})\n",
        status.version,
        escape(&status.site),
        escape(&status.agent),
        status.gateways.len(),
        human_duration(status.uptime_seconds),
        status.config.generation,
        status.config.digest.chars().take(12).collect::<String>(),
    ));
    if let Some(r) = status.config.last_reload.as_ref().filter(|r| !r.ok) {
        out.push_str(&format!(
            "  last reload REFUSED, running the previous configuration: {}\n",
            escape(r.error.as_deref().unwrap_or("?"))
        ));
    }

    out.push_str(&cert_line("agent certificate", status.cert.as_ref()));
    for g in &status.gateways {
        if let Some(w) = g.cert.as_ref().and_then(|c| c.warning.as_ref()) {
            out.push_str(&format!(
                "  WARNING: gateway {}: {}\n",
                escape(&g.gateway),
                escape(w)
            ));
        }
    }
    out
}

/// One row per gateway: state, address, TLS, round trip, pool, last error.
fn gateways_section(status: &StatusReport) -> String {
    let mut out = String::new();
    out.push_str(&format!("\nGateways ({})\n", status.gateways.len()));
    let rows: Vec<Vec<String>> = status
        .gateways
        .iter()
        .map(|g| {
            let dash = || "-".to_string();
            vec![
                escape(&g.gateway),
                if g.connected { "connected" } else { "down" }.to_string(),
                g.addr.clone().unwrap_or_else(dash),
                g.connected_seconds.map_or_else(dash, human_duration),
                match &g.tls {
                    Some(t) => format!("{} {}", t.version, escape(&t.server_name)),
                    None if g.connected => "PLAINTEXT".into(),
                    None => dash(),
                },
                g.rtt_ms.map_or_else(dash, |ms| format!("{ms:.1} ms")),
                if g.connected {
                    format!("{}/{}", g.pool.idle, g.pool.size)
                } else {
                    dash()
                },
                match &g.last_error {
                    Some(e) => format!("{} ({} attempts)", escape(e), g.reconnect_attempts),
                    None => dash(),
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "GATEWAY",
            "STATE",
            "ADDRESS",
            "CONNECTED",
            "TLS",
            "RTT",
            "POOL",
            "LAST ERROR",
        ],
        &rows,
    ));
    out
}

/// One row per listener with its state on each gateway and its counters, then the last failure per listener.
fn agent_listeners_section(status: &StatusReport, stats: &StatsReport) -> String {
    let mut out = String::new();
    let counters: HashMap<&str, &ListenerStatsReport> = stats
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l))
        .collect();
    let mut header: Vec<String> = ["LISTENER", "PUBLIC", "BACKEND"].map(String::from).to_vec();
    header.extend(
        status
            .gateways
            .iter()
            .map(|g| format!("ON {}", escape(&g.gateway))),
    );
    header.extend(["SERVED", "ACTIVE", "BACKEND FAILURES", "CLIENT IN / OUT"].map(String::from));
    let mut failures = Vec::new();
    let rows: Vec<Vec<String>> = status
        .listeners
        .iter()
        .map(|l| {
            let mut row = vec![escape(&l.name), l.public.clone(), escape(&l.backend)];
            for g in &status.gateways {
                let on = g.listeners.iter().find(|x| x.name == l.name);
                row.push(match on {
                    Some(x) if !x.addrs.is_empty() => format!("{} {}", x.state, x.addrs.join(",")),
                    Some(x) => match &x.error {
                        Some(e) => format!("{}: {}", x.state, escape(e)),
                        None => x.state.clone(),
                    },
                    None => "-".into(),
                });
            }
            let c = counters.get(l.name.as_str()).map(|c| &c.counters);
            let get = |f: fn(&crate::agent::report::ListenerSnapshot) -> u64| c.map_or(0, f);
            row.push(get(|c| c.served).to_string());
            row.push(get(|c| c.active).to_string());
            row.push(get(|c| c.backend_failures).to_string());
            row.push(format!(
                "{} / {}",
                human_bytes(get(|c| c.bytes.from_client) as f64),
                human_bytes(get(|c| c.bytes.to_client) as f64)
            ));
            if let Some(f) = c.and_then(|c| c.last_failure.as_ref()) {
                failures.push(format!("  {}: {}", escape(&l.name), escape(&f.error)));
            }
            row
        })
        .collect();
    out.push_str(&format!("\nListeners ({})\n", rows.len()));
    if !rows.is_empty() {
        let header: Vec<&str> = header.iter().map(String::as_str).collect();
        out.push_str(&table(&header, &rows));
    }
    if !failures.is_empty() {
        out.push_str("\nLast failure per listener\n");
        for f in failures {
            out.push_str(&f);
            out.push('\n');
        }
    }
    out
}

/// One row per backend of listeners with several: in rotation or not, clients, failures.
fn agent_backends_section(status: &StatusReport) -> String {
    let rows: Vec<Vec<String>> = status
        .listeners
        .iter()
        .flat_map(|l| {
            let balance = l.balance.clone().unwrap_or_default();
            l.backends.iter().map(move |b| {
                vec![
                    escape(&l.name),
                    balance.clone(),
                    escape(&b.backend),
                    if b.up { "up" } else { "DOWN" }.to_string(),
                    b.active.to_string(),
                    b.connect_failures.to_string(),
                    b.ejections.to_string(),
                    b.last_error.as_deref().map_or("-".into(), escape),
                ]
            })
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let header = [
        "LISTENER",
        "BALANCE",
        "BACKEND",
        "STATE",
        "ACTIVE",
        "CONNECT FAILURES",
        "EJECTED",
        "LAST ERROR",
    ];
    format!("\nBackends ({})\n{}", rows.len(), table(&header, &rows))
}

/// Client totals and the outbound proxy's requests.
fn agent_totals_section(status: &StatusReport, stats: &StatsReport) -> String {
    let mut out = String::new();
    let t = &stats.totals;
    out.push_str(&format!(
        "\nClients: {} active, {} offered, {} served, {} backend failures, {} data connection failures\n",
        t.active, t.offered, t.served, t.backend_failures, t.data_failures
    ));
    if let Some(o) = &status.outbound {
        let counts: Vec<String> = stats
            .outbound
            .requests
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
            .collect();
        out.push_str(&format!(
            "Outbound proxy {}{}: {} active; requests: {}\n",
            o.listen,
            if o.authentication {
                " (authentication)"
            } else {
                ""
            },
            stats.outbound.active,
            if counts.is_empty() {
                "none".to_string()
            } else {
                counts.join(", ")
            }
        ));
    }
    out
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
