//! Each section's parser on its own: the piece `AgentConfig::parse` calls for it, fed that
//! section's raw form, with its errors located on the right line.

use super::listeners::duration_or;
use super::*;

/// Parses `text` as `T` and runs `piece` on it with the file's `Source`.
fn piece<T: serde::de::DeserializeOwned, R>(
    text: &str,
    piece: impl FnOnce(&Source, &T) -> Result<R, ConfigError>,
) -> Result<R, ConfigError> {
    let src = Source::new(Path::new("agent.toml"), text);
    let raw: T = src.parse_toml()?;
    piece(&src, &raw)
}

fn err_at<R: std::fmt::Debug>(r: Result<R, ConfigError>, line: usize, has: &str) {
    let e = r.expect_err("an error");
    assert_eq!(e.line, Some(line), "{e}");
    assert!(e.message.contains(has), "{e}");
}

#[derive(Deserialize)]
struct Gateways {
    gateways: Spanned<Vec<Spanned<String>>>,
}

#[test]
fn gateways_get_the_default_port_and_are_never_listed_twice() {
    let ok = piece("gateways = [\"gw1\", \"gw2:1\"]", |s, g: &Gateways| {
        parse_gateways(s, &g.gateways)
    });
    let port = DEFAULT_CONTROL_PORT;
    assert_eq!(ok.unwrap(), [format!("gw1:{port}"), "gw2:1".to_string()]);
    let twice = format!("gateways = [\n\"gw1\",\n\"gw1:{port}\"]");
    err_at(
        piece(&twice, |s, g: &Gateways| parse_gateways(s, &g.gateways)),
        3,
        "is listed twice",
    );
    let none = piece("\ngateways = []", |s, g: &Gateways| {
        parse_gateways(s, &g.gateways)
    });
    err_at(none, 2, "at least one gateway is required");
    let bad = piece("gateways = [\"gw1:1-2\"]", |s, g: &Gateways| {
        parse_gateways(s, &g.gateways)
    });
    err_at(bad, 1, "must name one port");
}

#[derive(Deserialize)]
struct Tls {
    tls: Option<Spanned<RawTls>>,
}

#[test]
fn tls_absent_is_plaintext_with_a_notice_and_missing_files_name_the_line() {
    let mut notices = Vec::new();
    let none = piece("", |s, t: &Tls| {
        parse_tls(
            s,
            Path::new("agent.toml"),
            t.tls.as_ref(),
            "acme",
            &mut notices,
        )
    });
    assert!(none.unwrap().is_none());
    assert!(notices[0].contains("PLAINTEXT"), "{notices:?}");
    let missing = "\ntls = { ca = \"/nonexistent/ca.crt\", cert = \"/nonexistent/a.crt\", key = \"/nonexistent/a.key\" }";
    let mut notices = Vec::new();
    let r = piece(missing, |s, t: &Tls| {
        parse_tls(
            s,
            Path::new("agent.toml"),
            t.tls.as_ref(),
            "acme",
            &mut notices,
        )
    });
    err_at(r, 2, "tls: ");
    assert!(notices.is_empty());
}

#[derive(Deserialize)]
struct Number {
    v: Option<Spanned<u64>>,
}

#[test]
fn max_frame_keeps_to_its_bounds() {
    let frame = |t: &str| piece(t, |s, n: &Number| parse_max_frame(s, n.v.as_ref()));
    assert_eq!(frame("").unwrap(), DEFAULT_MAX_FRAME);
    assert_eq!(frame("v = 4096").unwrap(), 4096);
    err_at(
        frame("\nv = 4095"),
        2,
        "outside the allowed 4096 to 67108864",
    );
    err_at(frame("v = 67108865"), 1, "max_frame: ");
}

#[derive(Deserialize)]
struct Reconnect {
    reconnect: Option<RawReconnect>,
}

#[test]
fn reconnect_defaults_and_max_not_shorter_than_initial() {
    let parse = |t: &str| {
        piece(t, |s, r: &Reconnect| {
            parse_reconnect(s, r.reconnect.as_ref())
        })
    };
    let default = parse("").unwrap();
    assert_eq!(
        (default.initial, default.max),
        (
            ReconnectConfig::default().initial,
            ReconnectConfig::default().max
        )
    );
    let set = parse("[reconnect]\ninitial = \"2s\"\nmax = \"1m\"").unwrap();
    assert_eq!(
        (set.initial, set.max),
        (Duration::from_secs(2), Duration::from_secs(60))
    );
    err_at(
        parse("[reconnect]\ninitial = \"2s\"\nmax = \"1s\""),
        3,
        "must not be shorter than reconnect.initial",
    );
    err_at(
        parse("[reconnect]\ninitial = \"11m\""),
        2,
        "reconnect.initial",
    );
}

#[test]
fn duration_or_takes_the_default_or_a_value_within_bounds() {
    #[derive(Deserialize)]
    struct D {
        d: Option<Spanned<String>>,
    }
    let bounds = (Duration::from_millis(100), Duration::from_secs(60));
    let parse = |t: &str| {
        piece(t, |s, d: &D| {
            duration_or(s, &d.d, "heartbeat", bounds, Duration::from_secs(5))
        })
    };
    assert_eq!(parse("").unwrap(), Duration::from_secs(5));
    assert_eq!(parse("d = \"250ms\"").unwrap(), Duration::from_millis(250));
    err_at(parse("\nd = \"2m\""), 2, "heartbeat: ");
}

