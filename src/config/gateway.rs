//! `gateway.toml`: the gateway's own settings. Listener definitions never live here; agents
//! push them at run time and the gateway keeps them in memory only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::reference::{Change, Setting, GATEWAY_KEYS};
use super::{read_file, ConfigError, Source};
use crate::access::{AccessRules, Policy};
use crate::addr::{PortRange, PublicAddr};
use crate::egress::EgressRules;
use crate::protocol::datagram;
use crate::protocol::frame::{DEFAULT_MAX_FRAME, MIN_MAX_FRAME};
use crate::transport::ServerTls;

mod sections;

pub(super) use sections::RawRules;
use sections::*;

pub const DEFAULT_CONTROL_PORT: u16 = 44500;

/// The gateway's validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where agents connect (control and data connections).
    pub control_listen: SocketAddr,
    /// Mutual TLS, loaded and ready; `None` runs the control port in plaintext.
    pub tls: Option<GatewayTls>,
    /// Whether data connections must use TLS too (`[control] data_tls`, default true). The
    /// control channel is encrypted regardless when `tls` is set. When false, only connections
    /// that carry their own proof may skip TLS: a data connection (its claim token) and a v2
    /// pool or outbound connection (its control session's secret); never a v1 pool or outbound
    /// hello, which proves nothing (`gateway::control::open`, `gateway::binding`).
    pub data_tls: bool,
    /// Whether plaintext pool connections are reused between clients (`[control] data_reuse`,
    /// default false): protocol v4, [`crate::protocol::Feature::PlainReuse`]. TLS pool
    /// connections are reused regardless. Applies to pool connections opened after a reload.
    pub data_reuse: bool,
    /// Which agent addresses may connect to the control port.
    pub peers: AccessRules,
    /// When a reload's `[peers]` rules deny a connected agent: also close the client and
    /// outbound connections it is piping (`[peers] drop_established`, default true). Its control
    /// channel, pooled and not yet piping connections are closed either way.
    pub drop_established: bool,
    /// Address public listeners bind to when the agent gives only a port.
    pub client_bind: IpAddr,
    /// Other addresses an agent's push may name for a listener (`[clients] allow_ips`); by
    /// default only `client_bind`: the gateway's owner decides where the public ports live.
    pub client_ips: Vec<IpAddr>,
    /// Public ports agents may open (`[clients] ports`); empty: any port.
    pub client_ports: Vec<PortRange>,
    /// Front balancers whose connections start with a PROXY v1/v2 header naming the real
    /// client (`[clients] proxy_protocol_from`); empty: none ([`crate::gateway::front`]).
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
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
    /// The certificate revocation list agents' certificates are checked against, if any.
    pub crl: Option<PathBuf>,
    /// Whether an agent certificate bound to no site may serve a site.
    pub site_binding: SiteBinding,
    pub server: ServerTls,
    /// What its own certificate (`cert`) says: name, serial, expiry.
    pub identity: crate::certinfo::CertInfo,
    /// Of the files' contents: a reload sees certificates rotated in place.
    pub fingerprint: String,
}

/// `[control] tls.site_binding`: what the gateway does with an agent certificate that names no
/// site. A certificate that names sites serves those only, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SiteBinding {
    /// Refused: every agent must have a certificate issued with `--site`.
    Required,
    /// Accepted for any site (certificates issued before site binding existed): the upgrade
    /// path, warned about at start.
    #[default]
    Optional,
}

impl SiteBinding {
    fn parse(s: &str) -> Result<SiteBinding, String> {
        match s {
            "required" => Ok(SiteBinding::Required),
            "optional" => Ok(SiteBinding::Optional),
            _ => Err(format!("\"{s}\" is not \"required\" or \"optional\"")),
        }
    }
}

impl std::fmt::Display for SiteBinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SiteBinding::Required => "required",
            SiteBinding::Optional => "optional",
        })
    }
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .field("crl", &self.crl)
            .field("site_binding", &self.site_binding)
            .finish_non_exhaustive()
    }
}

