//! `[admin]`, the same section in gateway.toml and agent.toml: where the daemon's admin server
//! listens (or `enabled = false`) and the token its mutating calls need.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Source};

/// `[admin]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

/// `[admin]` validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where the admin server listens; `None` when `enabled = false`.
    pub listen: Option<SocketAddr>,
    /// Bearer token the mutating calls require.
    pub token: Option<String>,
}

impl AdminConfig {
    /// The default: listening on `default`, no token.
    pub fn on(default: SocketAddr) -> Self {
        AdminConfig {
            listen: Some(default),
            token: None,
        }
    }
}

/// Validates `[admin]` (absent: listen on `default`). `exposes` completes the warnings for an
/// admin server without a token ("... who reaches it can ...").
pub(super) fn parse_admin(
    src: &Source,
    raw: Option<&RawAdmin>,
    default: SocketAddr,
    exposes: &str,
    notices: &mut Vec<String>,
) -> Result<AdminConfig, ConfigError> {
    let mut cfg = AdminConfig::on(default);
    let Some(admin) = raw else {
        notices.push(format!(
            "[admin] has no token: every local user (and anyone with an SSH tunnel) who reaches {default} can {exposes}; set [admin] token"
        ));
        return Ok(cfg);
    };
    if let Some(listen) = &admin.listen {
        let addr = src.parse_with(listen, "admin.listen", |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("invalid socket address \"{s}\""))
        })?;
        if !addr.ip().is_loopback() && admin.token.is_none() {
            notices.push(format!(
                "[admin] listens on {addr}, beyond loopback, without a token: anyone who reaches it can {exposes}"
            ));
        }
        cfg.listen = Some(addr);
    }
    if admin.enabled == Some(false) {
        cfg.listen = None;
    }
    if let (Some(listen), None) = (cfg.listen, &admin.token) {
        if listen.ip().is_loopback() {
            notices.push(format!(
                "[admin] has no token: every local user (and anyone with an SSH tunnel) who reaches {listen} can {exposes}; set [admin] token"
            ));
        }
    }
    if let Some(token) = &admin.token {
        if token.get_ref().len() < 16 {
            return Err(src.error(
                token.span(),
                "admin.token",
                "must be at least 16 characters",
            ));
        }
        cfg.token = Some(token.get_ref().clone());
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use crate::config::{AgentConfig, GatewayConfig};
    use std::path::Path;

    fn agent(admin: &str) -> Result<AgentConfig, String> {
        let text = format!("site = \"s\"\ngateways = [\"g:1\"]\n{admin}");
        AgentConfig::parse(Path::new("agent.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_agent_listens_on_9091_by_default_and_warns_without_a_token() {
        let cfg = agent("").unwrap();
        assert_eq!(cfg.admin.listen, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(cfg.admin.token, None);
        assert!(cfg
            .notices
            .iter()
            .any(|n| n.contains("[admin] has no token") && n.contains("reload the agent")));
    }

    #[test]
    fn the_agent_section_is_the_gateways() {
        let cfg = agent("[admin]\nlisten = \"10.0.0.20:9091\"\n").unwrap();
        assert_eq!(cfg.admin.listen, Some("10.0.0.20:9091".parse().unwrap()));
        assert!(cfg.notices.iter().any(|n| n.contains("beyond loopback")));
        let cfg = agent("[admin]\nenabled = false\n").unwrap();
        assert_eq!(cfg.admin.listen, None);
        let cfg = agent("[admin]\ntoken = \"0123456789abcdef\"\n").unwrap();
        assert_eq!(cfg.admin.token.as_deref(), Some("0123456789abcdef"));
        assert!(!cfg.notices.iter().any(|n| n.contains("[admin]")));
        for (text, want) in [
            (
                "[admin]\ntoken = \"short\"\n",
                "agent.toml:4: admin.token: must be at least 16",
            ),
            (
                "[admin]\nlisten = \"9091\"\n",
                "agent.toml:4: admin.listen: invalid socket address",
            ),
            ("[admin]\nport = 9091\n", "unknown field `port`"),
        ] {
            let err = agent(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_gateway_keeps_9090() {
        let text = "[control]\nlisten = \"127.0.0.1:44500\"\n[peers]\ndefault = \"allow\"\n";
        let cfg = GatewayConfig::parse(Path::new("gateway.toml"), text).unwrap();
        assert_eq!(cfg.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(cfg
            .notices
            .iter()
            .any(|n| n.contains("[admin] has no token") && n.contains("stop the gateway")));
    }
}
