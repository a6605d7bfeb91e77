//! `agent.toml`: the site's listeners, its backends and the gateways to dial.
//!
//! This file holds the typed config and [`AgentConfig::parse`], which reads the raw file and
//! calls one parser per section in the file's documented order: [`sections`] (gateways, `[tls]`,
//! `[reconnect]`, `[limits]`, identity), [`listeners`] (`[[listener]]`), [`outbound`]
//! (`[outbound]`), [`pool`] (`pool`). [`settings`] says what the parsed file means key by key
//! (`agent --check`) and what a reload changes. Each piece is unit tested on its own
//! (`piece_tests.rs`), the whole file in `tests.rs`.

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

mod listeners;
mod outbound;
mod pool;
mod sections;
mod settings;

use listeners::{parse_listeners, parse_timers, RawListener};
use outbound::{parse_outbound, RawOutbound};
pub use outbound::{
    OutboundConfig, OUTBOUND_HANDSHAKE_TIMEOUT, OUTBOUND_MAX_CLIENTS, OUTBOUND_MAX_CLIENTS_PER_IP,
};
pub use pool::PoolConfig;
use pool::{parse_pool, RawPool};
use sections::{
    host_name, parse_gateway, parse_gateways, parse_limits, parse_max_frame, parse_reconnect,
    parse_source_ips, parse_tls, RawLimits, RawReconnect, RawTls,
};
#[cfg(test)]
pub(super) use settings::traced_keys;
pub use settings::ListenerChanges;

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
    pub const DEFAULT_IDLE: Duration = datagram::DEFAULT_IDLE;

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
    /// A UDP listener carries [`datagram::UDP_MARKER`] and its idle timeout
    /// ([`datagram::idle_entry`]) as its first two client exceptions, a
    /// listener with host names [`crate::protocol::hostnames::ROUTE_MARKER`] and its names.
    pub fn spec(&self) -> ListenerSpec {
        let mut clients = self.clients_text.clone();
        if let Protocol::Udp { idle_timeout } = self.protocol {
            clients.except.insert(0, datagram::idle_entry(idle_timeout));
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

/// How long a stopping agent lets established connections finish, by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

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

#[cfg(test)]
mod tests;

#[cfg(test)]
mod piece_tests;
