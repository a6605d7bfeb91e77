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

/// The effective value of one key (a default when the file does not set it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    /// As people read it; empty when unset.
    pub value: String,
    /// Never printed (tokens, passwords): compared, and shown as "(set)".
    pub secret: bool,
}

impl Setting {
    pub fn new(key: &'static str, value: impl fmt::Display) -> Setting {
        Setting {
            key,
            value: value.to_string(),
            secret: false,
        }
    }

    pub fn secret(key: &'static str, value: Option<&str>) -> Setting {
        Setting {
            key,
            value: value.unwrap_or_default().to_string(),
            secret: true,
        }
    }

    /// The value as it may be printed.
    pub fn shown(&self) -> String {
        match (self.secret, self.value.is_empty()) {
            (_, true) => "(none)".to_string(),
            (true, false) => "(set)".to_string(),
            (false, false) => self.value.clone(),
        }
    }
}

/// One key whose value differs between the running configuration and a new file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub old: String,
    pub new: String,
    pub reload: Reload,
    pub note: &'static str,
}

impl Change {
    /// Whether a reload left it out (it needs a restart).
    pub fn needs_restart(&self) -> bool {
        self.reload == Reload::Restart
    }

    /// The line for a restart's answer: everything applies then.
    pub fn at_restart(&self) -> String {
        format!(
            "{}: {} -> {}: applied by the restart",
            self.key, self.old, self.new
        )
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} -> {}: {}",
            self.key,
            self.old,
            self.new,
            self.reload.effect()
        )?;
        if !self.note.is_empty() {
            write!(f, " ({})", self.note)?;
        }
        Ok(())
    }
}

/// The keys whose values differ, in the order of `keys`. A key without a setting (the
/// listeners, compared as a whole elsewhere) is skipped.
pub fn diff(keys: &[Key], old: &[Setting], new: &[Setting]) -> Vec<Change> {
    let find = |settings: &[Setting], name: &str| settings.iter().find(|s| s.key == name).cloned();
    keys.iter()
        .filter_map(|k| {
            let (a, b) = (find(old, k.name)?, find(new, k.name)?);
            (a.value != b.value).then(|| Change {
                key: k.name,
                old: a.shown(),
                new: if b.secret && !b.value.is_empty() && !a.value.is_empty() {
                    "(a new value)".to_string()
                } else {
                    b.shown()
                },
                reload: k.reload,
                note: k.note,
            })
        })
        .collect()
}

/// A short fingerprint of files' contents (TLS files rotated in place keep their paths, and a
/// reload must still see that they changed).
pub(crate) fn fingerprint(paths: &[&std::path::Path]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        h.update(std::fs::read(p).unwrap_or_default());
    }
    h.finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Prints settings as `key = value` lines (for `--check`).
pub fn render(settings: &[Setting]) -> String {
    let width = settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
    settings
        .iter()
        .map(|s| format!("  {:width$}  {}\n", s.key, s.shown()))
        .collect()
}

/// Test support: the keys a `Raw*` struct accepts, read through serde (every field name of every
/// nested struct, as dotted paths; arrays of tables add no segment).
#[cfg(test)]
pub(crate) mod trace {
    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    /// toml's `Spanned<T>` deserializes as a struct of this name whose `value` field is the T.
    const SPANNED: &str = "$__serde_spanned_private_Spanned";

    #[derive(Debug)]
    pub struct Error(String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Error {}
    impl de::Error for Error {
        fn custom<T: std::fmt::Display>(msg: T) -> Self {
            Error(msg.to_string())
        }
    }

    /// Collects the leaf keys of `T`.
    pub fn keys<'de, T: serde::Deserialize<'de>>() -> Vec<String> {
        let mut out = Vec::new();
        T::deserialize(Tracer {
            path: String::new(),
            out: &mut out,
        })
        .expect("tracing a Raw struct");
        out.sort();
        out.dedup();
        out
    }

    struct Tracer<'a> {
        path: String,
        out: &'a mut Vec<String>,
    }

