//! `GET /metrics`: Prometheus (OpenMetrics text) exposition of the gateway's statistics, read
//! from the live counters at each scrape (a prometheus-client `Collector`), so nothing is
//! counted twice and the data path never touches a metrics library.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::gateway::{GatewayHandle, RunState};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct GatewayCollector {
    handle: GatewayHandleDebug,
}

/// `GatewayHandle` without a useful `Debug`; the collector trait wants one.
struct GatewayHandleDebug(GatewayHandle);

impl std::fmt::Debug for GatewayHandleDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayHandle")
    }
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in values {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Labels, i64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for GatewayCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gw = &self.handle.0;
        let stats = gw.stats();
        let status = gw.status();
        let per: Vec<_> = stats
            .listeners
            .iter()
            .map(|l| {
                (
                    vec![("site", l.site.clone()), ("listener", l.name.clone())],
                    &l.traffic,
                )
            })
            .collect();
        let c = |f: &dyn Fn(&crate::gateway::stats::TrafficSnapshot) -> u64| -> Vec<(Labels, u64)> {
            per.iter()
                .map(|(labels, t)| (labels.clone(), f(t)))
                .collect()
        };
        counters(
            &mut e,
            "sallyport_clients_accepted",
            "Client connections accepted and offered to an agent.",
            &c(&|t| t.accepted),
        )?;
        counters(
            &mut e,
            "sallyport_clients_rejected",
            "Client connections refused by client rules, limits or a pause.",
            &c(&|t| t.rejected),
        )?;
        counters(
            &mut e,
            "sallyport_clients_closed",
            "Client connections that ended.",
            &c(&|t| t.closed),
        )?;
        counters(
            &mut e,
            "sallyport_client_bytes_read",
            "Bytes read from clients.",
            &c(&|t| t.bytes.client_read),
        )?;
        counters(
            &mut e,
            "sallyport_client_bytes_written",
            "Bytes written to clients.",
            &c(&|t| t.bytes.client_written),
        )?;
        counters(
            &mut e,
            "sallyport_agent_bytes_read",
            "Bytes read from agents' data connections.",
            &c(&|t| t.bytes.agent_read),
        )?;
        counters(
            &mut e,
            "sallyport_agent_bytes_written",
            "Bytes written to agents' data connections.",
            &c(&|t| t.bytes.agent_written),
        )?;
        let g = |f: &dyn Fn(&crate::gateway::stats::TrafficSnapshot) -> u64| -> Vec<(Labels, i64)> {
            per.iter()
                .map(|(labels, t)| (labels.clone(), f(t) as i64))
                .collect()
        };
        gauges(
            &mut e,
            "sallyport_clients_active",
            "Client connections piping now.",
            &g(&|t| t.active),
        )?;
        gauges(
            &mut e,
            "sallyport_clients_pending",
            "Clients waiting for their data connection.",
            &g(&|t| t.pending),
        )?;

        let listening: Vec<(Labels, i64)> = status
            .listeners
            .iter()
            .map(|l| {
                let up = matches!(l.state, crate::gateway::ListenerState::Listening);
                (
                    vec![("site", l.site.clone()), ("listener", l.name.clone())],
                    up as i64,
                )
            })
            .collect();
        gauges(
            &mut e,
            "sallyport_listener_up",
            "1 while the listener accepts clients.",
            &listening,
        )?;

        let mut sites: std::collections::BTreeMap<String, i64> = Default::default();
        for a in &status.agents {
            *sites.entry(a.site.clone()).or_default() += 1;
        }
        let agents: Vec<(Labels, i64)> = sites
            .into_iter()
            .map(|(site, n)| (vec![("site", site)], n))
            .collect();
        gauges(
            &mut e,
            "sallyport_agents_connected",
            "Agents with a control channel, per site.",
            &agents,
        )?;

        let refusals: Vec<(Labels, u64)> = stats
            .refusals
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.to_string())], *n))
            .collect();
        counters(
            &mut e,
            "sallyport_refusals",
            "Refused connections by reason.",
            &refusals,
        )?;

        let states: Vec<(Labels, i64)> = [RunState::Running, RunState::Paused, RunState::Stopping]
            .iter()
            .map(|s| {
                let name = serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                (vec![("state", name)], (*s == status.state) as i64)
            })
            .collect();
        gauges(
            &mut e,
            "sallyport_state",
            "1 for the gateway's current state.",
            &states,
        )?;
        gauges(
            &mut e,
            "sallyport_uptime_seconds",
            "Seconds since the gateway started.",
            &[(Vec::new(), status.uptime_seconds as i64)],
        )?;
        Ok(())
    }
}

/// Renders the metrics of `handle` in OpenMetrics text format.
pub fn render(handle: &GatewayHandle) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(GatewayCollector {
        handle: GatewayHandleDebug(handle.clone()),
    }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}
