//! `GET /metrics`: the gateway's statistics in the Prometheus text format (0.0.4), built at each
//! scrape from the live counters (so nothing is counted twice and the data path never touches
//! a metrics library) and written by the `prometheus` crate's `TextEncoder`. Names follow the
//! Prometheus conventions: `sallyport_` prefix, base units, `_total` on counters.

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

use crate::gateway::stats::TrafficSnapshot;
use crate::gateway::{GatewayHandle, ListenerState, RunState, StatsView, StatusView};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label names and values of one sample.
pub(crate) type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &Labels) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.clone());
            l
        })
        .collect()
}

/// One metric family: its samples, each with its labels.
pub(crate) fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Labels, f64)>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(
        samples
            .into_iter()
            .map(|(l, v)| {
                let mut m = Metric::default();
                m.set_label(labels(&l));
                match kind {
                    MetricType::COUNTER => {
                        let mut c = Counter::default();
                        c.set_value(v);
                        m.set_counter(c);
                    }
                    _ => {
                        let mut g = Gauge::default();
                        g.set_value(v);
                        m.set_gauge(g);
                    }
                }
                m
            })
            .collect(),
    );
    f
}

/// The families with one sample per listener: name, help, type, value.
type PerListener = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TrafficSnapshot) -> u64,
);

const PER_LISTENER: [PerListener; 9] = [
    (
        "sallyport_clients_accepted_total",
        "Client connections accepted and offered to an agent.",
        "counter",
        |t| t.accepted,
    ),
    (
        "sallyport_clients_rejected_total",
        "Client connections refused by client rules, limits or a pause.",
        "counter",
        |t| t.rejected,
    ),
    (
        "sallyport_clients_closed_total",
        "Client connections that ended.",
        "counter",
        |t| t.closed,
    ),
    (
        "sallyport_client_bytes_read_total",
        "Bytes read from clients.",
        "counter",
        |t| t.bytes.client_read,
    ),
    (
        "sallyport_client_bytes_written_total",
        "Bytes written to clients.",
        "counter",
        |t| t.bytes.client_written,
    ),
    (
        "sallyport_agent_bytes_read_total",
        "Bytes read from agents' data connections.",
        "counter",
        |t| t.bytes.agent_read,
    ),
    (
        "sallyport_agent_bytes_written_total",
        "Bytes written to agents' data connections.",
        "counter",
        |t| t.bytes.agent_written,
    ),
    (
        "sallyport_clients_active",
        "Client connections piping now.",
        "gauge",
        |t| t.active,
    ),
    (
        "sallyport_clients_pending",
        "Clients waiting for their data connection.",
        "gauge",
        |t| t.pending,
    ),
];

/// `{site="..",listener=".."}`, escaped as the text format requires.
fn listener_labels(site: &str, name: &str) -> String {
    let esc = |v: &str| {
        v.replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('"', "\\\"")
    };
    format!("{{site=\"{}\",listener=\"{}\"}}", esc(site), esc(name))
}

/// One family of `samples` (labels already rendered), in the text format `TextEncoder` writes;
/// nothing when there is no sample.
fn write_family(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    samples: impl Iterator<Item = (usize, f64)>,
    labels: &[String],
) {
    use std::fmt::Write;
    let mut samples = samples.peekable();
    if samples.peek().is_none() {
        return;
    }
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    for (i, v) in samples {
        let _ = writeln!(out, "{name}{} {v}", labels[i]);
    }
}

/// `sallyport_cert_expiry_seconds`: the gateway's own certificate and each connected agent's.
fn cert_expiry(status: &crate::gateway::StatusView) -> MetricFamily {
    let mut samples: Vec<(Labels, f64)> = Vec::new();
    if let Some(own) = &status.control.cert {
        let labels = vec![
            ("role", "gateway".to_string()),
            ("site", String::new()),
            ("name", own.subject.clone()),
        ];
        samples.push((labels, own.expires_in_seconds as f64));
    }
    // One sample per agent name: two sessions of one agent (a reconnect overlapping the old
    // session) show the sooner expiry.
    let mut agents = std::collections::BTreeMap::<(String, String), i64>::new();
    for a in &status.agents {
        if let Some(cert) = &a.cert {
            let left = agents
                .entry((a.site.clone(), a.name.clone()))
                .or_insert(i64::MAX);
            *left = (*left).min(cert.expires_in_seconds);
        }
    }
    for ((site, name), left) in agents {
        let labels = vec![
            ("role", "agent".to_string()),
            ("site", site),
            ("name", name),
        ];
        samples.push((labels, left as f64));
    }
    family(
        "sallyport_cert_expiry_seconds",
        "Seconds until a certificate expires: the gateway's own, and each connected agent's.",
        MetricType::GAUGE,
        samples,
    )
}

