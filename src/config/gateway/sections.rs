//! `gateway.toml`'s sections: their raw (spanned) form as the file says it, and one parser per
//! section ([control], [peers], [clients], [egress], [limits]), each turning its raw form into
//! the typed settings with errors at the offending line. `GatewayConfig::parse` calls them in
//! the file's documented order.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    pub(super) control: Option<RawControl>,
    pub(super) peers: Option<RawPeers>,
    pub(super) clients: Option<RawClients>,
    pub(super) egress: Option<RawEgress>,
    pub(super) admin: Option<crate::config::admin::RawAdmin>,
    pub(super) limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    listen: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
    data_tls: Option<bool>,
    data_reuse: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Spanned<String>,
    crl: Option<Spanned<String>>,
    site_binding: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::config) struct RawRules {
    pub default: Option<Spanned<String>>,
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
}

/// `[peers]`: the rules, and what revoking a connected agent closes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeers {
    default: Option<Spanned<String>>,
    #[serde(default)]
    except: Vec<Spanned<String>>,
    drop_established: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClients {
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
pub(super) struct RawEgress {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
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
pub(super) fn parse_trusted_net(s: &str) -> Result<ipnet::IpNet, String> {
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

/// `[control]`: the listen address, TLS (files loaded here), `data_tls` and `data_reuse`.
pub(super) fn parse_control(
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
    if let Some(data_reuse) = control.data_reuse {
        cfg.data_reuse = data_reuse;
    }
    Ok(())
}

/// `[peers]`: who may open control connections, and whether revoking a connected agent's
/// address closes its established connections (`drop_established`, else `dropping`).
pub(super) fn parse_peers(
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
pub(super) fn require_peers(src: &Source<'_>, peers: Option<&RawPeers>) -> Result<(), ConfigError> {
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
pub(super) fn parse_clients(
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
pub(super) fn parse_egress(
    src: &Source<'_>,
    egress: &RawEgress,
) -> Result<EgressRules, ConfigError> {
    for entry in &egress.allow {
        src.parse_with(entry, "egress.allow", EgressRules::check_entry)?;
    }
    let allow: Vec<&str> = egress.allow.iter().map(|a| a.get_ref().as_str()).collect();
    EgressRules::parse(&allow).map_err(|e| src.error_nowhere(format!("egress.allow: {e}")))
}

/// `[limits]`' timeouts, each within its bounds.
pub(super) fn parse_limit_timeouts(
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
pub(super) fn ranged(
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
pub(super) fn parse_limit_sizes(
    src: &Source<'_>,
    raw: &RawLimits,
    l: &mut Limits,
) -> Result<(), ConfigError> {
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
pub(super) fn parse_limit_counts(
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
pub(super) fn parse_tls(
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
    let fingerprint = crate::config::reference::fingerprint(&files);
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
