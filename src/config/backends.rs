//! A listener's several backends (issue 18 item 2): `backend = ["10.0.0.5:443", "10.0.0.6:443"]`,
//! `balance = "round-robin" | "least-connections" | "failover"` and `health = { interval,
//! timeout, http }`. The agent's side of it is [`crate::agent::backends`].
//!
//! Rules:
//! - `backend = "host:port"` stays what it was (one backend, no group); a list, `balance` or
//!   `health` makes a [`BackendGroup`]. The first entry is also the listener's `backend`.
//! - A list holds 1 to [`MAX_BACKENDS`] distinct entries, each one port or a range as long as
//!   the public one. A UDP listener has one backend and no health check.
//! - `health`: `interval` 100ms to 1h (required), `timeout` 10ms to 60s and not over the
//!   interval (default: the smaller of 1s and the interval), `http` a path starting with `/`
//!   (a GET that must answer 2xx; without it a TCP connect is the check).
//! - Errors carry the file and line of the key.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ConfigError, Source};
use crate::addr::{BackendAddr, PublicAddr};

/// The most backends one listener may list.
pub const MAX_BACKENDS: usize = 64;

/// How a listener's clients are spread over its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Balance {
    /// Each new client goes to the next healthy backend in turn.
    #[default]
    RoundRobin,
    /// To the healthy backend with the fewest clients piping now (ties in turn).
    LeastConnections,
    /// To the first healthy backend in the list: the others are spares.
    Failover,
}

impl Balance {
    /// The word the configuration, the status and the docs use.
    pub fn word(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConnections => "least-connections",
            Balance::Failover => "failover",
        }
    }
}

/// Active health checks of every backend of a listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// A path to GET (HTTP/1.1, plain): a 2xx answer passes. `None`: a TCP connect passes.
    pub http: Option<String>,
}

/// A listener's backends, how clients are spread over them and how they are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendGroup {
    /// Every backend, in configuration order (the first is also the listener's `backend`).
    pub backends: Vec<BackendAddr>,
    pub balance: Balance,
    pub health: Option<HealthCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    interval: Spanned<String>,
    timeout: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
}

/// What [`parse`] reads of one listener.
pub(super) struct RawGroup<'a> {
    pub backend: &'a Spanned<super::StringOrList>,
    pub balance: Option<&'a Spanned<String>>,
    pub health: Option<&'a Spanned<RawHealth>>,
    pub udp: bool,
}

/// The listener's backends: the first one, and the group when there is one.
pub(super) fn parse(
    src: &Source,
    raw: RawGroup<'_>,
    public: &PublicAddr,
    ctx: &dyn Fn(&str) -> String,
) -> Result<(BackendAddr, Option<BackendGroup>), ConfigError> {
    let list = &raw.backend.get_ref().0;
    let refuse = |why: String| src.error(raw.backend.span(), &ctx("backend"), why);
    if list.is_empty() || list.len() > MAX_BACKENDS {
        return Err(refuse(format!(
            "lists {} backends: give 1 to {MAX_BACKENDS}",
            list.len()
        )));
    }
    let mut backends: Vec<BackendAddr> = Vec::with_capacity(list.len());
    for (i, text) in list.iter().enumerate() {
        let which = if list.len() == 1 {
            String::new()
        } else {
            format!("entry {} ", i + 1)
        };
        let b: BackendAddr = text.parse().map_err(|e| refuse(format!("{which}{e}")))?;
        if b.ports.len() != 1 && b.ports.len() != public.ports.len() {
            return Err(refuse(format!(
                "{which}range of {} ports does not match the public range of {} ports",
                b.ports.len(),
                public.ports.len()
            )));
        }
        if backends.contains(&b) {
            return Err(refuse(format!("{b} is listed twice")));
        }
        backends.push(b);
    }
    let grouped = list.len() > 1 || raw.balance.is_some() || raw.health.is_some();
    if raw.udp && grouped {
        return Err(refuse(
            "a UDP listener has one backend (no list, balance or health): a refused datagram is not seen"
                .into(),
        ));
    }
    let first = backends[0].clone();
    if !grouped {
        return Ok((first, None));
    }
    let balance = match raw.balance {
        None => Balance::default(),
        Some(b) => src.parse_with(b, &ctx("balance"), |s| {
            [
                Balance::RoundRobin,
                Balance::LeastConnections,
                Balance::Failover,
            ]
            .into_iter()
            .find(|b| b.word() == s)
            .ok_or_else(|| {
                format!("expected \"round-robin\", \"least-connections\" or \"failover\", found \"{s}\"")
            })
        })?,
    };
    let health = raw
        .health
        .map(|h| parse_health(src, h.get_ref(), ctx))
        .transpose()?;
    let group = BackendGroup {
        backends,
        balance,
        health,
    };
    Ok((first, Some(group)))
}

