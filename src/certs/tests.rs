//! Unit tests of `certs`: init, issue, renew and revoke in a temporary directory, and what each
//! refuses.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn opts(dir: &Path) -> InitOptions {
    InitOptions {
        dir: dir.to_path_buf(),
        gateway_names: vec!["dmz-gw1.example".into()],
        gateway_ips: vec!["192.0.2.10".parse().unwrap()],
        agent_names: vec![],
        site: None,
        days: 30,
        force: false,
        new_ca: false,
    }
}

fn read(d: &Path, f: &str) -> Vec<u8> {
    std::fs::read(d.join(f)).unwrap()
}

#[test]
fn init_makes_every_file_and_tls_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let summary = init(&opts(dir.path())).unwrap();
    assert!(
        summary.contains("valid for dmz-gw1.example, 192.0.2.10"),
        "{summary}"
    );
    for f in [
        "ca.crt",
        "ca.key",
        "gateway.crt",
        "gateway.key",
        "agent.crt",
        "agent.key",
    ] {
        assert!(summary.contains(&format!("{}", dir.path().join(f).display())));
        let meta = std::fs::metadata(dir.path().join(f)).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if f.ends_with(".key") {
            assert_eq!(mode, 0o600, "{f}");
        } else {
            assert_eq!(mode, 0o644, "{f}");
        }
    }
    let d = dir.path();
    crate::transport::ServerTls::load(
        &d.join("gateway.crt"),
        &d.join("gateway.key"),
        &d.join("ca.crt"),
        None,
    )
    .unwrap();
    crate::transport::ClientTls::load(
        &d.join("ca.crt"),
        &d.join("agent.crt"),
        &d.join("agent.key"),
        None,
    )
    .unwrap();

    // Again: nothing is overwritten, and more agents come from the same CA.
    let ca_before = read(d, "ca.crt");
    let mut more = opts(d);
    more.agent_names = vec!["agent-b".into()];
    let summary = init(&more).unwrap();
    assert!(summary.contains("kept     "), "{summary}");
    assert!(summary.contains("the private CA (reused)"), "{summary}");
    assert_eq!(read(d, "ca.crt"), ca_before);
    assert!(d.join("agent-b.key").exists());
    assert!(init(&more)
        .unwrap_err()
        .to_string()
        .contains("already exists: nothing was written"));
}

#[test]
fn init_with_other_gateway_names_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    init(&opts(d)).unwrap();
    let before: Vec<Vec<u8>> = ["ca.crt", "gateway.crt", "agent.crt"]
        .iter()
        .map(|f| read(d, f))
        .collect();
    let mut other = opts(d);
    other.gateway_names = vec!["dmz-gw2.example".into()];
    other.gateway_ips = vec![];
    let err = init(&other).unwrap_err().to_string();
    assert!(
        err.contains("valid for dmz-gw1.example, 192.0.2.10, not for dmz-gw2.example"),
        "{err}"
    );
    assert!(err.contains("cert issue --dir"), "{err}");
    let after: Vec<Vec<u8>> = ["ca.crt", "gateway.crt", "agent.crt"]
        .iter()
        .map(|f| read(d, f))
        .collect();
    assert_eq!(before, after);
    // The same names in another order are the same certificate: kept.
    let mut same = opts(d);
    same.gateway_names = vec!["dmz-gw1.example".into()];
    let summary = init(&same).unwrap();
    assert!(
        summary.contains("the gateway certificate, valid for"),
        "{summary}"
    );
}

#[test]
fn force_rotates_the_leaves_and_keeps_the_ca_new_ca_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    init(&opts(d)).unwrap();
    let (ca, gw) = (read(d, "ca.crt"), read(d, "gateway.crt"));
    let mut force = opts(d);
    force.gateway_names = vec![];
    force.gateway_ips = vec![];
    force.force = true;
    let summary = init(&force).unwrap();
    assert_eq!(read(d, "ca.crt"), ca, "--force replaced the CA");
    assert_ne!(read(d, "gateway.crt"), gw);
    // No names given: the rotated certificate keeps the old names.
    assert_eq!(
        sans_of(&d.join("gateway.crt")).unwrap(),
        ["dmz-gw1.example", "192.0.2.10"]
    );
    assert!(summary.contains("replaced "), "{summary}");

    issue(&IssueOptions {
        dir: d.to_path_buf(),
        subject: Subject::Agent {
            name: "agent-b".into(),
            site: Some("acme".into()),
        },
        days: 5,
        force: false,
    })
    .unwrap();
    let info = crate::certinfo::CertInfo::from_pem_file(&d.join("agent-b.crt")).unwrap();
    assert_eq!(info.sites, ["acme"]);
    assert_eq!(info.common_name.as_deref(), Some("agent-b"));
    let mut new = opts(d);
    new.new_ca = true;
    let summary = init(&new).unwrap();
    assert_ne!(read(d, "ca.crt"), ca);
    assert!(summary.contains("a NEW private CA"), "{summary}");
    assert!(
        summary.contains("no longer valid: agent-b.crt"),
        "{summary}"
    );
}

#[test]
fn issue_writes_name_files_signed_by_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let gw2 = IssueOptions {
        dir: d.to_path_buf(),
        subject: Subject::Gateway {
            names: vec!["dmz-gw2.example".into(), "192.0.2.11".into()],
        },
        days: 10,
        force: false,
    };
    assert!(issue(&gw2).unwrap_err().to_string().contains("no CA in"));
    init(&opts(d)).unwrap();
    let summary = issue(&gw2).unwrap();
    assert!(
        summary.contains("valid for dmz-gw2.example, 192.0.2.11"),
        "{summary}"
    );
    crate::transport::ServerTls::load(
        &d.join("dmz-gw2.example.crt"),
        &d.join("dmz-gw2.example.key"),
        &d.join("ca.crt"),
        None,
    )
    .unwrap();
    assert!(issue(&gw2)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    for bad in [
        Subject::Agent {
            name: "ca".into(),
            site: None,
        },
        Subject::Agent {
            name: "../x".into(),
            site: None,
        },
        Subject::Agent {
            name: "edge".into(),
            site: Some("bad site".into()),
        },
        Subject::Gateway {
            names: vec!["*.example".into()],
        },
        Subject::Gateway {
            names: vec!["a/b".into()],
        },
        Subject::Gateway { names: vec![] },
    ] {
        let o = IssueOptions {
            subject: bad.clone(),
            ..gw2.clone()
        };
        assert!(issue(&o).is_err(), "{bad:?}");
    }
}
