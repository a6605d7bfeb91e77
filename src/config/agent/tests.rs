//! agent.toml parsed whole: the examples, each error with its line, digests and reloads.

use super::*;

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::parse(Path::new("agent.toml"), text)
}

const EXAMPLE: &str = r#"site = "acme-mft"
gateways = ["dmz-gw1.example:44500", "dmz-gw2.example"]

[[listener]]
name = "sftp"
public = "2222"
backend = "10.0.0.5:22"
proxy_protocol = "none"
clients = { default = "allow", except = ["198.51.100.0/24"] }

[[listener]]
name = "ftp-pasv"
public = "30000-30049"
backend = "10.0.0.6:30000-30049"

[outbound]
listen = "127.0.0.1:1080"
"#;

#[test]
fn rate_limits_parse_and_bad_ones_name_their_line() {
    let limited = EXAMPLE.replace(
        "proxy_protocol = \"none\"\n",
        "proxy_protocol = \"none\"\nnew_connections_per_ip = \"20/s\"\nclient_rate = \"8MiB/s\"\nlisteners_rate = 1\n",
    );
    let err = parse(&limited).unwrap_err().to_string();
    assert!(err.contains("listeners_rate"), "{err}");
    let cfg = parse(&limited.replace("listeners_rate = 1\n", "")).unwrap();
    let edge = cfg.listener("sftp").unwrap().edge;
    assert_eq!(edge.new_connections_per_ip_hourly, Some(72_000));
    assert_eq!(edge.client_rate, Some(8 << 20));
    assert_eq!(edge.listener_rate, None);
    let sent = cfg.edge_limits().unwrap();
    assert_eq!(sent.listeners.len(), 1);
    // Limits change the digest; no limits keep the digest of a file without the keys.
    assert_ne!(cfg.digest(), parse(EXAMPLE).unwrap().digest());
    assert!(parse(EXAMPLE).unwrap().edge_limits().is_none());
    let bad = limited.replace("listeners_rate = 1\n", "listener_rate = \"100MiB\"\n");
    let err = parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("agent.toml:11") && err.contains("listener_rate") && err.contains("8MiB/s"),
        "{err}"
    );
}

#[test]
fn hostnames_share_a_port_and_bad_ones_name_their_line() {
    let head = "site = \"a\"\ngateways = [\"g:1\"]\n";
    let l = |name: &str, public: &str, names: &str| {
        format!("[[listener]]\nname = \"{name}\"\npublic = \"{public}\"\nbackend = \"h:1\"\nhostnames = [{names}]\n")
    };
    let two = format!(
        "{head}{}{}",
        l("a", "443", "\"Files.Example.COM.\", \"*.example.org\""),
        l("b", "443", "\"*\"")
    );
    let cfg = parse(&two).unwrap();
    let a = cfg.listener("a").unwrap();
    assert_eq!(a.hostnames, ["files.example.com", "*.example.org"]);
    let spec = a.spec();
    let (names, rest) = crate::protocol::hostnames::split(&spec.clients.except);
    assert_eq!(names, a.hostnames);
    assert!(rest.is_empty());
    // Without names, the digest is what it was before the key existed.
    let plain = format!("{head}[[listener]]\nname = \"a\"\npublic = \"443\"\nbackend = \"h:1\"\n");
    let json = serde_json::to_string(&parse(&plain).unwrap().listeners[0]).unwrap();
    assert!(!json.contains("hostnames"), "{json}");
    let cases = [
        (
            format!("{head}{}{}", l("a", "443", "\"x.example\""), l("b", "443", "\"X.example\"")),
            "agent.toml:12: listener \"b\": hostnames: \"x.example\" on 443 is already listener \"a\"'s",
        ),
        (
            format!("{head}{}[[listener]]\nname = \"b\"\npublic = \"443\"\nbackend = \"h:1\"\n", l("a", "443", "\"x.example\"")),
            "agent.toml:10: listener \"b\": public: 443 is shared by host name (listener \"a\")",
        ),
        (format!("{head}{}", l("a", "443-444", "\"x\"")), "agent.toml:7: listener \"a\": hostnames: a listener with host names has one public port"),
        (format!("{head}{}", l("a", "443", "")), "agent.toml:7: listener \"a\": hostnames: is empty"),
        (format!("{head}{}", l("a", "443", "\"a..b\"")), "agent.toml:7: listener \"a\": hostnames: \"a..b\" is not a host name"),
        (format!("{head}{}", l("a", "443", "\"x.*.org\"")), "is not a host name"),
        (format!("{head}{}", l("a", "443", "\"x\", \"X.\"")), "agent.toml:7: listener \"a\": hostnames: \"x\" is listed twice"),
        (format!("{head}{}protocol = \"udp\"\n", l("a", "53", "\"x\"")), "not for protocol = \"udp\""),
    ];
    for (text, want) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{e}\n  wanted: {want}");
    }
}

