//! Unit tests of `gateway::route`.

use super::*;

impl Owned for (String, String) {
    fn owner(&self) -> (&str, &str) {
        (&self.0, &self.1)
    }
}

fn owner(listener: &str) -> (String, String) {
    ("site".to_string(), listener.to_string())
}

fn table(routes: &[(&str, &[&str])]) -> Result<Table<(String, String)>, String> {
    let mut table = Table::default();
    let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
    for (listener, names) in routes {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        claim(&mut table, addr, owner(listener), &names)?;
    }
    Ok(table)
}

fn found(table: &Table<(String, String)>, name: Option<&str>) -> Option<String> {
    table.find(name).map(|r| r.1.clone())
}

#[test]
fn exact_beats_the_longest_wildcard_beats_the_default() {
    let t = table(&[
        ("files", &["files.example.org"]),
        ("org", &["*.example.org"]),
        ("deep", &["*.b.example.org"]),
        ("other", &["*"]),
    ])
    .unwrap();
    assert_eq!(
        found(&t, Some("files.example.org")).as_deref(),
        Some("files")
    );
    assert_eq!(found(&t, Some("www.example.org")).as_deref(), Some("org"));
    assert_eq!(found(&t, Some("a.www.example.org")).as_deref(), Some("org"));
    assert_eq!(found(&t, Some("a.b.example.org")).as_deref(), Some("deep"));
    assert_eq!(found(&t, Some("example.org")).as_deref(), Some("other"));
    assert_eq!(found(&t, None).as_deref(), Some("other"));
    let mut t = t;
    t.remove("site", "other");
    assert_eq!(found(&t, Some("example.org")), None);
    assert_eq!(found(&t, None), None);
    for l in ["files", "org", "deep"] {
        assert!(!t.is_empty());
        t.remove("site", l);
    }
    assert!(t.is_empty());
}

#[test]
fn a_name_belongs_to_one_listener_and_a_refused_claim_adds_nothing() {
    let err = table(&[("a", &["x.example"]), ("b", &["y.example", "x.example"])])
        .err()
        .unwrap();
    assert!(
        err.contains("\"x.example\" on port 443 is already served by listener \"a\""),
        "{err}"
    );
    let mut t = table(&[("a", &["x.example"])]).unwrap();
    let addr = "127.0.0.1:443".parse().unwrap();
    let names = ["y.example".to_string(), "x.example".to_string()];
    assert!(claim(&mut t, addr, owner("b"), &names).is_err());
    assert_eq!(found(&t, Some("y.example")), None, "all or nothing");
    // The same listener claiming its own name again is no conflict.
    assert!(claim(&mut t, addr, owner("a"), &names[1..]).is_ok());
}
