//! Every key of gateway.toml and agent.toml, and what a running daemon does when it changes.
//!
//! [`GATEWAY_KEYS`] and [`AGENT_KEYS`] are the one list of keys: a reload compares the running
//! and the new file key by key ([`diff`]) and says for each changed key whether it took effect
//! ([`Reload`]); `--check` prints the same settings; docs/configuration.md documents the same
//! keys, and the tests below check all of them against the parsers' own field lists (read from
//! the `Raw*` structs through serde), so a key cannot be added, removed or reclassified in one
//! place only.
//!
//! This module never opens a socket or a file; values are rendered for people, secrets never.

use std::fmt;

mod settings;

pub(crate) use settings::fingerprint;
pub use settings::{diff, render, Change, Setting};

/// What a running daemon does with a changed key at SIGHUP (the gateway's `ctl restart`
/// applies every key of gateway.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// In force at once, for everything that follows.
    Applied,
    /// In force for connections made after the reload; established ones keep the old value.
    NewConnections,
    /// The agent's control channels reconnect, each new one up before the old one closes.
    Reconnect,
    /// Needs a restart (the gateway: `sallyport ctl restart`; the agent: a new process); the
    /// running value is kept until then.
    Restart,
}

impl Reload {
    /// The word docs/configuration.md's "SIGHUP" column uses.
    pub fn word(self) -> &'static str {
        match self {
            Reload::Applied => "yes",
            Reload::NewConnections => "new connections",
            Reload::Reconnect => "reconnect",
            Reload::Restart => "restart",
        }
    }

    fn effect(self) -> &'static str {
        match self {
            Reload::Applied => "applied",
            Reload::NewConnections => {
                "applied to new connections; established ones keep the old value"
            }
            Reload::Reconnect => {
                "applied: the control channels reconnect (each new one is up before the old one closes)"
            }
            Reload::Restart => "NOT applied: needs a restart",
        }
    }
}

/// One key of a config file.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The dotted path: `limits.max_frame`, `listener.backend`.
    pub name: &'static str,
    pub reload: Reload,
    /// A precision for the reload log line (empty when the effect says it all).
    pub note: &'static str,
}

const fn key(name: &'static str, reload: Reload) -> Key {
    Key {
        name,
        reload,
        note: "",
    }
}

const fn noted(name: &'static str, reload: Reload, note: &'static str) -> Key {
    Key { name, reload, note }
}

use Reload::{Applied, NewConnections, Reconnect, Restart};

/// Every key of gateway.toml.
pub const GATEWAY_KEYS: &[Key] = &[
    noted(
        "control.listen",
        Restart,
        "`sallyport ctl restart` rebinds the control port",
    ),
    noted(
        "control.tls.cert",
        NewConnections,
        "files are re-read at every reload",
    ),
    noted(
        "control.tls.key",
        NewConnections,
        "files are re-read at every reload",
    ),
    noted(
        "control.tls.client_ca",
        NewConnections,
        "files are re-read at every reload",
    ),
    noted(
        "control.tls.crl",
        Applied,
        "re-read at every reload: new handshakes are checked against it, and connected agents whose certificate it revokes are cut",
    ),
    noted(
        "control.tls.site_binding",
        NewConnections,
        "control channels that joined a site keep it",
    ),
    noted(
        "control.data_tls",
        Restart,
        "agents learn it when their control channel connects: `sallyport ctl restart`",
    ),
    noted(
        "control.data_reuse",
        NewConnections,
        "plaintext pool connections opened after the reload; parked ones keep what they negotiated",
    ),
    noted(
        "peers.default",
        Applied,
        "connected agents the rules now deny are cut at once",
    ),
    noted(
        "peers.except",
        Applied,
        "connected agents the rules now deny are cut at once",
    ),
    key("peers.drop_established", Applied),
    noted(
        "clients.bind",
        Applied,
        "listeners that used it reopen on the new address",
    ),
    noted(
        "clients.allow_ips",
        Applied,
        "listeners the new rules no longer allow close; the next push may use new ones",
    ),
    noted(
        "clients.ports",
        Applied,
        "listeners the new rules no longer allow close; the next push may use new ones",
    ),
    noted(
        "clients.proxy_protocol_from",
        NewConnections,
        "connections accepted after the reload are read with the new list",
    ),
    noted("egress.allow", Applied, "for new outbound requests"),
    key("admin.enabled", Applied),
    noted(
        "admin.listen",
        Applied,
        "the admin API moves once the new address is bound",
    ),
    key("admin.token", Applied),
    key("limits.hello_timeout", NewConnections),
    key("limits.pending_timeout", NewConnections),
    key("limits.max_frame", NewConnections),
    key("limits.max_pending", Applied),
    key("limits.max_pending_per_listener", Applied),
    noted(
        "limits.max_udp_flows_per_listener",
        Applied,
        "for new flows",
    ),
    key("limits.max_datagram", Applied),
    key("limits.max_connections", Applied),
    key("limits.max_connections_per_ip", Applied),
    key("limits.max_handshakes", Applied),
    key("limits.max_handshakes_per_ip", Applied),
    noted("limits.drain_timeout", Applied, "for the next stop"),
    key("limits.first_byte_timeout", NewConnections),
    noted(
        "limits.max_listen_ports",
        Applied,
        "for the next push; ports already open stay open",
    ),
    noted(
        "limits.max_listen_ports_per_site",
        Applied,
        "for the next push; ports already open stay open",
    ),
    noted(
        "limits.max_sites",
        Applied,
        "for sites that connect next; connected sites stay",
    ),
    noted(
        "limits.max_outbound",
        Applied,
        "for new outbound connections",
    ),
    noted(
        "limits.data_reuse_clients",
        Applied,
        "from each reusable connection's next client",
    ),
    noted(
        "limits.data_reuse_bytes",
        Applied,
        "from each reusable connection's next client",
    ),
];

