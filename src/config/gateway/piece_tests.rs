//! Each section's parser on its own: the piece `GatewayConfig::parse` calls for it, fed that
//! section's raw form, with its errors located on the right line.

use super::*;

/// Parses `text` as `T` and runs `piece` on it with the file's `Source`.
fn piece<T: serde::de::DeserializeOwned, R>(
    text: &str,
    piece: impl FnOnce(&Source, &T) -> Result<R, ConfigError>,
) -> Result<R, ConfigError> {
    let src = Source::new(Path::new("gateway.toml"), text);
    let raw: T = src.parse_toml()?;
    piece(&src, &raw)
}

fn err_at<R: std::fmt::Debug>(r: Result<R, ConfigError>, line: usize, has: &str) {
    let e = r.expect_err("an error");
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.message.contains(has), "{e}");
}

#[test]
fn control_sets_listen_and_data_tls_and_names_a_bad_address() {
    let path = Path::new("gateway.toml");
    let cfg = piece("listen = \"127.0.0.1:4000\"\ndata_tls = false\n", |s, c| {
        let mut cfg = GatewayConfig::default();
        parse_control(s, path, c, &mut cfg).map(|()| cfg)
    })
    .unwrap();
    assert_eq!(cfg.control_listen, "127.0.0.1:4000".parse().unwrap());
    assert!(!cfg.data_tls);
    assert!(cfg.tls.is_none());
    let bad = piece("\nlisten = \"4000\"\n", |s, c: &RawControl| {
        parse_control(s, path, c, &mut GatewayConfig::default())
    });
    err_at(bad, 2, "invalid socket address \"4000\"");
}

#[test]
fn peers_keep_the_established_default_unless_written() {
    let (rules, dropping) = piece("default = \"deny\"\nexcept = [\"10.0.0.1\"]\n", |s, p| {
        parse_peers(s, p, true)
    })
    .unwrap();
    assert!(dropping, "the default is kept");
    assert!(rules.allows("10.0.0.1".parse().unwrap()));
    assert!(!rules.allows("10.0.0.2".parse().unwrap()));
    let (_, dropping) = piece("default = \"allow\"\ndrop_established = false\n", |s, p| {
        parse_peers(s, p, true)
    })
    .unwrap();
    assert!(!dropping);
    let bad = piece("default = \"deny\"\nexcept = [\n\"10.0.*.1\"]\n", |s, p| {
        parse_peers(s, p, true)
    });
    err_at(bad, 3, "invalid wildcard");
}

#[test]
fn peers_must_be_written_with_a_default() {
    let src = Source::new(Path::new("gateway.toml"), "");
    let e = require_peers(&src, None).unwrap_err();
    assert!(e.message.contains("no [peers] section"), "{e}");
    let e = piece("except = [\"10.0.0.1\"]\n", |s, p| {
        require_peers(s, Some(p))
    })
    .unwrap_err();
    assert!(e.message.contains("peers.default is required"), "{e}");
    piece("default = \"deny\"\n", |s, p| require_peers(s, Some(p))).unwrap();
}