/// The UDP listeners' families (samples only for UDP listeners; drops labelled by reason).
fn write_udp_families(
    out: &mut String,
    listeners: &[crate::gateway::ListenerStatsView],
    labels: &[String],
) {
    type Get = fn(&crate::gateway::stats::UdpSnapshot) -> u64;
    let families: [(&str, &str, &str, Get); 4] = [
        (
            "sallyport_udp_flows",
            "UDP flows open now (waiting for their data connection or relaying).",
            "gauge",
            |u| u.flows,
        ),
        (
            "sallyport_udp_datagrams_from_clients_total",
            "Datagrams from clients queued for their flow.",
            "counter",
            |u| u.datagrams_from_clients,
        ),
        (
            "sallyport_udp_datagrams_to_clients_total",
            "Datagrams sent to clients.",
            "counter",
            |u| u.datagrams_to_clients,
        ),
        (
            "sallyport_udp_flows_idle_ended_total",
            "Flows the gateway ended itself, silent past the idle timeout plus 5 s (the agent did not end them).",
            "counter",
            |u| u.flows_idle_ended,
        ),
    ];
    for (name, help, kind, get) in families {
        let samples = listeners
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.traffic.udp.as_ref().map(|u| (i, get(u) as f64)));
        write_family(out, name, help, kind, samples, labels);
    }
    // One sample per listener and reason: `{site,listener,reason}`.
    let dropped: Vec<(String, f64)> = listeners
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.traffic.udp.as_ref().map(|u| (i, u)))
        .flat_map(|(i, u)| {
            let base = labels[i].trim_end_matches('}').to_string();
            u.dropped
                .iter()
                .map(move |(why, n)| (format!("{base},reason=\"{why}\"}}"), *n as f64))
        })
        .collect();
    let names: Vec<String> = dropped.iter().map(|(l, _)| l.clone()).collect();
    write_family(
        out,
        "sallyport_udp_datagrams_dropped_total",
        "Datagrams dropped, by reason: oversize, queue_full, refused (no flow allowed), send_failed, rate (client_rate or listener_rate).",
        "counter",
        dropped.iter().enumerate().map(|(i, (_, n))| (i, *n)),
        &names,
    );
}

/// Renders the metrics of `handle`. The per-listener families are written straight to text
/// with each listener's labels rendered once: at 5,000 listeners, building them as protobuf
/// objects (two label pairs per sample, ten families) was most of a scrape.
pub fn render(handle: &GatewayHandle) -> String {
    let stats = handle.stats();
    let status = handle.status();
    let mut out = String::with_capacity(stats.listeners.len() * 10 * 120 + 4096);
    write_listener_families(&mut out, &stats, &status);
    let mut families = gateway_families(&stats, &status);
    families.extend(memory_families("sallyport"));
    out.push_str(&encode(families));
    out
}

/// The per-listener families (counters, UDP datagrams, up), written straight into `out`: the
/// part that grows with the number of listeners.
fn write_listener_families(out: &mut String, stats: &StatsView, status: &StatusView) {
    let labels: Vec<String> = stats
        .listeners
        .iter()
        .map(|l| listener_labels(&l.site, &l.name))
        .collect();
    for (name, help, kind, get) in PER_LISTENER {
        let samples = stats
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (i, get(&l.traffic) as f64));
        write_family(out, name, help, kind, samples, &labels);
    }
    write_udp_families(out, &stats.listeners, &labels);
    let up_labels: Vec<String> = status
        .listeners
        .iter()
        .map(|l| listener_labels(&l.site, &l.name))
        .collect();
    let up = status
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| (i, (l.state == ListenerState::Listening) as u8 as f64));
    write_family(
        out,
        "sallyport_listener_up",
        "1 while the listener accepts clients.",
        "gauge",
        up,
        &up_labels,
    );
}

