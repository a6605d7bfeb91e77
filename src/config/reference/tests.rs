//! Unit tests of `config::reference`: every key listed once, documented in docs/configuration.md,
//! and the same as the keys the parsers accept.

use super::*;
use std::collections::BTreeSet;

/// The rows of docs/configuration.md's tables under `heading`, as (key, cells).
fn documented(heading: &str) -> Vec<(String, Vec<String>)> {
    let doc = include_str!("../../../docs/configuration.md");
    let start = doc
        .find(heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no {heading:?}"));
    let section = &doc[start + heading.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect();
            let key = cells[0].trim_matches('`').to_string();
            (key, cells)
        })
        .collect()
}

/// Keys, reload words and defaults of one file: the parser, the key list, the settings of
/// a minimal file and the documentation must agree.
fn check(
    heading: &str,
    parsed: Vec<String>,
    keys: &[Key],
    defaults: &[Setting],
    no_default: &[&str],
) {
    let listed: BTreeSet<String> = keys.iter().map(|k| k.name.to_string()).collect();
    let parsed: BTreeSet<String> = parsed.into_iter().collect();
    assert_eq!(
        parsed, listed,
        "the parser's keys (left) and the key list in config/reference.rs (right) differ"
    );
    let rows = documented(heading);
    let docs: BTreeSet<String> = rows.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        docs, listed,
        "docs/configuration.md {heading} (left) and the key list (right) differ"
    );
    for (name, cells) in &rows {
        let key = keys.iter().find(|k| k.name == name).unwrap();
        // | key | type | default | SIGHUP | meaning |
        assert_eq!(
            cells[3],
            key.reload.word(),
            "docs/configuration.md: the SIGHUP column of {name}"
        );
        if no_default.contains(&name.as_str()) {
            continue;
        }
        if let Some(setting) = defaults.iter().find(|s| s.key == name) {
            let want = if setting.value.is_empty() {
                "none".to_string()
            } else {
                format!("`{}`", setting.value)
            };
            assert!(
                cells[2].starts_with(&want),
                    "docs/configuration.md: the default of {name} is {want} in the code, \"{}\" in the docs",
                cells[2]
            );
        }
    }
}

#[test]
fn gateway_keys_parser_list_and_docs_agree() {
    let defaults = crate::config::GatewayConfig::default().settings();
    let names: BTreeSet<&str> = defaults.iter().map(|s| s.key).collect();
    let listed: BTreeSet<&str> = GATEWAY_KEYS.iter().map(|k| k.name).collect();
    assert_eq!(names, listed, "GatewayConfig::settings() covers every key");
    check(
        "## gateway.toml",
        crate::config::gateway::traced_keys(),
        GATEWAY_KEYS,
        &defaults,
        // Required in a file; a gateway configured in code allows every peer.
        &["peers.default"],
    );
}

#[test]
fn agent_keys_parser_list_and_docs_agree() {
    let minimal = crate::config::AgentConfig::parse(
        std::path::Path::new("agent.toml"),
        "site = \"s\"\ngateways = [\"g\"]\n[outbound]\nlisten = \"127.0.0.1:1080\"\n",
    )
    .unwrap();
    let defaults = minimal.settings();
    let names: BTreeSet<&str> = defaults.iter().map(|s| s.key).collect();
    let listed: BTreeSet<&str> = AGENT_KEYS
        .iter()
        .map(|k| k.name)
        .filter(|k| !k.starts_with("listener."))
        .collect();
    assert_eq!(
        names, listed,
        "AgentConfig::settings() covers every key but the listeners'"
    );
    check(
        "## agent.toml",
        crate::config::agent::traced_keys(),
        AGENT_KEYS,
        &defaults,
        &["site", "name", "gateways", "outbound.listen"],
    );
}

#[test]
fn diff_names_changed_keys_and_hides_secrets() {
    let old = [
        Setting::new("a", 1),
        Setting::secret("t", None),
        Setting::secret("u", Some("one")),
    ];
    let new = [
        Setting::new("a", 2),
        Setting::secret("t", Some("s3cret")),
        Setting::secret("u", Some("two")),
    ];
    let keys = [key("a", Applied), key("t", Restart), key("u", Applied)];
    let changes = diff(&keys, &old, &new);
    let lines: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        lines,
        [
            "a: 1 -> 2: applied",
            "t: (none) -> (set): NOT applied: needs a restart",
            "u: (set) -> (a new value): applied",
        ]
    );
    assert!(!lines
        .iter()
        .any(|l| l.contains("s3cret") || l.contains("two")));
}