#[test]
fn clients_canonicalise_mapped_addresses_and_check_ranges() {
    let text = "bind = \"127.0.0.10\"\nallow_ips = [\"::ffff:127.0.0.11\"]\nports = [\"2222\", \"30000-30100\"]\nproxy_protocol_from = [\"::ffff:10.0.0.5\"]\n";
    let cfg = piece(text, |s, c| {
        let mut cfg = GatewayConfig::default();
        parse_clients(s, c, &mut cfg).map(|()| cfg)
    })
    .unwrap();
    assert_eq!(cfg.client_bind, "127.0.0.10".parse::<IpAddr>().unwrap());
    assert_eq!(
        cfg.client_ips,
        vec!["127.0.0.11".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(cfg.client_ports.len(), 2);
    assert_eq!(
        cfg.proxy_protocol_from,
        vec!["10.0.0.5/32".parse::<ipnet::IpNet>().unwrap()]
    );
    let bad = piece(
        "ports = [\n\"2222\",\n\"30100-30000\"]\n",
        |s, c: &RawClients| parse_clients(s, c, &mut GatewayConfig::default()),
    );
    err_at(bad, 3, "invalid port or range \"30100-30000\"");
    let bad = piece("\n\nbind = \"localhost\"\n", |s, c: &RawClients| {
        parse_clients(s, c, &mut GatewayConfig::default())
    });
    err_at(bad, 3, "invalid IP address \"localhost\"");
}

#[test]
fn egress_checks_each_entry_at_its_line() {
    let rules = piece(
        "allow = [\"sftp.example:22\", \"203.0.113.0/24:443\"]\n",
        parse_egress,
    )
    .unwrap();
    assert_eq!(rules.len(), 2);
    assert!(rules.allows_name("sftp.example", 22));
    assert!(!rules.allows_name("sftp.example", 23));
    let bad = piece("allow = [\n\"sftp.example:22\",\n\"no port\"]\n", |s, e| {
        parse_egress(s, e)
    });
    err_at(bad, 3, "");
}

#[test]
fn limit_timeouts_are_bounded_and_named() {
    let l = piece(
        "pending_timeout = \"3s\"\ndrain_timeout = \"0s\"\n",
        |s, r| {
            let mut l = Limits::default();
            parse_limit_timeouts(s, r, &mut l).map(|()| l)
        },
    )
    .unwrap();
    assert_eq!(l.pending_timeout, Duration::from_secs(3));
    assert_eq!(l.drain_timeout, Duration::ZERO);
    assert_eq!(l.hello_timeout, Limits::default().hello_timeout);
    let bad = piece("\nfirst_byte_timeout = \"2m\"\n", |s, r: &RawLimits| {
        parse_limit_timeouts(s, r, &mut Limits::default())
    });
    let e = bad.unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.to_string().contains("limits.first_byte_timeout"), "{e}");
}

#[test]
fn limit_sizes_are_bounded() {
    let l = piece("max_frame = 65536\ndata_reuse_clients = 7\n", |s, r| {
        let mut l = Limits::default();
        parse_limit_sizes(s, r, &mut l).map(|()| l)
    })
    .unwrap();
    assert_eq!((l.max_frame, l.data_reuse_clients), (65536, 7));
    let bad = piece("\nmax_frame = 10\n", |s, r: &RawLimits| {
        parse_limit_sizes(s, r, &mut Limits::default())
    });
    err_at(bad, 2, "10 is outside the allowed");
    let bad = piece("data_reuse_bytes = 0\n", |s, r: &RawLimits| {
        parse_limit_sizes(s, r, &mut Limits::default())
    });
    err_at(bad, 1, "0 is outside the allowed 1 to");
}

#[test]
fn limit_counts_are_bounded_and_ports_optional() {
    let text = "max_pending = 5\nmax_datagram = 512\nmax_listen_ports_per_site = 9\n";
    let l = piece(text, |s, r| {
        let mut l = Limits::default();
        parse_limit_counts(s, r, &mut l).map(|()| l)
    })
    .unwrap();
    assert_eq!((l.max_pending, l.max_datagram), (5, 512));
    assert_eq!(l.max_listen_ports, None);
    assert_eq!(l.max_listen_ports_per_site, Some(9));
    let bad = piece("\n\nmax_outbound = 1000001\n", |s, r: &RawLimits| {
        parse_limit_counts(s, r, &mut Limits::default())
    });
    err_at(bad, 3, "1000001 is outside the allowed 1 to 1000000");
    let bad = piece("max_datagram = 100\n", |s, r: &RawLimits| {
        parse_limit_counts(s, r, &mut Limits::default())
    });
    err_at(bad, 1, "100 is outside the allowed 512 to");
}

#[test]
fn notices_name_open_peers_and_plaintext() {
    let mut cfg = GatewayConfig {
        peers: AccessRules::parse(Policy::Allow, &[] as &[String]).unwrap(),
        ..Default::default()
    };
    let notices = cfg.notices_of_choices();
    assert!(notices[0].starts_with("[peers] default = \"allow\": every address may"));
    assert!(notices[1].contains("PLAINTEXT"), "{notices:?}");
    assert_eq!(notices.len(), 2);
    cfg.peers = AccessRules::parse(Policy::Deny, &["10.0.0.1".to_string()]).unwrap();
    assert_eq!(cfg.notices_of_choices().len(), 1);
}