fn parse_health(
    src: &Source,
    h: &RawHealth,
    ctx: &dyn Fn(&str) -> String,
) -> Result<HealthCheck, ConfigError> {
    let (ms, secs) = (Duration::from_millis, Duration::from_secs);
    let interval =
        src.duration_within(&h.interval, &ctx("health.interval"), ms(100), secs(3600))?;
    let timeout = match &h.timeout {
        Some(t) => {
            let timeout = src.duration_within(t, &ctx("health.timeout"), ms(10), secs(60))?;
            if timeout > interval {
                return Err(src.error(
                    t.span(),
                    &ctx("health.timeout"),
                    format!(
                        "{} is longer than the interval ({}): a check must end before the next",
                        humantime::format_duration(timeout),
                        humantime::format_duration(interval)
                    ),
                ));
            }
            timeout
        }
        None => interval.min(secs(1)),
    };
    let http = match &h.http {
        None => None,
        Some(p) => Some(src.parse_with(p, &ctx("health.http"), |s| {
            let ok = s.starts_with('/')
                && s.len() <= 1024
                && s.bytes().all(|b| b.is_ascii_graphic());
            if ok {
                Ok(s.to_string())
            } else {
                Err(format!(
                    "\"{s}\" is not a request path (it starts with / and has no spaces or control characters)"
                ))
            }
        })?),
    };
    Ok(HealthCheck {
        interval,
        timeout,
        http,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    fn parse(listener: &str) -> Result<AgentConfig, String> {
        let text = format!(
            "site = \"s\"\ngateways = [\"g:1\"]\n\n[[listener]]\nname = \"web\"\npublic = \"8080\"\n{listener}\n"
        );
        AgentConfig::parse(std::path::Path::new("agent.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn one_backend_stays_plain_and_a_list_makes_a_group() {
        let c = parse("backend = \"10.0.0.5:80\"").unwrap();
        assert!(c.listeners[0].group.is_none());
        let c = parse("backend = [\"10.0.0.5:80\", \"10.0.0.6:80\"]").unwrap();
        let g = c.listeners[0].group.clone().unwrap();
        assert_eq!(g.backends.len(), 2);
        assert_eq!(g.balance, Balance::RoundRobin);
        assert!(g.health.is_none());
        let c = parse(
            "backend = [\"a.internal:80\", \"10.0.0.6:80\"]\nbalance = \"failover\"\nhealth = { interval = \"2s\", http = \"/healthz\" }",
        )
        .unwrap();
        let g = c.listeners[0].group.clone().unwrap();
        assert_eq!(g.balance, Balance::Failover);
        let h = g.health.unwrap();
        assert_eq!(h.interval, Duration::from_secs(2));
        assert_eq!(
            h.timeout,
            Duration::from_secs(1),
            "default: min(1s, interval)"
        );
        assert_eq!(h.http.as_deref(), Some("/healthz"));
        // One backend with a health check is a group of one (its health is shown).
        let c = parse("backend = \"10.0.0.5:80\"\nhealth = { interval = \"300ms\" }").unwrap();
        let g = c.listeners[0].group.clone().unwrap();
        assert_eq!(g.health.unwrap().timeout, Duration::from_millis(300));
    }

    #[test]
    fn bad_groups_are_refused_with_file_and_line() {
        for (listener, line, words) in [
            ("backend = []", 7, "lists 0 backends"),
            (
                "backend = [\"10.0.0.5:80\", \"10.0.0.5:80\"]",
                7,
                "listed twice",
            ),
            ("backend = [\"10.0.0.5:80\", \"nope\"]", 7, "entry 2"),
            ("backend = [\"10.0.0.5:80\", 5]", 7, "expected a string"),
            (
                "backend = [\"10.0.0.5:80\"]\nbalance = \"random\"",
                8,
                "expected \"round-robin\"",
            ),
            (
                "backend = \"10.0.0.5:80\"\nhealth = { interval = \"1s\", timeout = \"2s\" }",
                8,
                "longer than the interval",
            ),
            (
                "backend = \"10.0.0.5:80\"\nhealth = { interval = \"10ms\" }",
                8,
                "health.interval",
            ),
            (
                "backend = \"10.0.0.5:80\"\nhealth = { interval = \"1s\", http = \"healthz\" }",
                8,
                "not a request path",
            ),
            (
                "backend = \"10.0.0.5:80\"\nhealth = { interval = \"1s\", tcp = true }",
                8,
                "unknown field",
            ),
            (
                "backend = [\"10.0.0.5:53\", \"10.0.0.6:53\"]\nprotocol = \"udp\"",
                7,
                "UDP listener has one backend",
            ),
        ] {
            let err = parse(listener).unwrap_err();
            assert!(
                err.contains(&format!("agent.toml:{line}")) && err.contains(words),
                "{listener}: {err}"
            );
        }
    }
}
