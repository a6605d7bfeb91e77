//! `agent.toml`: the site's listeners, its backends and the gateways to dial.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::admin::AdminConfig;
use super::gateway::{parse_rules, relative_to, RawRules, DEFAULT_CONTROL_PORT};
use super::reference::{Change, Setting, AGENT_KEYS};
use super::{check_name, read_file, ConfigError, Source};
use crate::access::AccessRules;
use crate::addr::{BackendAddr, Occupancy, PublicAddr};
use crate::protocol::{datagram, ClientRules, ListenerSpec, DEFAULT_MAX_FRAME};
use crate::transport::ClientTls;

/// Where the agent's admin server listens unless `[admin] listen` says otherwise (the gateway's
/// is 9090, so both fit on one host).
pub const DEFAULT_AGENT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9091);

/// The agent's validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The site this agent serves; agents with the same site share listeners on a gateway.
    pub site: String,
    /// This agent's name in gateway logs and status (the host name unless set).
    pub name: String,
    /// Gateways to keep a control channel to, as `host:port`.
    pub gateways: Vec<String>,
    pub tls: Option<AgentTls>,
    /// Source address for every connection to a gateway (multi-homed hosts); the OS picks
    /// when unset. With a list, the first.
    pub source_ip: Option<std::net::IpAddr>,
    /// `source_ip` as a list: data, pool and outbound connections take these in turn, so one
    /// agent's new connections spread over several (source, gateway) tuples and their
    /// TIME-WAIT sockets (each tuple holds about 28,000 ports for 60 s: ~470 new connections per
    /// second sustained). Empty when `source_ip` is unset.
    pub data_source_ips: Vec<std::net::IpAddr>,
    /// Heartbeat interval on the control channel; the peer is dead after three silent intervals.
    pub heartbeat: Duration,
    pub reconnect: ReconnectConfig,
    /// Timeout for every TCP connect (gateway and backends).
    pub connect_timeout: Duration,
    /// Idle data connections kept open to each gateway (the warm pool): fixed or adaptive.
    pub pool: PoolConfig,
    /// How long a stopping agent lets established connections finish before it exits (they
    /// end with it).
    pub drain_timeout: Duration,
    /// Where the agent keeps its state (the ban list, `bans.json`); `None`: in memory only.
    pub state_dir: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    /// SOCKS5 / HTTP CONNECT endpoint (not yet implemented; parsed and kept).
    /// The outbound proxy (SOCKS5 and HTTP CONNECT) for internal hosts, when configured.
    pub outbound: Option<OutboundConfig>,
    pub max_frame: usize,
    /// The agent's admin server (`[admin]`; 127.0.0.1:9091 unless `enabled = false`).
    pub admin: AdminConfig,
    /// `[limits]`: what one gateway may make this agent hold (see `agent::limits`).
    pub limits: AgentLimits,
    pub notices: Vec<String>,
}

/// `[limits]` of agent.toml: bounds each gateway's offers must stay within, so that a
/// compromised gateway reaches the configured backends at the configured rate and no more.
/// Every bound is per gateway; the defaults are above what one gateway's own defaults let
/// through (16,384 clients) and above the connection rate measured on the project's machine
/// (8,624 conn/s), so they never bite a healthy deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    /// Data connections (dialed or piping, warm-pool ones handed a client included) at once.
    pub max_data_connections: usize,
    /// Backend connections (connecting or piping) at once.
    pub max_backend_connections: usize,
    /// The same, per listener.
    pub max_backend_connections_per_listener: usize,
    /// Offers (ClientArrived, PoolAssign) admitted per second, on average (a token bucket).
    pub offers_per_second: u32,
    /// The bucket's size: offers admitted at once after a quiet spell.
    pub offer_burst: u32,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            max_data_connections: 16384,
            max_backend_connections: 16384,
            max_backend_connections_per_listener: 16384,
            offers_per_second: 20000,
            offer_burst: 20000,
        }
    }
}

/// The agent's TLS files and the connector built from them.
#[derive(Clone)]
pub struct AgentTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `tls.server_name`: the name the gateway's certificate must carry, if not its address.
    pub server_name: Option<String>,
    pub client: ClientTls,
    /// What its certificate (`cert`) says: name, site, serial, expiry.
    pub identity: crate::certinfo::CertInfo,
    /// Of the three files' contents: a reload sees certificates rotated in place.
    pub fingerprint: String,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff between reconnection attempts: `initial`, doubling, capped at `max`,
/// each delay drawn uniformly from its upper half ("equal jitter") so agents never stampede.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// How the agent tells a backend the real client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// How the backend learns the client's address at the socket level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Impersonation {
    /// The backend sees the agent's address (use `proxy_protocol` to pass the client's).
    #[default]
    None,
    /// The agent connects from the client's own address (`IP_TRANSPARENT`, Linux, IPv4).
    Transparent,
}

/// What a listener forwards: TCP connections, or UDP datagrams grouped into flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    /// A flow (client address and port) ends after `idle_timeout` without a datagram either way.
    Udp { idle_timeout: Duration },
}

impl Protocol {
    /// A flow's idle time when `idle_timeout` is not set.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

    pub fn is_tcp(&self) -> bool {
        *self == Protocol::Tcp
    }
}

/// Where a listener's clients go on the agent's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Backend {
    /// A TCP server the agent connects to (from `backend = "host:port"`).
    Tcp(BackendAddr),
    /// The embedding application itself ([`crate::agent::GatewayListener`]): data connections
    /// are handed to its `accept()`.
    Local,
}

