//! Configuration files: types, parsing and validation, with `file:line` errors.
//!
//! Parse, don't validate: [`GatewayConfig`] and [`AgentConfig`] only exist in a valid state. Each
//! file is first read into `Raw*` structs whose leaves are [`toml::Spanned`], then converted into
//! typed values; every failure names the file, the line and the field, e.g.
//! `agent.toml:12: listener "sftp": backend: invalid socket address "10.0.0.5" (...)`.
//!
//! Loading never opens a socket or writes a file; the caller decides what to do with the result.

mod admin;
mod agent;
pub mod backends;
mod gateway;
pub mod reference;

use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

pub use admin::AdminConfig;
pub use agent::{
    AgentConfig, AgentLimits, AgentTls, Backend, Impersonation, ListenerChanges, ListenerConfig,
    OutboundConfig, PoolConfig, Protocol, ProxyProtocol, ReconnectConfig,
    OUTBOUND_HANDSHAKE_TIMEOUT, OUTBOUND_MAX_CLIENTS, OUTBOUND_MAX_CLIENTS_PER_IP,
};
pub use backends::{BackendGroup, Balance, HealthCheck};
pub use gateway::{GatewayConfig, Limits, SiteBinding};

/// A key that takes one string or a list of them (`backend`, `source_ip`), as written: the one
/// string is a list of one.
pub(crate) struct StringOrList(pub Vec<String>);

impl<'de> serde::Deserialize<'de> for StringOrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StringOrList, E> {
                Ok(StringOrList(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrList, A::Error> {
                let mut all = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    all.push(s);
                }
                Ok(StringOrList(all))
            }
        }
        d.deserialize_any(V)
    }
}

/// A configuration error with its location. `Display` gives the one-line form operators grep for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The text of one config file and its name, to turn byte spans into line numbers.
pub(crate) struct Source<'a> {
    pub file: String,
    pub text: &'a str,
}

impl<'a> Source<'a> {
    pub fn new(file: &Path, text: &'a str) -> Self {
        Source {
            file: file.display().to_string(),
            text,
        }
    }

    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error at `span`; `context` is the field path such as `listener "sftp": backend`.
    pub fn error(
        &self,
        span: Range<usize>,
        context: &str,
        message: impl fmt::Display,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: Some(self.line_of(span.start)),
            message: if context.is_empty() {
                message.to_string()
            } else {
                format!("{context}: {message}")
            },
        }
    }

    /// An error without a useful position (e.g. a missing section).
    pub fn error_nowhere(&self, message: impl fmt::Display) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: None,
            message: message.to_string(),
        }
    }

    /// Deserializes the raw structure, mapping TOML and serde errors to `file:line: message`.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| ConfigError {
            file: self.file.clone(),
            line: e.span().map(|s| self.line_of(s.start)),
            message: e.message().trim().to_string(),
        })
    }

    /// Parses a spanned string with `FromStr`-like `parse`, locating any error.
    pub fn parse_with<T>(
        &self,
        value: &Spanned<String>,
        context: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        parse(value.get_ref()).map_err(|e| self.error(value.span(), context, e))
    }

    pub fn duration(
        &self,
        value: &Spanned<String>,
        context: &str,
    ) -> Result<Duration, ConfigError> {
        self.parse_with(value, context, |s| {
            humantime::parse_duration(s).map_err(|e| {
                format!("invalid duration \"{s}\": {e} (e.g. \"500ms\", \"10s\", \"1m\")")
            })
        })
    }

    /// A positive duration within `[min, max]`.
    pub fn duration_within(
        &self,
        value: &Spanned<String>,
        context: &str,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(value, context)?;
        if d < min || d > max {
            return Err(self.error(
                value.span(),
                context,
                format!(
                    "{} is outside the allowed {} to {}",
                    value.get_ref(),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(d)
    }
}

/// Reads a whole config file, with the path in the error.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        message: format!("cannot read: {e}"),
    })
}

/// Names of sites, agents and listeners: 1-64 characters of `A-Z a-z 0-9 . _ -`. The gateway
/// checks every name a peer sends with it before storing, logging or showing it.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    // The name may come from a peer: it is shown escaped in the error.
    let shown = crate::escape::escaped(name);
    if name.is_empty() || name.len() > 64 {
        return Err(format!("\"{shown}\" must be 1 to 64 characters long"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "\"{shown}\" may only contain letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_numbers() {
        let src = Source::new(Path::new("x.toml"), "a\nb\nc");
        assert_eq!(src.line_of(0), 1);
        assert_eq!(src.line_of(2), 2);
        assert_eq!(src.line_of(4), 3);
        assert_eq!(src.error(4..5, "c", "bad").to_string(), "x.toml:3: c: bad");
    }

    #[test]
    fn names() {
        assert!(check_name("acme-mft_1.x").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
    }
}
