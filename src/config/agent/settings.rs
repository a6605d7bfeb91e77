//! What agent.toml's settings are, key by key: the list `agent --check` prints, and what differs
//! between a running config and a new one at SIGHUP (changed keys, listeners added, removed or
//! changed, whether the control connection must be redialled). It never reads a file.

use super::*;

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
        crate::config::reference::diff(AGENT_KEYS, &self.settings(), &new.settings())
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
            .any(|c| c.reload == crate::config::reference::Reload::Reconnect)
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
pub(in crate::config) fn traced_keys() -> Vec<String> {
    crate::config::reference::trace::keys::<RawAgent>()
}
