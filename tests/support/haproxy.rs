//! A real HAProxy in TCP mode in front of gateways, as docs/deployment.md configures it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{local, wait_open, Workdir};

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// A real HAProxy in TCP mode with health checks, in the foreground.
pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// One frontend per (frontend port, backend port), each balancing over `gateway_ips`.
    pub fn start(dir: &Workdir, fronts: &[(u16, u16)], gateway_ips: &[&str]) -> Haproxy {
        Self::start_with(dir, fronts, gateway_ips, "")
    }

    /// [`Haproxy::start`] with more options on every `server` line (e.g. `send-proxy-v2`).
    pub fn start_with(
        dir: &Workdir,
        fronts: &[(u16, u16)],
        gateway_ips: &[&str],
        server_options: &str,
    ) -> Haproxy {
        assert!(
            std::path::Path::new(HAPROXY).exists(),
            "{HAPROXY} is missing: run the tests with scripts/test.sh, which installs haproxy"
        );
        let mut cfg = format!("global\n  maxconn 4000\n\n{}", documented_defaults());
        for (i, (front, back)) in fronts.iter().enumerate() {
            cfg.push_str(&format!(
                "\nfrontend f{i}\n  bind 127.0.0.1:{front}\n  default_backend b{i}\n\nbackend b{i}\n  balance roundrobin\n"
            ));
            for (j, ip) in gateway_ips.iter().enumerate() {
                cfg.push_str(&format!(
                    "  server gw{} {ip}:{back} check inter 200ms fall 2 rise 2 {server_options}\n",
                    j + 1
                ));
            }
        }
        let path = dir.write("haproxy.cfg", &cfg);
        let child = Command::new(HAPROXY)
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        for (front, _) in fronts {
            wait_open(local(*front), Duration::from_secs(10));
        }
        Haproxy { child }
    }
}

/// The `defaults` section of docs/deployment.md's HAProxy example, as an operator copies it,
/// with `timeout client` and `timeout server` shortened to 1 s so that a test can see that
/// `timeout tunnel` (which the example must have) keeps idle sessions open past them.
fn documented_defaults() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/deployment.md"))
        .unwrap();
    let start = doc
        .find("\ndefaults\n")
        .expect("deployment.md has an HAProxy defaults section");
    let section = &doc[start + 1..];
    let end = section.find("\n\n").expect("the defaults section ends");
    section[..end]
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["timeout", which @ ("client" | "server"), ..] => {
                    format!("  timeout {which} 1s\n")
                }
                _ => format!("{line}\n"),
            }
        })
        .collect()
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
