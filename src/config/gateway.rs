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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    control: Option<RawControl>,
    peers: Option<RawPeers>,
    clients: Option<RawClients>,
    egress: Option<RawEgress>,
    admin: Option<super::admin::RawAdmin>,
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
    crl: Option<Spanned<String>>,
    site_binding: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRules {
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
}

/// `[peers]`: the rules, and what revoking a connected agent closes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeers {
    default: Option<Spanned<String>>,
    #[serde(default)]
    except: Vec<Spanned<String>>,
    drop_established: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClients {
    bind: Option<Spanned<String>>,
    #[serde(default)]
    allow_ips: Vec<Spanned<String>>,
    #[serde(default)]
    ports: Vec<Spanned<String>>,
    #[serde(default)]
    proxy_protocol_from: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    hello_timeout: Option<Spanned<String>>,
    first_byte_timeout: Option<Spanned<String>>,
    pending_timeout: Option<Spanned<String>>,
    max_frame: Option<Spanned<u64>>,
    max_pending: Option<Spanned<u64>>,
    max_pending_per_listener: Option<Spanned<u64>>,
    max_udp_flows_per_listener: Option<Spanned<u64>>,
    max_datagram: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_ip: Option<Spanned<u64>>,
    max_handshakes: Option<Spanned<u64>>,
    max_handshakes_per_ip: Option<Spanned<u64>>,
    drain_timeout: Option<Spanned<String>>,
    max_listen_ports: Option<Spanned<u64>>,
    max_listen_ports_per_site: Option<Spanned<u64>>,
    max_sites: Option<Spanned<u64>>,
    max_outbound: Option<Spanned<u64>>,
    data_reuse_clients: Option<Spanned<u64>>,
    data_reuse_bytes: Option<Spanned<u64>>,
}

