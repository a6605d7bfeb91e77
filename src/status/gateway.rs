//! `sallyport status` against a gateway: its `StatusView` and `StatsView` as terminal tables,
//! one section after the other (header, agents, revoked agents, listeners, routes, totals).

use std::collections::{HashMap, HashSet};

use super::{cert_cell, cert_line, human_bytes, human_duration, s, table, word};
use crate::escape::escape;
use crate::gateway::outbound::OUTBOUND_LISTENER;
use crate::gateway::stats::TrafficSnapshot;
use crate::gateway::{
    AgentView, ListenerStatsView, ListenerView, RevokedView, RouteView, StatsView, StatusView,
};

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