/// Timeouts and sizes that bound what a peer or a client can make the gateway hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time a new control-port connection has to complete its hello.
    pub hello_timeout: Duration,
    /// Time a new control-port connection has to send its first byte (a real agent's TLS
    /// ClientHello or preamble follows its connect at once); at most `hello_timeout`.
    pub first_byte_timeout: Duration,
    /// Time a client waits for a data connection before it is closed.
    pub pending_timeout: Duration,
    /// Hard maximum frame size on the control port, in bytes.
    pub max_frame: usize,
    /// Clients waiting for a data connection, in total and per listener.
    pub max_pending: usize,
    pub max_pending_per_listener: usize,
    /// UDP flows open at once per UDP listener (each holds a data connection).
    pub max_udp_flows_per_listener: usize,
    /// The largest UDP datagram forwarded, in bytes; larger ones are dropped and counted.
    pub max_datagram: usize,
    /// Client connections (waiting or piping), in total and per client IP address.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Control-port connections that have not completed their hello, in total and per IP.
    pub max_handshakes: usize,
    pub max_handshakes_per_ip: usize,
    /// How long a graceful stop lets established connections finish.
    pub drain_timeout: Duration,
    /// Public ports open at once, in total and per site; `None`: derived from the open-files
    /// limit at start ([`Limits::listen_ports`]).
    pub max_listen_ports: Option<usize>,
    pub max_listen_ports_per_site: Option<usize>,
    /// Sites with a connected agent, at most.
    pub max_sites: usize,
    /// Outbound connections (agents' proxy clients) open at once.
    pub max_outbound: usize,
    /// Clients one reusable TLS data connection serves at most before it is closed.
    pub data_reuse_clients: u64,
    /// Bytes (both ways) after which a reusable TLS data connection takes its last client.
    pub data_reuse_bytes: u64,
}

impl Limits {
    /// The public-port caps (total, per site) for a process allowed `fd_limit` descriptors: by
    /// default a quarter of them in total (at most 16384) and half of that per site, so ports
    /// never crowd out connections and one site never takes every port.
    pub fn listen_ports(&self, fd_limit: usize) -> (usize, usize) {
        let total = self
            .max_listen_ports
            .unwrap_or_else(|| (fd_limit / 4).clamp(1, 16384));
        let per_site = self
            .max_listen_ports_per_site
            .unwrap_or_else(|| (total / 2).max(1))
            .min(total);
        (total, per_site)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hello_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(2),
            pending_timeout: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            max_pending: 4096,
            max_pending_per_listener: 1024,
            max_udp_flows_per_listener: 4096,
            max_datagram: 65_507,
            max_connections: 16384,
            max_connections_per_ip: 512,
            max_handshakes: 4096,
            max_handshakes_per_ip: 1024,
            drain_timeout: Duration::from_secs(30),
            max_listen_ports: None,
            max_listen_ports_per_site: None,
            max_sites: 256,
            max_outbound: 1024,
            data_reuse_clients: 1000,
            data_reuse_bytes: 1 << 30,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            control_listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_CONTROL_PORT),
            tls: None,
            data_tls: true,
            data_reuse: false,
            peers: AccessRules::allow_all(),
            drop_established: true,
            client_bind: Ipv4Addr::UNSPECIFIED.into(),
            client_ips: Vec::new(),
            client_ports: Vec::new(),
            proxy_protocol_from: Vec::new(),
            egress: EgressRules::default(),
            admin_listen: Some(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9090)),
            admin_token: None,
            limits: Limits::default(),
            notices: Vec::new(),
        }
    }
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