#[test]
fn udp_listeners_parse_and_refuse_what_udp_cannot_do() {
    let base = "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"dns\"\npublic = \"53\"\nbackend = \"10.0.0.53:53\"\nprotocol = \"udp\"\n";
    let cfg = parse(base).unwrap();
    let dns = cfg.listener("dns").unwrap();
    assert_eq!(
        dns.protocol,
        Protocol::Udp {
            idle_timeout: Duration::from_secs(60)
        }
    );
    assert!(crate::protocol::datagram::is_udp(
        &dns.spec().clients.except
    ));
    for (extra, line, says) in [
        ("proxy_protocol = \"v1\"\n", 8, "v1 has no UDP form"),
        (
            "impersonation = \"transparent\"\n",
            8,
            "not available for UDP",
        ),
        ("idle_timeout = \"10ms\"\n", 8, "idle_timeout"),
    ] {
        let e = parse(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("agent.toml:{line}: listener \"dns\"")),
            "{e}"
        );
        assert!(e.contains(says), "{e}");
    }
    let tcp_idle = base.replace("protocol = \"udp\"\n", "idle_timeout = \"5s\"\n");
    let e = parse(&tcp_idle).unwrap_err().to_string();
    assert!(e.contains("applies to protocol = \"udp\" only"), "{e}");
    let bad = base.replace("\"udp\"", "\"sctp\"");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.contains("expected \"tcp\" or \"udp\""), "{e}");
    // A TCP and a UDP listener may share a port; two UDP ones may not.
    let both = format!(
        "{base}[[listener]]\nname = \"dns-tcp\"\npublic = \"53\"\nbackend = \"10.0.0.53:53\"\n"
    );
    assert!(parse(&both).is_ok());
    let twice = format!("{both}[[listener]]\nname = \"dns2\"\npublic = \"53\"\nbackend = \"10.0.0.54:53\"\nprotocol = \"udp\"\n");
    let e = parse(&twice).unwrap_err().to_string();
    assert!(e.contains("overlaps listener \"dns\""), "{e}");
}

#[test]
fn a_tcp_only_config_keeps_its_digest() {
    // The digest of a config without UDP must not change with this version (agents of a
    // site are upgraded one at a time): a TCP listener serializes as the struct did before
    // `protocol` existed.
    #[derive(Serialize)]
    struct Before<'a> {
        name: &'a String,
        public: &'a PublicAddr,
        backend: &'a Backend,
        proxy_protocol: &'a ProxyProtocol,
        impersonation: &'a Impersonation,
        clients_text: &'a ClientRules,
    }
    let cfg = parse(EXAMPLE).unwrap();
    for l in &cfg.listeners {
        let before = Before {
            name: &l.name,
            public: &l.public,
            backend: &l.backend,
            proxy_protocol: &l.proxy_protocol,
            impersonation: &l.impersonation,
            clients_text: &l.clients_text,
        };
        assert_eq!(
            postcard::to_allocvec(l).unwrap(),
            postcard::to_allocvec(&before).unwrap()
        );
    }
    let mut udp = cfg.clone();
    udp.listeners[0].protocol = Protocol::Udp {
        idle_timeout: Duration::from_secs(60),
    };
    assert_ne!(cfg.digest(), udp.digest());
}

