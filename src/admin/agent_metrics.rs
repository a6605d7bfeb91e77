//! The agent's `GET /metrics`: its status and counters in the Prometheus text format, built at
//! each scrape from the same reports `/api/status` and `/api/stats` answer, written with the
//! gateway's encoder ([`super::metrics`]). Every name starts with `sallyport_agent_` and none
//! is one the gateway exports, so one Prometheus can scrape both daemons.

use prometheus::proto::MetricType::{COUNTER, GAUGE};

use super::metrics::{encode, family, memory_families, Labels};
use crate::agent::report::{GatewayReport, Light, ListenerSnapshot, StatsReport, StatusReport};

/// `sallyport_agent_cert_expiry_seconds`: the agent's own certificate and each connected
/// gateway's.
fn cert_expiry(status: &StatusReport) -> prometheus::proto::MetricFamily {
    let mut samples: Vec<(Labels, f64)> = Vec::new();
    if let Some(own) = &status.cert {
        let labels = vec![
            ("role", "agent".to_string()),
            ("name", status.agent.clone()),
        ];
        samples.push((labels, own.expires_in_seconds as f64));
    }
    for g in &status.gateways {
        if let Some(cert) = &g.cert {
            let labels = vec![("role", "gateway".to_string()), ("name", g.gateway.clone())];
            samples.push((labels, cert.expires_in_seconds as f64));
        }
    }
    family(
        "sallyport_agent_cert_expiry_seconds",
        "Seconds until a certificate expires: the agent's own, and each connected gateway's.",
        GAUGE,
        samples,
    )
}

/// Renders an agent's metrics.
pub fn render(status: &StatusReport, stats: &StatsReport) -> String {
    let mut families = gateway_families(status);
    families.push(cert_expiry(status));
    families.push(listener_up(status));
    families.extend(backend_families(status));
    families.extend(listener_families(stats));
    families.extend(agent_families(status, stats));
    families.extend(memory_families("sallyport_agent"));
    encode(families)
}

/// One family per fact about each gateway: the agent's info, then the control channel's
/// state, round trip, reconnects and sessions, and the warm pool.
fn gateway_families(status: &StatusReport) -> Vec<prometheus::proto::MetricFamily> {
    let gw = |g: &str| -> Labels { vec![("gateway", g.to_string())] };
    let per_gateway = |f: &dyn Fn(&GatewayReport) -> Option<f64>| {
        status
            .gateways
            .iter()
            .filter_map(|g| f(g).map(|v| (gw(&g.gateway), v)))
            .collect::<Vec<_>>()
    };
    vec![
        family(
            "sallyport_agent_info",
            "Always 1; the labels say which agent of which site runs which version.",
            GAUGE,
            vec![(
                vec![
                    ("site", status.site.clone()),
                    ("agent", status.agent.clone()),
                    ("version", status.version.clone()),
                ],
                1.0,
            )],
        ),
        family(
            "sallyport_agent_gateway_up",
            "1 while the control channel to the gateway is up.",
            GAUGE,
            per_gateway(&|g| Some(g.connected as u8 as f64)),
        ),
        family(
            "sallyport_agent_gateway_rtt_seconds",
            "Smoothed round-trip time of the control connection (TCP_INFO).",
            GAUGE,
            per_gateway(&|g| g.rtt_ms.map(|ms| ms / 1000.0)),
        ),
        family(
            "sallyport_agent_gateway_reconnect_attempts",
            "Failed connection attempts since the last established session.",
            GAUGE,
            per_gateway(&|g| Some(g.reconnect_attempts as f64)),
        ),
        family(
            "sallyport_agent_gateway_sessions_total",
            "Control sessions established since the agent started.",
            COUNTER,
            per_gateway(&|g| Some(g.sessions as f64)),
        ),
        family(
            "sallyport_agent_pool_idle_connections",
            "Idle warm-pool data connections open to the gateway.",
            GAUGE,
            per_gateway(&|g| Some(g.pool.idle as f64)),
        ),
        family(
            "sallyport_agent_pool_target_connections",
            "Idle warm-pool data connections wanted now (the adaptive pool's target).",
            GAUGE,
            per_gateway(&|g| Some(g.pool.size as f64)),
        ),
        family(
            "sallyport_agent_pool_clients_total",
            "Clients the gateway handed over pooled connections (hit) or announced because none was idle (miss).",
            COUNTER,
            status
                .gateways
                .iter()
                .flat_map(|g| {
                    [("hit", g.pool.hits), ("miss", g.pool.misses)].map(|(result, n)| {
                        let mut labels = gw(&g.gateway);
                        labels.push(("result", result.to_string()));
                        (labels, n as f64)
                    })
                })
                .collect(),
        ),
    ]
}

/// `sallyport_agent_listener_up`: per gateway and listener.
fn listener_up(status: &StatusReport) -> prometheus::proto::MetricFamily {
    let listener_up = status
        .gateways
        .iter()
        .flat_map(|g| {
            g.listeners.iter().map(|l| {
                (
                    vec![("gateway", g.gateway.clone()), ("listener", l.name.clone())],
                    (l.state == "open") as u8 as f64,
                )
            })
        })
        .collect();
    family(
        "sallyport_agent_listener_up",
        "1 while the gateway accepts clients for the listener.",
        GAUGE,
        listener_up,
    )
}

