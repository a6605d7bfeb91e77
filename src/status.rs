//! `sallyport status`: the admin API's status and statistics as terminal tables.

use serde_json::Value;

use crate::admin::client;

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

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Renders the status and stats documents as the `status` command prints them.
pub fn render(status: &Value, stats: &Value) -> String {
    let mut out = String::new();
    let light = s(&status["light"]);
    let mark = match light.as_str() {
        "green" => "●",
        "amber" => "◐",
        _ => "○",
    };
    out.push_str(&format!(
        "Sallyport gateway {}   {mark} {} ({light})   up {}   control {} ({})\n",
        s(&status["version"]),
        s(&status["state"]).to_uppercase(),
        human_duration(u(&status["uptime_seconds"])),
        s(&status["control"]["listen"]),
        if status["control"]["tls"].as_bool() == Some(true) {
            "mutual TLS"
        } else {
            "PLAINTEXT"
        },
    ));

    let agents = status["agents"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("\nAgents ({})\n", agents.len()));
    if agents.is_empty() {
        out.push_str("  none connected: listeners are closed until an agent connects\n");
    } else {
        let rows: Vec<Vec<String>> = agents
            .iter()
            .map(|a| {
                vec![
                    s(&a["site"]),
                    s(&a["name"]),
                    s(&a["addr"]),
                    human_duration(u(&a["connected_seconds"])),
                    u(&a["inflight"]).to_string(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["SITE", "AGENT", "ADDRESS", "CONNECTED", "OFFERED"],
            &rows,
        ));
    }

    let listeners = status["listeners"].as_array().cloned().unwrap_or_default();
    let per = stats["listeners"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!("\nListeners ({})\n", listeners.len()));
    if !listeners.is_empty() {
        let rows: Vec<Vec<String>> = listeners
            .iter()
            .map(|l| {
                let st = per
                    .iter()
                    .find(|p| p["site"] == l["site"] && p["name"] == l["name"])
                    .cloned()
                    .unwrap_or(Value::Null);
                let mut state = s(&l["state"]);
                if let Some(e) = l["error"].as_str() {
                    state = format!("{state}: {e}");
                }
                let addrs = l["addrs"].as_array().cloned().unwrap_or_default();
                let public = match addrs.len() {
                    0 => s(&l["public"]),
                    1 => s(&addrs[0]),
                    n => format!("{} (+{} ports)", s(&addrs[0]), n - 1),
                };
                vec![
                    s(&l["site"]),
                    s(&l["name"]),
                    public,
                    state,
                    u(&st["active"]).to_string(),
                    u(&st["pending"]).to_string(),
                    u(&st["accepted"]).to_string(),
                    u(&st["rejected"]).to_string(),
                    u(&st["closed"]).to_string(),
                    format!(
                        "{} / {}",
                        human_bytes(f(&st["bytes"]["client_read"])),
                        human_bytes(f(&st["bytes"]["client_written"]))
                    ),
                ]
            })
            .collect();
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

    let t = &stats["totals"];
    out.push_str(&format!(
        "\nClients: {} active, {} pending, {} accepted, {} rejected, {} closed\n",
        u(&t["active"]),
        u(&t["pending"]),
        u(&t["accepted"]),
        u(&t["rejected"]),
        u(&t["closed"])
    ));
    let rows: Vec<Vec<String>> = [
        ("client read", "client_read"),
        ("client written", "client_written"),
        ("agent read", "agent_read"),
        ("agent written", "agent_written"),
    ]
    .iter()
    .map(|(label, key)| {
        vec![
            label.to_string(),
            human_bytes(f(&t["bytes"][key])),
            format!("{}/s", human_bytes(f(&t["rates"][key]))),
        ]
    })
    .collect();
    out.push_str(&table(&["BYTES", "TOTAL", "RATE"], &rows));

    if let Some(refusals) = stats["refusals"].as_object() {
        let nonzero: Vec<String> = refusals
            .iter()
            .filter(|(_, v)| u(v) > 0)
            .map(|(k, v)| format!("{k} {}", u(v)))
            .collect();
        if !nonzero.is_empty() {
            out.push_str(&format!("\nRefused: {}\n", nonzero.join(", ")));
        }
    }
    out
}

/// `sallyport status`.
pub async fn print(admin: String, token: Option<String>, json: bool) -> anyhow::Result<()> {
    let status = client::get(&admin, "/api/status", token.as_deref()).await?;
    let stats = client::get(&admin, "/api/stats", token.as_deref()).await?;
    if json {
        let both = serde_json::json!({"status": status, "stats": stats});
        println!("{}", serde_json::to_string_pretty(&both)?);
    } else {
        print!("{}", render(&status, &stats));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humans() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1_500_000.0), "1.5 MB");
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(3725), "1h 02m");
        assert_eq!(human_duration(90000), "1d 01h");
    }
}
