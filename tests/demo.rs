//! `sallyport demo` says "running" only when what answers on its port is the demo itself.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::*;

/// Issue 13 item 4: port taken by another program (an HTTP server here). The demo must not say
/// "running" (on main it did, and curl reached the other program): it exits non-zero at once
/// with the reason and `--port`.
#[test]
fn demo_refuses_a_port_another_program_holds() {
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = other.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in other.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nsomeone else\r\n",
            );
        }
    });
    let started = Instant::now();
    let mut demo = Proc::spawn("demo", &["demo", "--port", &port.to_string()]);
    let code = demo.wait_exit(Duration::from_secs(20));
    let log = demo.log_lines().join("\n");
    assert_eq!(code, Some(1), "{log}");
    assert!(started.elapsed() < Duration::from_secs(15), "{log}");
    assert!(!log.contains("demo is running"), "{log}");
    assert!(
        log.contains(&format!("the demo cannot listen on 127.0.0.1:{port}"))
            && log.contains("address in use")
            && log.contains(&format!("sallyport demo --port {}", port + 1)),
        "{log}"
    );
}

/// The good case says running after its own test request, and a client gets the demo's page.
#[test]
fn demo_says_running_after_it_has_seen_its_own_page() {
    let port = free_port();
    let demo = Proc::spawn("demo", &["demo", "--port", &port.to_string()]);
    demo.wait_for_log("Sallyport demo is running", Duration::from_secs(15));
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-i",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains("Hello from the demo backend behind Sallyport!"),
        "{page}"
    );
    assert!(page.contains("X-Sallyport-Demo: "), "{page}");
}
