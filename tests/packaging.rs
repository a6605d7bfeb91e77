//! The systemd units under packaging/systemd: `systemd-analyze verify` accepts them, their
//! offline security review rates them "OK", they declare the hardening docs/security.md
//! promises, and the gateway really runs as an unprivileged user holding CAP_NET_BIND_SERVICE
//! only, opening a public port below 1024.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

const UNITS: [&str; 2] = ["sallyport-gateway.service", "sallyport-agent.service"];

fn unit_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/systemd")
        .join(name)
}

/// `systemd-analyze`, or None with a message saying why the check is skipped.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "SKIPPED: systemd-analyze is not installed (Debian package systemd); scripts/test.sh \
             installs it"
        );
    }
    found.then_some("systemd-analyze")
}

/// The units with ExecStart pointing at the binary just built (verify checks it exists).
fn installable_copies(dir: &Workdir) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(unit_path(name)).unwrap();
            assert!(text.contains("ExecStart=/usr/bin/sallyport "), "{name}");
            dir.write(name, &text.replace("/usr/bin/sallyport", BIN))
        })
        .collect()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = Workdir::new();
    for unit in installable_copies(&dir) {
        // --man=no: the units name their man pages (Documentation=man:...), which only the
        // Debian package installs; tests/deb.rs verifies the installed units with them.
        let out = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", unit.display());
        // verify prints problems as warnings without failing: there must be none about us.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("sallyport")).collect();
        assert!(ours.is_empty(), "{}: {ours:#?}", unit.display());
    }
}

#[test]
fn units_rate_ok_in_the_offline_security_review() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = Workdir::new();
    for unit in installable_copies(&dir) {
        let out = Command::new(analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level: {stdout}"));
        // "→ Overall exposure level for sallyport-gateway.service: 1.7 OK 🙂"
        let score: f64 = line
            .rsplit(": ")
            .next()
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse {line:?}"));
        eprintln!("{line}");
        // systemd rates < 2.0 "OK" (the best band), 2.0-4.9 "MEDIUM", above "EXPOSED"/"UNSAFE".
        assert!(score < 2.0, "{line}");
    }
}

/// `key=value` lines of a unit, comments dropped.
fn directives(name: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(unit_path(name))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn value<'a>(d: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    d.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn units_declare_the_promised_hardening() {
    for name in UNITS {
        let d = directives(name);
        for (key, want) in [
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("MemoryDenyWriteExecute", "yes"),
            ("SystemCallArchitectures", "native"),
            ("RestrictSUIDSGID", "yes"),
        ] {
            assert_eq!(value(&d, key), [want], "{name}: {key}");
        }
        assert!(value(&d, "User").is_empty(), "{name}: no fixed user");
        // No writable path anywhere: the DMZ side writes nothing to disk.
        for key in [
            "ReadWritePaths",
            "StateDirectory",
            "CacheDirectory",
            "LogsDirectory",
        ] {
            assert!(value(&d, key).is_empty(), "{name}: {key}");
        }
    }
    let gateway = directives("sallyport-gateway.service");
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert_eq!(
            value(&gateway, key),
            ["CAP_NET_BIND_SERVICE"],
            "gateway {key}"
        );
    }
    let agent = directives("sallyport-agent.service");
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        assert_eq!(value(&agent, key), [""], "agent {key}: no capability");
    }
}

/// A free loopback port below 1024 (only root or CAP_NET_BIND_SERVICE may bind it).
fn free_low_port() -> u16 {
    (700..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("no free port between 700 and 1000")
}

/// The `Uid:` and `CapEff:` lines of /proc/PID/status.
fn identity(pid: u32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("CapEff:"))
}

#[test]
fn the_gateway_runs_as_nobody_with_only_net_bind_service() {
    let has_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let is_root = identity(std::process::id()).0.starts_with("0 ");
    if !has_setpriv || !is_root {
        eprintln!("SKIPPED: needs root and setpriv (util-linux) to drop to nobody");
        return;
    }
    // A directory nobody can read: the test's temp dir is private to root.
    let dir = Workdir::new();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    for d in [dir.path(), shared.as_path()] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let bin = shared.join("sallyport");
    std::fs::copy(BIN, &bin).unwrap();
    let config = shared.join("gateway.toml");
    std::fs::write(
        &config,
        "[control]\nlisten = \"127.0.0.1:0\"\n\n[clients]\nbind = \"127.0.0.1\"\n\n[peers]\ndefault = \"deny\"\nexcept = [\"127.0.0.1\"]\n",
    )
    .unwrap();

    // What the unit does: another user, no groups, CAP_NET_BIND_SERVICE as the only
    // capability (bounding, inheritable and ambient sets), no new privileges.
    let proc = Proc::spawn_program(
        "gateway",
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--bounding-set=-all,+net_bind_service",
            "--inh-caps=-all,+net_bind_service",
            "--ambient-caps=-all,+net_bind_service",
            "--no-new-privs",
            "--",
            bin.to_str().unwrap(),
            "gateway",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let line = proc.wait_for_log("control port listening on ", Duration::from_secs(10));
    let control: std::net::SocketAddr = line
        .rsplit("control port listening on ")
        .next()
        .unwrap()
        .split([' ', '/'])
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (uid, caps) = identity(proc.pid());
    assert_eq!(uid, "65534 65534 65534 65534");
    assert_eq!(
        caps, "0000000000000400",
        "CAP_NET_BIND_SERVICE (bit 10) only"
    );

    let echo = EchoServer::start();
    let port = free_low_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[control],
        &[listener("low", port, echo.addr)],
        "",
        "",
    );
    wait_open(local(port), Duration::from_secs(10));
    echo_round_trip(local(port), "through a privileged port, opened by nobody");
}
