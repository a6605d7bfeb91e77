//! `gateway.toml`: the gateway's own settings. Listener definitions never live here; agents
//! push them at run time and the gateway keeps them in memory only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{read_file, ConfigError, Source};
use crate::access::{AccessRules, Policy};
use crate::egress::EgressRules;
use crate::protocol::frame::{DEFAULT_MAX_FRAME, MIN_MAX_FRAME};
use crate::transport::ServerTls;

pub const DEFAULT_CONTROL_PORT: u16 = 44500;

/// The gateway's validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where agents connect (control and data connections).
    pub control_listen: SocketAddr,
    /// Mutual TLS, loaded and ready; `None` runs the control port in plaintext.
    pub tls: Option<GatewayTls>,
    /// Whether data connections must use TLS too (`[control] data_tls`, default true). The
    /// control channel is encrypted regardless when `tls` is set.
    pub data_tls: bool,
    /// Which agent addresses may connect to the control port.
    pub peers: AccessRules,
    /// Address public listeners bind to when the agent gives only a port.
    pub client_bind: IpAddr,
    /// Destinations the outbound proxy may reach; empty: none.
    pub egress: EgressRules,
    /// Admin HTTP API, `/metrics` and dashboard (default 127.0.0.1:9090); `None` when disabled.
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin API's mutating calls require.
    pub admin_token: Option<String>,
    pub limits: Limits,
    /// Warnings found while loading (sections parsed but not yet in force, ...), for the log.
    pub notices: Vec<String>,
}

/// The gateway's TLS files and the acceptor built from them.
#[derive(Clone)]
pub struct GatewayTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub server: ServerTls,
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .finish_non_exhaustive()
    }
}