    impl Tracer<'_> {
        fn leaf(self) {
            if !self.path.is_empty() {
                self.out.push(self.path);
            }
        }
    }

    macro_rules! leaf {
        ($($method:ident => $visit:ident($value:expr)),* $(,)?) => {$(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                self.leaf();
                visitor.$visit($value)
            }
        )*};
    }

    impl<'de> Deserializer<'de> for Tracer<'_> {
        type Error = Error;

        leaf! {
            deserialize_bool => visit_bool(true),
            deserialize_u64 => visit_u64(4096),
            deserialize_u32 => visit_u64(1),
            deserialize_u16 => visit_u64(1),
            deserialize_i64 => visit_i64(1),
            deserialize_str => visit_str("x"),
            deserialize_string => visit_str("x"),
        }

        /// A string, which untagged enums (a string or a list) take; a key whose visitor
        /// expects "a count ..." (`pool`: a count or a table) gets a number.
        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.leaf();
            struct Expecting<'v, V>(&'v V);
            impl<'de, V: Visitor<'de>> std::fmt::Display for Expecting<'_, V> {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    self.0.expecting(f)
                }
            }
            if Expecting(&visitor).to_string().starts_with("a count") {
                visitor.visit_u64(1)
            } else {
                visitor.visit_str("x")
            }
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_some(self)
        }

        fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            visitor.visit_seq(OneElement(Some(self)))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Error> {
            visitor.visit_map(Fields {
                spanned: name == SPANNED,
                fields: fields.iter(),
                next: None,
                path: self.path,
                out: self.out,
            })
        }

        serde::forward_to_deserialize_any! {
            i8 i16 i32 i128 u8 u128 f32 f64 char bytes byte_buf unit unit_struct
            newtype_struct tuple tuple_struct map enum identifier ignored_any
        }
    }

    struct OneElement<'a>(Option<Tracer<'a>>);

    impl<'de> SeqAccess<'de> for OneElement<'_> {
        type Error = Error;
        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, Error> {
            match self.0.take() {
                Some(t) => seed.deserialize(t).map(Some),
                None => Ok(None),
            }
        }
    }

    struct Fields<'a> {
        spanned: bool,
        fields: std::slice::Iter<'static, &'static str>,
        next: Option<&'static str>,
        path: String,
        out: &'a mut Vec<String>,
    }

    impl<'de> MapAccess<'de> for Fields<'_> {
        type Error = Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, Error> {
            let Some(field) = self.fields.next() else {
                return Ok(None);
            };
            self.next = Some(field);
            seed.deserialize(de::value::BorrowedStrDeserializer::<Error>::new(field))
                .map(Some)
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
            let field = self.next.take().expect("a key came first");
            if self.spanned {
                // start and end are byte offsets; the value is the real field, at this path.
                if field.ends_with("value") {
                    return seed.deserialize(Tracer {
                        path: self.path.clone(),
                        out: self.out,
                    });
                }
                return seed.deserialize(de::value::U64Deserializer::<Error>::new(0));
            }
            let path = if self.path.is_empty() {
                field.to_string()
            } else {
                format!("{}.{field}", self.path)
            };
            seed.deserialize(Tracer {
                path,
                out: self.out,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The rows of docs/configuration.md's tables under `heading`, as (key, cells).
    fn documented(heading: &str) -> Vec<(String, Vec<String>)> {
        let doc = include_str!("../../docs/configuration.md");
        let start = doc
            .find(heading)
            .unwrap_or_else(|| panic!("docs/configuration.md has no {heading:?}"));
        let section = &doc[start + heading.len()..];
        let section = &section[..section.find("\n## ").unwrap_or(section.len())];
        section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect();
                let key = cells[0].trim_matches('`').to_string();
                (key, cells)
            })
            .collect()
    }

    /// Keys, reload words and defaults of one file: the parser, the key list, the settings of
    /// a minimal file and the documentation must agree.
    fn check(
        heading: &str,
        parsed: Vec<String>,
        keys: &[Key],
        defaults: &[Setting],
        no_default: &[&str],
    ) {
        let listed: BTreeSet<String> = keys.iter().map(|k| k.name.to_string()).collect();
        let parsed: BTreeSet<String> = parsed.into_iter().collect();
        assert_eq!(
            parsed, listed,
            "the parser's keys (left) and the key list in config/reference.rs (right) differ"
        );
        let rows = documented(heading);
        let docs: BTreeSet<String> = rows.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(
            docs, listed,
            "docs/configuration.md {heading} (left) and the key list (right) differ"
        );
        for (name, cells) in &rows {
            let key = keys.iter().find(|k| k.name == name).unwrap();
            // | key | type | default | SIGHUP | meaning |
            assert_eq!(
                cells[3],
                key.reload.word(),
                "docs/configuration.md: the SIGHUP column of {name}"
            );
            if no_default.contains(&name.as_str()) {
                continue;
            }
            if let Some(setting) = defaults.iter().find(|s| s.key == name) {
                let want = if setting.value.is_empty() {
                    "none".to_string()
                } else {
                    format!("`{}`", setting.value)
                };
                assert!(
                    cells[2].starts_with(&want),
                    "docs/configuration.md: the default of {name} is {want} in the code, \"{}\" in the docs",
                    cells[2]
                );
            }
        }
    }

    #[test]
    fn gateway_keys_parser_list_and_docs_agree() {
        let defaults = crate::config::GatewayConfig::default().settings();
        let names: BTreeSet<&str> = defaults.iter().map(|s| s.key).collect();
        let listed: BTreeSet<&str> = GATEWAY_KEYS.iter().map(|k| k.name).collect();
        assert_eq!(names, listed, "GatewayConfig::settings() covers every key");
        check(
            "## gateway.toml",
            crate::config::gateway::traced_keys(),
            GATEWAY_KEYS,
            &defaults,
            // Required in a file; a gateway configured in code allows every peer.
            &["peers.default"],
        );
    }

    #[test]
    fn agent_keys_parser_list_and_docs_agree() {
        let minimal = crate::config::AgentConfig::parse(
            std::path::Path::new("agent.toml"),
            "site = \"s\"\ngateways = [\"g\"]\n[outbound]\nlisten = \"127.0.0.1:1080\"\n",
        )
        .unwrap();
        let defaults = minimal.settings();
        let names: BTreeSet<&str> = defaults.iter().map(|s| s.key).collect();
        let listed: BTreeSet<&str> = AGENT_KEYS
            .iter()
            .map(|k| k.name)
            .filter(|k| !k.starts_with("listener."))
            .collect();
        assert_eq!(
            names, listed,
            "AgentConfig::settings() covers every key but the listeners'"
        );
        check(
            "## agent.toml",
            crate::config::agent::traced_keys(),
            AGENT_KEYS,
            &defaults,
            &["site", "name", "gateways", "outbound.listen"],
        );
    }

    #[test]
    fn diff_names_changed_keys_and_hides_secrets() {
        let old = [
            Setting::new("a", 1),
            Setting::secret("t", None),
            Setting::secret("u", Some("one")),
        ];
        let new = [
            Setting::new("a", 2),
            Setting::secret("t", Some("s3cret")),
            Setting::secret("u", Some("two")),
        ];
        let keys = [key("a", Applied), key("t", Restart), key("u", Applied)];
        let changes = diff(&keys, &old, &new);
        let lines: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            lines,
            [
                "a: 1 -> 2: applied",
                "t: (none) -> (set): NOT applied: needs a restart",
                "u: (set) -> (a new value): applied",
            ]
        );
        assert!(!lines
            .iter()
            .any(|l| l.contains("s3cret") || l.contains("two")));
    }
}