/// Each backend of listeners with several: in rotation or not, its clients, its failures.
fn backend_families(status: &StatusReport) -> Vec<prometheus::proto::MetricFamily> {
    type Of = fn(&crate::agent::backends::BackendReport) -> f64;
    let each = |f: Of| {
        status
            .listeners
            .iter()
            .flat_map(|l| {
                l.backends.iter().map(move |b| {
                    let labels = vec![("listener", l.name.clone()), ("backend", b.backend.clone())];
                    (labels, f(b))
                })
            })
            .collect::<Vec<_>>()
    };
    [
        (
            "sallyport_agent_backend_up",
            "1 while the backend is in rotation (its health checks pass and it accepts connections).",
            GAUGE,
            (|b| b.up as u8 as f64) as Of,
        ),
        (
            "sallyport_agent_backend_active",
            "Clients piping to the backend now.",
            GAUGE,
            |b| b.active as f64,
        ),
        (
            "sallyport_agent_backend_connect_failures_total",
            "Client connections the backend refused or did not accept in time (the client was tried on the next one).",
            COUNTER,
            |b| b.connect_failures as f64,
        ),
        (
            "sallyport_agent_backend_ejections_total",
            "Times the backend was taken out of rotation (failed check, or connect failures in a row).",
            COUNTER,
            |b| b.ejections as f64,
        ),
    ]
    .into_iter()
    .map(|(name, help, kind, f)| family(name, help, kind, each(f)))
    .collect()
}

/// The counters of each listener.
fn listener_families(stats: &StatsReport) -> Vec<prometheus::proto::MetricFamily> {
    let mut families = Vec::new();
    let each = |f: fn(&ListenerSnapshot) -> u64| {
        stats
            .listeners
            .iter()
            .map(|l| (vec![("listener", l.name.clone())], f(&l.counters) as f64))
            .collect::<Vec<_>>()
    };
    for (name, help, kind, value) in [
        (
            "sallyport_agent_clients_offered_total",
            "Clients gateways offered this agent.",
            COUNTER,
            (|c| c.offered) as fn(&ListenerSnapshot) -> u64,
        ),
        (
            "sallyport_agent_clients_served_total",
            "Clients piped to their backend.",
            COUNTER,
            |c| c.served,
        ),
        (
            "sallyport_agent_backend_failures_total",
            "Clients whose backend could not be reached.",
            COUNTER,
            |c| c.backend_failures,
        ),
        (
            "sallyport_agent_data_failures_total",
            "Clients whose data connection to the gateway could not be opened.",
            COUNTER,
            |c| c.data_failures,
        ),
        (
            "sallyport_agent_clients_active",
            "Clients piping now.",
            GAUGE,
            |c| c.active,
        ),
        (
            "sallyport_agent_bytes_from_clients_total",
            "Client bytes written to backends (without PROXY headers).",
            COUNTER,
            |c| c.bytes.from_client,
        ),
        (
            "sallyport_agent_bytes_to_clients_total",
            "Backend bytes written towards clients.",
            COUNTER,
            |c| c.bytes.to_client,
        ),
    ] {
        families.push(family(name, help, kind, each(value)));
    }
    families
}

/// The outbound proxy, offers refused, the configuration, the light and the uptime.
fn agent_families(
    status: &StatusReport,
    stats: &StatsReport,
) -> Vec<prometheus::proto::MetricFamily> {
    let mut families = Vec::new();
    let outcomes = stats
        .outbound
        .requests
        .iter()
        .map(|(k, n)| (vec![("outcome", k.clone())], *n as f64))
        .collect();
    families.push(family(
        "sallyport_agent_outbound_requests_total",
        "Outbound proxy requests by outcome.",
        COUNTER,
        outcomes,
    ));
    families.push(family(
        "sallyport_agent_offers_refused_total",
        "Offers of gateways refused before any connection, by reason (agent [limits], unknown listener, bad port).",
        COUNTER,
        stats
            .refused
            .iter()
            .map(|(k, n)| (vec![("reason", k.clone())], *n as f64))
            .collect(),
    ));
    families.push(family(
        "sallyport_agent_outbound_active",
        "Outbound proxy clients piping now.",
        GAUGE,
        vec![(vec![], stats.outbound.active as f64)],
    ));
    families.push(family(
        "sallyport_agent_config_generation",
        "Configurations loaded since the agent started (1 + applied reloads).",
        GAUGE,
        vec![(vec![], status.config.generation as f64)],
    ));
    families.push(family(
        "sallyport_agent_config_reloads_total",
        "Reloads (SIGHUP or POST /api/reload) by result: applied or refused.",
        COUNTER,
        vec![
            (
                vec![("result", "applied".to_string())],
                status.config.reloads_applied as f64,
            ),
            (
                vec![("result", "refused".to_string())],
                status.config.reloads_refused as f64,
            ),
        ],
    ));
    families.push(family(
        "sallyport_agent_light",
        "1 for the agent's current light (green, amber, red).",
        GAUGE,
        [Light::Green, Light::Amber, Light::Red]
            .into_iter()
            .map(|l| {
                let name = serde_json::to_value(l).expect("a light serializes");
                (
                    vec![("light", name.as_str().unwrap_or("").to_string())],
                    (l == status.light) as u8 as f64,
                )
            })
            .collect(),
    ));
    families.push(family(
        "sallyport_agent_uptime_seconds",
        "Seconds since the agent started.",
        GAUGE,
        vec![(vec![], status.uptime_seconds as f64)],
    ));
    families
}
