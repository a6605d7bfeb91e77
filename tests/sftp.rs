//! A real OpenSSH server behind gateway + agent: a real `sftp` client uploads and downloads a
//! 64 MiB random file through the gateway; the bytes arrive unchanged both ways.

mod support;

use std::time::{Duration, Instant};

use support::sshd::{Sshd, TEST_USER};
use support::*;

const SIZE: usize = 64 * 1024 * 1024;

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

    let source = dir.path().join("source.bin");
    std::fs::write(&source, pseudo_random(SIZE, 0x5a11)).unwrap();
    let source_sha = sha256_file(&source);
    let remote = sshd.data_dir.join("uploaded.bin");
    let downloaded = dir.path().join("downloaded.bin");

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
        &dir,
    );
    let through_gateway = started.elapsed();
    assert!(
        out.status.success(),
        "sftp through the gateway failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&remote), source_sha, "upload changed the bytes");
    assert_eq!(
        sha256_file(&downloaded),
        source_sha,
        "download changed the bytes"
    );

    // The same transfer straight to sshd, for the throughput comparison in the test output.
    let direct_remote = sshd.data_dir.join("direct.bin");
    let direct_down = dir.path().join("direct-down.bin");
    let started = Instant::now();
    let out = sshd.sftp(
        sshd.port,
        &format!(
            "put {} {}\nget {} {}\n",
            source.display(),
            direct_remote.display(),
            direct_remote.display(),
            direct_down.display()
        ),
        &dir,
    );
    let direct = started.elapsed();
    assert!(out.status.success(), "direct sftp failed");
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
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("Accepted publickey for {TEST_USER}"))));
}