/// One listener: a public port on the gateway forwarded to a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    pub public: PublicAddr,
    pub backend: Backend,
    pub proxy_protocol: ProxyProtocol,
    pub impersonation: Impersonation,
    /// Left out of the digest for TCP, so configurations without UDP keep the digest they had
    /// (agents of one site may be upgraded one at a time).
    #[serde(skip_serializing_if = "Protocol::is_tcp")]
    pub protocol: Protocol,
    #[serde(skip)]
    pub clients: AccessRules,
    /// The client rules as written, for the wire.
    pub clients_text: ClientRules,
    /// Rate limits the gateways enforce (outside the digest's serialization: see
    /// [`AgentConfig::digest`]).
    #[serde(skip)]
    pub edge: EdgeLimitsConfig,
    /// `auto_ban`: automatic bans the gateways decide (outside the digest's serialization too).
    #[serde(skip)]
    pub auto_ban: Option<crate::protocol::ListenerAutoBan>,
    /// `hostnames`: the names this listener serves on a public port it may share with other
    /// listeners (normalized: lowercase, no trailing dot; `"*"` is the port's default). Empty:
    /// the port is its own. Left out of the digest when empty, so digests stay as they were.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Several backends (`backend = [...]`), `balance` and `health`; `None` for a single
    /// `backend = "host:port"` (left out of the digest then, so digests stay as they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<super::BackendGroup>,
}

/// A listener's rate limits (`new_connections_per_ip`, `client_rate`, `listener_rate`); `None`:
/// unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EdgeLimitsConfig {
    /// New connections per client address per hour.
    pub new_connections_per_ip_hourly: Option<u64>,
    /// Bytes per second per client connection, each direction.
    pub client_rate: Option<u64>,
    /// Bytes per second for the whole listener, each direction.
    pub listener_rate: Option<u64>,
}

impl EdgeLimitsConfig {
    pub fn is_unlimited(&self) -> bool {
        *self == EdgeLimitsConfig::default()
    }
}

impl ListenerConfig {
    /// What the gateway needs to know (no backend).
    /// A UDP listener carries [`datagram::UDP_MARKER`] as its first client exception, a
    /// listener with host names [`crate::protocol::hostnames::ROUTE_MARKER`] and its names.
    pub fn spec(&self) -> ListenerSpec {
        let mut clients = self.clients_text.clone();
        if !self.protocol.is_tcp() {
            clients.except.insert(0, datagram::UDP_MARKER.to_string());
        }
        crate::protocol::hostnames::mark(&self.hostnames, &mut clients.except);
        ListenerSpec {
            name: self.name.clone(),
            public: self.public,
            clients,
        }
    }

