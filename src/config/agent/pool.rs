//! `pool` in agent.toml: the warm pool's bounds. A count is a fixed pool (`pool = 4` keeps four
//! idle data connections per gateway, `pool = 0` none); a table bounds an adaptive one
//! (`pool = { min = 2, max = 32, window = "1m" }`): the agent keeps, idle, as many connections as
//! the most clients that arrived from that gateway in any one second of the last `window`, never
//! fewer than `min` nor more than `max` (see `agent::pool`). Unset: `pool = 4`, a fixed pool
//! (the adaptive default was measured and kept out: see `DEFAULT_POOL`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use super::super::{ConfigError, Source};

/// The pool when `pool` is unset: four idle connections per gateway, whatever the traffic. Enough
/// for a few clients without a notification round trip, cheap when idle (two sockets each). Not
/// adaptive by default: with `{ min = 4, max = 32 }` the 8,000-client load test (tests/load.rs)
/// left the agent 18 MiB above its baseline after a round (50.9 vs 32.7 MiB; fixed 4: back
/// within 10 %), which is not explained yet.
pub const DEFAULT_POOL: PoolConfig = PoolConfig::fixed(4);
/// Idle connections an adaptive pool keeps at least, unless `min` says otherwise.
pub const DEFAULT_POOL_MIN: usize = 4;
/// The most idle connections an adaptive pool grows to, unless `max` says otherwise.
pub const DEFAULT_POOL_MAX: usize = 32;
/// How long the busiest second is remembered, unless `window` says otherwise.
pub const DEFAULT_POOL_WINDOW: Duration = Duration::from_secs(60);
/// The most a config may ask for (the gateway holds at most 256 per site).
pub const MAX_POOL: usize = 64;
/// Bounds of `window`: a whole second (the unit of counting) to an hour.
const WINDOW_BOUNDS: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));

/// The warm pool's bounds, per gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Idle connections kept however quiet the gateway is; 0: none when quiet.
    pub min: usize,
    /// Idle connections kept however busy it is; 0 disables the pool.
    pub max: usize,
    /// How long the busiest second counts.
    pub window: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        DEFAULT_POOL
    }
}

impl PoolConfig {
    /// A pool of `n` idle connections whatever the traffic (`pool = n`).
    pub const fn fixed(n: usize) -> Self {
        PoolConfig {
            min: n,
            max: n,
            window: DEFAULT_POOL_WINDOW,
        }
    }

    /// Whether the agent keeps a pool at all.
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Idle connections wanted when the busiest second of the window saw `peak` clients.
    pub fn target(&self, peak: usize) -> usize {
        peak.clamp(self.min, self.max)
    }
}

impl fmt::Display for PoolConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            return write!(f, "{}", self.max);
        }
        write!(
            f,
            "{{ min = {}, max = {}, window = \"{}\" }}",
            self.min,
            self.max,
            humantime::format_duration(self.window)
        )
    }
}

/// `pool` as written: a count or a table.
pub(in crate::config) enum RawPool {
    Fixed(u64),
    Bounds(RawBounds),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::config) struct RawBounds {
    min: Option<u64>,
    max: Option<u64>,
    window: Option<String>,
}

impl<'de> Deserialize<'de> for RawPool {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> Visitor<'de> for Either {
            type Value = RawPool;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a count (a fixed pool) or a table { min, max, window }")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPool, E> {
                Ok(RawPool::Fixed(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPool, E> {
                u64::try_from(v)
                    .map(RawPool::Fixed)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawPool, A::Error> {
                RawBounds::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawPool::Bounds)
            }
        }
        d.deserialize_any(Either)
    }
}

