//! The messages of the control protocol (v1 and v2) and their mapping to frame types.
//!
//! Payloads are serialized with postcard (a stable, documented, compact serde format). Type
//! numbers below `0x8000` are *critical*: a peer that does not know one must fail the connection
//! with [`ErrorCode::UNKNOWN_MESSAGE`]. Types from `0x8000` up are *advisory*: a peer that does
//! not know one skips it. That lets a later version add hints (statistics, load reports) without
//! breaking older peers, while anything that changes behaviour forces a version bump.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::token::Token;
use super::{ProtocolError, RawFrame};
use crate::access::Policy;
use crate::addr::PublicAddr;

mod codec;

/// Frame type numbers. Stable forever once released.
pub mod kind {
    pub const HELLO: u16 = 0x0001;
    pub const HELLO_ACK: u16 = 0x0002;
    pub const ERROR: u16 = 0x0003;
    /// v2 ([`crate::protocol::Feature::SessionBinding`]).
    pub const SESSION_SECRET: u16 = 0x0004;
    pub const PUSH_CONFIG: u16 = 0x0010;
    pub const CONFIG_RESULT: u16 = 0x0011;
    pub const CLIENT_ARRIVED: u16 = 0x0020;
    pub const CLIENT_FAILED: u16 = 0x0021;
    pub const POOL_ASSIGN: u16 = 0x0022;
    /// v2 ([`crate::protocol::Feature::PoolAccepted`]).
    pub const POOL_ACCEPTED: u16 = 0x0023;
    pub const HEARTBEAT: u16 = 0x0030;
    /// Types at or above this are advisory (ignored when unknown).
    pub const FIRST_ADVISORY: u16 = 0x8000;
    /// Advisory: a gateway that ignores a ban list behaves as before (it refuses no one more),
    /// so no version is needed; [`BAN_RESULT`] tells the agent the list was applied.
    pub const BAN_LIST: u16 = 0x8010;
    pub const BAN_RESULT: u16 = 0x8011;
    /// Advisory: a gateway that ignores it enforces no rate limits (as before they existed).
    pub const EDGE_LIMITS: u16 = 0x8012;
    /// Advisory: a gateway that ignores it bans no one by itself (as before).
    pub const AUTO_BANS: u16 = 0x8013;
}

/// Every connection's first frame. Its layout is frozen for all protocol versions: the version
/// range comes first so that even a peer that cannot decode the role can say which versions it
/// would have understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// Free text for logs, e.g. `sallyport/0.1.0`.
    pub software: String,
    pub role: Role,
}

/// The leading fields of [`Hello`], decodable even when the rest is not.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct HelloVersions {
    pub min_version: u16,
    pub max_version: u16,
}

/// What the connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The long-lived control channel of one agent.
    Control(ControlHello),
    /// A data connection claiming one pending client.
    Data(DataHello),
    /// An outbound connection: an internal host asks the gateway to dial `host`:`port` for it. v1: no
    /// proof of its control session, so a gateway with TLS takes it only over TLS, from the
    /// certificate of a control session of its site (docs/protocol.md 7.12).
    Outbound(OutboundHello),
    /// A warm-pool data connection: it waits, idle, until the gateway hands it a client with
    /// [`PoolAssign`] (no notification round trip). v1: bound like [`Role::Outbound`], to the
    /// certificate of its agent's control session; refused in plaintext on a gateway with TLS.
    Pool(PoolHello),
    /// v2: a warm-pool connection proven by the [`SessionSecret`] of its agent's control
    /// session on this gateway. Over TLS its certificate must be that session's too.
    SessionPool(PoolHello, Token),
    /// v2: an outbound connection proven by the [`SessionSecret`] of a control session of its
    /// site on this gateway. Over TLS its certificate must be that session's too.
    SessionOutbound(OutboundHello, Token),
}

/// v2: sent by the gateway on a control channel right after its HelloAck: the secret that binds
/// this session's pool and outbound connections to it. 128 random bits, valid while the session
/// lives; never logged (`Token`'s `Debug` hides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSecret {
    pub secret: Token,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolHello {
    /// The site whose clients this connection may carry.
    pub site: String,
    /// The agent opening it: it must have a live control channel on this gateway, proven by
    /// the session secret (v2, [`Role::SessionPool`]) or, over TLS, by the same certificate
    /// (docs/protocol.md 7.12); its pooled connections are dropped when that channel ends.
    pub agent: String,
}

/// The gateway hands a waiting pool connection a client; raw bytes follow, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAssign {
    /// The gateway's id for the client (for logs).
    pub id: u64,
    pub listener: String,
    pub port_offset: u16,
    pub client_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
}

/// v2: the agent took the client a [`PoolAssign`] handed it; raw bytes follow, both ways. Sent
/// before the agent dials the backend, so its absence means the agent never saw the client and
/// the gateway may offer the client elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAccepted {
    /// The id from the [`PoolAssign`] it answers.
    pub id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlHello {
    /// The site this agent serves; agents of one site share its listeners.
    pub site: String,
    /// The agent's own name (host name by default), for logs and status.
    pub agent: String,
    /// Heartbeat interval the agent wants, in milliseconds. Both sides send one at least this
    /// often and declare the peer dead after three intervals of silence.
    pub heartbeat_ms: u32,
}

