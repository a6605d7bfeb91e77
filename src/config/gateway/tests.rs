//! `GatewayConfig::parse` as a whole: the documented example, defaults, and errors that
//! name their line and field.

use super::*;

fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
    GatewayConfig::parse(Path::new("gateway.toml"), text)
}

#[test]
fn design_example_parses() {
    let cfg = parse(
        r#"
[control]
listen = "0.0.0.0:44500"

[peers]
default = "allow"
except = ["10.0.0.*", "10.1.0.0/16", "10.2.0.10-10.2.0.20", "fd00::/8"]

[clients]
bind = "0.0.0.0"

[egress]
allow = ["sftp.partner.example:22", "203.0.113.0/24:443"]

[admin]
listen = "127.0.0.1:9090"
"#,
    )
    .unwrap();
    assert_eq!(cfg.control_listen, "0.0.0.0:44500".parse().unwrap());
    assert!(!cfg.peers.allows("10.0.0.3".parse().unwrap()));
    assert!(cfg.peers.allows("10.3.0.3".parse().unwrap()));
    assert!(cfg.tls.is_none());
    assert_eq!(cfg.egress.len(), 2);
    assert!(cfg.egress.allows_name("sftp.partner.example", 22));
}

#[test]
fn agents_bind_only_where_the_owner_allows() {
    let cfg = parse(
        "[peers]\ndefault = \"allow\"\n[clients]\nbind = \"127.0.0.10\"\nallow_ips = [\"127.0.0.11\"]\nports = [\"2222\", \"30000-30100\"]\n",
    )
    .unwrap();
    let ok = |s: &str| cfg.check_public(&s.parse().unwrap());
    assert!(ok("2222").is_ok());
    assert!(ok("127.0.0.10:30000-30100").is_ok());
    assert!(ok("127.0.0.11:30050").is_ok());
    let e = ok("127.0.0.1:2222").unwrap_err();
    assert!(e.contains("127.0.0.1 is not an address"), "{e}");
    assert!(ok("0.0.0.0:2222").is_err());
    let e = ok("81").unwrap_err();
    assert!(e.contains("port 81 is outside"), "{e}");
    assert!(ok("30090-30101").is_err());
}

#[test]
fn peers_must_be_written() {
    let err = parse("").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml: no [peers] section"),
        "{err}"
    );
    let err = parse("[peers]\nexcept = [\"10.0.0.1\"]\n").unwrap_err();
    assert!(
        err.to_string().contains("peers.default is required"),
        "{err}"
    );
    let cfg = parse("[peers]\ndefault = \"allow\"\n").unwrap();
    assert!(cfg
        .notices
        .iter()
        .any(|n| n.contains("[peers] default = \"allow\"")));
    let cfg = parse("[peers]\ndefault = \"deny\"\nexcept = [\"10.0.0.1\"]\n").unwrap();
    assert!(!cfg.notices.iter().any(|n| n.contains("[peers]")));
}

#[test]
fn empty_file_means_defaults() {
    let cfg = parse("[peers]\ndefault = \"allow\"\n").unwrap();
    assert_eq!(cfg.control_listen.port(), DEFAULT_CONTROL_PORT);
    assert_eq!(cfg.limits, Limits::default());
}

#[test]
fn errors_name_line_and_field() {
    let err = parse("[control]\nlisten = \"44500\"\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "gateway.toml:2: control.listen: invalid socket address \"44500\" (e.g. \"0.0.0.0:44500\")"
    );
    let err = parse("[peers]\nexcept = [\n  \"10.0.0.1\",\n  \"10.0.*.1\",\n]\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml:4: peers.except: invalid wildcard"),
        "{err}"
    );
    let err = parse("[limits]\npending_timeout = \"forever\"\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml:2: limits.pending_timeout: invalid duration"),
        "{err}"
    );
    let err = parse("[control]\ntls = { cert = \"nope.crt\", key = \"k\", client_ca = \"c\" }\n")
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml:2: control.tls: cannot read"),
        "{err}"
    );
    let err = parse("[limits]\nmax_connections = 0\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml:2: limits.max_connections: 0 is outside"),
        "{err}"
    );
    let err = parse("[control]\nlisen = \"x\"\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("gateway.toml:2: unknown field `lisen`"),
        "{err}"
    );
}
