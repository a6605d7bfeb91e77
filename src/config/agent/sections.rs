//! agent.toml's connection sections: `gateways`, `[tls]`, `[reconnect]`, `[limits]`, the
//! frame size, source addresses and the agent's identity. Each has its raw (spanned) form and one
//! parser turning it into typed settings with errors at the offending line;
//! `AgentConfig::parse` calls them in the file's documented order.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_data_connections: Option<Spanned<u64>>,
    pub(super) max_backend_connections: Option<Spanned<u64>>,
    pub(super) max_backend_connections_per_listener: Option<Spanned<u64>>,
    pub(super) offers_per_second: Option<Spanned<u64>>,
    pub(super) offer_burst: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca: Spanned<String>,
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
    pub(super) server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReconnect {
    pub(super) initial: Option<Spanned<String>>,
    pub(super) max: Option<Spanned<String>>,
}

pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| check_name(s).is_ok())
        .unwrap_or_else(|| "agent".to_string())
}

/// `host:port`, or `host` with the default control port.
pub(super) fn parse_gateway(s: &str) -> Result<String, String> {
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
pub(super) fn identity_notices(
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

/// `gateways`: at least one, each a host with an optional port, none listed twice.
pub(super) fn parse_gateways(
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
pub(super) fn parse_tls(
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
            let fingerprint = crate::config::reference::fingerprint(&[&ca, &cert, &key]);
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
pub(super) fn parse_max_frame(
    src: &Source,
    raw: Option<&Spanned<u64>>,
) -> Result<usize, ConfigError> {
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
pub(super) fn parse_source_ips(
    src: &Source,
    raw: Option<&Spanned<crate::config::StringOrList>>,
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
pub(super) fn parse_reconnect(
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

/// `[limits]`: every count from 1 to 1,000,000; unset keys keep their defaults.
pub(super) fn parse_limits(
    src: &Source,
    raw: Option<&RawLimits>,
) -> Result<AgentLimits, ConfigError> {
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