/// The gateway's own families: agents per site, certificates, the warm pool, refusals, check
/// probes, the run state and the uptime.
fn gateway_families(stats: &StatsView, status: &StatusView) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let mut families = Vec::new();
    let mut sites = std::collections::BTreeMap::<String, f64>::new();
    for a in &status.agents {
        *sites.entry(a.site.clone()).or_default() += 1.0;
    }
    let agents = sites
        .into_iter()
        .map(|(site, n)| (vec![("site", site)], n))
        .collect();
    families.push(family(
        "sallyport_agents_connected",
        "Agents with a control channel, per site.",
        GAUGE,
        agents,
    ));
    families.push(cert_expiry(status));
    families.push(family(
        "sallyport_pool_idle_connections",
        "Idle warm-pool data connections agents opened ahead of time.",
        GAUGE,
        vec![(vec![], stats.pooled as f64)],
    ));
    let refusals = stats
        .refusals
        .iter()
        .map(|(reason, n)| (vec![("reason", reason.to_string())], *n as f64))
        .collect();
    families.push(family(
        "sallyport_refusals_total",
        "Refused connections by reason.",
        COUNTER,
        refusals,
    ));
    let handshakes = [
        ("full", stats.tls.handshakes_full),
        ("resumed", stats.tls.handshakes_resumed),
    ]
    .into_iter()
    .map(|(kind, n)| (vec![("kind", kind.to_string())], n as f64))
    .collect();
    families.push(family(
        "sallyport_tls_handshakes_total",
        "Control-port TLS handshakes (control, pool, data, outbound) by kind: full or resumed.",
        COUNTER,
        handshakes,
    ));
    families.push(family(
        "sallyport_tls_sessions",
        "TLS sessions kept for resumption.",
        GAUGE,
        vec![(vec![], stats.tls.sessions.entries as f64)],
    ));
    families.push(family(
        "sallyport_tls_session_bytes",
        "Estimated heap held by the TLS sessions kept for resumption.",
        GAUGE,
        vec![(vec![], stats.tls.sessions.bytes as f64)],
    ));
    families.push(family(
        "sallyport_check_probes_total",
        "Data hellos from `sallyport check` runs (not refusals).",
        COUNTER,
        vec![(vec![], stats.check_probes as f64)],
    ));
    let states = [
        ("running", RunState::Running),
        ("paused", RunState::Paused),
        ("stopping", RunState::Stopping),
    ]
    .into_iter()
    .map(|(name, s)| {
        (
            vec![("state", name.to_string())],
            (s == status.state) as u8 as f64,
        )
    })
    .collect();
    families.push(family(
        "sallyport_state",
        "1 for the gateway's current state.",
        GAUGE,
        states,
    ));
    families.push(family(
        "sallyport_uptime_seconds",
        "Seconds since the gateway started.",
        GAUGE,
        vec![(Vec::new(), status.uptime_seconds as f64)],
    ));
    families
}

/// The process's memory (see [`crate::mem::MemoryFigures`]), under `prefix` (each daemon
/// exports its own names, so one Prometheus scrapes both): the resident memory split into
/// anonymous and file-backed, and the heap into allocated and kept free, which tell a leak
/// (allocated grows) from an allocator keeping freed memory (free grows) and from code pages
/// (file grows).
pub(crate) fn memory_families(prefix: &str) -> Vec<MetricFamily> {
    let m = crate::mem::MemoryFigures::read();
    let some = |pairs: Vec<(&'static str, &str, Option<u64>)>| -> Vec<(Labels, f64)> {
        pairs
            .into_iter()
            .filter_map(|(k, v, n)| n.map(|n| (vec![(k, v.to_string())], n as f64)))
            .collect()
    };
    vec![
        family(
            &format!("{prefix}_resident_memory_bytes"),
            "Resident memory by kind: anonymous (heap, stacks) or file (the executable's pages).",
            MetricType::GAUGE,
            some(vec![
                ("kind", "anonymous", m.resident_anonymous),
                ("kind", "file", m.resident_file),
            ]),
        ),
        family(
            &format!("{prefix}_heap_bytes"),
            "Heap memory by state: allocated, or free but kept by the allocator (glibc).",
            MetricType::GAUGE,
            some(vec![
                ("state", "allocated", m.heap_allocated),
                ("state", "free", m.heap_free),
            ]),
        ),
    ]
}

/// The text format of `families`, leaving out those without a sample (no listener yet), as
/// Prometheus expects.
pub(crate) fn encode(mut families: Vec<MetricFamily>) -> String {
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("encoding to memory cannot fail");
    String::from_utf8(out).expect("the text format is UTF-8")
}