#[derive(Deserialize)]
struct Listeners {
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
}

fn listeners(text: &str, notices: &mut Vec<String>) -> Result<Vec<ListenerConfig>, ConfigError> {
    piece(text, |s, l: &Listeners| {
        parse_listeners(s, &l.listener, notices)
    })
}

#[test]
fn listeners_are_named_once_hold_their_ports_and_match_ranges() {
    let mut notices = Vec::new();
    assert!(listeners("", &mut notices).unwrap().is_empty());
    assert!(
        notices[0].contains("no [[listener]] defined"),
        "{notices:?}"
    );

    let one = "[[listener]]\nname = \"a\"\npublic = \"2222\"\nbackend = \"10.0.0.5:22\"\nproxy_protocol = \"v2\"\n";
    let mut notices = Vec::new();
    let got = listeners(one, &mut notices).unwrap();
    assert!(notices.is_empty());
    assert_eq!(
        (got[0].name.as_str(), got[0].proxy_protocol),
        ("a", ProxyProtocol::V2)
    );
    assert_eq!(got[0].backend_target(0).as_deref(), Some("10.0.0.5:22"));

    let twice = format!("{one}[[listener]]\nname = \"a\"\npublic = \"2223\"\nbackend = \"h:1\"\n");
    err_at(
        listeners(&twice, &mut notices),
        7,
        "listener \"a\": name: another listener",
    );
    let overlap =
        format!("{one}[[listener]]\nname = \"b\"\npublic = \"2220-2229\"\nbackend = \"h:1\"\n");
    err_at(
        listeners(&overlap, &mut notices),
        8,
        "overlaps listener \"a\"",
    );
    // The same port over UDP is another port.
    let udp = format!("{one}[[listener]]\nname = \"b\"\npublic = \"2222\"\nbackend = \"h:1\"\nprotocol = \"udp\"\n");
    assert_eq!(listeners(&udp, &mut notices).unwrap().len(), 2);
    let ranges = "[[listener]]\nname = \"r\"\npublic = \"3000-3009\"\nbackend = \"h:4000-4004\"\n";
    err_at(
        listeners(ranges, &mut notices),
        4,
        "does not match the public range of 10 ports",
    );
    let proxy = one.replace("\"v2\"", "\"v3\"");
    err_at(
        listeners(&proxy, &mut notices),
        5,
        "listener \"a\": proxy_protocol: expected",
    );
}

#[derive(Deserialize)]
struct Outbound {
    outbound: RawOutbound,
}

fn outbound(text: &str, notices: &mut Vec<String>) -> Result<OutboundConfig, ConfigError> {
    piece(text, |s, o: &Outbound| {
        parse_outbound(s, &o.outbound, notices)
    })
}

#[test]
fn outbound_checks_users_and_limits_and_warns_of_an_open_proxy() {
    let mut notices = Vec::new();
    let ok = outbound("[outbound]\nlisten = \"127.0.0.1:1080\"\n", &mut notices).unwrap();
    assert_eq!(
        (ok.max_clients, ok.max_clients_per_ip, ok.handshake_timeout),
        (
            OUTBOUND_MAX_CLIENTS,
            OUTBOUND_MAX_CLIENTS_PER_IP,
            OUTBOUND_HANDSHAKE_TIMEOUT
        )
    );
    assert!(notices.is_empty(), "loopback: no notice");
    outbound("[outbound]\nlisten = \"0.0.0.0:1080\"\n", &mut notices).unwrap();
    assert!(
        notices[0].contains("neither users nor client rules"),
        "{notices:?}"
    );
    let user = "[outbound]\nlisten = \"0.0.0.0:1080\"\n[[outbound.users]]\nname = \"a:b\"\npassword = \"p\"\n";
    err_at(
        outbound(user, &mut notices),
        4,
        "outbound.users.name: must be 1 to 255 bytes without ':'",
    );
    let count = "[outbound]\nlisten = \"127.0.0.1:1080\"\nmax_clients = 0\n";
    err_at(
        outbound(count, &mut notices),
        3,
        "outbound.max_clients: 0 is outside",
    );
    err_at(
        outbound("[outbound]\nlisten = \"1080\"\n", &mut notices),
        2,
        "invalid socket address",
    );
}

#[derive(Deserialize)]
struct Sources {
    source_ip: Option<Spanned<crate::config::StringOrList>>,
}

#[test]
fn source_ip_is_one_address_or_a_list_of_one_family() {
    let ips = |t: &str| {
        piece(t, |s, r: &Sources| {
            parse_source_ips(s, r.source_ip.as_ref())
        })
    };
    assert!(ips("").unwrap().is_empty());
    assert_eq!(ips("source_ip = \"10.0.0.5\"").unwrap().len(), 1);
    let list = ips("source_ip = [\"10.0.0.5\", \"10.0.0.6\", \"10.0.0.7\"]").unwrap();
    assert_eq!(list[2].to_string(), "10.0.0.7");
    err_at(ips("\nsource_ip = []"), 2, "an empty list");
    err_at(
        ips("source_ip = [\"10.0.0.5\", \"10.0.0.5\"]"),
        1,
        "listed twice",
    );
    err_at(ips("source_ip = [\"10.0.0.5\", \"::1\"]"), 1, "same family");
    err_at(ips("source_ip = [\"10.0.0.x\"]"), 1, "invalid IP address");
}