/// `pool`: a fixed count or adaptive bounds, each count at most [`MAX_POOL`], `min` at most `max`.
pub(in crate::config) fn parse_pool(
    src: &Source,
    raw: Option<&Spanned<RawPool>>,
) -> Result<PoolConfig, ConfigError> {
    let Some(raw) = raw else {
        return Ok(PoolConfig::default());
    };
    let err = |msg: String| src.error(raw.span(), "pool", msg);
    let count = |n: u64, what: &str| match usize::try_from(n) {
        Ok(n) if n <= MAX_POOL => Ok(n),
        _ => Err(err(format!(
            "{what}{n} is more than the allowed {MAX_POOL}"
        ))),
    };
    let bounds = match raw.get_ref() {
        RawPool::Fixed(n) => return Ok(PoolConfig::fixed(count(*n, "")?)),
        RawPool::Bounds(b) => b,
    };
    let min = bounds.min.map(|n| count(n, "min ")).transpose()?;
    let max = bounds.max.map(|n| count(n, "max ")).transpose()?;
    let (min, max) = match (min, max) {
        (Some(min), Some(max)) if min > max => {
            return Err(err(format!("min {min} is more than max {max}")))
        }
        (Some(min), Some(max)) => (min, max),
        (Some(min), None) => (min, DEFAULT_POOL_MAX.max(min)),
        (None, Some(max)) => (DEFAULT_POOL_MIN.min(max), max),
        (None, None) => (DEFAULT_POOL_MIN, DEFAULT_POOL_MAX),
    };
    let window = match &bounds.window {
        Some(w) => {
            let d = humantime::parse_duration(w).map_err(|e| {
                err(format!(
                    "window: invalid duration \"{w}\": {e} (e.g. \"30s\", \"5m\")"
                ))
            })?;
            let (lo, hi) = WINDOW_BOUNDS;
            if d < lo || d > hi {
                return Err(err(format!("window: {w} is outside the allowed 1s to 1h")));
            }
            d
        }
        None => DEFAULT_POOL_WINDOW,
    };
    Ok(PoolConfig { min, max, window })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[derive(Deserialize)]
    struct Top {
        pool: Option<Spanned<RawPool>>,
    }

    fn pool(text: &str) -> Result<PoolConfig, ConfigError> {
        let src = Source::new(Path::new("agent.toml"), text);
        let raw: Top = src.parse_toml()?;
        parse_pool(&src, raw.pool.as_ref())
    }

    fn err_at(text: &str, line: usize, has: &str) {
        let e = pool(text).expect_err("an error");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.message.contains(has), "{e}");
    }

    #[test]
    fn a_count_is_a_fixed_pool_and_so_is_unset() {
        assert_eq!(pool("").unwrap(), PoolConfig::fixed(4));
        assert_eq!(pool("pool = 0").unwrap(), PoolConfig::fixed(0));
        assert!(!pool("pool = 0").unwrap().enabled());
        let fixed = pool(&format!("pool = {MAX_POOL}")).unwrap();
        assert_eq!((fixed.min, fixed.max), (MAX_POOL, MAX_POOL));
        assert_eq!(fixed.target(0), MAX_POOL);
        assert_eq!(fixed.to_string(), MAX_POOL.to_string());
        err_at(&format!("\npool = {}", MAX_POOL + 1), 2, "pool: 65 is more");
        err_at("pool = -1", 1, "negative");
        err_at("pool = \"4\"", 1, "a count (a fixed pool) or a table");
    }

    #[test]
    fn bounds_take_defaults_for_what_is_left_out_and_are_checked() {
        let p = pool("pool = { min = 1, max = 8, window = \"10s\" }").unwrap();
        assert_eq!((p.min, p.max, p.window), (1, 8, Duration::from_secs(10)));
        assert_eq!((p.target(0), p.target(5), p.target(100)), (1, 5, 8));
        assert_eq!(p.to_string(), "{ min = 1, max = 8, window = \"10s\" }");
        assert_eq!(pool("pool = { max = 2 }").unwrap().min, 2);
        assert_eq!(pool("pool = { min = 40 }").unwrap().max, 40);
        assert_eq!(pool("pool = { min = 0 }").unwrap().target(0), 0);
        assert!(pool("pool = { min = 0 }").unwrap().enabled());
        // A table in its own section works too.
        let p = pool("[pool]\nmin = 2\nmax = 3").unwrap();
        assert_eq!((p.min, p.max), (2, 3));
        err_at("pool = { min = 9, max = 8 }", 1, "min 9 is more than max 8");
        err_at(
            "pool = { max = 65 }",
            1,
            "max 65 is more than the allowed 64",
        );
        err_at(
            "\n\npool = { window = \"0s\" }",
            3,
            "outside the allowed 1s to 1h",
        );
        err_at("pool = { window = \"soon\" }", 1, "invalid duration");
        err_at("pool = { mn = 1 }", 1, "unknown field");
    }
}
