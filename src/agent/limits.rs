//! Agent-side limits: what one gateway, honest, overloaded or compromised, can make this agent
//! hold (`[limits]` of agent.toml, [`AgentLimits`]).
//!
//! Rules:
//! - Every bound is per gateway: a gateway that floods the agent uses up its own share and
//!   never the places of the agent's other gateways.
//! - Every offer (a `ClientArrived`, or a `PoolAssign` on a warm-pool connection) is admitted
//!   here before the agent dials anything: first the rate (a token bucket of
//!   `offers_per_second`, `offer_burst` deep), then the listener (it must be configured) and
//!   the port offset (it must be in its range), then one data-connection place, and for a TCP
//!   backend one backend place of the gateway and one of the listener. The places are
//!   [`Admission`]'s permits, held until the client's connections close.
//! - A refused offer is answered with `ClientFailed` (a pool assignment is left unanswered, so
//!   the gateway offers the client elsewhere), counted by reason in the agent's statistics
//!   (`/api/stats` `refused`, `/metrics` `sallyport_agent_offers_refused_total`), and logged
//!   once per reason, gateway and 10 s, with a tally: a flood of 100,000 offers writes a few
//!   lines, not 100,000.
//! - Limits are read from the configuration at each offer, so a reload applies to the next
//!   offer; places already held stay.
//! - Names a gateway sends are logged quoted and cut to 64 characters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::stats::{AgentStats, Refusal};
use crate::config::{AgentConfig, AgentLimits, Backend};
use crate::limits::{Event, Gauge, GaugePermit};

/// The limits of every gateway of one agent, by gateway (as configured, `host:port`).
#[derive(Debug, Default)]
pub(crate) struct Limits {
    gateways: Mutex<HashMap<String, Arc<GatewayLimits>>>,
}

impl Limits {
    /// The places and the offer rate of `gateway`, created on first use. They outlive its
    /// sessions: a gateway cannot reset its share by reconnecting.
    pub fn gateway(&self, gateway: &str) -> Arc<GatewayLimits> {
        let mut all = self.gateways.lock();
        all.entry(gateway.to_string())
            .or_insert_with(|| Arc::new(GatewayLimits::new(gateway)))
            .clone()
    }
}

/// One gateway's share of the agent.
#[derive(Debug)]
pub(crate) struct GatewayLimits {
    gateway: String,
    data: Gauge,
    backend: Gauge,
    /// Per configured listener (names are checked against the configuration first, so a
    /// gateway cannot grow this map).
    listeners: Mutex<HashMap<String, Gauge>>,
    bucket: Mutex<Option<Bucket>>,
    /// One rate-limited log per reason, in the order of [`Refusal::ALL`].
    logs: [Event; Refusal::ALL.len()],
    /// Data connections that failed (a gateway that answers data hellos with garbage): the
    /// first few lines per 10 s, then a tally.
    pub data_failures: Event,
}

