//! A real OpenSSH server behind gateway + agent: a real `sftp` client uploads and downloads a
//! 64 MiB random file through the gateway; the bytes arrive unchanged both ways.

mod support;

use std::time::{Duration, Instant};

use support::sshd::{Sshd, TEST_USER};
use support::*;

const SIZE: usize = 64 * 1024 * 1024;

/// Uploads and downloads 64 MiB through `public`; asserts both copies are identical to the
/// source; returns the time taken.
fn put_and_get(dir: &Workdir, sshd: &Sshd, public: u16, tag: &str) -> Duration {
    let source = dir.path().join(format!("source-{tag}.bin"));
    std::fs::write(&source, pseudo_random(SIZE, 0x5a11)).unwrap();
    let source_sha = sha256_file(&source);
    let remote = sshd.data_dir.join(format!("uploaded-{tag}.bin"));
    let downloaded = dir.path().join(format!("downloaded-{tag}.bin"));
    let started = Instant::now();
    let out = sshd.sftp(
        public,
        &format!(
            "put {} {}\nget {} {}\n",
            source.display(),
            remote.display(),
            remote.display(),
            downloaded.display()
        ),
        dir,
    );
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "sftp ({tag}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256_file(&remote),
        source_sha,
        "upload ({tag}) changed the bytes"
    );
    assert_eq!(
        sha256_file(&downloaded),
        source_sha,
        "download ({tag}) changed the bytes"
    );
    took
}

#[test]
fn sftp_64_mib_over_mutual_tls() {
    let dir = Workdir::new();
    let sshd = Sshd::start(&dir);
    let certs = make_certs(&dir, "certs", &[]);
    let gateway = start_gateway_with(
        &dir,
        "gateway",
        &format!("listen = \"127.0.0.1:0\"\n{}", gateway_tls(&certs)),
        "",
    );
    let public = free_port();
    let agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("sftp", public, local(sshd.port))],
        &agent_tls(&certs, &certs, "agent"),
        "",
    );
    wait_open(local(public), Duration::from_secs(10));
    agent.wait_for_log("TLS 1.3, gateway verified", Duration::from_secs(1));
    let took = put_and_get(&dir, &sshd, public, "tls");
    eprintln!(
        "sftp 2 x 64 MiB over mutual TLS (control and data): {:.0} MB/s",
        2.0 * SIZE as f64 / 1e6 / took.as_secs_f64()
    );
}

#[test]
fn sftp_64_mib_up_and_down_through_the_gateway() {
    let dir = Workdir::new();
    let sshd = Sshd::start(&dir);
    let gateway = start_gateway(&dir, "");
    let public = free_port();
    let _agent = start_agent(
        &dir,
        "agent",
        &[gateway.control],
        &[listener("sftp", public, local(sshd.port))],
        "",
        "",
    );
    wait_open(local(public), Duration::from_secs(10));

    let through_gateway = put_and_get(&dir, &sshd, public, "gateway");
    // The same transfer straight to sshd, for the throughput comparison in the test output.
    let direct = put_and_get(&dir, &sshd, sshd.port, "direct");
    let mb = 2.0 * SIZE as f64 / 1e6;
    eprintln!(
        "sftp 2 x 64 MiB: through gateway {:.0} MB/s ({:.2} s), direct {:.0} MB/s ({:.2} s), ratio {:.2}",
        mb / through_gateway.as_secs_f64(),
        through_gateway.as_secs_f64(),
        mb / direct.as_secs_f64(),
        direct.as_secs_f64(),
        direct.as_secs_f64() / through_gateway.as_secs_f64(),
    );
    // sshd saw the session for the test user.
    assert!(sshd
        .log
        .lock()
        .iter()
        .any(|l| l.contains(&format!("Accepted publickey for {TEST_USER}"))));
}