/// The client id no client ever has (the gateway numbers clients from 1). A data hello for it
/// is a reachability probe (`sallyport check`): it passes TLS, the peer rules and the version
/// check like any data hello, then gets `UNKNOWN_CLIENT`, and the gateway counts it as a check
/// probe rather than as a wrong token.
pub const PROBE_ID: u64 = 0;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataHello {
    /// The pending client's id from [`ClientArrived`]. Not secret.
    pub id: u64,
    /// The pending client's single-use secret.
    pub token: Token,
}

/// An outbound request, made by an agent's SOCKS5 / HTTP CONNECT proxy for an internal host.
/// The gateway dials `host:port` only if its own `[egress] allow` list permits it, then answers
/// with [`HelloAck`] (raw bytes follow, both ways) or an `Error` (EGRESS_DENIED,
/// DEST_UNREACHABLE) and closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundHello {
    /// The site of the agent asking; the connection must belong to a live control session of
    /// that site on this gateway (its secret, or over TLS its certificate; see [`Role`]).
    pub site: String,
    /// A host name or an IP address literal (without brackets).
    pub host: String,
    pub port: u16,
    /// The internal host that asked the agent's proxy, for the gateway's logs and statistics.
    pub client_addr: SocketAddr,
}

/// The gateway's answer to an acceptable [`Hello`]. On a data connection, raw bytes follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The negotiated version: the highest both sides speak.
    pub version: u16,
    pub software: String,
    /// The heartbeat interval in force (the agent's wish, clamped by the gateway); 0 on data
    /// connections.
    pub heartbeat_ms: u32,
    /// Whether data connections must use TLS (when the control channel does). Meaningful on
    /// control connections only.
    pub data_tls: bool,
}

/// A numeric error class; the set grows, so unknown codes must be displayed, not rejected.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(1);
    pub const BAD_HELLO: ErrorCode = ErrorCode(2);
    pub const PROTOCOL: ErrorCode = ErrorCode(3);
    pub const UNKNOWN_MESSAGE: ErrorCode = ErrorCode(4);
    pub const FRAME_TOO_LARGE: ErrorCode = ErrorCode(5);
    pub const UNKNOWN_CLIENT: ErrorCode = ErrorCode(6);
    pub const PEER_DENIED: ErrorCode = ErrorCode(7);
    pub const TLS_REQUIRED: ErrorCode = ErrorCode(8);
    pub const CONFIG_REJECTED: ErrorCode = ErrorCode(9);
    pub const TIMEOUT: ErrorCode = ErrorCode(10);
    pub const SHUTTING_DOWN: ErrorCode = ErrorCode(11);
    pub const LIMIT: ErrorCode = ErrorCode(12);
    pub const EGRESS_DENIED: ErrorCode = ErrorCode(13);
    pub const DEST_UNREACHABLE: ErrorCode = ErrorCode(14);
    /// The agent's certificate is bound to another site than the one its hello claims (or to
    /// none, where the gateway requires a binding).
    pub const WRONG_SITE: ErrorCode = ErrorCode(15);
    /// The agent's certificate was revoked (a reload's CRL) or no longer validates.
    pub const REVOKED: ErrorCode = ErrorCode(16);

    pub fn name(self) -> &'static str {
        match self {
            Self::UNSUPPORTED_VERSION => "unsupported version",
            Self::BAD_HELLO => "bad hello",
            Self::PROTOCOL => "protocol error",
            Self::UNKNOWN_MESSAGE => "unknown message type",
            Self::FRAME_TOO_LARGE => "frame too large",
            Self::UNKNOWN_CLIENT => "unknown or expired client",
            Self::PEER_DENIED => "peer denied",
            Self::TLS_REQUIRED => "TLS required",
            Self::CONFIG_REJECTED => "config rejected",
            Self::TIMEOUT => "timeout",
            Self::SHUTTING_DOWN => "shutting down",
            Self::LIMIT => "limit reached",
            Self::EGRESS_DENIED => "egress denied",
            Self::DEST_UNREACHABLE => "destination unreachable",
            Self::WRONG_SITE => "wrong site",
            Self::REVOKED => "certificate revoked",
            _ => "error",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A fatal error, sent just before the sender closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for ErrorMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The IP rules a listener applies to clients, as text; the gateway parses them itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientRules {
    pub default: Policy,
    pub except: Vec<String>,
}

/// What the gateway needs to know of one listener. Backends never leave the internal network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    pub name: String,
    pub public: PublicAddr,
    pub clients: ClientRules,
}