    /// The backend `host:port` for a client on the public port at `offset`: port for port with
    /// a range backend, always the same port with a single-port backend.
    pub fn backend_target(&self, offset: u16) -> Option<String> {
        let Backend::Tcp(backend) = &self.backend else {
            return None;
        };
        let offset = if backend.ports.len() == 1 { 0 } else { offset };
        backend.target(offset)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    site: Spanned<String>,
    name: Option<Spanned<String>>,
    gateways: Spanned<Vec<Spanned<String>>>,
    tls: Option<Spanned<RawTls>>,
    source_ip: Option<Spanned<super::StringOrList>>,
    heartbeat: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    max_frame: Option<Spanned<u64>>,
    pool: Option<Spanned<RawPool>>,
    state_dir: Option<Spanned<String>>,
    reconnect: Option<RawReconnect>,
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    outbound: Option<RawOutbound>,
    admin: Option<super::admin::RawAdmin>,
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_data_connections: Option<Spanned<u64>>,
    max_backend_connections: Option<Spanned<u64>>,
    max_backend_connections_per_listener: Option<Spanned<u64>>,
    offers_per_second: Option<Spanned<u64>>,
    offer_burst: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    initial: Option<Spanned<String>>,
    max: Option<Spanned<String>>,
}

/// A listener's `protocol` and `idle_timeout`, and the settings UDP cannot honour: PROXY v1
/// has no UDP form, and transparent mode is TCP only in this version.
fn parse_protocol(
    src: &Source,
    l: &RawListener,
    ctx: &dyn Fn(&str) -> String,
) -> Result<Protocol, ConfigError> {
    let udp = match &l.protocol {
        None => false,
        Some(p) => src.parse_with(p, &ctx("protocol"), |s| match s {
            "tcp" => Ok(false),
            "udp" => Ok(true),
            o => Err(format!("expected \"tcp\" or \"udp\", found \"{o}\"")),
        })?,
    };
    if !udp {
        if let Some(t) = &l.idle_timeout {
            return Err(src.error(
                t.span(),
                &ctx("idle_timeout"),
                "applies to protocol = \"udp\" only (TCP connections end when they close)",
            ));
        }
        return Ok(Protocol::Tcp);
    }
    if let Some(p) = l.proxy_protocol.as_ref().filter(|p| p.get_ref() == "v1") {
        return Err(src.error(
            p.span(),
            &ctx("proxy_protocol"),
            "PROXY protocol v1 has no UDP form: use \"v2\" (or \"none\") on a UDP listener",
        ));
    }
    if let Some(i) = l
        .impersonation
        .as_ref()
        .filter(|i| i.get_ref() == "transparent")
    {
        return Err(src.error(
            i.span(),
            &ctx("impersonation"),
            "transparent mode is not available for UDP listeners: use proxy_protocol = \"v2\"",
        ));
    }
    let idle_timeout = match &l.idle_timeout {
        Some(t) => src.duration_within(
            t,
            &ctx("idle_timeout"),
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        )?,
        None => Protocol::DEFAULT_IDLE,
    };
    Ok(Protocol::Udp { idle_timeout })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    public: Spanned<String>,
    backend: Spanned<super::StringOrList>,
    balance: Option<Spanned<String>>,
    health: Option<Spanned<super::backends::RawHealth>>,
    proxy_protocol: Option<Spanned<String>>,
    impersonation: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    clients: Option<RawRules>,
    new_connections_per_ip: Option<Spanned<String>>,
    client_rate: Option<Spanned<String>>,
    listener_rate: Option<Spanned<String>>,
    auto_ban: Option<Spanned<RawAutoBan>>,
    hostnames: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoBan {
    connections: Option<Spanned<u64>>,
    short_connections: Option<Spanned<u64>>,
    shorter_than: Option<Spanned<String>>,
    within: Spanned<String>,
    ban: Option<Spanned<String>>,
    max_ban: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbound {
    listen: Spanned<String>,
    clients: Option<RawRules>,
    handshake_timeout: Option<Spanned<String>>,
    max_clients: Option<Spanned<u64>>,
    max_clients_per_ip: Option<Spanned<u64>>,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    password: Spanned<String>,
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

/// How long a stopping agent lets established connections finish, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| check_name(s).is_ok())
        .unwrap_or_else(|| "agent".to_string())
}

/// `host:port`, or `host` with the default control port.
fn parse_gateway(s: &str) -> Result<String, String> {
    let with_port = if s.starts_with('[') && s.ends_with(']') || !s.contains(':') {
        format!("{s}:{DEFAULT_CONTROL_PORT}")
    } else {
        s.to_string()
    };
    let addr: BackendAddr = with_port.parse().map_err(|_| {
        format!("invalid gateway address \"{s}\" (expected host:port, e.g. dmz-gw1.example:44500)")
    })?;
    if addr.ports.len() != 1 {
        return Err(format!("gateway address \"{s}\" must name one port"));
    }
    Ok(addr.target(0).expect("a single port has offset 0"))
}

/// Warnings about the agent's own certificate: bound to another site than `site` (every
/// gateway will refuse it), or expiring within 30 days.
fn identity_notices(
    identity: &crate::certinfo::CertInfo,
    cert: &Path,
    site: &str,
    notices: &mut Vec<String>,
) {
    if identity.serves(site) == Some(false) {
        notices.push(format!(
            "{} is bound to site \"{}\", not to site \"{site}\": gateways will refuse it (WRONG_SITE)",
            cert.display(),
            identity.sites.join("\", \"")
        ));
    }
    let left = identity.seconds_left(std::time::SystemTime::now());
    if crate::certinfo::expiry_warns(left) {
        notices.push(format!(
            "the agent certificate {} {}: renew it (sallyport cert renew --agent NAME) and reload",
            cert.display(),
            crate::certinfo::describe_expiry(left)
        ));
    }
}

impl AgentConfig {
    /// A configuration with defaults and no listener, for programs that build it in code (the
    /// embedded listener); `gateways` are `host:port` or `host`.
    pub fn new(site: &str, gateways: &[&str]) -> Result<Self, String> {
        check_name(site)?;
        if gateways.is_empty() {
            return Err("at least one gateway is required".into());
        }
        Ok(AgentConfig {
            site: site.to_string(),
            name: host_name(),
            gateways: gateways
                .iter()
                .map(|g| parse_gateway(g))
                .collect::<Result<_, _>>()?,
            tls: None,
            source_ip: None,
            data_source_ips: Vec::new(),
            heartbeat: Duration::from_secs(5),
            reconnect: ReconnectConfig::default(),
            connect_timeout: Duration::from_secs(10),
            pool: PoolConfig::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            state_dir: None,
            listeners: Vec::new(),
            outbound: None,
            max_frame: DEFAULT_MAX_FRAME,
            admin: AdminConfig::on(DEFAULT_AGENT_ADMIN),
            limits: AgentLimits::default(),
            notices: Vec::new(),
        })
    }

    /// Reads and validates an agent config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_file(path)?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let src = Source::new(path, text);
        let raw: RawAgent = src.parse_toml()?;
        let mut notices = Vec::new();

        let site = raw.site.get_ref().clone();
        src.parse_with(&raw.site, "site", check_name)?;
        let name = match &raw.name {
            Some(n) => {
                src.parse_with(n, "name", check_name)?;
                n.get_ref().clone()
            }
            None => host_name(),
        };
        let gateways = parse_gateways(&src, &raw.gateways)?;
        let tls = parse_tls(&src, path, raw.tls.as_ref(), &site, &mut notices)?;
        let data_source_ips = parse_source_ips(&src, raw.source_ip.as_ref())?;
        let source_ip = data_source_ips.first().copied();
        let (heartbeat, connect_timeout, drain_timeout) = parse_timers(&src, &raw)?;
        let max_frame = parse_max_frame(&src, raw.max_frame.as_ref())?;
        let pool = parse_pool(&src, raw.pool.as_ref())?;
        let state_dir = match &raw.state_dir {
            Some(d) if d.get_ref().trim().is_empty() => {
                return Err(src.error(d.span(), "state_dir", "must not be empty"))
            }
            Some(d) => Some(relative_to(path, d.get_ref())),
            None => None,
        };
        let reconnect = parse_reconnect(&src, raw.reconnect.as_ref())?;
        let listeners = parse_listeners(&src, &raw.listener, &mut notices)?;
        let outbound = match &raw.outbound {
            Some(o) => Some(parse_outbound(&src, o, &mut notices)?),
            None => None,
        };
        let admin = super::admin::parse_admin(
            &src,
            raw.admin.as_ref(),
            DEFAULT_AGENT_ADMIN,
            "reload the agent and read its internal addresses",
            &mut notices,
        )?;
        let limits = parse_limits(&src, raw.limits.as_ref())?;

        Ok(AgentConfig {
            site,
            name,
            gateways,
            tls,
            source_ip,
            data_source_ips,
            heartbeat,
            reconnect,
            connect_timeout,
            pool,
            drain_timeout,
            state_dir,
            listeners,
            outbound,
            max_frame,
            admin,
            limits,
            notices,
        })
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerConfig> {
        self.listeners.iter().find(|l| l.name == name)
    }

    pub fn listener_specs(&self) -> Vec<ListenerSpec> {
        self.listeners.iter().map(ListenerConfig::spec).collect()
    }

    /// The rate limits of the listeners that have any, for the gateways; `None` when no
    /// listener has one (then nothing is sent, as before limits existed).
    pub fn edge_limits(&self) -> Option<crate::protocol::EdgeLimits> {
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .filter(|l| !l.edge.is_unlimited())
            .map(|l| crate::protocol::ListenerLimits {
                name: l.name.clone(),
                new_connections_per_ip_hourly: l.edge.new_connections_per_ip_hourly,
                client_rate: l.edge.client_rate,
                listener_rate: l.edge.listener_rate,
            })
            .collect();
        (!listeners.is_empty()).then_some(crate::protocol::EdgeLimits { listeners })
    }

    /// The automatic-ban settings of the listeners that have them, for the gateways.
    pub fn auto_bans(&self) -> Option<crate::protocol::AutoBans> {
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .filter_map(|l| l.auto_ban.clone())
            .collect();
        (!listeners.is_empty()).then_some(crate::protocol::AutoBans { listeners })
    }

    /// Hex SHA-256 over the site and every listener (public side, backend, options, and the
    /// rate limits and automatic bans when any listener has some). Two agents of one site must produce the same
    /// digest. Limits are left out when there are none, so a configuration without limits
    /// keeps the digest it had before they existed (agents of two versions can share a site).
    pub fn digest(&self) -> String {
        type Extra<'a> = (
            &'a str,
            EdgeLimitsConfig,
            Option<&'a crate::protocol::ListenerAutoBan>,
        );
        let limits: Vec<Extra> = self
            .listeners
            .iter()
            .filter(|l| !l.edge.is_unlimited() || l.auto_ban.is_some())
            .map(|l| (l.name.as_str(), l.edge, l.auto_ban.as_ref()))
            .collect();
        let bytes = if limits.is_empty() {
            postcard::to_stdvec(&(&self.site, &self.listeners))
        } else {
            postcard::to_stdvec(&(&self.site, &self.listeners, &limits))
        }
        .expect("serializing plain data cannot fail");
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A listener's `hostnames`: each `"*"`, `"*.suffix"` or a DNS name (letters, digits, `-`,
/// dots between non-empty labels), normalized; no repeats; TCP and a single port only.
fn parse_hostnames(
    src: &Source,
    l: &RawListener,
    public: &PublicAddr,
    protocol: &Protocol,
    ctx: &dyn Fn(&str) -> String,
) -> Result<Vec<String>, ConfigError> {
    let Some(list) = &l.hostnames else {
        return Ok(Vec::new());
    };
    let refuse = |why: &str| Err(src.error(list.span(), &ctx("hostnames"), why));
    if list.get_ref().is_empty() {
        return refuse("is empty: list the names this listener serves, or leave the key out");
    }
    if !protocol.is_tcp() {
        return refuse(
            "host names route TCP clients (TLS SNI, HTTP Host): not for protocol = \"udp\"",
        );
    }
    if public.ports.len() != 1 {
        return refuse("a listener with host names has one public port, not a range");
    }
    let mut names: Vec<String> = Vec::new();
    for name in list.get_ref() {
        let normal = src.parse_with(name, &ctx("hostnames"), check_hostname)?;
        if names.contains(&normal) {
            return Err(src.error(
                name.span(),
                &ctx("hostnames"),
                format!("\"{normal}\" is listed twice"),
            ));
        }
        names.push(normal);
    }
    Ok(names)
}

/// One entry of `hostnames`, normalized (lowercase, no trailing dot).
pub fn check_hostname(name: &str) -> Result<String, String> {
    let normal = crate::peek::normalize(name.trim());
    if normal == "*" {
        return Ok(normal);
    }
    let bare = normal.strip_prefix("*.").unwrap_or(&normal);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if bare.len() > 253 || !bare.split('.').all(label_ok) {
        return Err(format!(
            "\"{name}\" is not a host name: expected e.g. \"files.example.com\", \"*.example.org\" (any name under it) or \"*\" (the port's default)"
        ));
    }
    Ok(normal)
}

/// Public ports the listeners of one file share by host name, and which listener holds each
/// name there.
#[derive(Default)]
struct SharedPorts(HashMap<PublicAddr, (String, HashMap<String, String>)>);

impl SharedPorts {
    /// Whether `public` is a port already shared by host name that this listener joins (its
    /// names then recorded); `false` for a port not yet seen (the caller claims it). A name
    /// already held there, or a listener without names on a shared port, is an error.
    fn share(
        &mut self,
        src: &Source,
        l: &RawListener,
        lname: &str,
        public: &PublicAddr,
        names: &[String],
    ) -> Result<bool, ConfigError> {
        let here = |field: &str| format!("listener \"{lname}\": {field}");
        let Some((first, held)) = self.0.get_mut(public) else {
            if !names.is_empty() {
                let held = names
                    .iter()
                    .map(|n| (n.clone(), lname.to_string()))
                    .collect();
                self.0.insert(*public, (lname.to_string(), held));
            }
            return Ok(false);
        };
        if names.is_empty() {
            return Err(src.error(
                l.public.span(),
                &here("public"),
                format!("{public} is shared by host name (listener \"{first}\"): set hostnames here too"),
            ));
        }
        for name in names {
            if let Some(other) = held.get(name) {
                let span = l
                    .hostnames
                    .as_ref()
                    .map(|h| h.span())
                    .unwrap_or(l.public.span());
                return Err(src.error(
                    span,
                    &here("hostnames"),
                    format!("\"{name}\" on {public} is already listener \"{other}\"'s"),
                ));
            }
            held.insert(name.clone(), lname.to_string());
        }
        Ok(true)
    }
}

/// `gateways`: at least one, each a host with an optional port, none listed twice.
fn parse_gateways(
    src: &Source,
    raw: &Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<String>, ConfigError> {
    if raw.get_ref().is_empty() {
        return Err(src.error(raw.span(), "gateways", "at least one gateway is required"));
    }
    let mut gateways = Vec::new();
    for g in raw.get_ref() {
        let addr = src.parse_with(g, "gateways", parse_gateway)?;
        if gateways.contains(&addr) {
            return Err(src.error(g.span(), "gateways", format!("\"{addr}\" is listed twice")));
        }
        gateways.push(addr);
    }
    Ok(gateways)
}

/// `tls`: the agent's CA, certificate and key, loaded and checked now (with notices about what
/// the certificate says), or `None` and a PLAINTEXT notice.
fn parse_tls(
    src: &Source,
    path: &Path,
    raw: Option<&Spanned<RawTls>>,
    site: &str,
    notices: &mut Vec<String>,
) -> Result<Option<AgentTls>, ConfigError> {
    let tls = match raw {
        Some(t) => {
            let (span, t) = (t.span(), t.get_ref());
            let (ca, cert, key) = (
                relative_to(path, t.ca.get_ref()),
                relative_to(path, t.cert.get_ref()),
                relative_to(path, t.key.get_ref()),
            );
            let name = t.server_name.as_ref().map(|n| n.get_ref().as_str());
            let client = ClientTls::load(&ca, &cert, &key, name)
                .map_err(|e| src.error(span.clone(), "tls", format!("{e:#}")))?;
            let identity = crate::certinfo::CertInfo::from_pem_file(&cert)
                .map_err(|e| src.error(span.clone(), "tls", format!("{e:#}")))?;
            identity_notices(&identity, &cert, site, notices);
            let fingerprint = super::reference::fingerprint(&[&ca, &cert, &key]);
            Some(AgentTls {
                ca,
                cert,
                key,
                server_name: name.map(str::to_string),
                client,
                identity,
                fingerprint,
            })
        }
        None => {
            notices.push(
                "no tls configured: the control channel runs in PLAINTEXT and the gateway is not authenticated"
                    .to_string(),
            );
            None
        }
    };
    Ok(tls)
}

/// `max_frame`: 4096 to 64 MiB.
fn parse_max_frame(src: &Source, raw: Option<&Spanned<u64>>) -> Result<usize, ConfigError> {
    Ok(match raw {
        Some(v) => {
            let n = *v.get_ref();
            if !(crate::protocol::frame::MIN_MAX_FRAME as u64..=64 * 1024 * 1024).contains(&n) {
                return Err(src.error(
                    v.span(),
                    "max_frame",
                    format!("{n} is outside the allowed 4096 to 67108864 bytes"),
                ));
            }
            n as usize
        }
        None => DEFAULT_MAX_FRAME,
    })
}

/// `source_ip`: one address or a list of distinct addresses of one family.
fn parse_source_ips(
    src: &Source,
    raw: Option<&Spanned<super::StringOrList>>,
) -> Result<Vec<std::net::IpAddr>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let err = |msg: String| src.error(raw.span(), "source_ip", msg);
    let texts = &raw.get_ref().0;
    if texts.is_empty() {
        let why = "an empty list (leave source_ip out to let the OS pick)";
        return Err(err(why.into()));
    }
    let mut ips: Vec<std::net::IpAddr> = Vec::new();
    for s in texts {
        let ip: std::net::IpAddr = s
            .parse()
            .map_err(|_| err(format!("invalid IP address \"{s}\"")))?;
        if ips.contains(&ip) {
            return Err(err(format!("{ip} is listed twice")));
        }
        if ips
            .first()
            .is_some_and(|first| first.is_ipv4() != ip.is_ipv4())
        {
            return Err(err(format!(
                "{ip} is not of the same family as {} (a gateway is reached over one)",
                ips[0]
            )));
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// `[reconnect]`: the backoff's first and longest wait.
fn parse_reconnect(
    src: &Source,
    raw: Option<&RawReconnect>,
) -> Result<ReconnectConfig, ConfigError> {
    let mut reconnect = ReconnectConfig::default();
    if let Some(r) = raw {
        if let Some(v) = &r.initial {
            reconnect.initial = src.duration_within(
                v,
                "reconnect.initial",
                Duration::from_millis(10),
                Duration::from_secs(600),
            )?;
        }
        if let Some(v) = &r.max {
            reconnect.max = src.duration_within(
                v,
                "reconnect.max",
                Duration::from_millis(10),
                Duration::from_secs(3600),
            )?;
            if reconnect.max < reconnect.initial {
                return Err(src.error(
                    v.span(),
                    "reconnect.max",
                    "must not be shorter than reconnect.initial",
                ));
            }
        }
    }
    Ok(reconnect)
}

/// `[outbound]`: where the agent's proxy listens, who may use it, its users and limits.
fn parse_outbound(
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

/// `[[listener]]`: every listener, each name its own and each public port its own (unless
/// listeners share it by host name); a notice when there is none.
fn parse_listeners(
    src: &Source,
    raw: &[Spanned<RawListener>],
    notices: &mut Vec<String>,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    // Names and addresses taken so far: each listener is checked in O(log n), not against
    // every other one (16,000 listeners took 462 ms when compared pairwise).
    let mut names: HashSet<String> = HashSet::new();
    // TCP and UDP ports are separate: a listener of each may share a port.
    let (mut held, mut held_udp) = (Occupancy::default(), Occupancy::default());
    let mut shared_ports = SharedPorts::default();
    for raw_l in raw {
        let l = raw_l.get_ref();
        let lname = l.name.get_ref().clone();
        src.parse_with(&l.name, "listener: name", check_name)?;
        let ctx = |field: &str| format!("listener \"{lname}\": {field}");
        if !names.insert(lname.clone()) {
            return Err(src.error(
                l.name.span(),
                &ctx("name"),
                "another listener has this name",
            ));
        }
        let ends = parse_listener_ends(src, l, &ctx)?;
        let taken = if ends.protocol.is_tcp() {
            &mut held
        } else {
            &mut held_udp
        };
        let shares = shared_ports.share(src, l, &lname, &ends.public, &ends.hostnames)?;
        if !shares && !taken.claim(&ends.public) {
            let (public, protocol) = (&ends.public, &ends.protocol);
            let other = listeners
                .iter()
                .find(|o| o.protocol.is_tcp() == protocol.is_tcp() && o.public.conflicts(public))
                .expect("the index found a conflict with a listener of the file");
            return Err(src.error(
                l.public.span(),
                &ctx("public"),
                format!(
                    "{public} overlaps listener \"{}\" ({})",
                    other.name, other.public
                ),
            ));
        }
        listeners.push(parse_listener_rest(src, l, lname.clone(), ends, &ctx)?);
    }
    if listeners.is_empty() {
        notices.push("no [[listener]] defined: the gateway will open no public port".into());
    }
    Ok(listeners)
}

/// What a listener joins: its public and backend addresses, its protocol, its host names.
struct ListenerEnds {
    public: PublicAddr,
    backend: BackendAddr,
    group: Option<super::BackendGroup>,
    protocol: Protocol,
    hostnames: Vec<String>,
}

/// A listener's `public`, `backend` (one port, or a range as long as the public one),
/// `protocol` and `hostnames`.
fn parse_listener_ends(
    src: &Source,
    l: &RawListener,
    ctx: &dyn Fn(&str) -> String,
) -> Result<ListenerEnds, ConfigError> {
    let public: PublicAddr = src.parse_with(&l.public, &ctx("public"), |s| s.parse())?;
    let protocol = parse_protocol(src, l, ctx)?;
    let raw = super::backends::RawGroup {
        backend: &l.backend,
        balance: l.balance.as_ref(),
        health: l.health.as_ref(),
        udp: !protocol.is_tcp(),
    };
    let (backend, group) = super::backends::parse(src, raw, &public, ctx)?;
    let hostnames = parse_hostnames(src, l, &public, &protocol, ctx)?;
    Ok(ListenerEnds {
        public,
        backend,
        group,
        protocol,
        hostnames,
    })
}

/// The rest of a listener: `proxy_protocol`, `impersonation`, `clients`, its rate limits and
/// `auto_ban`.
fn parse_listener_rest(
    src: &Source,
    l: &RawListener,
    name: String,
    ends: ListenerEnds,
    ctx: &dyn Fn(&str) -> String,
) -> Result<ListenerConfig, ConfigError> {
    let proxy_protocol = match &l.proxy_protocol {
        None => ProxyProtocol::None,
        Some(p) => src.parse_with(p, &ctx("proxy_protocol"), |s| match s {
            "none" => Ok(ProxyProtocol::None),
            "v1" => Ok(ProxyProtocol::V1),
            "v2" => Ok(ProxyProtocol::V2),
            o => Err(format!(
                "expected \"none\", \"v1\" or \"v2\", found \"{o}\""
            )),
        })?,
    };
    let impersonation = match &l.impersonation {
        None => Impersonation::None,
        Some(p) => src.parse_with(p, &ctx("impersonation"), |s| match s {
            "none" => Ok(Impersonation::None),
            "transparent" if cfg!(target_os = "linux") => Ok(Impersonation::Transparent),
            "transparent" => Err("transparent mode needs Linux".to_string()),
            o => Err(format!(
                "expected \"none\" or \"transparent\", found \"{o}\""
            )),
        })?,
    };
    let (clients, except) = match &l.clients {
        Some(r) => parse_rules(src, r, &ctx("clients."))?,
        None => (AccessRules::allow_all(), Vec::new()),
    };
    let clients_text = ClientRules {
        default: clients.default,
        except,
    };
    let edge = parse_edge_limits(src, l, ctx)?;
    let auto_ban = l
        .auto_ban
        .as_ref()
        .map(|a| parse_auto_ban(src, &name, a, ctx))
        .transpose()?;
    Ok(ListenerConfig {
        name,
        public: ends.public,
        backend: Backend::Tcp(ends.backend),
        proxy_protocol,
        impersonation,
        protocol: ends.protocol,
        clients,
        clients_text,
        edge,
        auto_ban,
        hostnames: ends.hostnames,
        group: ends.group,
    })
}

/// `heartbeat`, `connect_timeout` and `drain_timeout`, each within its bounds or its default.
fn parse_timers(
    src: &Source,
    raw: &RawAgent,
) -> Result<(Duration, Duration, Duration), ConfigError> {
    let (ms, secs) = (Duration::from_millis, Duration::from_secs);
    let heartbeat = duration_or(
        src,
        &raw.heartbeat,
        "heartbeat",
        (ms(100), secs(60)),
        secs(5),
    )?;
    let connect_timeout = duration_or(
        src,
        &raw.connect_timeout,
        "connect_timeout",
        (ms(100), secs(300)),
        secs(10),
    )?;
    let drain_timeout = duration_or(
        src,
        &raw.drain_timeout,
        "drain_timeout",
        (Duration::ZERO, secs(3600)),
        DEFAULT_DRAIN_TIMEOUT,
    )?;
    Ok((heartbeat, connect_timeout, drain_timeout))
}

/// A duration key within `(min, max)`, or `default` when it is absent.
fn duration_or(
    src: &Source,
    raw: &Option<Spanned<String>>,
    key: &str,
    (min, max): (Duration, Duration),
    default: Duration,
) -> Result<Duration, ConfigError> {
    match raw {
        Some(v) => src.duration_within(v, key, min, max),
        None => Ok(default),
    }
}

/// A listener's `new_connections_per_ip`, `client_rate` and `listener_rate`.
fn parse_edge_limits(
    src: &Source,
    l: &RawListener,
    ctx: &dyn Fn(&str) -> String,
) -> Result<EdgeLimitsConfig, ConfigError> {
    use crate::ratelimit::{parse_byte_rate, parse_conn_rate};
    let conn = |v: &Spanned<String>, key: &str| src.parse_with(v, &ctx(key), parse_conn_rate);
    let bytes = |v: &Spanned<String>, key: &str| src.parse_with(v, &ctx(key), parse_byte_rate);
    Ok(EdgeLimitsConfig {
        new_connections_per_ip_hourly: l
            .new_connections_per_ip
            .as_ref()
            .map(|v| conn(v, "new_connections_per_ip"))
            .transpose()?,
        client_rate: l
            .client_rate
            .as_ref()
            .map(|v| bytes(v, "client_rate"))
            .transpose()?,
        listener_rate: l
            .listener_rate
            .as_ref()
            .map(|v| bytes(v, "listener_rate"))
            .transpose()?,
    })
}

/// A listener's `auto_ban = { connections, short_connections, shorter_than, within, ban,
/// max_ban }`: `within` and one trigger at least; shorter_than 1s, ban 10m, max_ban 24h unless
/// set.
fn parse_auto_ban(
    src: &Source,
    name: &str,
    raw: &Spanned<RawAutoBan>,
    ctx: &dyn Fn(&str) -> String,
) -> Result<crate::protocol::ListenerAutoBan, ConfigError> {
    let a = raw.get_ref();
    let (ms, day) = (Duration::from_millis(1), Duration::from_secs(86_400));
    let dur = |v: &Option<Spanned<String>>, key: &str, default: Duration| match v {
        Some(v) => src.duration_within(v, &ctx(&format!("auto_ban.{key}")), ms, 3650 * day),
        None => Ok(default),
    };
    let count = |v: &Option<Spanned<u64>>, key: &str| {
        v.as_ref()
            .map(|c| match *c.get_ref() {
                n @ 1..=1_000_000 => Ok(n as u32),
                n => Err(src.error(
                    c.span(),
                    &ctx(&format!("auto_ban.{key}")),
                    format!("{n} is out of range (1 to 1000000)"),
                )),
            })
            .transpose()
    };
    let within = src.duration_within(&a.within, &ctx("auto_ban.within"), ms, 3650 * day)?;
    let ban = dur(&a.ban, "ban", Duration::from_secs(600))?;
    let max_ban = dur(&a.max_ban, "max_ban", day)?.max(ban);
    let spec = crate::protocol::ListenerAutoBan {
        name: name.to_string(),
        connections: count(&a.connections, "connections")?,
        short_connections: count(&a.short_connections, "short_connections")?,
        shorter_than_ms: dur(&a.shorter_than, "shorter_than", Duration::from_secs(1))?.as_millis()
            as u64,
        within_ms: within.as_millis() as u64,
        ban_ms: ban.as_millis() as u64,
        max_ban_ms: max_ban.as_millis() as u64,
    };
    if spec.connections.is_none() && spec.short_connections.is_none() {
        return Err(src.error(
            raw.span(),
            &ctx("auto_ban"),
            "set connections or short_connections (or both)",
        ));
    }
    Ok(spec)
}

/// `[limits]`: every count from 1 to 1,000,000; unset keys keep their defaults.
fn parse_limits(src: &Source, raw: Option<&RawLimits>) -> Result<AgentLimits, ConfigError> {
    let mut limits = AgentLimits::default();
    let Some(raw) = raw else {
        return Ok(limits);
    };
    let count = |v: &Option<Spanned<u64>>, name: &str| -> Result<Option<u64>, ConfigError> {
        match v {
            Some(v) if (1..=1_000_000).contains(v.get_ref()) => Ok(Some(*v.get_ref())),
            Some(v) => Err(src.error(
                v.span(),
                &format!("limits.{name}"),
                format!("{} is outside the allowed 1 to 1000000", v.get_ref()),
            )),
            None => Ok(None),
        }
    };
    let l = &mut limits;
    if let Some(n) = count(&raw.max_data_connections, "max_data_connections")? {
        l.max_data_connections = n as usize;
    }
    if let Some(n) = count(&raw.max_backend_connections, "max_backend_connections")? {
        l.max_backend_connections = n as usize;
    }
    let per_listener = "max_backend_connections_per_listener";
    if let Some(n) = count(&raw.max_backend_connections_per_listener, per_listener)? {
        l.max_backend_connections_per_listener = n as usize;
    }
    if let Some(n) = count(&raw.offers_per_second, "offers_per_second")? {
        l.offers_per_second = n as u32;
    }
    if let Some(n) = count(&raw.offer_burst, "offer_burst")? {
        l.offer_burst = n as u32;
    }
    Ok(limits)
}

impl AgentConfig {
    /// Every key's effective value but the listeners' (compared as a whole: see
    /// [`AgentConfig::listener_changes`]), in the order of [`AGENT_KEYS`].
    pub fn settings(&self) -> Vec<Setting> {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let tls = |f: fn(&AgentTls) -> &PathBuf| match &self.tls {
            Some(t) => format!("{} (sha256 {})", f(t).display(), t.fingerprint),
            None => String::new(),
        };
        let out = self.outbound.as_ref();
        let users = |f: fn(&(String, String)) -> &str| -> String {
            out.map(|o| o.users.iter().map(f).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        };
        vec![
            Setting::new("site", &self.site),
            Setting::new("name", &self.name),
            Setting::new("gateways", self.gateways.join(", ")),
            Setting::new("tls.ca", tls(|t| &t.ca)),
            Setting::new("tls.cert", tls(|t| &t.cert)),
            Setting::new("tls.key", tls(|t| &t.key)),
            Setting::new(
                "tls.server_name",
                self.tls
                    .as_ref()
                    .and_then(|t| t.server_name.clone())
                    .unwrap_or_default(),
            ),
            Setting::new(
                "source_ip",
                self.data_source_ips
                    .iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            Setting::new("heartbeat", d(self.heartbeat)),
            Setting::new("connect_timeout", d(self.connect_timeout)),
            Setting::new("drain_timeout", d(self.drain_timeout)),
            Setting::new("max_frame", self.max_frame),
            Setting::new("pool", self.pool),
            Setting::new(
                "state_dir",
                self.state_dir
                    .as_ref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            ),
            Setting::new("reconnect.initial", d(self.reconnect.initial)),
            Setting::new("reconnect.max", d(self.reconnect.max)),
            Setting::new(
                "outbound.listen",
                out.map(|o| o.listen.to_string()).unwrap_or_default(),
            ),
            Setting::new(
                "outbound.clients.default",
                out.map(|o| o.clients.default.to_string())
                    .unwrap_or_default(),
            ),
            Setting::new(
                "outbound.clients.except",
                out.map(|o| o.clients.except_text()).unwrap_or_default(),
            ),
            Setting::new(
                "outbound.handshake_timeout",
                out.map(|o| d(o.handshake_timeout)).unwrap_or_default(),
            ),
            Setting::new(
                "outbound.max_clients",
                out.map(|o| o.max_clients.to_string()).unwrap_or_default(),
            ),
            Setting::new(
                "outbound.max_clients_per_ip",
                out.map(|o| o.max_clients_per_ip.to_string())
                    .unwrap_or_default(),
            ),
            Setting::new("admin.enabled", self.admin.listen.is_some()),
            Setting::new(
                "admin.listen",
                self.admin.listen.map(|a| a.to_string()).unwrap_or_default(),
            ),
            Setting::secret("admin.token", self.admin.token.as_deref()),
            Setting::new("outbound.users.name", users(|u| &u.0)),
            Setting::secret("outbound.users.password", Some(&users(|u| &u.1))),
            Setting::new(
                "limits.max_data_connections",
                self.limits.max_data_connections,
            ),
            Setting::new(
                "limits.max_backend_connections",
                self.limits.max_backend_connections,
            ),
            Setting::new(
                "limits.max_backend_connections_per_listener",
                self.limits.max_backend_connections_per_listener,
            ),
            Setting::new("limits.offers_per_second", self.limits.offers_per_second),
            Setting::new("limits.offer_burst", self.limits.offer_burst),
        ]
    }

    /// What a reload of `new` changes, key by key (the listeners: see `listener_changes`).
    pub fn changes(&self, new: &AgentConfig) -> Vec<Change> {
        super::reference::diff(AGENT_KEYS, &self.settings(), &new.settings())
    }

    /// The listeners a reload adds, removes and changes, by name.
    pub fn listener_changes(&self, new: &AgentConfig) -> ListenerChanges {
        let old: HashMap<&str, &ListenerConfig> = self
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        let mut changes = ListenerChanges::default();
        for l in &new.listeners {
            match old.get(l.name.as_str()) {
                None => changes.added.push(l.name.clone()),
                Some(o) if *o != l => changes.changed.push(l.name.clone()),
                Some(_) => {}
            }
        }
        let new_names: HashSet<&str> = new.listeners.iter().map(|l| l.name.as_str()).collect();
        changes.removed = self
            .listeners
            .iter()
            .filter(|l| !new_names.contains(l.name.as_str()))
            .map(|l| l.name.clone())
            .collect();
        changes
    }

    /// Whether a change from `self` to `new` needs new control channels (the hello or the
    /// channel's TLS, source address or frame size differ).
    pub fn needs_reconnect(&self, new: &AgentConfig) -> bool {
        self.changes(new)
            .iter()
            .any(|c| c.reload == super::reference::Reload::Reconnect)
    }
}

/// Listener names a reload adds, removes and changes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ListenerChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl ListenerChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl std::fmt::Display for ListenerChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // At most a few names each: a reload of thousands of listeners is one line.
        let names = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
            match v.len() {
                n if n > 5 => format!("{} and {} more", shown.join(", "), n - 5),
                _ => shown.join(", "),
            }
        };
        let mut parts = Vec::new();
        for (what, v) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !v.is_empty() {
                parts.push(format!("{} {what} ({})", v.len(), names(v)));
            }
        }
        write!(f, "listeners: {}", parts.join(", "))
    }
}

/// The keys agent.toml's parser accepts (for the reference's tests).
#[cfg(test)]
pub(super) fn traced_keys() -> Vec<String> {
    super::reference::trace::keys::<RawAgent>()
}

mod pool;
pub use pool::PoolConfig;
use pool::{parse_pool, RawPool};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod piece_tests;