/// One entry of `[clients] proxy_protocol_from`: a network (`"10.0.0.0/24"`) or one address
/// (`"10.0.0.5"`, taken as /32 or /128). IPv4-mapped IPv6 forms are stored as IPv4, the form
/// client addresses are compared in.
fn parse_trusted_net(s: &str) -> Result<ipnet::IpNet, String> {
    let bad = || format!("invalid network or address \"{s}\" (e.g. \"10.0.0.0/24\", \"10.0.0.5\")");
    let net = match s.parse::<ipnet::IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => ipnet::IpNet::from(s.parse::<IpAddr>().map_err(|_| bad())?),
    };
    match (net, crate::access::canonical(net.addr())) {
        (ipnet::IpNet::V6(v6), IpAddr::V4(v4)) if v6.prefix_len() >= 96 => {
            ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .map_err(|_| bad())
        }
        _ => Ok(net),
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

/// `[control]`: the listen address, TLS (files loaded here) and `data_tls`.
fn parse_control(
    src: &Source<'_>,
    path: &Path,
    control: &RawControl,
    cfg: &mut GatewayConfig,
) -> Result<(), ConfigError> {
    if let Some(listen) = &control.listen {
        cfg.control_listen = src.parse_with(listen, "control.listen", |s| {
            s.parse::<SocketAddr>()
                .map_err(|_| format!("invalid socket address \"{s}\" (e.g. \"0.0.0.0:44500\")"))
        })?;
    }
    if let Some(tls) = &control.tls {
        cfg.tls = Some(parse_tls(src, path, tls)?);
    }
    if let Some(data_tls) = control.data_tls {
        cfg.data_tls = data_tls;
    }
    Ok(())
}

/// `[peers]`: who may open control connections, and whether revoking a connected agent's
/// address closes its established connections (`drop_established`, else `dropping`).
fn parse_peers(
    src: &Source<'_>,
    peers: &RawPeers,
    dropping: bool,
) -> Result<(AccessRules, bool), ConfigError> {
    let rules = RawRules {
        default: peers.default.clone(),
        except: peers.except.clone(),
    };
    let rules = parse_rules(src, &rules, "peers.")?.0;
    Ok((rules, peers.drop_established.unwrap_or(dropping)))
}

/// Who may reach the control port is the gateway's first line of defence: it must be written
/// down. `default = "allow"` still works, but only when written (and it warns).
fn require_peers(src: &Source<'_>, peers: Option<&RawPeers>) -> Result<(), ConfigError> {
    match peers {
        None => Err(src.error_nowhere(
            "no [peers] section: say which addresses may open control connections, \
             e.g. [peers] default = \"deny\" with except = [\"10.0.0.20\"] (your agents), \
             or write default = \"allow\" to let every address try",
        )),
        Some(peers) if peers.default.is_none() => Err(src.error_nowhere(
            "peers.default is required: \"deny\" (with your agents' addresses in except) \
             or \"allow\"",
        )),
        Some(_) => Ok(()),
    }
}

/// `[clients]`: where agents' listeners bind, which IPs and ports they may ask for, and the
/// front balancers whose connections start with a PROXY header.
fn parse_clients(
    src: &Source<'_>,
    clients: &RawClients,
    cfg: &mut GatewayConfig,
) -> Result<(), ConfigError> {
    let ip = |s: &str| {
        s.parse::<IpAddr>()
            .map_err(|_| format!("invalid IP address \"{s}\""))
    };
    if let Some(bind) = &clients.bind {
        cfg.client_bind = src.parse_with(bind, "clients.bind", ip)?;
    }
    for allowed in &clients.allow_ips {
        let allowed = src.parse_with(allowed, "clients.allow_ips", ip)?;
        cfg.client_ips.push(crate::access::canonical(allowed));
    }
    for ports in &clients.ports {
        cfg.client_ports
            .push(src.parse_with(ports, "clients.ports", |s| {
                s.parse::<PortRange>().map_err(|e| {
                    format!("invalid port or range \"{s}\": {e} (e.g. \"443\", \"30000-30100\")")
                })
            })?);
    }
    for net in &clients.proxy_protocol_from {
        let trusted = src.parse_with(net, "clients.proxy_protocol_from", parse_trusted_net)?;
        cfg.proxy_protocol_from.push(trusted);
    }
    Ok(())
}

/// `[egress]`: the destinations agents' outbound connections may reach, each checked at its
/// line.
fn parse_egress(src: &Source<'_>, egress: &RawEgress) -> Result<EgressRules, ConfigError> {
    for entry in &egress.allow {
        src.parse_with(entry, "egress.allow", EgressRules::check_entry)?;
    }
    let allow: Vec<&str> = egress.allow.iter().map(|a| a.get_ref().as_str()).collect();
    EgressRules::parse(&allow).map_err(|e| src.error_nowhere(format!("egress.allow: {e}")))
}

/// `[limits]`' timeouts, each within its bounds.
fn parse_limit_timeouts(
    src: &Source<'_>,
    raw: &RawLimits,
    l: &mut Limits,
) -> Result<(), ConfigError> {
    let (ms, s) = (Duration::from_millis, Duration::from_secs);
    let timeouts = [
        (
            &raw.hello_timeout,
            "hello_timeout",
            ms(100),
            s(300),
            &mut l.hello_timeout,
        ),
        (
            &raw.first_byte_timeout,
            "first_byte_timeout",
            ms(100),
            s(60),
            &mut l.first_byte_timeout,
        ),
        (
            &raw.pending_timeout,
            "pending_timeout",
            ms(100),
            s(600),
            &mut l.pending_timeout,
        ),
        (
            &raw.drain_timeout,
            "drain_timeout",
            Duration::ZERO,
            s(3600),
            &mut l.drain_timeout,
        ),
    ];
    for (value, name, min, max, slot) in timeouts {
        if let Some(v) = value {
            *slot = src.duration_within(v, &format!("limits.{name}"), min, max)?;
        }
    }
    Ok(())
}

/// The value of `limits.{name}` when it is set, if `range` holds it.
fn ranged(
    src: &Source<'_>,
    value: &Option<Spanned<u64>>,
    name: &str,
    range: RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    let Some(v) = value else { return Ok(None) };
    let n = *v.get_ref();
    if !range.contains(&n) {
        let why = format!(
            "{n} is outside the allowed {} to {}",
            range.start(),
            range.end()
        );
        return Err(src.error(v.span(), &format!("limits.{name}"), why));
    }
    Ok(Some(n))
}

/// `[limits]`' byte sizes: the largest frame, and how much one reused data connection carries.
fn parse_limit_sizes(src: &Source<'_>, raw: &RawLimits, l: &mut Limits) -> Result<(), ConfigError> {
    if let Some(v) = &raw.max_frame {
        let n = *v.get_ref();
        if !(MIN_MAX_FRAME as u64..=64 * 1024 * 1024).contains(&n) {
            return Err(src.error(
                v.span(),
                "limits.max_frame",
                format!("{n} is outside the allowed {MIN_MAX_FRAME} to 67108864 bytes"),
            ));
        }
        l.max_frame = n as usize;
    }
    let clients = ranged(
        src,
        &raw.data_reuse_clients,
        "data_reuse_clients",
        1..=1 << 32,
    )?;
    if let Some(n) = clients {
        l.data_reuse_clients = n;
    }
    if let Some(n) = ranged(src, &raw.data_reuse_bytes, "data_reuse_bytes", 1..=1 << 50)? {
        l.data_reuse_bytes = n;
    }
    Ok(())
}

/// `[limits]`' counts (1 to 1,000,000 each) and the largest datagram.
fn parse_limit_counts(
    src: &Source<'_>,
    raw: &RawLimits,
    l: &mut Limits,
) -> Result<(), ConfigError> {
    let count = |v: &Option<Spanned<u64>>, name: &str| -> Result<Option<usize>, ConfigError> {
        Ok(ranged(src, v, name, 1..=1_000_000)?.map(|n| n as usize))
    };
    let set = |slot: &mut usize, n: Option<usize>| {
        if let Some(n) = n {
            *slot = n;
        }
    };
    set(&mut l.max_pending, count(&raw.max_pending, "max_pending")?);
    let per_listener = count(&raw.max_pending_per_listener, "max_pending_per_listener")?;
    set(&mut l.max_pending_per_listener, per_listener);
    let flows = count(
        &raw.max_udp_flows_per_listener,
        "max_udp_flows_per_listener",
    )?;
    set(&mut l.max_udp_flows_per_listener, flows);
    let largest = datagram::MAX_PAYLOAD as u64;
    if let Some(n) = ranged(src, &raw.max_datagram, "max_datagram", 512..=largest)? {
        l.max_datagram = n as usize;
    }
    set(
        &mut l.max_connections,
        count(&raw.max_connections, "max_connections")?,
    );
    let per_ip = count(&raw.max_connections_per_ip, "max_connections_per_ip")?;
    set(&mut l.max_connections_per_ip, per_ip);
    set(
        &mut l.max_handshakes,
        count(&raw.max_handshakes, "max_handshakes")?,
    );
    let per_ip = count(&raw.max_handshakes_per_ip, "max_handshakes_per_ip")?;
    set(&mut l.max_handshakes_per_ip, per_ip);
    set(&mut l.max_sites, count(&raw.max_sites, "max_sites")?);
    set(
        &mut l.max_outbound,
        count(&raw.max_outbound, "max_outbound")?,
    );
    if let Some(n) = count(&raw.max_listen_ports, "max_listen_ports")? {
        l.max_listen_ports = Some(n);
    }
    let per_site = count(&raw.max_listen_ports_per_site, "max_listen_ports_per_site")?;
    if let Some(n) = per_site {
        l.max_listen_ports_per_site = Some(n);
    }
    Ok(())
}

/// `[control] tls`: loads the files, so a file that does not work is an error at its line.
fn parse_tls(
    src: &Source<'_>,
    path: &Path,
    tls: &Spanned<RawTls>,
) -> Result<GatewayTls, ConfigError> {
    let (span, tls) = (tls.span(), tls.get_ref());
    let file = |v: &Spanned<String>| relative_to(path, v.get_ref());
    let (cert, key, client_ca) = (file(&tls.cert), file(&tls.key), file(&tls.client_ca));
    let crl = tls.crl.as_ref().map(file);
    let site_binding = match &tls.site_binding {
        Some(v) => src.parse_with(v, "control.tls.site_binding", SiteBinding::parse)?,
        None => SiteBinding::default(),
    };
    let server = ServerTls::load(&cert, &key, &client_ca, crl.as_deref()).map_err(|e| {
        match (&tls.crl, crl.as_deref()) {
            // A CRL that does not load is named at its own line.
            (Some(at), Some(crl)) if format!("{e:#}").contains(&crl.display().to_string()) => {
                src.error(at.span(), "control.tls.crl", format!("{e:#}"))
            }
            _ => src.error(span.clone(), "control.tls", format!("{e:#}")),
        }
    })?;
    let identity = crate::certinfo::CertInfo::from_pem_file(&cert)
        .map_err(|e| src.error(span.clone(), "control.tls", format!("{e:#}")))?;
    let mut files = vec![cert.as_path(), key.as_path(), client_ca.as_path()];
    files.extend(crl.as_deref());
    let fingerprint = super::reference::fingerprint(&files);
    Ok(GatewayTls {
        cert,
        key,
        client_ca,
        crl,
        site_binding,
        server,
        identity,
        fingerprint,
    })
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
