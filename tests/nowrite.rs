//! The gateway writes nothing to disk: run it under strace through a full session (TLS, agent,
//! transfers, refusals, a reload, a graceful stop) and check that no file was opened for
//! writing, created, renamed or removed.

mod support;

use std::path::Path;
use std::time::Duration;

use support::servers::EchoServer;
use support::*;

/// File syscalls that change the file system whatever their flags.
const MUTATING: &[&str] = &[
    "creat(",
    "rename(",
    "renameat(",
    "renameat2(",
    "unlink(",
    "unlinkat(",
    "mkdir(",
    "mkdirat(",
    "rmdir(",
    "link(",
    "linkat(",
    "symlink(",
    "symlinkat(",
    "truncate(",
    "chmod(",
    "fchmodat(",
    "chown(",
    "fchownat(",
    "mknod(",
    "mknodat(",
    "utimensat(",
];

/// Whether a traced open asks for write access or creation.
fn opens_for_writing(line: &str) -> bool {
    (line.contains("open(") || line.contains("openat(") || line.contains("openat2("))
        && ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND"]
            .iter()
            .any(|f| line.contains(f))
}

fn offending_lines(trace: &Path) -> Vec<String> {
    std::fs::read_to_string(trace)
        .unwrap()
        .lines()
        .filter(|l| opens_for_writing(l) || MUTATING.iter().any(|m| l.contains(m)))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_gateway_opens_no_file_for_writing_during_a_full_session() {
    assert!(
        Path::new("/usr/bin/strace").exists(),
        "strace is missing: run the tests with scripts/test.sh, which installs it"
    );
    let dir = Workdir::new();
    let certs = make_certs(&dir, "certs", &[]);
    let echo = EchoServer::start();
    let config = dir.write(
        "gateway.toml",
        &format!(
            "[control]\nlisten = \"127.0.0.1:0\"\n{}\n\n[clients]\nbind = \"127.0.0.1\"\n\n[peers]\ndefault = \"allow\"\nexcept = [\"127.0.0.66\"]\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            gateway_tls(&certs)
        ),
    );
    let trace = dir.path().join("gateway.strace");
    let gateway = Proc::spawn_program(
        "strace",
        "/usr/bin/strace",
        &[
            "-f",
            "-qq",
            "-e",
            "trace=%file",
            "-o",
            trace.to_str().unwrap(),
            BIN,
            "gateway",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let line = gateway.wait_for_log("control port listening on ", Duration::from_secs(20));
    let control: std::net::SocketAddr = line
        .rsplit("listening on ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let public = local(free_port());
    let agent = start_agent(
        &dir,
        "agent",
        &[control],
        &[listener("echo", public.port(), echo.addr)],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    wait_open(public, Duration::from_secs(20));
    // Payload through the gateway, both ways.
    for i in 0..20 {
        echo_round_trip(public, &format!("payload {i} {}", "x".repeat(10_000)));
    }
    // A denied peer and a garbage hello.
    let _ = support::wire::exchange(
        control,
        Some("127.0.0.66".parse().unwrap()),
        b"hi",
        true,
        Duration::from_secs(5),
    );
    let _ = support::wire::exchange(
        control,
        None,
        b"GET / HTTP/1.0\r\n\r\n",
        true,
        Duration::from_secs(5),
    );
    // A config push that changes the listeners.
    agent.signal("HUP");
    agent.wait_for_log("pushing generation 2", Duration::from_secs(5));
    echo_round_trip(public, "after the reload");

    // A graceful stop: SIGTERM to the gateway itself (the child of strace).
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", gateway.pid())).unwrap();
    let gateway_pid = children
        .split_whitespace()
        .next()
        .expect("the traced gateway")
        .to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &gateway_pid])
        .status()
        .unwrap();
    assert!(status.success());
    let mut gateway = gateway;
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(15)),
        Some(0),
        "strace (and the gateway) must exit cleanly"
    );

    let traced = std::fs::read_to_string(&trace).unwrap();
    assert!(
        traced.contains("gateway.crt"),
        "the trace must cover the gateway reading its certificate"
    );
    let offending = offending_lines(&trace);
    assert!(
        offending.is_empty(),
        "the gateway touched the file system for writing:\n{}",
        offending.join("\n")
    );
}

#[test]
fn the_detector_flags_writes_and_passes_reads() {
    assert!(opens_for_writing(
        r#"12 openat(AT_FDCWD, "/tmp/x", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3"#
    ));
    assert!(opens_for_writing(
        r#"12 openat(AT_FDCWD, "/tmp/x", O_RDWR|O_CLOEXEC) = 3"#
    ));
    assert!(!opens_for_writing(
        r#"12 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = 3"#
    ));
    assert!(MUTATING
        .iter()
        .any(|m| r#"12 renameat2(AT_FDCWD, "a", AT_FDCWD, "b", 0) = 0"#.contains(m)));
}
