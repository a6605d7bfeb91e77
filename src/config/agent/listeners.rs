//! agent.toml's `[[listener]]` tables: one raw listener as the file says it and the parsers that
//! turn it into a [`ListenerConfig`] (public and backend ends, protocol, hostnames, timers, edge
//! limits, auto-bans), checking across listeners that two never claim the same public port and
//! name. Every error names the listener and the file's line.

use super::*;

/// A listener's `protocol` and `idle_timeout`, and the settings UDP cannot honour: PROXY v1
/// has no UDP form, and transparent mode is TCP only in this version.
pub(super) fn parse_protocol(
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
pub(super) struct RawListener {
    pub(super) name: Spanned<String>,
    pub(super) public: Spanned<String>,
    pub(super) backend: Spanned<crate::config::StringOrList>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) health: Option<Spanned<crate::config::backends::RawHealth>>,
    pub(super) proxy_protocol: Option<Spanned<String>>,
    pub(super) impersonation: Option<Spanned<String>>,
    pub(super) protocol: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) clients: Option<RawRules>,
    pub(super) new_connections_per_ip: Option<Spanned<String>>,
    pub(super) client_rate: Option<Spanned<String>>,
    pub(super) listener_rate: Option<Spanned<String>>,
    pub(super) auto_ban: Option<Spanned<RawAutoBan>>,
    pub(super) hostnames: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAutoBan {
    pub(super) connections: Option<Spanned<u64>>,
    pub(super) short_connections: Option<Spanned<u64>>,
    pub(super) shorter_than: Option<Spanned<String>>,
    pub(super) within: Spanned<String>,
    pub(super) ban: Option<Spanned<String>>,
    pub(super) max_ban: Option<Spanned<String>>,
}

/// A listener's `hostnames`: each `"*"`, `"*.suffix"` or a DNS name (letters, digits, `-`,
/// dots between non-empty labels), normalized; no repeats; TCP and a single port only.
pub(super) fn parse_hostnames(
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
pub(super) struct SharedPorts(HashMap<PublicAddr, (String, HashMap<String, String>)>);

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

/// `[[listener]]`: every listener, each name its own and each public port its own (unless
/// listeners share it by host name); a notice when there is none.
pub(super) fn parse_listeners(
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
pub(super) struct ListenerEnds {
    pub(super) public: PublicAddr,
    pub(super) backend: BackendAddr,
    pub(super) group: Option<crate::config::BackendGroup>,
    pub(super) protocol: Protocol,
    pub(super) hostnames: Vec<String>,
}

/// A listener's `public`, `backend` (one port, or a range as long as the public one),
/// `protocol` and `hostnames`.
pub(super) fn parse_listener_ends(
    src: &Source,
    l: &RawListener,
    ctx: &dyn Fn(&str) -> String,
) -> Result<ListenerEnds, ConfigError> {
    let public: PublicAddr = src.parse_with(&l.public, &ctx("public"), |s| s.parse())?;
    let protocol = parse_protocol(src, l, ctx)?;
    let raw = crate::config::backends::RawGroup {
        backend: &l.backend,
        balance: l.balance.as_ref(),
        health: l.health.as_ref(),
        udp: !protocol.is_tcp(),
    };
    let (backend, group) = crate::config::backends::parse(src, raw, &public, ctx)?;
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
pub(super) fn parse_listener_rest(
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
pub(super) fn parse_timers(
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
pub(super) fn duration_or(
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
pub(super) fn parse_edge_limits(
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
pub(super) fn parse_auto_ban(
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