fn display_list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
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
    /// Whether an agent may open a listener on `public` here: its IP must be `[clients] bind`
    /// (when it names none, or names that one) or one of `[clients] allow_ips`, and every port
    /// must lie in one of `[clients] ports` (when given). The error is one line for the agent.
    pub fn check_public(&self, public: &PublicAddr) -> Result<(), String> {
        if let Some(ip) = public.ip.map(crate::access::canonical) {
            if ip != self.client_bind && !self.client_ips.contains(&ip) {
                return Err(format!(
                    "{ip} is not an address this gateway lets agents bind: its [clients] bind is {}{}",
                    self.client_bind,
                    if self.client_ips.is_empty() {
                        " (omit the IP in `public`, or ask the gateway's owner to add it to [clients] allow_ips)".to_string()
                    } else {
                        format!(", allow_ips {}", display_list(&self.client_ips))
                    }
                ));
            }
        }
        let ports = public.ports;
        if !self.client_ports.is_empty()
            && !self
                .client_ports
                .iter()
                .any(|r| r.first() <= ports.first() && ports.last() <= r.last())
        {
            return Err(format!(
                "port {ports} is outside the ports this gateway lets agents open ([clients] ports = {})",
                display_list(&self.client_ports)
            ));
        }
        Ok(())
    }

    /// Reads and validates a gateway config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths. Sections
    /// are parsed in the file's documented order, so the first error reported is the same
    /// whichever piece finds it.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let src = Source::new(path, text);
        let raw: RawGateway = src.parse_toml()?;
        let mut cfg = GatewayConfig::default();
        if let Some(control) = &raw.control {
            parse_control(&src, path, control, &mut cfg)?;
        }
        if let Some(peers) = &raw.peers {
            (cfg.peers, cfg.drop_established) = parse_peers(&src, peers, cfg.drop_established)?;
        }
        if let Some(clients) = &raw.clients {
            parse_clients(&src, clients, &mut cfg)?;
        }
        if let Some(egress) = &raw.egress {
            cfg.egress = parse_egress(&src, egress)?;
        }
        let admin = super::admin::parse_admin(
            &src,
            raw.admin.as_ref(),
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 9090),
            "pause, restart or stop the gateway",
            &mut cfg.notices,
        )?;
        cfg.admin_listen = admin.listen;
        cfg.admin_token = admin.token;
        if let Some(limits) = &raw.limits {
            parse_limit_timeouts(&src, limits, &mut cfg.limits)?;
            parse_limit_sizes(&src, limits, &mut cfg.limits)?;
            parse_limit_counts(&src, limits, &mut cfg.limits)?;
        }
        require_peers(&src, raw.peers.as_ref())?;
        cfg.limits.first_byte_timeout = cfg.limits.first_byte_timeout.min(cfg.limits.hello_timeout);
        let notices = cfg.notices_of_choices();
        cfg.notices.extend(notices);
        Ok(cfg)
    }

    /// What the configuration chose that an operator should hear about at start: an open
    /// `[peers]`, plaintext, optional site binding, a certificate near its expiry.
    fn notices_of_choices(&self) -> Vec<String> {
        let mut notices = Vec::new();
        if self.peers.default == Policy::Allow {
            notices.push(format!(
                "[peers] default = \"allow\": every address{} may open control connections; \
                 prefer default = \"deny\" with your agents' addresses",
                if self.peers.except.is_empty() {
                    ""
                } else {
                    " outside the exceptions"
                }
            ));
        }
        let Some(tls) = &self.tls else {
            notices.push(
                "no [control] tls configured: control and data connections run in PLAINTEXT and agents are not authenticated".into(),
            );
            return notices;
        };
        if tls.site_binding == SiteBinding::Optional {
            notices.push(
                "[control] tls.site_binding = \"optional\": agent certificates bound to no site may serve any site; set it to \"required\" once every agent has a certificate from `sallyport cert issue --site`".into(),
            );
        }
        let left = tls.identity.seconds_left(std::time::SystemTime::now());
        if crate::certinfo::expiry_warns(left) {
            notices.push(format!(
                "the gateway certificate {} {}: renew it (sallyport cert renew --gateway NAME) and reload",
                tls.cert.display(),
                crate::certinfo::describe_expiry(left)
            ));
        }
        if !self.data_tls {
            notices.push(
                "[control] data_tls = false: data connections run in plaintext (the control channel stays encrypted)".into(),
            );
        }
        notices
    }
}

