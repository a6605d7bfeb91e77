//! agent.toml's `[outbound]` section: the SOCKS5 / HTTP CONNECT proxy the agent offers to the
//! gateway's egress (listen address, users, limits), its raw form and its parser. Errors carry
//! the file's line, like every other section's.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbound {
    pub(super) listen: Spanned<String>,
    pub(super) clients: Option<RawRules>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_clients: Option<Spanned<u64>>,
    pub(super) max_clients_per_ip: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    pub(super) name: Spanned<String>,
    pub(super) password: Spanned<String>,
}

/// `[outbound]`: where the agent's proxy listens, who may use it, and (optionally) the
/// user names and passwords it requires (SOCKS5 username/password, HTTP Basic).
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    pub clients: AccessRules,
    /// Empty: no authentication.
    pub users: Vec<(String, String)>,
    /// Time a proxy client has from its connect to a complete request, first byte included.
    pub handshake_timeout: Duration,
    /// Proxy clients (in their handshake or piping), in total and per client address (IPv6 per
    /// /64): a flood of connections cannot take the agent's descriptors from the inbound
    /// service.
    pub max_clients: usize,
    pub max_clients_per_ip: usize,
}

/// `[outbound]` defaults: the handshake bound and the proxy client caps.
pub const OUTBOUND_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub const OUTBOUND_MAX_CLIENTS: usize = 1024;

pub const OUTBOUND_MAX_CLIENTS_PER_IP: usize = 128;

/// `[outbound]`: where the agent's proxy listens, who may use it, its users and limits.
pub(super) fn parse_outbound(
    src: &Source,
    o: &RawOutbound,
    notices: &mut Vec<String>,
) -> Result<OutboundConfig, ConfigError> {
    let listen = src.parse_with(&o.listen, "outbound.listen", |s| {
        s.parse::<SocketAddr>()
            .map_err(|_| format!("invalid socket address \"{s}\""))
    })?;
    let clients = match &o.clients {
        Some(r) => parse_rules(src, r, "outbound.clients.")?.0,
        None => AccessRules::allow_all(),
    };
    let mut users = Vec::new();
    for u in &o.users {
        let name = src.parse_with(&u.name, "outbound.users.name", |s| {
            if s.is_empty() || s.len() > 255 || s.contains(':') {
                Err("must be 1 to 255 bytes without ':'".to_string())
            } else {
                Ok(s.to_string())
            }
        })?;
        let password = src.parse_with(&u.password, "outbound.users.password", |s| {
            if s.is_empty() || s.len() > 255 {
                Err("must be 1 to 255 bytes".to_string())
            } else {
                Ok(s.to_string())
            }
        })?;
        users.push((name, password));
    }
    if !listen.ip().is_loopback() && users.is_empty() && o.clients.is_none() {
        notices.push(format!(
            "[outbound] listens on {listen} with neither users nor client rules: \
             every host that reaches it may use the gateway's egress"
        ));
    }
    let handshake_timeout = match &o.handshake_timeout {
        Some(v) => src.duration_within(
            v,
            "outbound.handshake_timeout",
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?,
        None => OUTBOUND_HANDSHAKE_TIMEOUT,
    };
    let count = |v: &Option<Spanned<u64>>, name: &str, default: usize| match v {
        Some(v) if (1..=1_000_000).contains(v.get_ref()) => Ok(*v.get_ref() as usize),
        Some(v) => Err(src.error(
            v.span(),
            &format!("outbound.{name}"),
            format!("{} is outside the allowed 1 to 1000000", v.get_ref()),
        )),
        None => Ok(default),
    };
    Ok(OutboundConfig {
        listen,
        clients,
        users,
        handshake_timeout,
        max_clients: count(&o.max_clients, "max_clients", OUTBOUND_MAX_CLIENTS)?,
        max_clients_per_ip: count(
            &o.max_clients_per_ip,
            "max_clients_per_ip",
            OUTBOUND_MAX_CLIENTS_PER_IP,
        )?,
    })
}