/// Every key of agent.toml.
pub const AGENT_KEYS: &[Key] = &[
    key("site", Reconnect),
    key("name", Reconnect),
    noted(
        "gateways",
        Applied,
        "a new gateway gets a control channel, a removed one's closes (its data connections finish)",
    ),
    key("tls.ca", Reconnect),
    key("tls.cert", Reconnect),
    key("tls.key", Reconnect),
    key("tls.server_name", Reconnect),
    key("source_ip", Reconnect),
    key("heartbeat", Reconnect),
    key("connect_timeout", NewConnections),
    noted("drain_timeout", Applied, "for the next stop"),
    key("max_frame", Reconnect),
    noted(
        "pool",
        Applied,
        "within a second: idle connections above the new target close, missing ones are opened",
    ),
    noted(
        "state_dir",
        Restart,
        "the ban list is read from it at start",
    ),
    noted("reconnect.initial", Applied, "from the next reconnection"),
    noted("reconnect.max", Applied, "from the next reconnection"),
    noted(
        "listener.name",
        Applied,
        "pushed to every gateway: only changed listeners restart",
    ),
    noted(
        "listener.public",
        Applied,
        "pushed to every gateway: only changed listeners restart",
    ),
    noted("listener.backend", Applied, "for new clients"),
    noted(
        "listener.balance",
        Applied,
        "for new clients; the backends' health is kept",
    ),
    noted(
        "listener.health.interval",
        Applied,
        "the listener's checks restart with the new settings",
    ),
    noted(
        "listener.health.timeout",
        Applied,
        "the listener's checks restart with the new settings",
    ),
    noted(
        "listener.health.http",
        Applied,
        "the listener's checks restart with the new settings",
    ),
    noted("listener.proxy_protocol", Applied, "for new clients"),
    noted("listener.impersonation", Applied, "for new clients"),
    noted(
        "listener.protocol",
        Applied,
        "the listener is closed and opened again with the other protocol",
    ),
    noted("listener.idle_timeout", Applied, "for new flows"),
    noted(
        "listener.hostnames",
        Applied,
        "pushed to every gateway: the listener's routes change, its clients stay",
    ),
    noted(
        "listener.clients.default",
        Applied,
        "pushed to every gateway: only changed listeners restart",
    ),
    noted(
        "listener.clients.except",
        Applied,
        "pushed to every gateway: only changed listeners restart",
    ),
    noted(
        "listener.new_connections_per_ip",
        Applied,
        "pushed to every gateway: for new clients",
    ),
    noted(
        "listener.client_rate",
        Applied,
        "pushed to every gateway: for new clients",
    ),
    noted(
        "listener.listener_rate",
        Applied,
        "pushed to every gateway: a new bucket, for new clients",
    ),
    noted(
        "listener.auto_ban.connections",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "listener.auto_ban.short_connections",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "listener.auto_ban.shorter_than",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "listener.auto_ban.within",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "listener.auto_ban.ban",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "listener.auto_ban.max_ban",
        Applied,
        "pushed to every gateway: a change starts the listener's counts afresh",
    ),
    noted(
        "outbound.listen",
        Applied,
        "the proxy moves once the new address is bound",
    ),
    noted("outbound.clients.default", Applied, "for new requests"),
    noted("outbound.clients.except", Applied, "for new requests"),
    noted("outbound.handshake_timeout", Applied, "for new requests"),
    noted("outbound.max_clients", Applied, "for new requests"),
    noted("outbound.max_clients_per_ip", Applied, "for new requests"),
    noted(
        "admin.enabled",
        Restart,
        "the agent's admin server keeps its address and token until the agent restarts",
    ),
    noted(
        "admin.listen",
        Restart,
        "the agent's admin server keeps its address and token until the agent restarts",
    ),
    noted(
        "admin.token",
        Restart,
        "the agent's admin server keeps its address and token until the agent restarts",
    ),
    noted("outbound.users.name", Applied, "for new requests"),
    noted("outbound.users.password", Applied, "for new requests"),
    noted("limits.max_data_connections", Applied, "for new offers"),
    noted("limits.max_backend_connections", Applied, "for new offers"),
    noted(
        "limits.max_backend_connections_per_listener",
        Applied,
        "for new offers",
    ),
    noted("limits.offers_per_second", Applied, "for new offers"),
    noted("limits.offer_burst", Applied, "for new offers"),
];

#[cfg(test)]
pub(crate) mod trace;

#[cfg(test)]
mod tests;