/// The places one admitted client holds until it ends.
#[derive(Debug)]
pub(crate) struct Admission {
    _data: GaugePermit,
    _backend: Option<(GaugePermit, GaugePermit)>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(slot: &mut Option<Bucket>, limits: &AgentLimits, now: Instant) -> bool {
        let burst = f64::from(limits.offer_burst);
        let b = slot.get_or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let refill = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + refill * f64::from(limits.offers_per_second)).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A name a gateway sent, safe for one log line.
fn quoted(name: &str) -> String {
    let cut: String = name.chars().take(64).collect();
    if cut.len() < name.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

impl GatewayLimits {
    fn new(gateway: &str) -> Self {
        GatewayLimits {
            gateway: gateway.to_string(),
            data: Gauge::default(),
            backend: Gauge::default(),
            listeners: Mutex::default(),
            bucket: Mutex::default(),
            logs: std::array::from_fn(|_| Event::once_per_10s()),
            data_failures: Event::some_per_10s(),
        }
    }

    /// Admits an offer of a client on `listener` at `port_offset`, or refuses it: counted in
    /// `stats`, logged (rate-limited), and the reason returned for the `ClientFailed`.
    pub fn admit(
        &self,
        config: &AgentConfig,
        stats: &AgentStats,
        listener: &str,
        port_offset: u16,
    ) -> Result<Admission, String> {
        healthy(stats, listener)
            .and_then(|()| self.check(config, listener, port_offset))
            .map_err(|(why, text)| {
                stats.refused.count(why);
                let index = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
                let hit = self.logs[index].hit();
                if hit.log {
                    tracing::warn!(
                        gateway = %self.gateway, reason = why.key(),
                        "offer refused: {text}{}", hit.tally()
                    );
                }
                text
            })
    }

    fn check(
        &self,
        config: &AgentConfig,
        listener: &str,
        port_offset: u16,
    ) -> Result<Admission, (Refusal, String)> {
        let limits = &config.limits;
        let mut bucket = self.bucket.lock();
        if !Bucket::take(&mut bucket, limits, Instant::now()) {
            return Err((
                Refusal::Rate,
                format!(
                    "the gateway offers more than the agent's limits.offers_per_second \
                     ({}/s, burst {})",
                    limits.offers_per_second, limits.offer_burst
                ),
            ));
        }
        drop(bucket);
        let Some(l) = config.listener(listener) else {
            return Err((
                Refusal::UnknownListener,
                format!(
                    "offer for listener {}, which this agent does not have",
                    quoted(listener)
                ),
            ));
        };
        // A single-port backend takes any offset: the listener's public range decides.
        if usize::from(port_offset) >= l.public.ports.len()
            || (l.backend != Backend::Local && l.backend_target(port_offset).is_none())
        {
            return Err((
                Refusal::BadPort,
                format!(
                    "offer for port offset {port_offset} of listener {}, outside its range of {} port(s)",
                    quoted(listener),
                    l.public.ports.len()
                ),
            ));
        }
        let data = self.data.try_acquire(limits.max_data_connections).ok_or((
            Refusal::DataConnections,
            format!(
                "this gateway's clients hold limits.max_data_connections ({}) data connections",
                limits.max_data_connections
            ),
        ))?;
        if l.backend == Backend::Local {
            return Ok(Admission {
                _data: data,
                _backend: None,
            });
        }
        let backend = self.backend.try_acquire(limits.max_backend_connections).ok_or((
            Refusal::BackendConnections,
            format!(
                "this gateway's clients hold limits.max_backend_connections ({}) backend connections",
                limits.max_backend_connections
            ),
        ))?;
        let per_listener = limits.max_backend_connections_per_listener;
        let mut listeners = self.listeners.lock();
        let one = listeners
            .entry(l.name.clone())
            .or_default()
            .try_acquire(per_listener)
            .ok_or((
                Refusal::ListenerBackendConnections,
                format!(
                    "this gateway's clients of listener {} hold \
                     limits.max_backend_connections_per_listener ({per_listener})",
                    quoted(listener)
                ),
            ))?;
        Ok(Admission {
            _data: data,
            _backend: Some((backend, one)),
        })
    }
}

/// Refuses an offer for a listener whose every backend fails its health checks: answered
/// before anything is dialed, so the gateway offers the client to another agent of the site.
fn healthy(stats: &AgentStats, listener: &str) -> Result<(), (Refusal, String)> {
    if !stats.backends.all_down(listener) {
        return Ok(());
    }
    Err((
        Refusal::NoHealthyBackend,
        format!(
            "every backend of listener {} fails its health checks",
            quoted(listener)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn config(limits: &str) -> AgentConfig {
        let text = format!(
            "site = \"s\"\ngateways = [\"g\"]\n[limits]\n{limits}\n\
             [[listener]]\nname = \"web\"\npublic = \"8000\"\nbackend = \"10.0.0.1:80\"\n\
             [[listener]]\nname = \"ftp\"\npublic = \"30000-30009\"\nbackend = \"10.0.0.2:30000-30009\"\n"
        );
        AgentConfig::parse(Path::new("agent.toml"), &text).unwrap()
    }

    #[test]
    fn the_bucket_admits_a_burst_then_the_rate() {
        let limits = AgentLimits {
            offers_per_second: 10,
            offer_burst: 5,
            ..AgentLimits::default()
        };
        let start = Instant::now();
        let mut b = None;
        let taken = (0..20)
            .filter(|_| Bucket::take(&mut b, &limits, start))
            .count();
        assert_eq!(taken, 5, "the burst");
        // 10 a second: one more after 100 ms, and never more than the burst after a pause.
        assert!(Bucket::take(
            &mut b,
            &limits,
            start + Duration::from_millis(100)
        ));
        assert!(!Bucket::take(
            &mut b,
            &limits,
            start + Duration::from_millis(100)
        ));
        let later = start + Duration::from_secs(60);
        let taken = (0..20)
            .filter(|_| Bucket::take(&mut b, &limits, later))
            .count();
        assert_eq!(taken, 5);
    }

    #[test]
    fn offers_are_refused_by_reason_and_places_come_back() {
        let cfg = config("max_backend_connections = 3\nmax_backend_connections_per_listener = 2\noffer_burst = 100");
        let stats = AgentStats::default();
        let g = GatewayLimits::new("gw:1");
        let refused =
            |listener: &str, offset: u16| g.admit(&cfg, &stats, listener, offset).unwrap_err();
        assert!(refused("nope", 0).contains("listener \"nope\", which this agent does not have"));
        assert!(refused("ftp", 10).contains("port offset 10"));
        // "web" is one port: offset 1 is no port of it, although its backend would take it.
        assert!(refused("web", 1).contains("port offset 1 "));
        let a = g.admit(&cfg, &stats, "web", 0).unwrap();
        let _b = g.admit(&cfg, &stats, "web", 0).unwrap();
        assert!(refused("web", 0).contains("max_backend_connections_per_listener (2)"));
        let _c = g.admit(&cfg, &stats, "ftp", 9).unwrap();
        assert!(refused("ftp", 0).contains("max_backend_connections (3)"));
        drop(a);
        assert!(g.admit(&cfg, &stats, "web", 0).is_ok());
        let counts = stats.refused.snapshot();
        assert_eq!(counts["unknown_listener"], 1);
        assert_eq!(counts["bad_port"], 2);
        assert_eq!(counts["listener_backend_connections"], 1);
        assert_eq!(counts["backend_connections"], 1);
        assert_eq!(counts["rate"], 0);
        // Another gateway has its own places.
        let other = Limits::default();
        assert!(other.gateway("gw:2").admit(&cfg, &stats, "web", 0).is_ok());
    }

    #[test]
    fn the_rate_is_checked_first_and_names_are_quoted() {
        let cfg = config("offers_per_second = 1\noffer_burst = 1");
        let stats = AgentStats::default();
        let g = GatewayLimits::new("gw:1");
        let long = format!("evil\n{}", "x".repeat(200));
        let first = g.admit(&cfg, &stats, &long, 0).unwrap_err();
        assert!(first.contains("\"evil\\nxxx"), "{first}");
        assert!(first.len() < 200, "{first}");
        let second = g.admit(&cfg, &stats, "web", 0).unwrap_err();
        assert!(
            second.contains("offers_per_second (1/s, burst 1)"),
            "{second}"
        );
        assert_eq!(stats.refused.snapshot()["rate"], 1);
    }
}
