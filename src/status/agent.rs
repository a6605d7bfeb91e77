//! `sallyport status` against an agent: its `StatusReport` and `StatsReport` as terminal
//! tables (header, gateways, listeners, backends, totals).

use std::collections::HashMap;

use super::{cert_line, human_bytes, human_duration, table};
use crate::agent::report::{Light, ListenerStatsReport, StatsReport, StatusReport};
use crate::escape::escape;

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
                    match (b.up, b.state) {
                        (true, _) => "up",
                        (false, crate::agent::backends::BackendState::Ejected) => "EJECTED",
                        (false, _) => "DOWN",
                    }
                    .to_string(),
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