#[test]
fn auto_ban_parses_with_defaults_and_needs_a_trigger() {
    let with = |ab: &str| {
        EXAMPLE.replace(
            "proxy_protocol = \"none\"\n",
            &format!("proxy_protocol = \"none\"\nauto_ban = {{ {ab} }}\n"),
        )
    };
    let cfg = parse(&with("connections = 30, within = \"1m\"")).unwrap();
    let ab = cfg.listener("sftp").unwrap().auto_ban.clone().unwrap();
    assert_eq!((ab.connections, ab.short_connections), (Some(30), None));
    assert_eq!(
        (ab.within_ms, ab.ban_ms, ab.max_ban_ms),
        (60_000, 600_000, 86_400_000)
    );
    assert_eq!(cfg.auto_bans().unwrap().listeners.len(), 1);
    assert_ne!(cfg.digest(), parse(EXAMPLE).unwrap().digest());
    let err = parse(&with("within = \"1m\"")).unwrap_err().to_string();
    assert!(
        err.contains("agent.toml:9") && err.contains("short_connections"),
        "{err}"
    );
    let err = parse(&with("connections = 0, within = \"1m\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("auto_ban.connections") && err.contains("out of range"),
        "{err}"
    );
}

#[test]
fn design_example_parses() {
    let cfg = parse(EXAMPLE).unwrap();
    assert_eq!(cfg.site, "acme-mft");
    assert_eq!(
        cfg.gateways,
        ["dmz-gw1.example:44500", "dmz-gw2.example:44500"]
    );
    assert_eq!(cfg.listeners.len(), 2);
    let sftp = cfg.listener("sftp").unwrap();
    assert!(!sftp.clients.allows("198.51.100.9".parse().unwrap()));
    assert_eq!(sftp.backend_target(0).unwrap(), "10.0.0.5:22");
    let ftp = cfg.listener("ftp-pasv").unwrap();
    assert_eq!(ftp.backend_target(49).unwrap(), "10.0.0.6:30049");
    assert_eq!(cfg.heartbeat, Duration::from_secs(5));
    assert_eq!(cfg.reconnect.max, Duration::from_secs(30));
}

#[test]
fn the_issue_example_error() {
    let text = EXAMPLE.replace("backend = \"10.0.0.5:22\"", "backend = \"10.0.0.5\"");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "agent.toml:7: listener \"sftp\": backend: invalid socket address \"10.0.0.5\""
        ),
        "{err}"
    );
}

#[test]
fn semantic_errors_have_lines() {
    let cases = [
        ("site = \"a b\"\ngateways = [\"g:1\"]\n", "agent.toml:1: site:"),
        ("site = \"a\"\ngateways = []\n", "agent.toml:2: gateways: at least one"),
        ("site = \"a\"\ngateways = [\"g:1\"]\nheartbeat = \"1h\"\n", "agent.toml:3: heartbeat:"),
        (
            "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"x\"\npublic = \"1-3\"\nbackend = \"h:1-2\"\n",
            "agent.toml:6: listener \"x\": backend: range of 2 ports",
        ),
        (
            "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"x\"\npublic = \"10\"\nbackend = \"h:1\"\n[[listener]]\nname = \"x\"\npublic = \"11\"\nbackend = \"h:1\"\n",
            "agent.toml:8: listener \"x\": name: another listener",
        ),
        (
            "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"x\"\npublic = \"10-20\"\nbackend = \"h:1\"\n[[listener]]\nname = \"y\"\npublic = \"127.0.0.1:15\"\nbackend = \"h:1\"\n",
            "agent.toml:9: listener \"y\": public: 127.0.0.1:15 overlaps listener \"x\"",
        ),
        (
            "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"x\"\npublic = \"10\"\nbackend = \"h:1\"\nproxy_protocol = \"v3\"\n",
            "agent.toml:7: listener \"x\": proxy_protocol:",
        ),
        (
            "site = \"a\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"x\"\npublic = \"10\"\nbakend = \"h:1\"\n",
            "agent.toml:6: unknown field `bakend`",
        ),
        ("gateways = [\"g:1\"]\n", "agent.toml:1: missing field `site`"),
    ];
    for (text, want) in cases {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.starts_with(want), "got {err:?}, want {want:?}");
    }
}

#[test]
fn digest_depends_on_backends() {
    let a = parse(EXAMPLE).unwrap();
    let b = parse(&EXAMPLE.replace("10.0.0.5:22", "10.0.0.9:22")).unwrap();
    assert_eq!(a.digest(), parse(EXAMPLE).unwrap().digest());
    assert_ne!(a.digest(), b.digest());
    assert_eq!(a.digest().len(), 64);
}