/// The agent's full listener set. Listeners absent from it are closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushConfig {
    /// Increases with every push on one control channel; echoed in [`ConfigResult`].
    pub generation: u64,
    /// Hex SHA-256 of the agent's whole normalized configuration (listeners and backends):
    /// agents of one site must agree on it.
    pub digest: String,
    pub listeners: Vec<ListenerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerStatus {
    /// Listening on these addresses. `kept` is true when it was already open with the same spec.
    Bound { addrs: Vec<SocketAddr>, kept: bool },
    /// Not listening, and why (e.g. "127.0.0.1:2222: address in use").
    Failed { error: String },
    /// Accepted, but not listening while the gateway is paused; it opens on resume.
    Paused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerResult {
    pub name: String,
    pub status: ListenerStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigResult {
    pub generation: u64,
    pub listeners: Vec<ListenerResult>,
}

/// A client is waiting on a listener; the agent should dial a data connection for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientArrived {
    pub id: u64,
    pub token: Token,
    pub listener: String,
    /// Offset of the accepting port within the listener's port range (0 for a single port); a
    /// range backend uses the same offset.
    pub port_offset: u16,
    /// The client's real address, as the gateway saw it.
    pub client_addr: SocketAddr,
    /// The gateway address the client connected to.
    pub gateway_addr: SocketAddr,
}

/// The agent cannot serve a pending client (unknown listener, backend unreachable); the gateway
/// closes that client now instead of at its deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFailed {
    pub id: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
}

/// The most bans one agent's list may hold (a gateway refuses a longer list).
pub const MAX_BANS: u32 = 100_000;
/// The longest reason text of one ban, in bytes.
pub const MAX_BAN_REASON: usize = 200;
/// The agent cuts its ban list into chunks whose payload stays under this many bytes, so every
/// chunk fits the smallest `max_frame` a gateway may set (4096).
pub const BAN_CHUNK_BYTES: usize = 3000;

/// One part of an agent's full ban list for its site (agent to gateway). A list is sent whole,
/// in chunks of one `generation`, on connect and after every change; it replaces the agent's
/// previous list once its `total` bans have arrived. docs/protocol.md section 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanList {
    /// Increases with every list sent on one control channel; a chunk of a newer generation
    /// abandons an unfinished older list.
    pub generation: u64,
    /// Bans in the whole list (at most [`MAX_BANS`]).
    pub total: u32,
    pub bans: Vec<Ban>,
}

/// One banned address or network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// The network address: host bits beyond `prefix` must be zero.
    pub addr: std::net::IpAddr,
    /// Prefix length: 32 (IPv4) or 128 (IPv6) for one address.
    pub prefix: u8,
    /// Milliseconds until the ban lifts, counted from when the list was sent (relative, so the
    /// two hosts' clocks need not agree); 0: until removed.
    pub remaining_ms: u64,
    /// Why (for the gateway's status page): printable text, at most [`MAX_BAN_REASON`] bytes.
    pub reason: String,
}

/// The gateway's answer to a complete [`BanList`]: applied, or refused (and the agent's
/// previous list kept) with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanResult {
    pub generation: u64,
    /// Bans in force from this agent's list.
    pub applied: u32,
    pub error: Option<String>,
}

/// The rate limits of an agent's listeners (agent to gateway), sent before every config push
/// that has any, whole: it replaces the site's previous limits. docs/protocol.md section 4.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeLimits {
    pub listeners: Vec<ListenerLimits>,
}

/// One listener's limits; `None`: unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerLimits {
    pub name: String,
    /// New connections per client address (an IPv4 address or an IPv6 /64), per hour (so
    /// `20/s`, `600/min` and `5/h` are all whole numbers).
    pub new_connections_per_ip_hourly: Option<u64>,
    /// Bytes per second per client connection, each direction.
    pub client_rate: Option<u64>,
    /// Bytes per second for the whole listener, each direction.
    pub listener_rate: Option<u64>,
}

/// The automatic-ban settings of an agent's listeners (agent to gateway), sent like
/// [`EdgeLimits`]: whole, before every config push when a listener has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoBans {
    pub listeners: Vec<ListenerAutoBan>,
}

/// One listener's automatic bans (docs/security.md, "Automatic bans").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerAutoBan {
    pub name: String,
    /// Ban an address that opens more than this many connections within `within_ms`.
    pub connections: Option<u32>,
    /// Ban an address with more than this many connections shorter than `shorter_than_ms`
    /// within `within_ms`.
    pub short_connections: Option<u32>,
    pub shorter_than_ms: u64,
    pub within_ms: u64,
    /// The first ban; each repeat doubles it, up to `max_ban_ms`.
    pub ban_ms: u64,
    pub max_ban_ms: u64,
}

/// A decoded message (any version: a message a version does not have is never sent on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Error(ErrorMsg),
    SessionSecret(SessionSecret),
    PushConfig(PushConfig),
    ConfigResult(ConfigResult),
    ClientArrived(ClientArrived),
    ClientFailed(ClientFailed),
    Heartbeat(Heartbeat),
    PoolAssign(PoolAssign),
    PoolAccepted(PoolAccepted),
    BanList(BanList),
    BanResult(BanResult),
    EdgeLimits(EdgeLimits),
    AutoBans(AutoBans),
}

#[cfg(test)]
mod tests;