/// Timeouts and sizes that bound what a peer or a client can make the gateway hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time a new control-port connection has to complete its hello.
    pub hello_timeout: Duration,
    /// Time a client waits for a data connection before it is closed.
    pub pending_timeout: Duration,
    /// Hard maximum frame size on the control port, in bytes.
    pub max_frame: usize,
    /// Clients waiting for a data connection, in total and per listener.
    pub max_pending: usize,
    pub max_pending_per_listener: usize,
    /// Client connections (waiting or piping), in total and per client IP address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Control-port connections that have not completed their hello, in total and per IP.
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    /// How long a graceful stop lets established connections finish.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(10),
            pending_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            max_pending: 4096,
            max_pending_per_listener: 1024,
            max_connections: 16384,
            max_connections_per_ip: 512,
            max_handshakes: 4096,
            max_handshakes_per_ip: 1024,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            control_listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_CONTROL_PORT),
            tls: None,
            data_tls: true,
            peers: AccessRules::allow_all(),
            client_bind: Ipv4Addr::UNSPECIFIED.into(),
            egress: EgressRules::default(),
            admin_listen: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9090)),
            admin_token: None,
            limits: Limits::default(),
            notices: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    control: Option<RawControl>,
    peers: Option<RawRules>,
    clients: Option<RawClients>,
    egress: Option<RawEgress>,
    admin: Option<RawAdmin>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
    data_tls: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRules {
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClients {
    bind: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    hello_timeout: Option<Spanned<String>>,
    pending_timeout: Option<Spanned<String>>,
    max_frame: Option<Spanned<u64>>,
    max_pending: Option<Spanned<u64>>,
    max_pending_per_listener: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    max_handshakes: Option<Spanned<u64>>,
    max_handshakes_per_ip: Option<Spanned<u64>>,
    drain_timeout: Option<Spanned<String>>,
}

/// Parses `[peers]`-style rules (also used for listener `clients`).
pub(super) fn parse_rules(
    src: &Source,
    raw: &RawRules,
    context: &str,
) -> Result<(AccessRules, Vec<String>), ConfigError> {
    let default = match &raw.default {
        Some(d) => src.parse_with(d, &format!("{context}default"), |s| s.parse::<Policy>())?,
        None => Policy::Allow,
    };
    let mut except = Vec::with_capacity(raw.except.len());
    for e in &raw.except {
        src.parse_with(e, &format!("{context}except"), |s| {
            s.parse::<crate::access::IpPattern>()
        })?;
        except.push(e.get_ref().trim().to_string());
    }
    let rules = AccessRules::parse(default, &except)
        .map_err(|e| src.error_nowhere(format!("{context}{e}")))?;
    Ok((rules, except))
}

/// Resolves a path from the config relative to the config file's directory.
pub(super) fn relative_to(config: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

impl GatewayConfig {
    /// Reads and validates a gateway config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let src = Source::new(path, text);
        let raw: RawGateway = src.parse_toml()?;
        let mut cfg = GatewayConfig::default();

        if let Some(control) = &raw.control {
            if let Some(listen) = &control.listen {
                cfg.control_listen = src.parse_with(listen, "control.listen", |s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        format!("invalid socket address \"{s}\" (e.g. \"0.0.0.0:44500\")")
                    })
                })?;
            }
            if let Some(tls) = &control.tls {
                let (span, tls) = (tls.span(), tls.get_ref());
                let file = |v: &Spanned<String>| relative_to(path, v.get_ref());
                let (cert, key, client_ca) =
                    (file(&tls.cert), file(&tls.key), file(&tls.client_ca));
                let server = ServerTls::load(&cert, &key, &client_ca)
                    .map_err(|e| src.error(span, "control.tls", format!("{e:#}")))?;
                cfg.tls = Some(GatewayTls {
                    cert,
                    key,
                    client_ca,
                    server,
                });
            }
            if let Some(data_tls) = control.data_tls {
                cfg.data_tls = data_tls;
            }
        }
        if let Some(peers) = &raw.peers {
            cfg.peers = parse_rules(&src, peers, "peers.")?.0;
        }
        if let Some(clients) = &raw.clients {
            if let Some(bind) = &clients.bind {
                cfg.client_bind = src.parse_with(bind, "clients.bind", |s| {
                    s.parse::<IpAddr>()
                        .map_err(|_| format!("invalid IP address \"{s}\""))
                })?;
            }
        }
        if let Some(egress) = &raw.egress {
            for entry in &egress.allow {
                src.parse_with(entry, "egress.allow", EgressRules::check_entry)?;
            }
            cfg.egress = EgressRules::parse(
                &egress
                    .allow
                    .iter()
                    .map(|a| a.get_ref().as_str())
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| src.error_nowhere(format!("egress.allow: {e}")))?;
        }
        if let Some(admin) = &raw.admin {
            if let Some(listen) = &admin.listen {
                let addr = src.parse_with(listen, "admin.listen", |s| {
                    s.parse::<SocketAddr>()
                        .map_err(|_| format!("invalid socket address \"{s}\""))
                })?;
                if !addr.ip().is_loopback() && admin.token.is_none() {
                    cfg.notices.push(format!(
                        "[admin] listens on {addr}, beyond loopback, without a token: anyone who reaches it can stop the gateway"
                    ));
                }
                cfg.admin_listen = Some(addr);
            }
            if admin.enabled == Some(false) {
                cfg.admin_listen = None;
            }
            if let Some(token) = &admin.token {
                if token.get_ref().len() < 16 {
                    return Err(src.error(
                        token.span(),
                        "admin.token",
                        "must be at least 16 characters",
                    ));
                }
                cfg.admin_token = Some(token.get_ref().clone());
            }
        }
        if let Some(limits) = &raw.limits {
            if let Some(v) = &limits.hello_timeout {
                cfg.limits.hello_timeout = src.duration_within(
                    v,
                    "limits.hello_timeout",
                    Duration::from_millis(100),
                    Duration::from_secs(300),
                )?;
            }
            if let Some(v) = &limits.pending_timeout {
                cfg.limits.pending_timeout = src.duration_within(
                    v,
                    "limits.pending_timeout",
                    Duration::from_millis(100),
                    Duration::from_secs(600),
                )?;
            }
            if let Some(v) = &limits.drain_timeout {
                cfg.limits.drain_timeout = src.duration_within(
                    v,
                    "limits.drain_timeout",
                    Duration::ZERO,
                    Duration::from_secs(3600),
                )?;
            }
            if let Some(v) = &limits.max_frame {
                let n = *v.get_ref();
                if !(MIN_MAX_FRAME as u64..=64 * 1024 * 1024).contains(&n) {
                    return Err(src.error(
                        v.span(),
                        "limits.max_frame",
                        format!("{n} is outside the allowed {MIN_MAX_FRAME} to 67108864 bytes"),
                    ));
                }
                cfg.limits.max_frame = n as usize;
            }
            let count = |v: &Option<Spanned<u64>>,
                         name: &str,
                         slot: &mut usize|
             -> Result<(), ConfigError> {
                if let Some(v) = v {
                    let n = *v.get_ref();
                    if !(1..=1_000_000).contains(&n) {
                        return Err(src.error(
                            v.span(),
                            &format!("limits.{name}"),
                            format!("{n} is outside the allowed 1 to 1000000"),
                        ));
                    }
                    *slot = n as usize;
                }
                Ok(())
            };
            let l = &mut cfg.limits;
            count(&limits.max_pending, "max_pending", &mut l.max_pending)?;
            count(
                &limits.max_pending_per_listener,
                "max_pending_per_listener",
                &mut l.max_pending_per_listener,
            )?;
            count(
                &limits.max_connections,
                "max_connections",
                &mut l.max_connections,
            )?;
            count(
                &limits.max_connections_per_ip,
                "max_connections_per_ip",
                &mut l.max_connections_per_ip,
            )?;
            count(
                &limits.max_handshakes,
                "max_handshakes",
                &mut l.max_handshakes,
            )?;
            count(
                &limits.max_handshakes_per_ip,
                "max_handshakes_per_ip",
                &mut l.max_handshakes_per_ip,
            )?;
        }
        if cfg.tls.is_none() {
            cfg.notices.push(
                "no [control] tls configured: control and data connections run in PLAINTEXT and agents are not authenticated".into(),
            );
        } else if !cfg.data_tls {
            cfg.notices.push(
                "[control] data_tls = false: data connections run in plaintext (the control channel stays encrypted)".into(),
            );
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse(Path::new("gateway.toml"), text)
    }

    #[test]
    fn design_example_parses() {
        let cfg = parse(
            r#"
[control]
listen = "0.0.0.0:44500"

[peers]
default = "allow"
except = ["10.0.0.*", "10.1.0.0/16", "10.2.0.10-10.2.0.20", "fd00::/8"]

[clients]
bind = "0.0.0.0"

[egress]
allow = ["sftp.partner.example:22", "203.0.113.0/24:443"]

[admin]
listen = "127.0.0.1:9090"
"#,
        )
        .unwrap();
        assert_eq!(cfg.control_listen, "0.0.0.0:44500".parse().unwrap());
        assert!(!cfg.peers.allows("10.0.0.3".parse().unwrap()));
        assert!(cfg.peers.allows("10.3.0.3".parse().unwrap()));
        assert!(cfg.tls.is_none());
        assert_eq!(cfg.egress.len(), 2);
        assert!(cfg.egress.allows_name("sftp.partner.example", 22));
    }

    #[test]
    fn empty_file_means_defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.control_listen.port(), DEFAULT_CONTROL_PORT);
        assert_eq!(cfg.limits, Limits::default());
    }

    #[test]
    fn errors_name_line_and_field() {
        let err = parse("[control]\nlisten = \"44500\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "gateway.toml:2: control.listen: invalid socket address \"44500\" (e.g. \"0.0.0.0:44500\")"
        );
        let err = parse("[peers]\nexcept = [\n  \"10.0.0.1\",\n  \"10.0.*.1\",\n]\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gateway.toml:4: peers.except: invalid wildcard"),
            "{err}"
        );
        let err = parse("[limits]\npending_timeout = \"forever\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gateway.toml:2: limits.pending_timeout: invalid duration"),
            "{err}"
        );
        let err =
            parse("[control]\ntls = { cert = \"nope.crt\", key = \"k\", client_ca = \"c\" }\n")
                .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gateway.toml:2: control.tls: cannot read"),
            "{err}"
        );
        let err = parse("[limits]\nmax_connections = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gateway.toml:2: limits.max_connections: 0 is outside"),
            "{err}"
        );
        let err = parse("[control]\nlisen = \"x\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("gateway.toml:2: unknown field `lisen`"),
            "{err}"
        );
    }
}
