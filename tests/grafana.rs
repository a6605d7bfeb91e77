//! The Grafana dashboard (issue 16 part 4, packaging/grafana/sallyport.json) against live
//! daemons: every metric its queries use exists in the live `/metrics` of the daemon its row is
//! about (the "Gateways" row: a gateway; the "Agents" row: an agent), and a real Prometheus
//! (Debian's `prometheus` package) scraping both evaluates every query without an error and
//! with data, Grafana's variables replaced by what "All" sends.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::servers::EchoServer;
use support::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana/sallyport.json");
    let text = std::fs::read_to_string(&path).expect("packaging/grafana/sallyport.json");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// (row title, panel title, expression) for every query of every panel, in order.
fn queries(dash: &Value) -> Vec<(String, String, String)> {
    let mut row = String::new();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            row = p["title"].as_str().unwrap().to_string();
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            out.push((
                row.clone(),
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// The `sallyport_*` metric names an expression uses (PromQL functions and labels are not
/// metric names: only identifiers with the prefix count).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("sallyport_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

/// The metric family names of a live exposition (from its `# TYPE` lines).
fn families(metrics: &str) -> BTreeSet<String> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", url])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Grafana's variables as "All" sends them, and a rate window that suits a 1 s scrape.
fn instantiate(expr: &str) -> String {
    expr.replace("$__rate_interval", "10s")
        .replace("$site", ".+")
        .replace("$agent", ".+")
}

#[test]
fn dashboard_queries_use_live_metrics_and_a_real_prometheus_evaluates_them() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "sallyport");
    assert_eq!(dash["__inputs"][0]["pluginId"], "prometheus");
    // Grafana lays panels out by gridPos: each needs one, inside the 24-column grid.
    for p in dash["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && g["h"].as_u64().unwrap() > 0,
            "{}",
            p["title"]
        );
    }

    let dir = Workdir::new();
    let echo = EchoServer::start();
    let gw = start_gateway(&dir, "");
    let public = free_port();
    let proxy = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[gw.control],
        &[listener("echo", public, echo.addr)],
        "",
        &format!("\n[outbound]\nlisten = \"{proxy}\"\n"),
    );
    let agent_api = agent_admin_url(&agent);
    wait_open(local(public), Duration::from_secs(10));
    echo_round_trip(local(public), "for the byte counters");

    // 1. Every metric of every query exists in the live /metrics of its row's daemon.
    let on_gateway = families(&curl(&format!("{}/metrics", gw.admin_url())));
    let on_agent = families(&curl(&format!("{agent_api}/metrics")));
    assert!(on_gateway.contains("sallyport_state") && on_agent.contains("sallyport_agent_info"));
    let both: Vec<_> = on_gateway.intersection(&on_agent).collect();
    assert!(
        both.is_empty(),
        "metric names both daemons export: {both:?}"
    );
    let all = queries(&dash);
    let mut variables = Vec::new();
    for v in dash["templating"]["list"].as_array().unwrap() {
        variables.push(v["definition"].as_str().unwrap().to_string());
    }
    for (row, title, expr) in &all {
        let live = match row.as_str() {
            "Gateways" => &on_gateway,
            "Agents" => &on_agent,
            other => panic!("panel {title} is in an unknown row {other:?}"),
        };
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: no sallyport metric in {expr}");
        for name in names {
            assert!(
                live.contains(&name),
                "{row} / {title}: {name} is not in a live {} /metrics",
                row.to_lowercase().trim_end_matches('s')
            );
        }
    }
    for def in &variables {
        for name in metric_names(def) {
            assert!(
                on_gateway.contains(&name) || on_agent.contains(&name),
                "variable {def}: {name} exists nowhere"
            );
        }
    }

    // 2. A real Prometheus scrapes both and evaluates every query.
    assert!(
        Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: run scripts/test.sh (Debian package prometheus)"
    );
    let prom_port = free_port();
    let target = |url: &str| url.trim_start_matches("http://").to_string();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
         - job_name: sallyport-gateway\n  static_configs:\n  - targets: ['{}']\n\
         - job_name: sallyport-agent\n  static_configs:\n  - targets: ['{}']\n",
        target(&gw.admin_url()),
        target(&agent_api)
    );
    let config_path = dir.write("prometheus.yml", &config);
    let data = dir.path().join("prometheus-data");
    let _prometheus = Proc::spawn_program(
        "prometheus",
        PROMETHEUS,
        &[
            &format!("--config.file={}", config_path.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            &format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--log.level=warn",
        ],
    );
    let api = format!("http://127.0.0.1:{prom_port}/api/v1/query");
    let query = |expr: &str| -> Value {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", &api, "--data-urlencode"])
            .arg(format!("query={expr}"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            query("count(up == 1)")["data"]["result"][0]["value"][1] == "2"
        }),
        "Prometheus never scraped both daemons: {}",
        query("up")
    );
    // Two scrapes with traffic between them, so rates have data.
    echo_round_trip(local(public), "between scrapes");
    std::thread::sleep(Duration::from_secs(3));
    for (_, title, expr) in &all {
        let expr = instantiate(expr);
        let mut answer = Value::Null;
        let ok = wait_until(Duration::from_secs(10), || {
            answer = query(&expr);
            answer["status"] == "success"
                && answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
        });
        assert!(ok, "{title}: {expr}\n-> {answer}");
    }
    for def in &variables {
        // label_values(METRIC, LABEL): the series exist and carry the label.
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap();
        let (metric, label) = inner.split_once(", ").unwrap();
        let answer = query(metric);
        let results = answer["data"]["result"].as_array().unwrap();
        assert!(
            !results.is_empty() && results.iter().all(|r| r["metric"][label].is_string()),
            "variable {def}: {answer}"
        );
    }
}