impl GatewayConfig {
    /// Every key's effective value, in the order of [`GATEWAY_KEYS`] (for reload reports and
    /// `--check`).
    pub fn settings(&self) -> Vec<Setting> {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let tls = |f: fn(&GatewayTls) -> &PathBuf| match &self.tls {
            Some(t) => format!("{} (sha256 {})", f(t).display(), t.fingerprint),
            None => String::new(),
        };
        let l = &self.limits;
        fn list<T: std::fmt::Display>(v: &[T]) -> String {
            let items: Vec<String> = v.iter().map(|x| format!("\"{x}\"")).collect();
            format!("[{}]", items.join(", "))
        }
        // Unset: derived from the open-files limit at start.
        let opt = |v: Option<usize>| v.map(|n| n.to_string()).unwrap_or_default();
        vec![
            Setting::new("control.listen", self.control_listen),
            Setting::new("control.tls.cert", tls(|t| &t.cert)),
            Setting::new("control.tls.key", tls(|t| &t.key)),
            Setting::new("control.tls.client_ca", tls(|t| &t.client_ca)),
            Setting::new(
                "control.tls.crl",
                match &self.tls {
                    Some(GatewayTls { crl: Some(crl), .. }) => crl.display().to_string(),
                    _ => String::new(),
                },
            ),
            Setting::new(
                "control.tls.site_binding",
                self.tls
                    .as_ref()
                    .map(|t| t.site_binding.to_string())
                    .unwrap_or_default(),
            ),
            Setting::new("control.data_tls", self.data_tls),
            Setting::new("control.data_reuse", self.data_reuse),
            Setting::new("peers.default", self.peers.default),
            Setting::new("peers.except", self.peers.except_text()),
            Setting::new("peers.drop_established", self.drop_established),
            Setting::new("clients.bind", self.client_bind),
            Setting::new("clients.allow_ips", list(&self.client_ips)),
            Setting::new("clients.ports", list(&self.client_ports)),
            Setting::new(
                "clients.proxy_protocol_from",
                list(&self.proxy_protocol_from),
            ),
            Setting::new("egress.allow", format!("{:?}", self.egress.entries())),
            Setting::new("admin.enabled", self.admin_listen.is_some()),
            Setting::new(
                "admin.listen",
                self.admin_listen.map(|a| a.to_string()).unwrap_or_default(),
            ),
            Setting::secret("admin.token", self.admin_token.as_deref()),
            Setting::new("limits.hello_timeout", d(l.hello_timeout)),
            Setting::new("limits.pending_timeout", d(l.pending_timeout)),
            Setting::new("limits.max_frame", l.max_frame),
            Setting::new("limits.max_pending", l.max_pending),
            Setting::new(
                "limits.max_pending_per_listener",
                l.max_pending_per_listener,
            ),
            Setting::new(
                "limits.max_udp_flows_per_listener",
                l.max_udp_flows_per_listener,
            ),
            Setting::new("limits.max_datagram", l.max_datagram),
            Setting::new("limits.max_connections", l.max_connections),
            Setting::new("limits.max_connections_per_ip", l.max_connections_per_ip),
            Setting::new("limits.max_handshakes", l.max_handshakes),
            Setting::new("limits.max_handshakes_per_ip", l.max_handshakes_per_ip),
            Setting::new("limits.drain_timeout", d(l.drain_timeout)),
            Setting::new("limits.first_byte_timeout", d(l.first_byte_timeout)),
            Setting::new("limits.max_listen_ports", opt(l.max_listen_ports)),
            Setting::new(
                "limits.max_listen_ports_per_site",
                opt(l.max_listen_ports_per_site),
            ),
            Setting::new("limits.max_sites", l.max_sites),
            Setting::new("limits.max_outbound", l.max_outbound),
            Setting::new("limits.data_reuse_clients", l.data_reuse_clients),
            Setting::new("limits.data_reuse_bytes", l.data_reuse_bytes),
        ]
    }

    /// What a reload of `new` changes, key by key.
    pub fn changes(&self, new: &GatewayConfig) -> Vec<Change> {
        super::reference::diff(GATEWAY_KEYS, &self.settings(), &new.settings())
    }
}

/// The keys gateway.toml's parser accepts (for the reference's tests).
#[cfg(test)]
pub(super) fn traced_keys() -> Vec<String> {
    super::reference::trace::keys::<RawGateway>()
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod piece_tests;
