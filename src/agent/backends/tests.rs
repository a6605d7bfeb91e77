//! Unit tests of `agent::backends`.

use super::*;

fn set(balance: Balance, health: bool) -> BackendSet {
    let backends = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let health = health.then(|| HealthCheck {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
        http: None,
    });
    BackendSet::new(
        "web",
        BackendGroup {
            backends,
            balance,
            health,
        },
    )
}

#[test]
fn the_report_tells_a_failed_check_from_connect_failures() {
    let s = set(Balance::RoundRobin, true);
    s.check_failed(0, "connect: connection refused".into());
    for _ in 0..EJECT_AFTER {
        s.connect_failed(1, "connection refused");
    }
    let states: Vec<BackendState> = s.report().iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        [BackendState::Down, BackendState::Ejected, BackendState::Up]
    );
    s.check_passed(0);
    assert_eq!(s.report()[0].state, BackendState::Up);
    let json = serde_json::to_value(&s.report()[1]).unwrap();
    assert_eq!(json["state"], "ejected");
}

fn firsts(set: &BackendSet, n: usize) -> Vec<usize> {
    (0..n).map(|_| set.order()[0]).collect()
}

#[test]
fn round_robin_takes_turns_and_skips_an_ejected_backend() {
    let s = set(Balance::RoundRobin, true);
    assert_eq!(firsts(&s, 6), [0, 1, 2, 0, 1, 2]);
    // Every order holds each healthy backend once: the next ones are the retries.
    assert_eq!(s.order().len(), 3);
    for _ in 0..EJECT_AFTER - 1 {
        s.connect_failed(1, "connection refused");
    }
    assert_eq!(
        s.order().len(),
        3,
        "not ejected before {EJECT_AFTER} failures"
    );
    s.connect_failed(1, "connection refused");
    let orders: Vec<Vec<usize>> = (0..4).map(|_| s.order()).collect();
    assert!(
        orders.iter().all(|o| o.len() == 2 && !o.contains(&1)),
        "{orders:?}"
    );
    let report = s.report();
    assert!(!report[1].up && report[1].ejections == 1 && report[1].connect_failures == 3);
    // A passed check reinstates it.
    s.check_passed(1);
    assert_eq!(s.order().len(), 3);
    assert!(s.report()[1].up);
}

#[test]
fn a_success_clears_the_failures_in_a_row() {
    let s = set(Balance::RoundRobin, true);
    for _ in 0..10 {
        s.connect_failed(2, "refused");
        s.connect_failed(2, "refused");
        s.connected(2);
    }
    assert!(s.report()[2].up);
}

#[test]
fn failover_prefers_the_first_healthy_and_all_down_tries_all() {
    let s = set(Balance::Failover, true);
    assert_eq!(firsts(&s, 3), [0, 0, 0]);
    s.check_failed(0, "connect: refused".into());
    assert_eq!(s.order(), [1, 2]);
    s.check_failed(1, "x".into());
    s.check_failed(2, "x".into());
    assert_eq!(
        s.order(),
        [0, 1, 2],
        "none healthy: every backend, in list order"
    );
    assert_eq!(
        s.report()[0].last_error.as_deref(),
        Some("connect: refused")
    );
}

#[test]
fn least_connections_picks_the_least_busy() {
    let s = set(Balance::LeastConnections, true);
    s.members[0].active.store(5, Ordering::Relaxed);
    s.members[1].active.store(1, Ordering::Relaxed);
    s.members[2].active.store(3, Ordering::Relaxed);
    assert_eq!(firsts(&s, 3), [1, 1, 1]);
    assert_eq!(s.order(), [1, 2, 0]);
    // Equals take turns.
    s.members[2].active.store(1, Ordering::Relaxed);
    let mut seen = firsts(&s, 4);
    seen.sort();
    seen.dedup();
    assert_eq!(seen, [1, 2]);
}

#[test]
fn without_checks_an_ejected_backend_is_tried_again_later() {
    let s = set(Balance::RoundRobin, false);
    for _ in 0..EJECT_AFTER {
        s.connect_failed(0, "refused");
    }
    assert!(!s.order().contains(&0));
    // As if RETRY_AFTER had passed.
    *s.members[0].down_since.lock() = Some(Instant::now() - RETRY_AFTER);
    assert!(s.order().contains(&0));
    // On trial: one more failure takes it out again.
    s.connect_failed(0, "refused");
    assert!(!s.order().contains(&0));
    assert_eq!(s.report()[0].ejections, 2);
}

#[test]
fn the_registry_keeps_an_unchanged_set_and_replaces_a_changed_one() {
    let parse = |backends: &str| {
        let text = format!(
                "site = \"s\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"web\"\npublic = \"8080\"\nbackend = {backends}\n"
        );
        AgentConfig::parse(std::path::Path::new("agent.toml"), &text).unwrap()
    };
    let reg = Registry::default();
    let a = parse("[\"127.0.0.1:1\", \"127.0.0.1:2\"]");
    reg.sync(&a);
    let group = a.listeners[0].group.clone().unwrap();
    let first = reg.get("web", &group).unwrap();
    first.connect_failed(0, "x");
    reg.sync(&a);
    assert!(Arc::ptr_eq(&first, &reg.get("web", &group).unwrap()));
    let b = parse("[\"127.0.0.1:1\", \"127.0.0.1:3\"]");
    reg.sync(&b);
    assert!(reg.get("web", &group).is_none());
    assert!(reg
        .get("web", b.listeners[0].group.as_ref().unwrap())
        .is_some());
    reg.sync(&parse("\"127.0.0.1:1\""));
    assert!(reg.reports().is_empty());
}

#[tokio::test]
async fn all_down_only_when_health_checks_say_so() {
    let parse = |extra: &str| {
        let text = format!(
                "site = \"s\"\ngateways = [\"g:1\"]\n[[listener]]\nname = \"web\"\npublic = \"8080\"\nbackend = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n{extra}\n"
        );
        AgentConfig::parse(std::path::Path::new("agent.toml"), &text).unwrap()
    };
    let reg = Registry::default();
    let checked = parse("health = { interval = \"1h\" }");
    reg.sync(&checked);
    let set = reg
        .get("web", checked.listeners[0].group.as_ref().unwrap())
        .unwrap();
    set.check_failed(0, "down".into());
    assert!(!reg.all_down("web"), "one backend is still up");
    set.check_failed(1, "down".into());
    assert!(reg.all_down("web"));
    set.check_passed(1);
    assert!(!reg.all_down("web"));
    assert!(!reg.all_down("other"));
    // Without checks a client tries them all: never refused.
    let unchecked = parse("");
    reg.sync(&unchecked);
    let set = reg
        .get("web", unchecked.listeners[0].group.as_ref().unwrap())
        .unwrap();
    for i in [0, 1] {
        for _ in 0..EJECT_AFTER {
            set.connect_failed(i, "refused");
        }
    }
    assert!(!reg.all_down("web"));
}
